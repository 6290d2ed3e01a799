"""TokenAligner: tokenizes the same texts with a student's and a teacher's tokenizer and aligns
the two into chunks (``align_spans``), with per-side prefixes (chat templates), prompt /
completion masks, BOS/EOS on either side and left or right padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .align import align_spans
from .mined import spans_by_edit_distance
from .offsets import TokenSpans, byte_offsets

__all__ = ["AlignedBatch", "TokenAligner"]


@dataclass
class AlignedBatch:
    """The two tokenizations of a batch and their alignment.

    ``B`` texts, ``T_s`` / ``T_t`` tokens per side (padded), ``C`` chunk slots. Spans are byte
    offsets into the shared text (prefix excluded); tokens outside it (prefix, BOS/EOS, other
    special tokens, padding) are in no chunk (-1).
    """

    student_input_ids: torch.Tensor  # int64 [B, T_s]
    student_attention_mask: torch.Tensor  # bool [B, T_s]
    student_spans: torch.Tensor  # int64 [B, T_s, 2]
    student_chunk_id: torch.Tensor  # int32 [B, T_s]
    teacher_input_ids: torch.Tensor  # int64 [B, T_t]
    teacher_attention_mask: torch.Tensor  # bool [B, T_t]
    teacher_spans: torch.Tensor  # int64 [B, T_t, 2]
    teacher_chunk_id: torch.Tensor  # int32 [B, T_t]
    num_chunks: torch.Tensor  # int32 [B]
    chunk_mask: torch.Tensor  # bool [B, C]: chunks counted (the completion's)
    student_completion_mask: torch.Tensor  # bool [B, T_s]: tokens of counted chunks
    teacher_completion_mask: torch.Tensor  # bool [B, T_t]


def _check_texts(name: str, texts, batch: int | None) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must be a list of str")
    texts = list(texts)
    if batch is not None and len(texts) != batch:
        raise ValueError(f"{name} has {len(texts)} entries but the batch has {batch} texts")
    return texts


class TokenAligner:
    """Aligns a student's and a teacher's tokenizations of the same texts.

    Args:
        student_tokenizer, teacher_tokenizer: Hugging Face tokenizers. Fast ones give exact
            byte spans from their offsets (``byte_offsets``).
        fallback: None (a tokenizer without offsets raises), or ``"mined"``: spans for such a
            tokenizer from its tokens' decoded strings, aligned to the text by edit distance
            (``fastkd.xtok.mined``; exact only where the strings agree, slower).
        add_special_tokens: let each tokenizer add its own BOS/EOS (in no chunk).

    Calling it with ``texts`` (or ``prompts`` and ``completions``, each text being their
    concatenation) tokenizes ``prefix + text`` on each side, where a prefix (per side, per
    text: a chat template's rendering up to the content, say) is model-specific and in no
    chunk, and returns an ``AlignedBatch``. With prompts, ``chunk_mask`` counts the chunks that
    start at or after the completion's first byte (a chunk straddling the boundary is left out);
    else every chunk.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        *,
        fallback: str | None = None,
        add_special_tokens: bool = True,
    ):
        if fallback not in (None, "mined"):
            raise ValueError(f"fallback must be None or 'mined'; got {fallback!r}")
        for name, tok in (
            ("student_tokenizer", student_tokenizer),
            ("teacher_tokenizer", teacher_tokenizer),
        ):
            if not getattr(tok, "is_fast", False) and fallback is None:
                raise TypeError(
                    f"{name} ({type(tok).__name__}) gives no character offsets; pass "
                    f"a fast tokenizer, or fallback='mined' to align by token "
                    f"strings and edit distance"
                )
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.fallback = fallback
        self.add_special_tokens = add_special_tokens

    def _side(self, tokenizer, texts, prefixes, padding_side) -> TokenSpans:
        prefixes = prefixes or [""] * len(texts)
        full = [p + t for p, t in zip(prefixes, texts)]
        if getattr(tokenizer, "is_fast", False):
            out = byte_offsets(
                tokenizer,
                full,
                add_special_tokens=self.add_special_tokens,
                padding_side=padding_side,
            )
        else:
            out = _mined_offsets(tokenizer, full, self.add_special_tokens, padding_side)
        shift = torch.tensor([len(p.encode("utf-8")) for p in prefixes], dtype=torch.int64)
        spans = out.spans.clone()
        live = spans[..., 1] > spans[..., 0]
        in_text = live & (spans[..., 1] > shift[:, None])
        shifted = (spans - shift[:, None, None]).clamp(min=0)
        spans = torch.where(
            in_text.unsqueeze(-1), shifted, torch.where(live.unsqueeze(-1), 0, spans)
        )
        return out._replace(spans=spans)

    def __call__(
        self,
        texts: list[str] | None = None,
        *,
        prompts: list[str] | None = None,
        completions: list[str] | None = None,
        student_prefixes: list[str] | None = None,
        teacher_prefixes: list[str] | None = None,
        padding_side: str = "right",
        backend: str = "auto",
    ) -> AlignedBatch:
        """Tokenizes and aligns a batch (see the class docstring)."""
        if (texts is None) == (completions is None):
            raise ValueError("pass either texts, or completions (with prompts)")
        if texts is None:
            completions = _check_texts("completions", completions, None)
            prompts = _check_texts("prompts", prompts, len(completions)) or [""] * len(completions)
            texts = [p + c for p, c in zip(prompts, completions)]
        else:
            texts = _check_texts("texts", texts, None)
            if prompts is not None:
                raise ValueError("prompts go with completions, not with texts")
        student_prefixes = _check_texts("student_prefixes", student_prefixes, len(texts))
        teacher_prefixes = _check_texts("teacher_prefixes", teacher_prefixes, len(texts))
        s = self._side(self.student_tokenizer, texts, student_prefixes, padding_side)
        t = self._side(self.teacher_tokenizer, texts, teacher_prefixes, padding_side)
        aligned = align_spans(s.spans, t.spans, backend=backend)
        prompt_bytes = torch.tensor(
            [len(p.encode("utf-8")) for p in (prompts or [])] or [0] * len(texts), dtype=torch.int64
        )
        width = int(aligned.num_chunks.max()) if len(texts) else 0
        chunk_start = _chunk_starts(s.spans, aligned.student_chunk_id, width)
        exists = torch.arange(width) < aligned.num_chunks[:, None]
        mask = exists & (chunk_start >= prompt_bytes[:, None])

        def token_mask(ids):
            return (ids >= 0) & mask.gather(1, ids.clamp(min=0).long()) if width else ids >= 0

        return AlignedBatch(
            s.input_ids,
            s.attention_mask,
            s.spans,
            aligned.student_chunk_id,
            t.input_ids,
            t.attention_mask,
            t.spans,
            aligned.teacher_chunk_id,
            aligned.num_chunks,
            mask,
            token_mask(aligned.student_chunk_id),
            token_mask(aligned.teacher_chunk_id),
        )


def _chunk_starts(spans: torch.Tensor, chunk_id: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``[B, width]``: each chunk's first byte (the previous chunk's end; the first live
    token's start for chunk 0)."""
    batch = spans.shape[0]
    ids = chunk_id.long()
    ends = torch.full((batch, width + 1), -1, dtype=torch.int64)
    ends.scatter_reduce_(1, ids + 1, spans[..., 1], reduce="amax")
    live = ids >= 0
    big = torch.iinfo(torch.int64).max
    first = (
        torch.where(live, spans[..., 0], big).amin(dim=1)
        if spans.shape[1]
        else torch.zeros(batch, dtype=torch.int64)
    )
    starts = torch.cat([first[:, None], ends[:, 1:width]], dim=1)
    return starts[:, :width]


def _mined_offsets(tokenizer, texts, add_special_tokens, padding_side) -> TokenSpans:
    """``byte_offsets`` for a tokenizer without offsets, by ``spans_by_edit_distance``."""
    special_ids = set(tokenizer.all_special_ids)
    rows = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    spans = np.full((len(rows), width, 2), -1, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    special = np.ones((len(rows), width), dtype=bool)
    for b, (text, row) in enumerate(zip(texts, rows)):
        pieces = [
            None
            if i in special_ids
            else tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)])
            for i in row
        ]
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, cols] = row
        spans[b, cols] = spans_by_edit_distance(pieces, text)
        mask[b, cols] = True
        special[b, cols] = [p is None for p in pieces]
    return TokenSpans(
        torch.from_numpy(ids),
        torch.from_numpy(spans),
        torch.from_numpy(mask),
        torch.from_numpy(special),
    )
