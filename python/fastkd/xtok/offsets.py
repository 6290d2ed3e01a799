"""byte_offsets: each token's [start, end) UTF-8 byte span in its text, from a fast tokenizer's
character offsets.

A fast tokenizer reports offsets in characters (code points). Bytes are what two tokenizers
share, and characters are too coarse where a tokenizer splits one character into several tokens
as bytes (byte-fallback pieces ``<0xE4><0xBD><0xA0>`` for 你, or byte-level BPE tokens holding
part of an emoji's four bytes): all pieces then report the same character span, so their ends
never match the other side's at the character's inner bytes and, worse, they look like one
token. Such a run of tokens sharing one span is split by each token's own byte length where the
lengths add up to the span's (``token_bytes``), else left sharing it (they then fall in one
chunk together).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .vocab_map import token_bytes

__all__ = ["TokenSpans", "byte_offsets", "char_to_byte_table"]


class TokenSpans(NamedTuple):
    """Output of ``byte_offsets``.

    Attributes:
        input_ids: int64 ``[B, T]`` token ids (padding: the tokenizer's pad id).
        spans: int64 ``[B, T, 2]`` ``[start, end)`` byte offsets into each text's UTF-8 bytes;
            special tokens get an empty span at their start, padding ``(-1, -1)``.
        attention_mask: bool ``[B, T]``, False at padding.
        special_mask: bool ``[B, T]``, True at special tokens (BOS, EOS, chat markers) and
            padding.
    """

    input_ids: torch.Tensor
    spans: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor


def char_to_byte_table(text: str) -> np.ndarray:
    """int64 ``[len(text) + 1]``: the byte offset of each character offset of ``text`` in its
    UTF-8 encoding (``table[len(text)]`` is the byte length)."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    lengths = (
        1
        + (code_points >= 0x80).astype(np.int64)
        + (code_points >= 0x800)
        + (code_points >= 0x10000)
    )
    table = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(lengths, out=table[1:])
    return table


def _split_shared_spans(spans: np.ndarray, live: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Splits runs of consecutive tokens reporting the same non-empty span by the tokens' own
    byte lengths ``own``, where those add up to the span's length (one row)."""
    n = len(spans)
    if n < 2:
        return spans
    same = np.zeros(n, dtype=bool)
    same[1:] = (
        live[1:] & live[:-1] & (spans[1:, 0] == spans[:-1, 0]) & (spans[1:, 1] == spans[:-1, 1])
    )
    if not same.any():
        return spans
    head = np.maximum.accumulate(np.where(same, 0, np.arange(n)))  # first token of each run
    before = np.cumsum(own) - own
    offset = before - before[head]  # bytes of the run before this token
    run_total = np.zeros(n, dtype=np.int64)
    np.add.at(run_total, head, own)
    in_run = same | np.isin(np.arange(n), head[same])
    exact = in_run & (run_total[head] == spans[head, 1] - spans[head, 0])
    out = spans.copy()
    out[exact, 0] = spans[exact, 0] + offset[exact]
    out[exact, 1] = out[exact, 0] + own[exact]
    return out


def _byte_lengths(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per id: the byte length of its vocabulary entry (-1 for special tokens), and whether the
    entry starts with a space."""
    table = token_bytes(tokenizer)
    lengths = np.array([-1 if b is None else len(b) for b in table] + [-1], dtype=np.int64)
    space = np.array([b is not None and b[:1] == b" " for b in table] + [False])
    return lengths, space


def byte_offsets(
    tokenizer,
    texts: list[str],
    *,
    add_special_tokens: bool = True,
    padding_side: str = "right",
    max_length: int | None = None,
) -> TokenSpans:
    """Tokenizes ``texts`` and returns each token's byte span in its text.

    Args:
        tokenizer: a fast Hugging Face tokenizer (``PreTrainedTokenizerFast``); its character
            offsets are converted to bytes through the UTF-8 length of each character.
        texts: the texts, one per sequence.
        add_special_tokens: let the tokenizer add its BOS/EOS (they get empty spans).
        padding_side: ``"right"`` or ``"left"``; sequences are padded to the longest.
        max_length: truncate to this many tokens (None: no truncation).

    Returns:
        ``TokenSpans(input_ids, spans, attention_mask, special_mask)``.

    Raises:
        TypeError: the tokenizer gives no character offsets (a slow tokenizer); see
            ``TokenAligner(..., fallback="mined")``.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"byte_offsets needs a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} has none. Use TokenAligner(..., "
            f"fallback='mined') to align by token strings instead"
        )
    texts = list(texts)
    enc = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    rows = enc["input_ids"]
    width = max((len(r) for r in rows), default=0)
    batch = len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    spans = np.full((batch, width, 2), -1, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=bool)
    special = np.ones((batch, width), dtype=bool)
    special_ids = np.array(sorted(tokenizer.all_special_ids), dtype=np.int64)
    lengths, leading_space = _byte_lengths(tokenizer)
    for b, (text, row, offsets) in enumerate(zip(texts, rows, enc["offset_mapping"])):
        n = len(row)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        row_ids = np.asarray(row, dtype=np.int64)
        row_special = np.isin(row_ids, special_ids)
        char_spans = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
        row_spans = char_to_byte_table(text)[char_spans]
        row_spans[row_special, 1] = row_spans[row_special, 0]
        live = row_spans[:, 1] > row_spans[:, 0]
        known = np.minimum(row_ids, len(lengths) - 1)
        own = lengths[known]
        # A space marker the tokenizer prepends (SentencePiece's leading "▁") stands for no
        # byte of the text: such a token holds one byte less than its entry.
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        at = np.clip(row_spans[:, 0], 0, max(len(data) - 1, 0))
        text_space = (data[at] == 0x20) if len(data) else np.zeros(n, dtype=bool)
        own = own - (leading_space[known] & ~text_space)
        row_spans = _split_shared_spans(row_spans, live, own)
        ids[b, cols], spans[b, cols], mask[b, cols], special[b, cols] = (
            row_ids,
            row_spans,
            True,
            row_special,
        )
    return TokenSpans(
        torch.from_numpy(ids),
        torch.from_numpy(spans),
        torch.from_numpy(mask),
        torch.from_numpy(special),
    )
