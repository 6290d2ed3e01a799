"""Training data: documents read from files, a train/eval split, next-token sequences of a fixed
length, and the order in which optimizer steps visit them.

Two kinds of document: plain text, packed into one token stream cut into sequences (every token
after the first is predicted once), and prompt/completion pairs, one sequence each, where only
the completion (and the eos token after it) is predicted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

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

_FORMATS = {"auto": (".txt", ".jsonl"), "txt": (".txt",), "jsonl": (".jsonl",)}


@dataclass(frozen=True)
class Document:
    """A text document (``text``), or a prompt/completion pair (``prompt`` and ``completion``);
    the fields of the other kind are None."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self):
        fields = (self.text, self.prompt, self.completion)
        if any(f is not None and not isinstance(f, str) for f in fields):
            raise TypeError(
                f"Document fields must be str or None; got "
                f"{tuple(type(f).__name__ for f in fields)}"
            )
        if (self.text is None) == (self.prompt is None and self.completion is None) or (
            self.prompt is None
        ) != (self.completion is None):
            raise ValueError("a Document has either text, or both prompt and completion")

    @property
    def is_pair(self) -> bool:
        """True for a prompt/completion pair, False for a text document."""
        return self.text is None


def _files_of(path: str, fmt: str) -> list[tuple[str, str]]:
    """``path`` (a file, or a directory standing for its files of ``fmt``'s suffixes, sorted by
    name) as (file, format) pairs, format ``"txt"`` or ``"jsonl"``."""
    suffixes = _FORMATS[fmt]
    if os.path.isdir(path):
        names = sorted(
            n
            for n in os.listdir(path)
            if n.endswith(suffixes) and os.path.isfile(os.path.join(path, n))
        )
        if not names:
            raise ValueError(f"directory {path!r} holds no {' or '.join(suffixes)} files")
        return [f for n in names for f in _files_of(os.path.join(path, n), fmt)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path!r}")
    if fmt != "auto":
        return [(path, fmt)]
    if not path.endswith(suffixes):
        raise ValueError(
            f"cannot tell the format of {path!r} from its name: expected a .txt or "
            f".jsonl file, or format='txt' or 'jsonl'"
        )
    return [(path, "txt" if path.endswith(".txt") else "jsonl")]


def _read_txt(path: str) -> Document:
    try:
        with open(path, encoding="utf-8") as f:
            return Document(text=f.read())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: str, text_key: str, prompt_key: str, completion_key: str) -> list[Document]:
    with open(path, "rb") as f:
        data = f.read()
    docs = []
    # JSON escapes newlines inside strings, so every raw b"\n" ends a record.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object; got {type(record).__name__}")
        has_text, has_prompt = text_key in record, prompt_key in record
        has_completion = completion_key in record
        if has_text and (has_prompt or has_completion):
            raise ValueError(
                f"{where}: a record is either text ({text_key!r}) or a pair "
                f"({prompt_key!r}, {completion_key!r}), not both"
            )
        if has_text:
            keys = (text_key,)
        elif has_prompt and has_completion:
            keys = (prompt_key, completion_key)
        elif has_prompt or has_completion:
            missing = completion_key if has_prompt else prompt_key
            raise ValueError(
                f"{where}: missing key {missing!r} (a pair needs {prompt_key!r} and "
                f"{completion_key!r})"
            )
        else:
            raise ValueError(
                f"{where}: expected key {text_key!r}, or keys {prompt_key!r} and "
                f"{completion_key!r}; got keys {sorted(record)}"
            )
        for key in keys:
            if not isinstance(record[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string; got {type(record[key]).__name__}"
                )
        docs.append(
            Document(text=record[text_key])
            if has_text
            else Document(prompt=record[prompt_key], completion=record[completion_key])
        )
    return docs


def read_documents(
    paths: Sequence[str | os.PathLike],
    *,
    format: str = "auto",
    text_key: str = "text",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
) -> list[Document]:
    """Reads documents from ``.txt`` and ``.jsonl`` files, in the order of ``paths``.

    A ``.txt`` file is one text document (UTF-8). A ``.jsonl`` file holds one JSON object per
    line (blank lines skipped): ``{text_key: str}`` is a text document, ``{prompt_key: str,
    completion_key: str}`` a prompt/completion pair; other keys are ignored and one file may mix
    both kinds. A directory stands for its ``.txt`` and ``.jsonl`` files (not subdirectories),
    sorted by name.

    Args:
        paths: files and directories.
        format: ``"auto"`` (by file suffix), or ``"txt"`` / ``"jsonl"`` to read every file (and
            a directory's files of that suffix) as that format.
        text_key, prompt_key, completion_key: the JSONL keys of the fields.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is not UTF-8, a record is not valid (the message names the file and
            line), a file's format cannot be told, or a directory holds no such files.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a list of paths; got the single path {paths!r}")
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}; got {format!r}")
    docs: list[Document] = []
    for path in paths:
        for file, fmt in _files_of(os.fspath(path), format):
            if fmt == "txt":
                docs.append(_read_txt(file))
            else:
                docs.extend(_read_jsonl(file, text_key, prompt_key, completion_key))
    return docs


def split_documents(
    docs: Sequence[Document], *, eval_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Splits documents into a training and an evaluation set, deterministically.

    Each distinct document gets a key, the sha256 of ``seed`` and its content; the evaluation
    set takes distinct documents in key order (with all their copies, so that no content is in
    both sets) until it holds ``round(eval_fraction * n)`` documents, at least one when
    ``eval_fraction > 0``, and never all of them. The split depends on the documents' contents
    and ``seed`` only, not on their order. Both sets keep the input order.
    With fewer than two distinct documents the evaluation set is empty.

    Args:
        docs: the documents (n of them).
        eval_fraction: the fraction of documents held out, in [0, 1).
        seed: any int; different seeds give independent splits.

    Returns:
        (train_docs, eval_docs).
    """
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, (int, float))
        or not 0.0 <= eval_fraction < 1.0
    ):
        raise ValueError(f"eval_fraction must be a number in [0, 1); got {eval_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}")
    n = len(docs)
    target = min(max(1, round(eval_fraction * n)), n - 1) if eval_fraction > 0 and n >= 2 else 0
    copies: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        content = json.dumps([seed, doc.text, doc.prompt, doc.completion], ensure_ascii=False)
        key = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
        copies.setdefault(key, []).append(i)
    held_out: set[int] = set()
    for key in sorted(copies):
        if len(held_out) >= target:
            break
        if len(held_out) + len(copies[key]) < n:
            held_out.update(copies[key])
    return (
        [d for i, d in enumerate(docs) if i not in held_out],
        [d for i, d in enumerate(docs) if i in held_out],
    )


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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


class StepSampler:
    """Which sequences each micro-batch of each optimizer step takes, deterministically.

    The sequences are visited epoch after epoch, epoch e in the order of a permutation of
    range(N) drawn by ``torch.randperm`` from a generator seeded by (``seed``, e) (the identity
    without ``shuffle``). Laid end to end, these orders form one sequence of positions; step s
    takes the G = ``micro_batch_size * grad_accum * world_size`` positions [s G, (s + 1) G),
    running on into the next epoch where one ends (and around again where G > N). Within a
    step, micro-batch j of rank r takes the ``micro_batch_size`` positions starting at
    ``(j * world_size + r) * micro_batch_size``. So a step's sequences, over all ranks and
    micro-batches, depend only on G: the same whatever the split of G into ranks and
    gradient-accumulation steps, which keeps a run's data the same when it resumes on a
    different number of devices. Needs no state: any step can be asked for, in any order.
    Permutations are the same for the same torch version (torch does not promise them across
    versions).
    """

    def __init__(
        self,
        num_sequences: int,
        *,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.num_sequences = _positive_int("num_sequences", num_sequences)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.grad_accum = _positive_int("grad_accum", grad_accum)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}); got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.rank, self.seed, self.shuffle = rank, seed, bool(shuffle)
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def global_batch_size(self) -> int:
        """G, the sequences one optimizer step consumes over all ranks and micro-batches."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``: a permutation of range(N), ``[N]`` int64."""
        return self._order(epoch).clone()

    def _order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                # One 64-bit seed per (seed, epoch) pair, for any int seed.
                mixed = hashlib.sha256(f"{self.seed},{epoch}".encode()).digest()[:8]
                generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little"))
                order = torch.randperm(self.num_sequences, generator=generator)
            else:
                order = torch.arange(self.num_sequences)
            # Keeping two epochs serves the steps that straddle an epoch boundary.
            if len(self._orders) >= 2:
                del self._orders[next(iter(self._orders))]
            self._orders[epoch] = order
        return order

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")

    def epoch_of(self, step: int) -> int:
        """The epoch of step ``step``'s first position (floor(s G / N))."""
        self._check_step(step)
        return step * self.global_batch_size // self.num_sequences

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: ``grad_accum`` lists of
        ``micro_batch_size`` sequence indices in [0, N)."""
        self._check_step(step)
        mb, world = self.micro_batch_size, self.world_size
        offsets = (torch.arange(self.grad_accum)[:, None] * world + self.rank) * mb + torch.arange(
            mb
        )
        positions = step * self.global_batch_size + offsets  # [grad_accum, mb]
        epochs = positions // self.num_sequences
        indices = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            here = epochs == epoch
            indices[here] = self._order(epoch)[positions[here] % self.num_sequences]
        return indices.tolist()
