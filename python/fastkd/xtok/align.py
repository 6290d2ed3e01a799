"""align_spans: chunk ids of two tokenizations of the same text from their tokens' byte spans.

The rule (csrc/common/align_spans_args.h): tokens with ``end > start`` take part; a chunk closes
at every byte both sides end a token at; a token's chunk is the one closing at the first common
end at or after its own end. Backends: ``cpu``, a native two-pointer walk per sequence (C++,
threads over the batch), and ``torch``, the same rule vectorized over the batch (a running
maximum of the ends and a batched ``searchsorted`` of one side's ends in the other's), which
runs on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops._checks import INT32_MAX
from ..ops._launch import launch
from ..ops._registry import (
    check_backend_name,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
)

__all__ = ["Alignment", "align_spans"]

# The inputs are integer spans, so no dtype is passed to the backend choice; the native backend
# keeps the registry's default floating-point dtypes, which nothing here consults.
register_op(
    "align_spans",
    [
        reference_backend(),
        native_backend("cpu", "align_spans_cpu"),
    ],
    auto={"cpu": ("cpu", "torch")},
)

# Status codes of csrc/common/align_spans_args.h.
_BAD_STUDENT, _BAD_TEACHER, _COVERAGE = 1, 2, 3


class Alignment(NamedTuple):
    """Output of ``align_spans``.

    Attributes:
        student_chunk_id: int32 ``[B, T_s]``, the chunk of each student token, -1 for tokens in
            no chunk (empty spans: special tokens, BOS/EOS, padding).
        teacher_chunk_id: int32 ``[B, T_t]``, likewise for the teacher.
        num_chunks: int32 ``[B]``, chunks per sequence (ids run from 0 to num_chunks - 1).
    """

    student_chunk_id: torch.Tensor
    teacher_chunk_id: torch.Tensor
    num_chunks: torch.Tensor


def _check_spans(name: str, spans) -> torch.Tensor:
    if not isinstance(spans, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [B, T, 2]; got {type(spans).__name__}"
        )
    if spans.dtype.is_floating_point or spans.dtype.is_complex or spans.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer byte offsets; got dtype {spans.dtype}")
    if spans.dim() != 3 or spans.shape[-1] != 2:
        raise ValueError(
            f"{name} must have shape [B, T, 2] ([start, end) byte offsets per "
            f"token); got {tuple(spans.shape)}"
        )
    if spans.shape[1] > INT32_MAX:
        raise ValueError(f"{name} has {spans.shape[1]} tokens per sequence; at most {INT32_MAX}")
    return spans.to(torch.int64).contiguous()


def _summaries(spans: torch.Tensor):
    """(taking part [B, T], running max of the ends [B, T] (-1 before the first), first
    offending token [B] (-1 if none), first start [B], last end [B]) of one side."""
    start, end = spans[..., 0], spans[..., 1]
    live = end > start
    running = torch.where(live, end, -1).cummax(dim=1).values
    previous = torch.cat([running.new_full((running.shape[0], 1), -1), running[:, :-1]], dim=1)
    bad = live & ((start < 0) | (end < previous))
    n = spans.shape[1]
    big = torch.iinfo(torch.int64).max
    if n == 0:
        none = torch.full((spans.shape[0],), -1, dtype=torch.int64, device=spans.device)
        return live, running, previous, none, none, none
    positions = torch.arange(n, device=spans.device).expand_as(bad)
    first_bad = torch.where(bad, positions, n).amin(dim=1)
    first_bad = torch.where(first_bad == n, -1, first_bad)
    first_start = torch.where(live, start, big).amin(dim=1)
    first_start = torch.where(first_start == big, -1, first_start)
    last_end = running[:, -1]
    return live, running, previous, first_bad, first_start, last_end


def _chunk_ids(live, running, previous, other_running) -> tuple[torch.Tensor, torch.Tensor]:
    """One side's chunk ids and the number of common ends, given the other side's running
    maximum of its ends (non-decreasing per row, so searchsorted applies)."""
    end = running  # equals the token's own end wherever it takes part
    if other_running.shape[1] == 0 or end.shape[1] == 0:
        zeros = torch.zeros(end.shape[0], dtype=torch.int64, device=end.device)
        return torch.full_like(end, -1, dtype=torch.int32), zeros
    idx = torch.searchsorted(other_running, end).clamp(max=other_running.shape[1] - 1)
    common = live & (other_running.gather(1, idx) == end)
    first_common = common & (end != previous)
    count = first_common.cumsum(dim=1)
    ids = torch.where(live, count - common.to(count.dtype), -1).to(torch.int32)
    return ids, count[:, -1]


def _align_torch(student: torch.Tensor, teacher: torch.Tensor):
    s_live, s_run, s_prev, s_bad, s_first, s_last = _summaries(student)
    t_live, t_run, t_prev, t_bad, t_first, t_last = _summaries(teacher)
    status = torch.zeros(student.shape[0], dtype=torch.int32, device=student.device)
    status = torch.where((s_first != t_first) | (s_last != t_last), _COVERAGE, status)
    status = torch.where(t_bad >= 0, _BAD_TEACHER, status)
    status = torch.where(s_bad >= 0, _BAD_STUDENT, status)
    detail = torch.where(s_bad >= 0, s_bad, torch.where(status == _BAD_TEACHER, t_bad, -1))
    s_ids, count = _chunk_ids(s_live, s_run, s_prev, t_run)
    t_ids, _ = _chunk_ids(t_live, t_run, t_prev, s_run)
    return s_ids, t_ids, count.to(torch.int32), status, detail


def _align_cpu(student: torch.Tensor, teacher: torch.Tensor):
    batch, ns, nt = student.shape[0], student.shape[1], teacher.shape[1]
    s_ids = torch.empty(batch, ns, dtype=torch.int32)
    t_ids = torch.empty(batch, nt, dtype=torch.int32)
    count = torch.empty(batch, dtype=torch.int32)
    status = torch.empty(batch, dtype=torch.int32)
    detail = torch.empty(batch, dtype=torch.int64)
    launch(
        "align_spans_cpu",
        args="AlignSpansArgs",
        student_spans=student,
        teacher_spans=teacher,
        batch=batch,
        student_len=ns,
        teacher_len=nt,
        student_chunk=s_ids,
        teacher_chunk=t_ids,
        num_chunks=count,
        status=status,
        detail=detail,
        run=dict(num_threads=torch.get_num_threads()),
    )
    return s_ids, t_ids, count, status, detail


def _raise_on_status(
    status: torch.Tensor, detail: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor
) -> None:
    failed = (status != 0).nonzero()
    if failed.numel() == 0:
        return
    b = int(failed[0, 0])
    code, token = int(status[b]), int(detail[b])
    if code in (_BAD_STUDENT, _BAD_TEACHER):
        name, spans = (
            ("student_spans", student) if code == _BAD_STUDENT else ("teacher_spans", teacher)
        )
        raise ValueError(
            f"{name}[{b}, {token}] = {spans[b, token].tolist()}: spans of the "
            f"tokens taking part (end > start) must start at >= 0 and end at or "
            f"after the previous token's end"
        )

    def cover(spans):
        live = spans[b][spans[b, :, 1] > spans[b, :, 0]]
        return (
            "nothing"
            if live.numel() == 0
            else f"bytes [{int(live[:, 0].min())}, {int(live[-1, 1])})"
        )

    raise ValueError(
        f"student_spans and teacher_spans of sequence {b} do not cover the same "
        f"text: the student covers {cover(student)}, the teacher {cover(teacher)}; "
        f"both must be spans of one text (same first start and last end)"
    )


def align_spans(
    student_spans: torch.Tensor, teacher_spans: torch.Tensor, *, backend: str = "auto"
) -> Alignment:
    """Aligns two tokenizations of the same texts into chunks by their tokens' byte spans.

    A chunk closes at every byte where both tokenizations end a token; each token belongs to the
    chunk closing at the first common end at or after its own end, so chunks are contiguous runs
    of tokens on both sides holding the same bytes. Linear time per sequence.

    Args:
        student_spans: integer ``[B, T_s, 2]``, ``[start, end)`` UTF-8 byte offsets of each
            student token into its text (``byte_offsets``). Tokens with ``end <= start`` take no
            part (special tokens, BOS/EOS: empty spans; padding: ``(-1, -1)``). Only the ends
            decide the chunks: a token's bytes are taken to run from the previous token's end.
        teacher_spans: integer ``[B, T_t, 2]``, the same texts under the teacher's tokenizer.
        backend: ``"auto"`` (``cpu`` for CPU tensors, else ``torch``), ``"cpu"`` (native) or
            ``"torch"`` (vectorized PyTorch, any device).

    Returns:
        ``Alignment(student_chunk_id, teacher_chunk_id, num_chunks)``: int32 ``[B, T_s]``,
        ``[B, T_t]`` chunk ids (0-based per sequence, non-decreasing, -1 for tokens in no
        chunk) and int32 ``[B]`` chunk counts, on the spans' device.

    Raises:
        ValueError: shapes differ in batch size; a token taking part starts below 0 or ends
            before the previous one; the two sides do not cover the same bytes (different first
            start or last end, or tokens on one side only).
    """
    check_backend_name(backend)
    student = _check_spans("student_spans", student_spans)
    teacher = _check_spans("teacher_spans", teacher_spans)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student_spans {tuple(student.shape)} and teacher_spans "
            f"{tuple(teacher.shape)} must have the same batch size"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_spans are on {student.device} but teacher_spans on {teacher.device}"
        )
    name = resolve_backend("align_spans", backend, student.device)
    if name == "cpu":
        out = _align_cpu(student, teacher)
    else:
        out = _align_torch(student, teacher)
    s_ids, t_ids, count, status, detail = out
    _raise_on_status(status, detail, student, teacher)
    return Alignment(s_ids, t_ids, count)
