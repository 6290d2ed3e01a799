"""GOLD's counted chunks, which ``gold_loss`` and ``fused_linear_gold_loss`` share: each chunk's
first position, which chunks a loss counts (present on both sides, in ``chunk_mask``, holding no
target equal to ``ignore_index``), and per side the positions of their first and continuation
tokens (``_Layout``, ``_gold_layout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _first_positions(chunk_id: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``[B, width]``: the first position of each chunk, -1 where the chunk is absent."""
    batch, length = chunk_id.shape
    ids = chunk_id.to(torch.int64)
    pos = torch.arange(length, device=ids.device).expand(batch, length)
    out = torch.full((batch, width + 1), length, dtype=torch.int64, device=ids.device)
    out.scatter_reduce_(1, ids + 1, pos, reduce="amin")
    out = out[:, 1:]
    return torch.where(out == length, -1, out)


def _width(chunk_id: torch.Tensor, num_chunks: int | None) -> int:
    top = int(chunk_id.max()) + 1 if chunk_id.numel() else 0
    return top if num_chunks is None else max(num_chunks, top)


class _Side(NamedTuple):
    """One side's positions: each counted chunk's first position, and the counted chunks' later
    positions (their continuation tokens), all int64 on the model's device."""

    first_batch: torch.Tensor  # [R]
    first_pos: torch.Tensor  # [R]
    cont_batch: torch.Tensor  # [M]
    cont_pos: torch.Tensor  # [M]
    cont_row: torch.Tensor  # [M], the counted chunk (row 0..R-1) each belongs to
    cont_targets: torch.Tensor  # [M], the token each predicts


class _Layout(NamedTuple):
    """The counted chunks, in (batch, chunk) order: row r is chunk ``chunk[r]`` of sequence
    ``batch[r]``; ``shape`` is (B, C) of the per-chunk output."""

    batch: torch.Tensor
    chunk: torch.Tensor
    shape: tuple[int, int]
    student: _Side
    teacher: _Side


def _check_chunk_ids(name: str, ids: torch.Tensor) -> None:
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"{name} must hold ids >= 0, or -1 outside chunks; got {int(ids.min())}")


def _side(chunk_id, targets, first, row_of, device) -> _Side:
    ids = chunk_id.to(torch.int64)
    slot = ids.clamp(min=0)
    row = torch.where(ids >= 0, row_of.gather(1, slot), -1)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    is_first = pos == first.gather(1, slot)
    first_batch, first_chunk = (row_of >= 0).nonzero(as_tuple=True)
    cont_batch, cont_pos = ((row >= 0) & ~is_first).nonzero(as_tuple=True)
    # Negative ids (-100) read as token 0, as merge_chunk_probs reads them.
    cont_targets = targets.to(device=ids.device, dtype=torch.int64)[cont_batch, cont_pos]
    parts = (
        first_batch,
        first[first_batch, first_chunk],
        cont_batch,
        cont_pos,
        row[cont_batch, cont_pos],
        cont_targets.clamp(min=0),
    )
    return _Side(*(t.to(device) for t in parts))


def _ignored_chunks(chunk_id, targets, ignore_index, shape) -> torch.Tensor:
    """Bool ``shape`` [B, C]: the chunks holding a position whose target is ``ignore_index``."""
    ids = chunk_id.to(torch.int64)
    hit = (targets.to(ids.device) == ignore_index) & (ids >= 0)
    out = torch.zeros(shape[0], shape[1] + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, torch.where(hit, ids + 1, 0), True)
    return out[:, 1:]


def _gold_layout(
    student_chunk_id,
    teacher_chunk_id,
    student_targets,
    teacher_targets,
    chunk_mask,
    device,
    ignore_index: int = -100,
) -> _Layout:
    """The counted chunks (present on both sides, in ``chunk_mask``, and holding no target
    equal to ``ignore_index`` on either side) and their positions."""
    _check_chunk_ids("student_chunk_id", student_chunk_id)
    _check_chunk_ids("teacher_chunk_id", teacher_chunk_id)
    width = max(_width(student_chunk_id, None), _width(teacher_chunk_id, None))
    s_first = _first_positions(student_chunk_id, width)
    t_first = _first_positions(teacher_chunk_id.to(s_first.device), width)
    counted = (s_first >= 0) & (t_first >= 0)
    counted &= ~_ignored_chunks(student_chunk_id, student_targets, ignore_index, counted.shape)
    counted &= ~_ignored_chunks(
        teacher_chunk_id.to(counted.device), teacher_targets, ignore_index, counted.shape
    )
    if chunk_mask is not None:
        if (
            not isinstance(chunk_mask, torch.Tensor)
            or chunk_mask.dtype != torch.bool
            or chunk_mask.dim() != 2
            or chunk_mask.shape[0] != counted.shape[0]
        ):
            raise ValueError(f"chunk_mask must be a bool tensor [B, C] with B = {counted.shape[0]}")
        mask = torch.zeros_like(counted)
        cols = min(width, chunk_mask.shape[1])
        mask[:, :cols] = chunk_mask[:, :cols].to(counted.device)
        counted &= mask
    batch, chunk = counted.nonzero(as_tuple=True)
    row_of = torch.full(counted.shape, -1, dtype=torch.int64, device=counted.device)
    row_of[batch, chunk] = torch.arange(batch.numel(), device=counted.device)
    return _Layout(
        batch.to(device),
        chunk.to(device),
        tuple(counted.shape),
        _side(student_chunk_id, student_targets, s_first, row_of, device),
        _side(teacher_chunk_id.to(s_first.device), teacher_targets, t_first, row_of, device),
    )
