"""GOLD's cross-tokenizer loss from the final hidden states and the lm_heads, without a
tokens x vocab logits tensor for either model.

``fused_linear_gold_loss`` computes what ``gold_loss`` computes on ``z = logit_scale * (hidden
@ weight.T + bias)``, from two kinds of rows:

* the continuation tokens of each counted chunk (its positions after the first): their
  log-probabilities come from ``fused_linear_logprobs`` (chunked lm_head, the student's with
  gradients to hidden, weight and bias; the teacher's under no_grad), summed per chunk;
* the first position of each counted chunk: its logits row, formed ``block_rows`` chunks at a
  time from the gathered hidden rows and the weight, in the forward and again in the backward,
  which writes the rows' gradient into the hidden states' gradient and adds ``g^T x`` into the
  weight's (one ``[V, H]`` buffer for all blocks).

Memory beyond the inputs: the gradients of the student's hidden states, weight and bias,
``fused_linear_logprobs``' chunk buffers, a few ``block_rows x V`` tensors for the merged rows,
and per-token and per-chunk vectors.
"""

from __future__ import annotations

import torch

from ..ops._chunked_lm_head import autocast_operands, check_head, check_scale, chunk_logits
from ..ops._chunked_lm_head import gemm_operand
from ..ops._checks import INT64_MAX, check_int, check_num_items
from ..ops._registry import resolve_backend
from ..ops.fused_linear_logprobs import fused_linear_logprobs
from .chunk_losses import _check_int
from .gold import (
    _check_options,
    _chunk_sums,
    _gold_layout,
    _hybrid_rule,
    _Layout,
    _reduce,
    _row_loss_grads,
    _row_losses,
    _RowRule,
    _Side,
    check_targets,
)
from .vocab_map import VocabMap

__all__ = ["fused_linear_gold_loss"]


def _head_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight a logits GEMM reads: float64 as it is, else ``gemm_operand``'s (an fp32 copy
    of a low-precision weight where no GEMM with fp32 output exists, as on CPU)."""
    return weight if weight.dtype == torch.float64 else gemm_operand(weight)


def _head_rows(hidden, weight_mm, bias, logit_scale, batch, pos) -> torch.Tensor:
    """``logit_scale * (hidden[batch, pos] @ W^T + bias)``: ``[n, V]`` float32 (float64 for
    float64 operands)."""
    x = hidden[batch, pos]
    if weight_mm.dtype != torch.float64:
        return chunk_logits(x, weight_mm, bias, logit_scale, None)
    z = torch.mm(x, weight_mm.t())
    if bias is not None:
        z.add_(bias)
    return z if logit_scale == 1.0 else z.mul_(logit_scale)


def _first_row_fn(hidden, weight_mm, bias, logit_scale, side: _Side):
    return lambda lo, hi: _head_rows(
        hidden, weight_mm, bias, logit_scale, side.first_batch[lo:hi], side.first_pos[lo:hi]
    )


class _GoldFromHidden(torch.autograd.Function):
    """``[R]`` GOLD losses of the counted chunks, the first positions' logits formed per block
    from the hidden states and the heads; ``s_cont`` / ``t_cont`` ``[R]`` are the chunks'
    continuation log-probabilities (``s_cont`` may carry a gradient)."""

    @staticmethod
    def forward(
        ctx,
        s_hidden,
        s_weight,
        s_bias,
        s_cont,
        t_hidden,
        t_weight,
        t_bias,
        t_cont,
        layout: _Layout,
        rule: _RowRule,
        block_rows: int,
        scales: tuple[float, float],
    ):
        with torch.autocast(s_hidden.device.type, enabled=False):
            losses = _row_losses(
                rule,
                block_rows,
                _first_row_fn(s_hidden, _head_operand(s_weight), s_bias, scales[0], layout.student),
                _first_row_fn(t_hidden, _head_operand(t_weight), t_bias, scales[1], layout.teacher),
                s_cont,
                t_cont,
            )
        ctx.layout, ctx.rule, ctx.block_rows, ctx.scales = layout, rule, block_rows, scales
        ctx.save_for_backward(
            s_hidden, s_weight, s_bias, s_cont, t_hidden, t_weight, t_bias, t_cont
        )
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        s_hidden, s_weight, s_bias, s_cont, t_hidden, t_weight, t_bias, t_cont = ctx.saved_tensors
        need_hidden, need_weight, need_bias, need_cont = ctx.needs_input_grad[:4]
        side, scale = ctx.layout.student, ctx.scales[0]
        work = s_cont.dtype
        with torch.autocast(s_hidden.device.type, enabled=False):
            s_mm = _head_operand(s_weight)
            # The weight's and bias's gradients accumulate over the blocks in float32 (float64).
            grad_hidden = torch.zeros_like(s_hidden) if need_hidden else None
            grad_weight = s_weight.new_zeros(s_weight.shape, dtype=work) if need_weight else None
            grad_bias = s_weight.new_zeros(s_weight.shape[0], dtype=work) if need_bias else None

            def put_row_grad(lo, hi, g):
                # g is dL/dz for z = s (x W^T + b): the GEMMs take s * g.
                batch, pos = side.first_batch[lo:hi], side.first_pos[lo:hi]
                if scale != 1.0:
                    g = g.mul_(scale)
                if need_hidden:
                    g_mm = g if g.dtype == s_mm.dtype else g.to(s_mm.dtype)
                    grad_hidden.index_put_((batch, pos), (g_mm @ s_mm).to(grad_hidden.dtype))
                if need_weight:
                    grad_weight.addmm_(g.t(), s_hidden[batch, pos].to(work))
                if need_bias:
                    grad_bias.add_(g.sum(0))

            grad_cont = _row_loss_grads(
                ctx.rule,
                ctx.block_rows,
                _first_row_fn(s_hidden, s_mm, s_bias, scale, side),
                _first_row_fn(
                    t_hidden, _head_operand(t_weight), t_bias, ctx.scales[1], ctx.layout.teacher
                ),
                s_cont,
                t_cont,
                grad_rows,
                put_row_grad,
            )
        return (
            grad_hidden,
            grad_weight.to(s_weight.dtype) if need_weight else None,
            grad_bias.to(s_bias.dtype) if need_bias else None,
            grad_cont if need_cont else None,
            *(None,) * 8,
        )


def _continuation(hidden, weight, bias, side: _Side, n_rows, temperature, logit_scale, backend):
    """``[R]``: each counted chunk's summed continuation log-probabilities (each at >= log 1e-8)
    from the fused lm_head, on the gathered continuation rows only."""
    if side.cont_batch.numel() == 0:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    logprob = fused_linear_logprobs(
        hidden[side.cont_batch, side.cont_pos],
        weight,
        side.cont_targets,
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        backend=backend,
    ).logprob
    return _chunk_sums(logprob, side.cont_row, n_rows)


def fused_linear_gold_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_targets: torch.Tensor,
    teacher_targets: torch.Tensor,
    student_chunk_id: torch.Tensor,
    teacher_chunk_id: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    merge: bool = True,
    chunk_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    vocab_map: VocabMap | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    block_rows: int = 64,
    reduction: str = "mean",
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GOLD's cross-tokenizer loss (``gold_loss``) from both models' final hidden states and
    lm_heads, without forming either model's ``[tokens, V]`` logits.

    With ``z_s = logit_scale * (student_hidden @ student_weight.T + student_bias)`` and ``z_t``
    likewise, ``merge=True`` gives ``gold_loss(z_s, z_t, student_targets, teacher_targets,
    student_chunk_id, teacher_chunk_id, ...)`` (equal to rounding). ``merge=False`` drops the
    continuation factors: plain ULD (or the hybrid) between the two models' next-token
    distributions at each chunk's first position, where both have read the same bytes; it
    equals ``gold_loss`` with every chunk cut to its first token (chunk id -1 at the chunk's
    later positions).

    Args:
        student_hidden: ``[B, T_s, H_s]`` float32/bfloat16/float16 (float64 with
            ``backend="torch"`` or ``"auto"``); ``student_hidden[b, t]`` predicts
            ``student_targets[b, t]``.
        student_weight: ``[V_s, H_s]`` lm_head weight; ``student_bias``: ``[V_s]`` or None.
            Hidden states, weight and bias get gradients.
        teacher_hidden, teacher_weight, teacher_bias: ``[B, T_t, H_t]``, ``[V_t, H_t]``,
            ``[V_t]`` or None; no gradient.
        student_targets, teacher_targets: integer ``[B, T_s]``, ``[B, T_t]``, the token each
            position predicts: ids in ``[0, V)`` or ``ignore_index`` (its chunk is then not
            counted) at positions in a chunk, any value elsewhere.
        student_chunk_id, teacher_chunk_id: integer ``[B, T_s]``, ``[B, T_t]`` (``align_spans``
            of the targets' spans), -1 outside chunks.
        logit_scale, teacher_logit_scale: multipliers of each head's output (before T).
        merge: True: GOLD's chain-rule merge; False: each chunk's first position only.
        chunk_mask, temperature, teacher_temperature, vocab_map, beta, matched_weight,
            unmatched_weight, reduction, ignore_index, num_items_in_batch: as in ``gold_loss``.
        block_rows: counted chunks per block of first-position rows (memory: a few
            ``block_rows x V`` float32 tensors).
        backend: ``fused_linear_logprobs``' backend for the continuation tokens (``"auto"``,
            ``"cpu"``, ``"triton"``, ``"torch"``).

    Returns:
        The loss, float32 (float64 for float64 inputs): a scalar, or ``[B, C]`` for
        ``reduction="none"`` (0 at uncounted chunks).
    """
    for side_name, hidden, weight, bias in (
        ("student", student_hidden, student_weight, student_bias),
        ("teacher", teacher_hidden, teacher_weight, teacher_bias),
    ):
        check_head(side_name, hidden, weight, bias)
        if hidden.dim() != 3:
            raise ValueError(
                f"{side_name}_hidden must have shape [B, T, H]; got {tuple(hidden.shape)}"
            )
    device = student_hidden.device
    if teacher_hidden.device != device:
        raise ValueError(
            f"teacher_hidden is on {teacher_hidden.device} but student_hidden on {device}"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must have the same batch size"
        )
    vocab_s, vocab_t = student_weight.shape[0], teacher_weight.shape[0]
    for name, ids, hidden in (
        ("student_targets", student_targets, student_hidden),
        ("teacher_targets", teacher_targets, teacher_hidden),
        ("student_chunk_id", student_chunk_id, student_hidden),
        ("teacher_chunk_id", teacher_chunk_id, teacher_hidden),
    ):
        _check_int(name, ids, hidden.shape[:2])
    check_int("ignore_index", ignore_index, -INT64_MAX - 1, INT64_MAX)
    check_num_items(num_items_in_batch)
    check_targets("student_targets", student_targets, student_chunk_id, vocab_s, ignore_index)
    check_targets("teacher_targets", teacher_targets, teacher_chunk_id, vocab_t, ignore_index)
    t_temp = _check_options(temperature, teacher_temperature, beta, block_rows, reduction)
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool; got {merge!r}")
    check_scale("logit_scale", logit_scale)
    check_scale("teacher_logit_scale", teacher_logit_scale)
    resolve_backend("fused_linear_logprobs", backend, device)
    split, weights = _hybrid_rule(
        vocab_map, vocab_s, vocab_t, device, matched_weight, unmatched_weight
    )
    layout = _gold_layout(
        student_chunk_id,
        teacher_chunk_id,
        student_targets,
        teacher_targets,
        chunk_mask,
        device,
        ignore_index,
    )
    student = autocast_operands([student_hidden, student_weight, student_bias], device.type)
    teacher = [
        None if t is None else t.detach()
        for t in autocast_operands([teacher_hidden, teacher_weight, teacher_bias], device.type)
    ]
    n_rows = layout.batch.numel()
    if merge:
        s_cont = _continuation(*student, layout.student, n_rows, temperature, logit_scale, backend)
        with torch.no_grad():
            t_cont = _continuation(
                *teacher, layout.teacher, n_rows, t_temp, teacher_logit_scale, backend
            )
    else:
        s_cont = torch.zeros(
            n_rows,
            dtype=torch.float64 if student[0].dtype == torch.float64 else torch.float32,
            device=device,
        )
        t_cont = torch.zeros(
            n_rows,
            dtype=torch.float64 if teacher[0].dtype == torch.float64 else torch.float32,
            device=device,
        )
    rule = _RowRule(float(temperature), float(t_temp), split, float(beta), weights)
    rows = _GoldFromHidden.apply(
        *student,
        s_cont,
        *teacher,
        t_cont,
        layout,
        rule,
        block_rows,
        (float(logit_scale), float(teacher_logit_scale)),
    )
    return _reduce(rows, layout, reduction, num_items_in_batch)
