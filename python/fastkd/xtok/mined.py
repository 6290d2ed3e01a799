"""Token byte spans for tokenizers without offsets, by edit distance over token strings.

A fallback, in the spirit of MinED (Wan et al., 2024, FuseLLM's minimum-edit-distance token
alignment): each token is decoded to its string on its own; where the concatenation equals the
text, the ends follow from the strings' lengths; otherwise (normalization, dropped or changed
characters) a Levenshtein alignment of the concatenation to the text, computed by dynamic
programming in O(len(text) * len(concatenation)) Python steps, maps each token's end to a
position in the text. The spans are then exact only where the strings agree; prefer a fast
tokenizer's offsets (``byte_offsets``), which need no guess.
"""

from __future__ import annotations

import numpy as np

from .offsets import char_to_byte_table

__all__ = ["edit_alignment", "spans_by_edit_distance"]


def edit_alignment(source: str, target: str) -> np.ndarray:
    """int64 ``[len(source) + 1]``: for each position of ``source``, the aligned position of
    ``target`` along a minimum-edit-distance (Levenshtein) path, non-decreasing, 0 at 0 and
    ``len(target)`` at the end."""
    n, m = len(source), len(target)
    cost = np.zeros((n + 1, m + 1), dtype=np.int64)
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    tgt = np.frombuffer(target.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    for i in range(1, n + 1):
        sub = cost[i - 1, :-1] + (tgt != ord(source[i - 1]))
        dele = cost[i - 1, 1:] + 1
        row = np.minimum(sub, dele)
        # Insertions run along the row: cost[i, j] = min(row[j - 1], cost[i, j - 1] + 1), a
        # running minimum of row[k] + (j - k).
        best = np.minimum.accumulate(np.concatenate([[cost[i, 0]], row]) - np.arange(m + 1))
        cost[i, 1:] = best[1:] + np.arange(1, m + 1)
    out = np.zeros(n + 1, dtype=np.int64)
    i, j = n, m
    out[n] = m
    while i > 0:
        if j > 0 and cost[i, j] == cost[i, j - 1] + 1:
            j -= 1
            continue
        if j > 0 and cost[i, j] == cost[i - 1, j - 1] + (source[i - 1] != target[j - 1]):
            j -= 1
        i -= 1
        out[i] = j
    return out


def spans_by_edit_distance(pieces: list[str | None], text: str) -> np.ndarray:
    """int64 ``[len(pieces), 2]`` byte spans of tokens whose decoded strings are ``pieces``
    (None for special tokens: an empty span) in ``text``."""
    lengths = np.array([0 if p is None else len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lengths)
    joined = "".join(p for p in pieces if p is not None)
    to_text = np.arange(len(joined) + 1) if joined == text else edit_alignment(joined, text)
    char_ends = to_text[ends]
    char_starts = np.concatenate([[to_text[0]], char_ends[:-1]]) if len(pieces) else char_ends
    table = char_to_byte_table(text)
    spans = np.stack([table[char_starts], table[char_ends]], axis=1).reshape(len(pieces), 2)
    empty = lengths == 0
    spans[empty, 0] = spans[empty, 1]
    return spans
