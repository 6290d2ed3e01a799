"""Universal Logit Distillation (uld_loss forward): the Triton kernel over sorted rows.

The semantic twin of ``csrc/cpu/uld_loss_cpu.cpp``, for GPUs, where the sort itself is
torch.sort's (a segmented radix sort). Per chunk of rows, the launcher forms q = softmax(z_s / T_s)
and p = softmax(z_t / T_t) in fp32 and sorts both in descending order, stably (q with its
permutation); then one program per row walks the sorted rows, the shorter zero-padded:
  loss : L = sum_{i < max(V_s, V_t)} |q_(i) - p_(i)|, and <q, h> = sum_i q_(i) h_i with
         h_i = sign(q_(i) - p_(i)) (sign(0) = 0);
  grad : dL/dz_s at column order_i = grad_scale / T_s * q_(i) (h_i - <q, h>), scattered through
         the permutation in the student's dtype.
A row with NaN among its probabilities (softmax of all -inf, a NaN or +inf logit) gets loss and
gradient NaN. Workspace: about 24 bytes per element of a chunk (both rows of probabilities, their
sorted copies and the int64 permutation); chunks are sized to stay within a fixed budget.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import quiet_nan, row_warps, vocab_block, write_zero_row

__all__ = ["uld_loss_forward"]

# Elements (rows x (V_s + V_t)) sorted at a time: about 24 bytes each of workspace, so 800 MB.
CHUNK_ELEMENTS = 1 << 25


@triton.jit
def _uld_sorted_rows_kernel(
    sq_ptr,  # [rows, vs] fp32: each row's student probabilities, descending
    order_ptr,  # [rows, vs] int64: the column of each sorted student probability
    sp_ptr,  # [rows, vt] fp32: the teacher's probabilities, descending
    labels_ptr,  # [rows] int64, or None
    grad_ptr,  # [rows, vs] contiguous, student dtype
    loss_ptr,  # [rows] fp32
    vs,
    vt,
    scale,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    g_ptr = grad_ptr + row * vs
    ignored = False
    if HAS_LABELS:
        ignored = tl.load(labels_ptr + row) == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        write_zero_row(g_ptr, vs, BLOCK_V)
    else:
        # Loss pass: [BLOCK_V] lanes of |q_(i) - p_(i)| and q_(i) h_i; masked ranks read 0.
        width = tl.maximum(vs, vt)
        loss_acc = tl.zeros([BLOCK_V], tl.float32)
        dot_acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, width, BLOCK_V):
            i = start + offs
            sq = tl.load(sq_ptr + row * vs + i, mask=i < vs, other=0.0)
            sp = tl.load(sp_ptr + row * vt + i, mask=i < vt, other=0.0)
            h = tl.where(sq > sp, 1.0, tl.where(sq < sp, -1.0, 0.0))
            loss_acc += tl.abs(sq - sp)
            dot_acc += sq * h
        loss = tl.sum(loss_acc, axis=0)
        dot = tl.sum(dot_acc, axis=0)
        nan = quiet_nan()
        row_nan = tl.where(loss == loss, 0.0, nan)
        tl.store(loss_ptr + row, loss)

        # Gradient pass: scattered through the permutation (a row's columns, each once).
        for start in range(0, vs, BLOCK_V):
            i = start + offs
            mask = i < vs
            sq = tl.load(sq_ptr + row * vs + i, mask=mask, other=0.0)
            sp = tl.load(sp_ptr + row * vt + i, mask=i < vt, other=0.0)
            col = tl.load(order_ptr + row * vs + i, mask=mask, other=0)
            h = tl.where(sq > sp, 1.0, tl.where(sq < sp, -1.0, 0.0))
            g = scale * (sq * (h - dot)) + row_nan
            tl.store(g_ptr + col, g.to(grad_ptr.dtype.element_ty), mask=mask)


def uld_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    grad: torch.Tensor,
    loss: torch.Tensor,
    *,
    student_temperature: float,
    teacher_temperature: float,
    ignore_index: int,
    grad_scale: float,
) -> None:
    """Writes ``loss[r]`` and ``grad[r, :]`` (``grad_scale`` dLoss_r/dz_s) for every row.

    ``student`` ``[N, V_s]`` and ``teacher`` ``[N, V_t]`` (any strides), ``labels`` ``[N]`` int64
    or None, ``grad`` contiguous ``[N, V_s]`` in the student's dtype, ``loss`` contiguous fp32
    ``[N]``.
    """
    n_rows, vs = student.shape
    vt = teacher.shape[-1]
    if n_rows == 0:
        return
    block_v = vocab_block(max(vs, vt))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (vs + vt))
    scale = grad_scale / student_temperature
    for start in range(0, n_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, n_rows)
        q = torch.softmax(student[start:end].float() / student_temperature, dim=-1)
        sq, order = q.sort(dim=-1, descending=True, stable=True)
        del q
        p = torch.softmax(teacher[start:end].float() / teacher_temperature, dim=-1)
        sp = p.sort(dim=-1, descending=True, stable=True).values
        del p
        _uld_sorted_rows_kernel[(end - start,)](
            sq,
            order,
            sp,
            None if labels is None else labels[start:end],
            grad[start:end],
            loss[start:end],
            vs,
            vt,
            scale,
            ignore_index,
            HAS_LABELS=labels is not None,
            BLOCK_V=block_v,
            num_warps=row_warps(block_v, 8),
        )
