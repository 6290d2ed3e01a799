"""Token alignment by byte spans as a plain Python two-pointer loop over one sequence: the
readable statement of ``fastkd.xtok.align_spans`` (the rule is in
csrc/common/align_spans_args.h) and the benchmark's plain-Python peer. It returns chunk ids only;
the checks of the spans are ``align_spans``'s."""

from __future__ import annotations

__all__ = ["align_spans_two_pointer"]


def align_spans_two_pointer(
    student_spans: list[tuple[int, int]], teacher_spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Chunk ids of one sequence's student and teacher tokens (-1: empty span, no chunk).

    Only tokens with ``end > start`` take part. Walking both sides, the side whose token ends
    first advances; where both end at the same byte the chunk closes, after taking in any
    further tokens that end at that byte. The spans must cover the same bytes (unchecked here).
    """
    s_ids, t_ids = [-1] * len(student_spans), [-1] * len(teacher_spans)
    s_live = [i for i, (a, b) in enumerate(student_spans) if b > a]
    t_live = [j for j, (a, b) in enumerate(teacher_spans) if b > a]
    i = j = chunk = 0
    while i < len(s_live) and j < len(t_live):
        s_end, t_end = student_spans[s_live[i]][1], teacher_spans[t_live[j]][1]
        if s_end <= t_end:
            s_ids[s_live[i]] = chunk
            i += 1
        if t_end <= s_end:
            t_ids[t_live[j]] = chunk
            j += 1
        if s_end == t_end:
            while i < len(s_live) and student_spans[s_live[i]][1] == s_end:
                s_ids[s_live[i]] = chunk
                i += 1
            while j < len(t_live) and teacher_spans[t_live[j]][1] == s_end:
                t_ids[t_live[j]] = chunk
                j += 1
            chunk += 1
    return s_ids, t_ids
