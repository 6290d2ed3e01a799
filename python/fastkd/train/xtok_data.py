"""Training sequences for a teacher with its own tokenizer: the student's sequences as
``tokenize_documents`` makes them, each re-tokenized by the teacher over the same bytes, and the
two tokenizations of the predicted tokens aligned into chunks once, when the data is loaded.

Per student sequence (T + 1 tokens of the packed stream, or a prompt/completion pair):

1. its bytes: the text its tokens cover, cut inward to whole UTF-8 characters at both ends (a
   byte-level token may hold part of a character); the eos tokens between documents split it into
   segments, and a pair's prompt and completion are segments of their own (tokenized apart, as
   the student's are, so both sides end a token at the boundary);
2. the teacher's tokens: each segment tokenized without special tokens, the teacher's eos where
   the student has one (an empty span: in no chunk);
3. the predicted tokens of both sides (all but each side's first token) trimmed to their largest
   common byte range between two bytes where both end a token, so that both cover the same text
   (``align_spans`` requires it); tokens outside it are in no chunk;
4. ``align_spans`` on the whole dataset at once; chunks holding a token the student does not
   predict (a prompt's) are dropped on both sides, and the rest renumbered 0, 1, ... per
   sequence.

Each sequence then carries, besides the student's ``input_ids``, ``labels`` and
``attention_mask`` ``[T]``: ``teacher_input_ids``, ``teacher_labels`` (the teacher's next
token; -100 at padding) and ``teacher_attention_mask`` ``[T_t]``, ``student_chunk_id`` ``[T]``
and ``teacher_chunk_id`` ``[T_t]`` (the chunk of the token each position predicts, -1 for none)
and ``chunk_count`` (the number of chunks counted). ``T_t`` is the longest teacher sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from ..xtok import align_spans, byte_offsets
from .data import IGNORE_INDEX, Document, SequenceDataset, pack_documents, sequences_of

__all__ = ["tokenize_aligned"]

# Texts per teacher tokenizer call: byte_offsets pads a call's texts to its longest, so a bounded
# group keeps that padding small.
_TOKENIZE_GROUP = 512


def _spans_of(tokenizer, texts: list[str], expected: list[list[int]], what: str):
    """Per text, the ``[n, 2]`` byte spans of its tokens (no special tokens added), after
    checking that the ids are ``expected`` (the ids the data was packed from)."""
    out = []
    for lo in range(0, len(texts), _TOKENIZE_GROUP):
        group = texts[lo : lo + _TOKENIZE_GROUP]
        enc = byte_offsets(tokenizer, group, add_special_tokens=False)
        for j in range(len(group)):
            n = int(enc.attention_mask[j].sum())
            ids = enc.input_ids[j, :n].tolist()
            if expected is not None and ids != expected[lo + j]:
                raise ValueError(
                    f"the student's tokenizer gives other ids with offsets than without "
                    f"for {what} {lo + j}: its tokenizer.json pads, truncates or adds tokens "
                    f"in one of the two calls"
                )
            out.append((ids, enc.spans[j, :n].numpy()))
    return out


def _char_start(data: bytes, at: int, end: int) -> int:
    """The first byte at or after ``at`` that starts a UTF-8 character (``end`` if none)."""
    while at < end and (data[at] & 0xC0) == 0x80:
        at += 1
    return at


def _char_end(data: bytes, at: int, start: int) -> int:
    """The last byte offset at or before ``at`` that ends a UTF-8 character."""
    while at > start and at < len(data) and (data[at] & 0xC0) == 0x80:
        at -= 1
    return at


def _segments(spans: np.ndarray, is_eos: np.ndarray, data: bytes, cuts: list[int]):
    """The teacher's segments of one student sequence: ``[(start, end, eos_after)]`` byte ranges
    of ``data`` between eos tokens and at ``cuts`` (byte offsets where a segment must end: a
    pair's prompt end), cut inward to whole characters at the sequence's ends."""
    live = spans[:, 1] > spans[:, 0]
    if not live.any():
        return [(0, 0, bool(e)) for e in is_eos if e]
    first, last = int(spans[live, 0].min()), int(spans[live, 1].max())
    first = _char_start(data, first, last)
    last = _char_end(data, last, first)
    out = []
    start = first
    for k in range(len(spans)):
        if is_eos[k]:
            end = min(max(int(spans[k, 0]), start), last)
            out.append((start, end, True))
            start = end
        elif live[k] and int(spans[k, 0]) in cuts and start < int(spans[k, 0]) <= last:
            out.append((start, int(spans[k, 0]), False))
            start = int(spans[k, 0])
    if start < last:
        out.append((start, last, False))
    return out


def _common_cover(s: np.ndarray, t: np.ndarray) -> None:
    """Trims two tokenizations' spans (``[n, 2]``, ``[m, 2]``, in place) to the largest byte
    range [L, R) where L and R are token boundaries on both sides: tokens outside it get (-1,
    -1), and the first kept token on each side starts at L, so both cover the same bytes."""
    s_live = s[:, 1] > s[:, 0]
    t_live = t[:, 1] > t[:, 0]
    if not s_live.any() or not t_live.any():
        s[s_live] = -1
        t[t_live] = -1
        return
    # A token's bytes run from the previous live token's end (align_spans' rule): the
    # boundaries of a side are its first start and every end.
    s_bounds = np.concatenate([s[s_live][:1, 0], s[s_live][:, 1]])
    t_bounds = np.concatenate([t[t_live][:1, 0], t[t_live][:, 1]])
    common = np.intersect1d(s_bounds, t_bounds)
    common = common[common >= max(s_bounds[0], t_bounds[0])]
    if len(common) < 2:
        s[s_live] = -1
        t[t_live] = -1
        return
    low, high = common[0], common[-1]
    for spans, live in ((s, s_live), (t, t_live)):
        keep = live & (spans[:, 1] > low) & (spans[:, 1] <= high)
        spans[live & ~keep] = -1
        spans[np.flatnonzero(keep)[0], 0] = low


def _teacher_rows(teacher_tokenizer, rows):
    """The teacher's token ids and spans of each row's segments (``rows``: ``[(data, segments)]``
    with byte ranges of ``data``)."""
    eos = teacher_tokenizer.eos_token_id
    texts, where = [], []
    for r, (data, segments) in enumerate(rows):
        for k, (start, end, _) in enumerate(segments):
            if end > start:
                texts.append(data[start:end].decode("utf-8"))
                where.append((r, k))
    encoded = dict(zip(where, _spans_of(teacher_tokenizer, texts, None, "segment")))
    out = []
    for r, (_, segments) in enumerate(rows):
        ids, spans = [], []
        for k, (start, end, eos_after) in enumerate(segments):
            if (r, k) in encoded:
                seg_ids, seg_spans = encoded[(r, k)]
                ids.extend(seg_ids)
                spans.append(seg_spans + start)
            if eos_after:
                ids.append(eos)
                spans.append(np.array([[end, end]], dtype=np.int64))
        out.append((ids, np.concatenate(spans) if spans else np.zeros((0, 2), dtype=np.int64)))
    return out


def tokenize_aligned(
    docs: list[Document],
    student_tokenizer,
    teacher_tokenizer,
    *,
    seq_len: int,
) -> SequenceDataset:
    """The student's sequences of ``docs`` (``tokenize_documents``) with the teacher's
    tokenization of the same bytes and the chunk alignment of both (see the module docstring).

    Args:
        docs: the documents.
        student_tokenizer, teacher_tokenizer: fast tokenizers with an eos token (the student's
            also a pad token); the teacher's pad id pads its sequences (its eos id when it has
            none).
        seq_len: T, the student's sequence length in tokens.

    Returns:
        A ``SequenceDataset`` ``[N, T]`` whose ``extra`` holds the teacher's tensors ``[N,
        T_t]``, both chunk ids and ``chunk_count`` ``[N]``.
    """
    for name, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False) or tok.eos_token_id is None:
            raise ValueError(
                f"the {name}'s tokenizer must be a fast tokenizer with an eos token "
                f"(byte offsets and document ends); got {type(tok).__name__} with "
                f"eos_token={getattr(tok, 'eos_token', None)!r}"
            )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}")
    if student_tokenizer.pad_token_id is None:
        raise ValueError("the student's tokenizer needs a pad token")
    packing = pack_documents(docs, student_tokenizer, seq_len=seq_len)
    student = sequences_of(packing, student_tokenizer.pad_token_id, seq_len)
    texts = [d.text for d in docs if not d.is_pair]
    doc_ids, start = [], 0
    for length in packing.doc_lengths:
        doc_ids.append(packing.stream[start : start + length])
        start += length + 1
    per_doc = _spans_of(student_tokenizer, texts, doc_ids, "document")

    # The stream's bytes and each stream token's span in them (eos: empty, at its document's
    # end).
    data = b"".join(t.encode("utf-8") for t in texts)
    stream_spans = np.zeros((len(packing.stream), 2), dtype=np.int64)
    stream_eos = np.zeros(len(packing.stream), dtype=bool)
    pos, offset = 0, 0
    for text, (ids, spans) in zip(texts, per_doc):
        stream_spans[pos : pos + len(ids)] = spans + offset
        offset += len(text.encode("utf-8"))
        stream_spans[pos + len(ids)] = offset
        stream_eos[pos + len(ids)] = True
        pos += len(ids) + 1

    # Per row: the bytes it indexes (the whole stream for packed blocks: a block's first and
    # last token may hold part of a character whose other bytes lie outside it), the student's
    # token spans in them (-1 for tokens of no text), eos flags, and the teacher's segments.
    rows, student_rows = [], []
    for k in range(packing.num_full + (packing.rest > 0)):
        lo, hi = k * seq_len, min(k * seq_len + seq_len + 1, len(packing.stream))
        spans, is_eos = stream_spans[lo:hi], stream_eos[lo:hi]
        live = spans[:, 1] > spans[:, 0]
        spans = np.where(live[:, None] | is_eos[:, None], spans, -1)
        rows.append((data, _segments(spans, is_eos, data, [])))
        student_rows.append((spans, is_eos))
    pair_docs = [d for d in docs if d.is_pair]
    kept = [pair_docs[i] for i, _, _ in packing.pairs]
    prompt_side = _spans_of(
        student_tokenizer, [d.prompt for d in kept], [p for _, p, _ in packing.pairs], "prompt"
    )
    completion_side = _spans_of(student_tokenizer, [d.completion for d in kept], None, "pair")
    eos = student_tokenizer.eos_token_id
    for doc, (_, prompt, seq), (_, p_spans), (c_ids, c_spans) in zip(
        kept, packing.pairs, prompt_side, completion_side
    ):
        if (prompt + c_ids + [eos])[: len(seq)] != seq:
            raise ValueError(
                "the student's tokenizer gives other ids with offsets than without for a "
                "completion: its tokenizer.json pads, truncates or adds tokens in one of the "
                "two calls"
            )
        prompt_bytes = doc.prompt.encode("utf-8")
        pair_data = prompt_bytes + doc.completion.encode("utf-8")
        end = [[len(pair_data), len(pair_data)]]
        spans = np.concatenate([p_spans, c_spans + len(prompt_bytes), end]).astype(np.int64)
        is_eos = np.zeros(len(spans), dtype=bool)
        is_eos[-1] = True
        spans, is_eos = spans[: len(seq)], is_eos[: len(seq)]
        cuts = [len(prompt_bytes)] if prompt else []
        rows.append((pair_data, _segments(spans, is_eos, pair_data, cuts)))
        student_rows.append((spans, is_eos))

    teacher = _teacher_rows(teacher_tokenizer, rows)
    n = len(rows)
    t_len = max([max(len(ids) - 1, 1) for ids, _ in teacher] + [1])
    t_pad = teacher_tokenizer.pad_token_id
    if t_pad is None:
        t_pad = teacher_tokenizer.eos_token_id
    t_input = torch.full((n, t_len), t_pad, dtype=torch.int64)
    t_labels = torch.full((n, t_len), IGNORE_INDEX, dtype=torch.int64)
    t_mask = torch.zeros((n, t_len), dtype=torch.int64)
    s_target_spans = np.full((n, seq_len, 2), -1, dtype=np.int64)
    t_target_spans = np.full((n, t_len, 2), -1, dtype=np.int64)
    for r, ((s_spans, s_eos), (ids, spans)) in enumerate(zip(student_rows, teacher)):
        s_tgt = np.where(s_eos[1:, None], -1, s_spans[1:])
        t_tgt = spans[1:].copy()
        is_t_eos = np.asarray(ids[1:], dtype=np.int64) == teacher_tokenizer.eos_token_id
        t_tgt[is_t_eos] = -1
        _common_cover(s_tgt, t_tgt)
        s_target_spans[r, : len(s_tgt)] = s_tgt
        m = len(ids) - 1
        if m > 0:
            t_input[r, :m] = torch.tensor(ids[:-1])
            t_labels[r, :m] = torch.tensor(ids[1:])
            t_mask[r, :m] = 1
            t_target_spans[r, :m] = t_tgt
    aligned = align_spans(torch.from_numpy(s_target_spans), torch.from_numpy(t_target_spans))
    s_chunk = aligned.student_chunk_id.to(torch.int64)
    t_chunk = aligned.teacher_chunk_id.to(torch.int64)
    # A chunk holding a token the student does not predict (a prompt's) is not counted.
    width = int(aligned.num_chunks.max()) if n else 0
    dropped = torch.zeros(n, width + 1, dtype=torch.bool)
    unlabelled = (student.labels == IGNORE_INDEX) & (s_chunk >= 0)
    dropped.scatter_(1, torch.where(unlabelled, s_chunk + 1, 0), True)
    dropped[:, 0] = False
    s_chunk = torch.where(dropped.gather(1, s_chunk + 1), -1, s_chunk)
    t_chunk = torch.where(dropped.gather(1, t_chunk + 1), -1, t_chunk)
    # The counted chunks renumbered 0, 1, ... per sequence: the losses' chunk tensors are as
    # wide as the largest id.
    counted = torch.zeros(n, width + 1, dtype=torch.bool)
    counted.scatter_(1, s_chunk + 1, True)
    counted[:, 0] = False
    rank = counted.cumsum(1) - 1
    s_chunk = torch.where(s_chunk >= 0, rank.gather(1, s_chunk + 1), -1)
    t_chunk = torch.where(t_chunk >= 0, rank.gather(1, t_chunk + 1), -1)
    chunk_count = counted.sum(1)
    return SequenceDataset(
        student.input_ids,
        student.labels,
        student.attention_mask,
        extra={
            "teacher_input_ids": t_input,
            "teacher_labels": t_labels,
            "teacher_attention_mask": t_mask,
            "student_chunk_id": s_chunk.to(torch.int32),
            "teacher_chunk_id": t_chunk.to(torch.int32),
            "chunk_count": chunk_count,
        },
    )
