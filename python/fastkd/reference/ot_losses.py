"""Plain-PyTorch SinKD and sequence-level OT losses: the readable statement and the test oracle.

Written for clarity, not memory: valid points are selected by boolean indexing (a host sync),
costs are formed from the materialized [n, m, d] differences, and sequences are solved one at a
time. Float64-capable. Two solvers:

- converged: log-domain Sinkhorn (``sinkhorn_reference``) run to ``tol`` on the detached cost,
  giving the plan P; the value is stated with P held fixed, so that autograd yields the envelope
  gradient dC = P: transport = sum P C, objective = transport + eps sum P log(P / (a b^T)).
- parity (the published procedure of SinKD and MultiLevelOT): P = exp(-C / eps), then a fixed
  number of rounds of (divide each row by its sum, then each column by its sum); value sum P C,
  differentiated through every round.
"""

from __future__ import annotations

import math

import torch

from .sinkhorn import sinkhorn_reference

__all__ = [
    "converged_plan",
    "fixed_rounds_plan",
    "pairwise_cost_reference",
    "sequence_ot_loss_reference",
    "sinkd_loss_reference",
]


def pairwise_cost_reference(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = c(x_i, y_j) for x ``[n, d]``, y ``[m, d]``, from the [n, m, d] differences:
    ``"l1"`` sum |x - y|, ``"l2"`` |x - y|, ``"sqeuclidean"`` |x - y|^2, ``"cosine"``
    1 - x.y / (|x| |y|) (1 where a vector is zero)."""
    diff = x[:, None, :] - y[None, :, :]
    if kind == "l1":
        return diff.abs().sum(-1)
    if kind == "l2":
        return diff.pow(2).sum(-1).sqrt()
    if kind == "sqeuclidean":
        return diff.pow(2).sum(-1)
    if kind == "cosine":
        norms = x.norm(dim=-1)[:, None] * y.norm(dim=-1)[None, :]
        dots = x @ y.T
        return 1.0 - torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 0.0)
    raise ValueError(f"unknown cost {kind!r}")


def fixed_rounds_plan(cost: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """The published loop on one ``[n, m]`` cost: K = exp(-C / eps); ``n_iters`` times,
    K <- K / (row sums), then K <- K / (column sums). Every column of the result sums to 1.
    As in github.com/2018cx/SinKD (loss.py, ``sinkhorn_normalized``, 20 rounds there) and
    github.com/2018cx/Multi-Level-OT (models/distillation_model.py, ``Sinkhorn_seq``, 10)."""
    plan = torch.exp(-cost / eps)
    for _ in range(n_iters):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return plan


def converged_plan(cost: torch.Tensor, eps: float, *, max_iters: int, tol: float) -> torch.Tensor:
    """The entropic OT plan of one ``[n, m]`` cost between uniform weights 1/n and 1/m (total
    mass 1), by log-domain Sinkhorn run until the L1 row-marginal error is below ``tol``. No
    gradient flows through it."""
    n, m = cost.shape
    c = cost.detach()
    log_a = torch.full((1, n), -math.log(n), dtype=c.dtype, device=c.device)
    log_b = torch.full((1, m), -math.log(m), dtype=c.dtype, device=c.device)
    s = sinkhorn_reference(
        c[None],
        log_a,
        log_b,
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        check_every=1,
        return_plan=True,
    )
    return s.plan[0]


def _ot_value(
    cost: torch.Tensor,
    *,
    eps: float,
    parity: bool,
    n_iters: int,
    max_iters: int,
    tol: float,
    value: str,
) -> torch.Tensor:
    if parity:
        return (fixed_rounds_plan(cost, eps, n_iters) * cost).sum()
    plan = converged_plan(cost, eps, max_iters=max_iters, tol=tol)
    transport = (plan * cost).sum()
    if value == "transport":
        return transport
    n, m = cost.shape
    # KL(P || a b^T) with a b^T = 1 / (n m); P held fixed, so d/dC = P.
    return transport + eps * (torch.special.xlogy(plan, plan) + plan * math.log(n * m)).sum()


def sinkd_loss_reference(
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
    value: str = "transport",
) -> torch.Tensor:
    """SinKD's loss (see ``fastkd.sinkd_loss``): the rows of ``[..., V]`` logits whose label is
    not ``ignore_index`` give q_i = softmax(z_s,i / T) and p_j = softmax(z_t,j / T) (common
    vocabulary prefix; the teacher detached); C_ij = c(q_i, p_j); the OT value between uniform
    weights. Computes in float64 for float64 inputs, else float32. Returns a scalar."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = (
        torch.float64
        if torch.float64 in (student_logits.dtype, teacher_logits.dtype)
        else torch.float32
    )
    zs = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab].to(dtype)
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab].to(dtype)
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        zs, zt = zs[keep], zt[keep]
    if zs.shape[0] == 0:
        return torch.zeros((), dtype=dtype, device=zs.device)
    q = torch.softmax(zs / temperature, dim=-1)
    p = torch.softmax(zt / temperature, dim=-1)
    c = pairwise_cost_reference(cost, q, p)
    return _ot_value(
        c, eps=eps, parity=parity, n_iters=n_iters, max_iters=max_iters, tol=tol, value=value
    )


def sequence_ot_loss_reference(
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
    value: str = "transport",
    reduction: str = "mean",
) -> torch.Tensor:
    """Sequence-level OT (see ``fastkd.sequence_ot_loss``): for each sequence b, the valid
    positions of ``student [B, T_s, D]`` and ``teacher [B, T_t, D]``, C_ij = c(s_i, t_j), and
    the OT value between uniform weights. Parity follows MultiLevelOT, whose cost has the
    teacher's positions on the rows: the rounds run on C^T. A sequence without valid positions
    on either side has loss 0 and is left out of the mean."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    losses, counted = [], 0
    for k in range(student.shape[0]):
        xs, xt = student[k].to(dtype), teacher[k].to(dtype)
        if student_mask is not None:
            xs = xs[student_mask[k] != 0]
        if teacher_mask is not None:
            xt = xt[teacher_mask[k] != 0]
        if xs.shape[0] == 0 or xt.shape[0] == 0:
            losses.append(torch.zeros((), dtype=dtype, device=student.device))
            continue
        counted += 1
        c = pairwise_cost_reference(cost, xs, xt)
        if parity:
            c = c.T
        losses.append(
            _ot_value(
                c,
                eps=eps,
                parity=parity,
                n_iters=n_iters,
                max_iters=max_iters,
                tol=tol,
                value=value,
            )
        )
    per_seq = torch.stack(losses) if losses else torch.zeros(0, dtype=dtype, device=student.device)
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    return per_seq.sum() / max(counted, 1)
