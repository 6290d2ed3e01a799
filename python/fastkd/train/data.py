"""Training data: documents tokenized into next-token sequences of a fixed length, and batches
of them.

Two kinds of document (``documents``: reading and the train/eval split): plain text, packed into
one token stream cut into sequences (every token after the first is predicted once), and
prompt/completion pairs, one sequence each, where only the completion (and the eos token after
it) is predicted. The order in which optimizer steps visit the sequences is ``step_sampler``'s.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from .documents import Document, read_documents, split_documents
from .step_sampler import StepSampler

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "SequenceDataset",
    "StepSampler",
    "Packing",
    "collate",
    "pack_documents",
    "read_documents",
    "sequences_of",
    "split_documents",
    "tokenize_documents",
]

IGNORE_INDEX = -100  # the label of positions with nothing to predict (torch's cross_entropy)


class SequenceDataset(torch.utils.data.Dataset):
    """Fixed-length next-token sequences, all held in memory.

    Attributes:
        input_ids: ``[N, T]`` int64 token ids (the pad id at padding).
        labels: ``[N, T]`` int64: ``labels[i, t]`` is the token to predict at position t (the
            one after it), ``IGNORE_INDEX`` (-100) where nothing is predicted.
        attention_mask: ``[N, T]`` int64, 1 on tokens, 0 on padding.
        extra: further per-sequence tensors ``[N, ...]`` that each item carries under its key
            (the teacher's tokenization and the chunk alignment of a cross-tokenizer run).
        fingerprint: sha256 hex digest of the shape and all tensors: equal exactly when the
            sequences, their tokens and their order are equal.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        for name, t in (
            ("input_ids", input_ids),
            ("labels", labels),
            ("attention_mask", attention_mask),
        ):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype != torch.int64
                or t.dim() != 2
                or t.shape != input_ids.shape
                or t.device.type != "cpu"
            ):
                raise ValueError(
                    f"{name} must be a CPU int64 tensor [N, T] of one shape with "
                    f"the others; got {getattr(t, 'dtype', type(t).__name__)} "
                    f"{tuple(getattr(t, 'shape', ()))}"
                )
        self.input_ids = input_ids.contiguous()
        self.labels = labels.contiguous()
        self.attention_mask = attention_mask.contiguous()
        self.extra = {}
        for key, t in (extra or {}).items():
            if key in ("input_ids", "labels", "attention_mask"):
                raise ValueError(f"extra tensor {key!r} would replace a main one")
            if (
                not isinstance(t, torch.Tensor)
                or t.device.type != "cpu"
                or t.dim() == 0
                or t.shape[0] != input_ids.shape[0]
            ):
                raise ValueError(
                    f"extra[{key!r}] must be a CPU tensor [N, ...] with N = "
                    f"{input_ids.shape[0]}; got {tuple(getattr(t, 'shape', ()))}"
                )
            self.extra[key] = t.contiguous()
        digest = hashlib.sha256(f"{tuple(input_ids.shape)}".encode())
        for t in (self.input_ids, self.labels, self.attention_mask):
            digest.update(t.numpy())
        for key in sorted(self.extra):
            digest.update(key.encode())
            digest.update(self.extra[key].numpy())
        self.fingerprint = digest.hexdigest()
        self._num_label_tokens = int((self.labels != IGNORE_INDEX).sum())

    @property
    def seq_len(self) -> int:
        """T, the length of every sequence in tokens."""
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Sequence ``i``: ``input_ids``, ``labels`` and ``attention_mask``, each ``[T]`` int64,
        and the ``extra`` tensors' rows (copies, so that a worker process sends one sequence
        rather than the whole dataset)."""
        item = {
            "input_ids": self.input_ids[i].clone(),
            "labels": self.labels[i].clone(),
            "attention_mask": self.attention_mask[i].clone(),
        }
        item.update((key, t[i].clone()) for key, t in self.extra.items())
        return item

    def num_label_tokens(self) -> int:
        """The number of predicted positions (labels other than -100) over all sequences."""
        return self._num_label_tokens


def _encode(backend: Tokenizer, texts: list[str], chunk_chars: int = 1 << 20) -> list[list[int]]:
    """Token ids of each text (no special tokens added), encoded in batches of about
    ``chunk_chars`` characters so that the tokenizer's per-token records stay small."""
    ids: list[list[int]] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= chunk_chars):
            size += len(texts[end])
            end += 1
        ids.extend(
            e.ids for e in backend.encode_batch_fast(texts[start:end], add_special_tokens=False)
        )
        start = end
    return ids


@dataclass(frozen=True)
class Packing:
    """How ``tokenize_documents`` lays documents out in sequences.

    Attributes:
        stream: the text documents' tokens, in order, each document followed by the eos id.
        doc_lengths: tokens of each text document (its eos not counted).
        num_full: the stream's full blocks of ``seq_len + 1`` tokens (stride ``seq_len``).
        rest: labels of the last, partial block (0: none).
        pairs: the kept prompt/completion pairs as ``(pair index among the pairs, prompt ids,
            sequence ids)``, the sequence being prompt + completion + eos cut to ``seq_len + 1``.
    """

    stream: list[int]
    doc_lengths: list[int]
    num_full: int
    rest: int
    pairs: list[tuple[int, list[int], list[int]]]


def pack_documents(
    docs: Sequence[Document], tokenizer: PreTrainedTokenizerFast, *, seq_len: int
) -> Packing:
    """The token layout of ``tokenize_documents`` (see there), before any tensor is built."""
    eos = tokenizer.eos_token_id
    # A private copy without truncation or padding: tokenizer.json may carry either, and the
    # caller's tokenizer is left as it was.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()

    stream: list[int] = []
    doc_lengths: list[int] = []
    for ids in _encode(backend, [d.text for d in docs if not d.is_pair]):
        stream.extend(ids)
        stream.append(eos)
        doc_lengths.append(len(ids))
    num_full = max(len(stream) - 1, 0) // seq_len
    rest = max(len(stream) - 1 - num_full * seq_len, 0)  # the labels of the last, partial block

    pairs = [d for d in docs if d.is_pair]
    prompts = _encode(backend, [d.prompt for d in pairs])
    completions = _encode(backend, [d.completion for d in pairs])
    kept = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        seq = (prompt + completion + [eos])[: seq_len + 1]
        # The first label predicts seq[max(len(prompt), 1)]: nothing predicts a sequence's
        # first token, even where the prompt is empty.
        if max(len(prompt), 1) < len(seq):
            kept.append((index, prompt, seq))
    if len(kept) < len(pairs):
        warnings.warn(
            f"{len(pairs) - len(kept)} of {len(pairs)} prompt/completion pairs dropped: "
            f"nothing to predict within seq_len + 1 = {seq_len + 1} tokens (a prompt "
            f"that fills them, or an empty prompt and completion)",
            stacklevel=3,
        )
    return Packing(stream, doc_lengths, num_full, rest, kept)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: PreTrainedTokenizerFast, *, seq_len: int
) -> SequenceDataset:
    """Tokenizes documents into next-token sequences of ``seq_len`` tokens.

    Text documents, in order, form one stream: each document's tokens followed by the eos
    token. The stream is cut into blocks of T + 1 tokens with stride T (consecutive blocks share
    one token); a block gives ``input_ids = block[:-1]`` and ``labels = block[1:]``, so every
    token of the stream after the first is a label exactly once. The last block may be shorter:
    it is padded (pad id, label -100, attention 0) when it holds at least one label and dropped
    otherwise. Attention is not cut at document boundaries: a model sees the previous
    documents of its block, as in GPT-style packing.

    Each prompt/completion pair is its own sequence: prompt + completion + eos (prompt and
    completion tokenized separately, so the boundary is exact), truncated to T + 1 tokens, then
    shifted as above; labels are -100 where the token to predict belongs to the prompt, so only
    the completion and the eos are learned (an empty prompt leaves the completion's first token
    unpredicted: nothing comes before it). Pairs with nothing to predict within T + 1 tokens
    are dropped, with a warning. No special tokens are added besides the eos; special-token
    strings in the text (e.g. a chat template's markers) encode as those tokens, as
    ``tokenizer(text)`` does.

    Sequences: the packed blocks in stream order, then the pairs in document order.

    Args:
        docs: the documents.
        tokenizer: a fast tokenizer with an eos and a pad token.
        seq_len: T, the sequence length in tokens (>= 1).

    Returns:
        The dataset ``[N, T]``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError(
            f"the tokenizer needs an eos and a pad token; got eos_token="
            f"{tokenizer.eos_token!r}, pad_token={tokenizer.pad_token!r}"
        )
    return sequences_of(pack_documents(docs, tokenizer, seq_len=seq_len), pad, seq_len)


def sequences_of(packing: Packing, pad: int, seq_len: int) -> SequenceDataset:
    """The dataset of a ``pack_documents`` layout: blocks, then pairs, padded with ``pad``."""
    tokens = torch.tensor(packing.stream, dtype=torch.int64)
    num_full, rest = packing.num_full, packing.rest
    kept = [(prompt, seq) for _, prompt, seq in packing.pairs]

    n = num_full + (rest > 0) + len(kept)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.int64)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.int64)
    if num_full:
        input_ids[:num_full] = tokens[: num_full * seq_len].view(num_full, seq_len)
        labels[:num_full] = tokens[1 : num_full * seq_len + 1].view(num_full, seq_len)
        attention_mask[:num_full] = 1
    if rest:
        start = num_full * seq_len
        input_ids[num_full, :rest] = tokens[start : start + rest]
        labels[num_full, :rest] = tokens[start + 1 : start + rest + 1]
        attention_mask[num_full, :rest] = 1
    for row, (prompt, seq) in enumerate(kept, start=num_full + (rest > 0)):
        seq_t = torch.tensor(seq, dtype=torch.int64)
        m = len(seq) - 1
        input_ids[row, :m] = seq_t[:-1]
        labels[row, :m] = seq_t[1:]
        # Position t predicts seq[t + 1], a prompt token while t + 1 < len(prompt).
        labels[row, : max(len(prompt) - 1, 0)] = IGNORE_INDEX
        attention_mask[row, :m] = 1
    return SequenceDataset(input_ids, labels, attention_mask)


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks items of a :class:`SequenceDataset` into a batch: each key ``[B, T]``."""
    if not items:
        raise ValueError("collate needs at least one item; got none")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
