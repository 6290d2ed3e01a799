"""Shared setup of the cross-tokenizer tests: the tokenizer pair (trained once per session),
adversarial texts, and the alignment invariants every aligned pair must satisfy."""

from __future__ import annotations

import torch

# Texts whose characters split across tokens as bytes, with leading whitespace, marks and
# emoji sequences; the empty text and one of only spaces.
ADVERSARIAL_TEXTS = [
    "def f(x):\n    return x + 1",
    "你好，世界",  # CJK: byte-fallback pieces
    "emoji 👩‍👩‍👧 family and 🎉!",  # ZWJ sequence, 4-byte characters
    "e\u0301te\u0301 and n\u0303",  # combining marks
    "   leading spaces",
    "\ttab\n\nnewlines  ",
    "",
    "   ",
    "mixed 日本語 text ü ß ø",
]


def oracle_chunks(s_spans, t_spans):
    """Chunk ids by the set definition: common ends, each token in the chunk closing at the
    first common end >= its own end (independent of the two-pointer form)."""
    s_ends = {e for a, e in s_spans if e > a}
    common = sorted(s_ends & {e for a, e in t_spans if e > a})

    def ids(spans):
        return [-1 if e <= a else next(k for k, c in enumerate(common) if c >= e) for a, e in spans]

    return ids(s_spans), ids(t_spans)


def check_invariants(s_spans, t_spans, s_ids, t_ids, n_chunks, text_bytes=None):
    """The alignment invariants for one sequence (spans and ids as lists)."""
    for ids in (s_ids, t_ids):
        live = [c for c in ids if c >= 0]
        assert live == sorted(live), "chunk ids must be non-decreasing"
        assert sorted(set(live)) == list(range(n_chunks)), "ids must run 0..n-1, contiguous"
    s_ends = {e for a, e in s_spans if e > a}
    t_ends = {e for a, e in t_spans if e > a}
    chunk_ends = []
    for c in range(n_chunks):
        s_end = max(e for (a, e), k in zip(s_spans, s_ids) if k == c)
        t_end = max(e for (a, e), k in zip(t_spans, t_ids) if k == c)
        assert s_end == t_end, f"chunk {c} ends at {s_end} (student) and {t_end} (teacher)"
        chunk_ends.append(s_end)
    assert set(chunk_ends) == s_ends & t_ends, "chunk ends must be the common token ends"
    if text_bytes is not None and n_chunks:
        starts = [min(a for (a, e), k in zip(s_spans, s_ids) if k == 0)]
        assert chunk_ends[-1] == len(text_bytes) and starts[0] == 0, "chunks cover the text"


def rows(x: torch.Tensor) -> list:
    return x.tolist()
