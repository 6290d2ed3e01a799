"""sinkd_loss / sequence_ot_loss: distillation losses built on entropic optimal transport.

Both losses form a cost matrix between two point sets (student points on the rows, teacher points
on the columns), put uniform weights on the valid points, and return the OT value between them:

- ``sinkd_loss`` (SinKD, Cui et al. 2024, arXiv:2402.17110): one problem per batch; the points
  are the rows (tokens or examples) of the batch, each a distribution over the vocabulary; the
  cost is the B x B matrix of distances between student and teacher distributions.
- ``sequence_ot_loss`` (the sequence level of MultiLevelOT, Cui et al. 2025, arXiv:2412.14528):
  one problem per sequence; the points are the positions of that sequence.

The default solver is the converged log-domain Sinkhorn of ``sinkhorn_loss`` (envelope gradient:
dC = P). ``parity=True`` runs the published procedure instead: a fixed number of un-stabilized
normalization rounds of K = exp(-C / eps), differentiated through by autograd. Masked points
(ignored labels, padding) carry zero weight, so no host synchronization is needed to drop them;
their inputs are replaced by zeros before any arithmetic, so garbage (NaN) there never leaks.
The plain-PyTorch statement of both losses is ``reference/ot_losses.py``.

This module holds the two losses and the L1 cost; the fixed-round procedure of ``parity=True``
is in ``fixed_rounds``, the checks, masks and weights of their inputs in ``loss_inputs``.
"""

from __future__ import annotations

import numbers

import torch

from ..ops._checks import REDUCTIONS, check_labels, check_logits
from .features import pairwise_cost
from .fixed_rounds import _fixed_rounds_value
from .loss_inputs import (
    _apply_mask,
    _check_common,
    _check_positive,
    _compute_dtype,
    _uniform_weights,
)
from .sinkhorn_loss import sinkhorn_loss

__all__ = ["l1_cost", "sequence_ot_loss", "sinkd_loss"]

# Elements of one [rows, cols, width] tile of sign(x_i - y_j) in the L1 cost's backward pass.
L1_TILE_ELEMENTS = 1 << 24


# ---- the L1 cost, with a backward pass in bounded memory -------------------------------------


def _tiles(n: int, m: int, d: int, budget: int):
    """(i0, i1, k0, k1) ranges that cover rows [0, n) and features [0, d), each tile holding at
    most max(budget, m) elements of an [i1 - i0, m, k1 - k0] block."""
    width = min(d, max(1, budget // max(m, 1)))
    rows = max(1, budget // max(m * width, 1))
    for i0 in range(0, n, rows):
        for k0 in range(0, d, width):
            yield i0, min(i0 + rows, n), k0, min(k0 + width, d)


class _TiledL1Cost(torch.autograd.Function):
    """C_ij = sum_k |x_ik - y_jk| for x [B, n, d], y [B, m, d], with a backward pass in bounded
    memory: dL/dx_ik = sum_j G_ij sign(x_ik - y_jk) and dL/dy_jk = -sum_i G_ij sign(x_ik - y_jk)
    over tiles of rows and features of at most ``L1_TILE_ELEMENTS`` elements. The forward pass
    is ``torch.cdist(p=1)``, which accumulates each C_ij without an [n, m, d] intermediate.
    """

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return torch.cdist(x, y, p=1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad
        grad = grad.to(x.dtype)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        batch, n, d = x.shape
        m = y.shape[1]
        for b in range(batch):
            for i0, i1, k0, k1 in _tiles(n, m, d, L1_TILE_ELEMENTS):
                sign = torch.sign(x[b, i0:i1, None, k0:k1] - y[b, None, :, k0:k1])
                g = grad[b, i0:i1]  # [rows, m]
                if need_x:
                    grad_x[b, i0:i1, k0:k1] = torch.bmm(g[:, None, :], sign)[:, 0]
                if need_y:
                    grad_y[b, :, k0:k1] -= torch.einsum("im,imk->mk", g, sign)
        return grad_x, grad_y


def l1_cost(x: torch.Tensor, y: torch.Tensor, *, tiled: bool | None = None) -> torch.Tensor:
    """C_ij = sum_k |x_ik - y_jk| for x ``[B, n, d]``, y ``[B, m, d]`` (or ``[n, d]``,
    ``[m, d]``), differentiable in both (the sign of x_ik - y_jk at a tie is 0).

    ``torch.cdist(p=1)`` computes it without an [n, m, d] intermediate, and so does its
    backward pass on CPU; on CUDA the backward kernel allocates a [B, m, n, d] buffer
    (aten/src/ATen/native/cuda/DistanceKernel.cu, cdist_backward_kernel_impl): B x B x V for
    SinKD's cost over a 128k vocabulary. ``tiled`` (default: off CPU, when that buffer would
    exceed ``L1_TILE_ELEMENTS``) computes the backward pass over bounded tiles instead.
    """
    if tiled is None:
        tiled = x.device.type != "cpu" and x.numel() * y.shape[-2] > L1_TILE_ELEMENTS
    if not tiled:
        return torch.cdist(x, y, p=1.0)
    if x.dim() == 2:
        return _TiledL1Cost.apply(x[None], y[None])[0]
    return _TiledL1Cost.apply(x, y)


def _cost(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return l1_cost(x, y) if kind == "l1" else pairwise_cost(kind, x, y)


# ---- SinKD ----------------------------------------------------------------------------------


def sinkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    eps: float = 0.1,
    cost: str = "l1",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    parity: bool = False,
    n_iters: int = 20,
    max_iters: int = 1000,
    tol: float = 1e-6,
    eps_scaling: float | None = None,
    check_every: int = 10,
    value: str = "transport",
    backend: str = "auto",
) -> torch.Tensor:
    """SinKD: batch-level optimal transport between student and teacher output distributions.

    The N valid rows of the batch (tokens or examples) give two point sets: the student's
    q_i = softmax(z_s,i / T) and the teacher's p_j = softmax(z_t,j / T), distributions over the
    vocabulary (both cut to the common prefix min(V_s, V_t)). The cost is the N x N matrix
    C_ij = c(q_i, p_j), by default the L1 distance sum_v |q_iv - p_jv| (in [0, 2]); weights are
    uniform (1/N) over the valid rows on both sides; the loss is the OT value between the two
    sets. Cost: O(N^2 V) arithmetic; memory O(N^2) beyond the inputs, never N x N x V (see
    ``l1_cost``).

    Args:
        student_logits: ``[..., V_s]`` float (fp32/bf16/fp16/fp64); any leading shape, flattened
            to rows.
        teacher_logits: ``[..., V_t]``, same leading shape. No gradient flows to it.
        temperature: T > 0 of both softmaxes (SinKD's published code uses T = 2).
        eps: entropic regularization > 0, in the units of the cost (SinKD: 0.1).
        cost: ``"l1"`` (SinKD), ``"l2"``, ``"sqeuclidean"`` or ``"cosine"`` between the
            distributions.
        labels: optional ``[...]`` integer tensor; rows whose label equals ``ignore_index``
            are left out of both point sets (no loss, zero gradient; their logits never enter
            the arithmetic, so garbage there does not leak).
        ignore_index: the label value of ignored rows.
        parity: False (default): the converged log-domain solver (``sinkhorn_loss``); the
            value with ``value="transport"`` is <P, C> with P of total mass 1, differentiated
            by the envelope theorem (dC = P, the plan held fixed). True: the published
            procedure (2018cx/SinKD, loss.py, class ``Sinkhorn``/``saliency_mse``): K =
            exp(-C / eps), ``n_iters`` rounds of row then column normalization, loss
            sum_ij P_ij C_ij, autograd through the rounds. Its plan has column sums 1, i.e.
            mass N: as the rounds converge its value tends to N times the default's. The
            published code also multiplies the loss by a constant weight (0.0008 to 0.002
            across its versions), left to the caller here.
        n_iters: parity rounds (the published code runs 20: ``sinkhorn_loss(n_iters=20)``
            overrides its Sinkhorn function's default of 10).
        max_iters, tol, eps_scaling, check_every, backend: the converged solver's options
            (see ``fastkd.sinkhorn``); unused with ``parity=True``.
        value: ``"transport"`` (default, SinKD's <P, C>) or ``"objective"`` (the entropic
            objective <P, C> + eps KL(P || a b^T), whose envelope gradient is exact at
            convergence); parity supports ``"transport"`` only.

    Returns:
        A scalar: float32 (float64 when an input is float64), in the units of the cost (L1:
        probability mass moved times L1 distance). 0 when no row is valid.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same leading shape"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"student_logits are on {student_logits.device} but teacher_logits "
            f"on {teacher_logits.device}"
        )
    _check_positive("temperature", temperature)
    _check_common(eps=eps, cost=cost, parity=parity, n_iters=n_iters, value=value)
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    check_labels(labels, lead, student_logits.device, vocab, ignore_index)

    dtype = _compute_dtype(student_logits, teacher_logits)
    zs = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].to(dtype)
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab].to(dtype)
    rows = zs.shape[0]
    if rows == 0:
        return zs.sum() * 0.0
    if labels is None:
        valid = torch.ones(rows, dtype=torch.bool, device=zs.device)
    else:
        # Ignored rows are zeroed before the softmax: their garbage never enters the
        # arithmetic, and torch.where sends them an exact zero gradient.
        valid = labels.reshape(-1) != ignore_index
        zs = torch.where(valid[:, None], zs, 0.0)
        zt = torch.where(valid[:, None], zt, 0.0)
    q = torch.softmax(zs / temperature, dim=-1)
    p = torch.softmax(zt / temperature, dim=-1)
    c = _cost(cost, q, p)  # [N, N]
    if parity:
        inside = (valid[:, None] & valid[None, :])[None]
        return _fixed_rounds_value(c[None], inside, float(eps), int(n_iters))[0]
    solver = dict(
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        eps_scaling=eps_scaling,
        check_every=check_every,
        value=value,
        validate=False,
        backend=backend,
    )
    if labels is None:
        return sinkhorn_loss(c, **solver)
    count = valid.sum()[None]
    w = _uniform_weights(valid[None], count, dtype)[0]
    return torch.where(count[0] > 0, sinkhorn_loss(c, w, w, **solver), 0.0)


# ---- sequence-level OT ----------------------------------------------------------------------


def sequence_ot_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    student_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    cost: str = "cosine",
    eps: float = 0.1,
    parity: bool = False,
    n_iters: int = 10,
    max_iters: int = 1000,
    tol: float = 1e-6,
    eps_scaling: float | None = None,
    check_every: int = 10,
    value: str = "transport",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Sequence-level OT: per sequence b, optimal transport between the student's positions
    and the teacher's positions (sequences of different lengths and tokenizations).

    Each position is a vector, and the cost compares vectors of the same width: distributions
    over a shared (or shared-truncated, e.g. MultiLevelOT's top-50 sorted probabilities)
    vocabulary, or hidden states projected to a common width. Hidden states of different
    widths are not comparable: project one side first (e.g. a learned linear map of the
    teacher's states, as CoT2Align does). Per sequence the cost is
    C_ij = c(student[b, i], teacher[b, j]), ``[B, T_s, T_t]``; weights are uniform over the
    valid (mask != 0) positions, any pattern (not only left-aligned prefixes: masked positions
    carry zero weight, no host sync); the loss is the OT value.

    Args:
        student: ``[B, T_s, D]`` float vectors.
        teacher: ``[B, T_t, D]``. Gradients flow to both when they require grad (e.g. a
            trainable projection of the teacher); detach the teacher otherwise.
        student_mask, teacher_mask: ``[B, T_s]`` / ``[B, T_t]`` bool or 0/1; None = all valid.
            Vectors at masked positions are never read (NaN there does not leak) and get zero
            gradient. A sequence with no valid position on either side has loss 0.
        cost: ``"cosine"`` (1 - cos, in [0, 2]; default), ``"l1"`` (MultiLevelOT), ``"l2"``,
            ``"sqeuclidean"``.
        eps: entropic regularization > 0, in the units of the cost.
        parity: False (default): the converged log-domain solver (``sinkhorn_loss``, envelope
            gradient dC = P). True: MultiLevelOT's published procedure (2018cx/Multi-Level-OT,
            models/distillation_model.py, class ``Sinkhorn_seq``): K = exp(-C / eps),
            ``n_iters`` rounds of normalization with the teacher's positions on the rows (row
            then column normalization of K^T: the student's positions are normalized last),
            value sum_ij P_ij C_ij, autograd through the rounds; its plan has mass T_s (valid
            positions), not 1. To reproduce MultiLevelOT exactly, pass its inputs
            (softmax(x / 2) of the top-50 sorted probabilities), cost="l1", eps=0.1,
            reduction="sum", and scale by its weights (0.001 * 0.1) yourself.
        n_iters: parity rounds (MultiLevelOT runs 10: ``sinkhorn_loss(n_iters=10)`` overrides
            its Sinkhorn function's default of 20).
        max_iters, tol, eps_scaling, check_every, backend: the converged solver's options
            (see ``fastkd.sinkhorn``); unused with ``parity=True``.
        value: ``"transport"`` (default, <P, C>) or ``"objective"`` (entropic objective);
            parity supports ``"transport"`` only.
        reduction: ``"mean"`` over the sequences with valid positions on both sides,
            ``"sum"``, or ``"none"`` (``[B]``).

    Returns:
        A scalar (or ``[B]``): float32 (float64 when an input is float64), in the units of the
        cost times transported mass.
    """
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point; got dtype {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, T, D]; got {tuple(t.shape)}")
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            f"must have the same batch size B and width D (vectors of different "
            f"widths are not comparable: project one side first)"
        )
    if teacher.device != student.device:
        raise ValueError(f"student is on {student.device} but teacher on {teacher.device}")
    _check_common(eps=eps, cost=cost, parity=parity, n_iters=n_iters, value=value)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    dtype = _compute_dtype(student, teacher)
    xs, smask = _apply_mask("student_mask", student_mask, student.to(dtype))
    xt, tmask = _apply_mask("teacher_mask", teacher_mask, teacher.to(dtype))
    batch, t_s, t_t = xs.shape[0], xs.shape[1], xt.shape[1]
    count_s = t_s if smask is None else smask.sum(1)
    count_t = t_t if tmask is None else tmask.sum(1)
    nonempty = torch.as_tensor((count_s > 0) & (count_t > 0), device=xs.device).expand(batch)
    if batch == 0 or t_s == 0 or t_t == 0:
        per_seq = (xs.sum((1, 2)) + xt.sum((1, 2))) * 0.0
    else:
        c = _cost(cost, xs, xt)  # [B, T_s, T_t]
        if parity:
            # MultiLevelOT calls its Sinkhorn as (teacher, student): the teacher's positions
            # are the rows of its cost, and the order of the normalizations follows that.
            rows = xt.new_ones(batch, t_t, dtype=torch.bool) if tmask is None else tmask
            cols = xs.new_ones(batch, t_s, dtype=torch.bool) if smask is None else smask
            per_seq = _fixed_rounds_value(
                c.mT, rows[:, :, None] & cols[:, None, :], float(eps), int(n_iters)
            )
        else:
            a = None if smask is None else _uniform_weights(smask, count_s, dtype)
            b = None if tmask is None else _uniform_weights(tmask, count_t, dtype)
            per_seq = sinkhorn_loss(
                c,
                a,
                b,
                eps=eps,
                max_iters=max_iters,
                tol=tol,
                eps_scaling=eps_scaling,
                check_every=check_every,
                value=value,
                validate=False,
                backend=backend,
            )
        per_seq = torch.where(nonempty, per_seq, 0.0)
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    return per_seq.sum() / nonempty.sum().clamp_min(1).to(per_seq.dtype)
