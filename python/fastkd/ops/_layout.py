"""Row layouts: how the native and Triton kernels address rows of ``[..., V]`` logits.

A kernel sees ``n_rows`` rows of unit-stride columns; row ``r`` starts at element
``(r // inner_rows) * outer_stride + (r % inner_rows) * inner_stride`` of the tensor's storage
(relative to its data pointer). Two levels cover contiguous tensors, slices such as
``logits[:, :-1, :]`` of a ``[B, T, V]`` tensor and stride-0 (broadcast) rows without a copy;
anything else is copied to a contiguous tensor first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowLayout", "row_layout"]


@dataclass(frozen=True)
class RowLayout:
    outer_stride: int
    inner_stride: int


def _merge_dims(sizes: list[int], strides: list[int]) -> tuple[list[int], list[int]]:
    """Drop size-1 dims and merge neighbours that address memory as one dim."""
    out_sizes: list[int] = []
    out_strides: list[int] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out_sizes and out_strides[-1] == stride * size:
            out_sizes[-1] *= size
            out_strides[-1] = stride
        else:
            out_sizes.append(size)
            out_strides.append(stride)
    return out_sizes, out_strides


def row_layout(
    x: torch.Tensor, inner_rows: int | None = None
) -> tuple[torch.Tensor, int, RowLayout]:
    """Returns ``(tensor, inner_rows, layout)`` for the rows of ``x`` (shape ``[..., V]``).

    ``tensor`` is ``x`` itself when its rows fit the two-level layout and its last dim has unit
    stride, else a contiguous copy. When ``inner_rows`` is given (to share one row numbering with
    another operand) the layout is built for that inner row count, copying if necessary.
    """
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] > 0 else 0
    if x.dim() == 0:
        raise ValueError("logits must have at least one dimension [..., V]")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    sizes, strides = _merge_dims(list(x.shape[:-1]), list(x.stride()[:-1]))
    if inner_rows is None:
        if len(sizes) == 0:
            return x, 1, RowLayout(0, 0)
        if len(sizes) == 1:
            return x, max(n_rows, 1), RowLayout(0, strides[0])
        if len(sizes) == 2:
            return x, sizes[1], RowLayout(strides[0], strides[1])
        x = x.contiguous()
        return x, max(n_rows, 1), RowLayout(0, x.shape[-1])
    layout = _layout_for(sizes, strides, n_rows, inner_rows)
    if layout is None:
        x = x.contiguous()
        layout = RowLayout(inner_rows * x.shape[-1], x.shape[-1])
    return x, inner_rows, layout


def _layout_for(
    sizes: list[int], strides: list[int], n_rows: int, inner_rows: int
) -> RowLayout | None:
    if len(sizes) == 0:
        return RowLayout(0, 0)
    if len(sizes) == 1:
        # One run of rows with one stride: valid for any split of it.
        return RowLayout(inner_rows * strides[0], strides[0])
    if len(sizes) == 2 and sizes[1] == inner_rows:
        return RowLayout(strides[0], strides[1])
    return None
