"""Batched log-domain Sinkhorn in plain PyTorch: the statement of the loop every backend follows
(csrc/common/sinkhorn_args.h), float64-capable, and differentiable through its iterations.

Problem b transports ``a[b, :n_b]`` to ``b[b, :m_b]`` at cost ``C[b, :n_b, :m_b]``. With
potentials f, g in the units of C and regularization e:

    F: f_i = -e LSE_j ((g_j - C_ij) / e + log b_j)
    G: g_j = -e LSE_i ((f_i - C_ij) / e + log a_i)
    E: err = sum_i a_i |exp((f_i - F(g)_i) / e) - 1|     (L1 row-marginal error)
    P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j)

Each problem runs F then G per iteration, on an eps-scaling schedule when asked (e starts at
``eps_start[b]`` and is multiplied by ``kappa`` after each iteration until it reaches ``eps``),
then checks E every ``check_every`` iterations at the final eps and stops below ``tol`` or at
``max_iters``. Problems stop independently; finished ones are frozen while others go on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "DenseCost",
    "SinkhornState",
    "log_weights",
    "plan_from_potentials",
    "run_sinkhorn",
    "sinkhorn_reference",
    "valid_mask",
]


class SinkhornState(NamedTuple):
    f: torch.Tensor  # [B, n] potentials (0 beyond n_b)
    g: torch.Tensor  # [B, m]
    iters: torch.Tensor  # [B] int32
    err: torch.Tensor  # [B] last row-marginal error computed
    eps: torch.Tensor  # [B] the e of the last iteration (eps unless stopped mid-schedule)
    transport: torch.Tensor  # [B] <P, C>
    mass: torch.Tensor  # [B] sum P
    plan: torch.Tensor | None


def valid_mask(
    sizes: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """[B, length] bool: entry k of problem b lies below sizes[b] (all True without sizes)."""
    if sizes is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return torch.arange(length, device=device)[None, :] < sizes.to(device)[:, None]


def log_weights(w: torch.Tensor) -> torch.Tensor:
    """log w, -inf where w <= 0 (a zero weight masks its entry)."""
    return torch.where(w > 0, torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), float("-inf"))


def plan_from_potentials(
    cost: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j), [B, n, m]; 0 where a weight is 0
    (log weight -inf), whatever the cost holds there."""
    e = eps.reshape(-1, 1, 1)
    logits = (f[:, :, None] + g[:, None, :] - cost) / e + log_a[:, :, None] + log_b[:, None, :]
    keep = torch.isfinite(log_a)[:, :, None] & torch.isfinite(log_b)[:, None, :]
    return torch.where(keep, torch.exp(torch.where(keep, logits, 0.0)), 0.0)


class DenseCost:
    """The half-iterations and the plan's statistics on a cost held as a ``[B, n, m]`` tensor
    (zeros outside the sizes)."""

    def __init__(self, c: torch.Tensor):
        self.c = c

    def f_update(self, g, lb, ec):
        """-e LSE_j ((g_j - C_ij) / e + log b_j), ec = e as [B, 1, 1]."""
        return -ec[:, :, 0] * torch.logsumexp((g[:, None, :] - self.c) / ec + lb[:, None, :], 2)

    def g_update(self, f, la, ec):
        return -ec[:, 0, :] * torch.logsumexp((f[:, :, None] - self.c) / ec + la[:, :, None], 1)

    def plan_stats(self, f, g, la, lb, e, return_plan):
        """(<P, C>, sum P, P or None)."""
        plan = plan_from_potentials(self.c, f, g, la, lb, e)
        return (plan * self.c).sum((1, 2)), plan.sum((1, 2)), plan if return_plan else None


def sinkhorn_reference(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    *,
    eps: float,
    max_iters: int,
    tol: float,
    check_every: int,
    eps_start: torch.Tensor | None = None,
    kappa: float = 0.5,
    n_sizes: torch.Tensor | None = None,
    m_sizes: torch.Tensor | None = None,
    init_g: torch.Tensor | None = None,
    return_plan: bool = False,
) -> SinkhornState:
    """Solves every problem of ``cost [B, n, m]`` with log weights ``log_a [B, n]``,
    ``log_b [B, m]`` (-inf marks a zero weight; entries beyond ``n_sizes``/``m_sizes`` are
    ignored whatever they hold). Computes in ``cost``'s dtype when it is float64, else float32.
    Differentiable w.r.t. cost and log weights through the iterations when they require grad.
    Host-side loop: checks whether all problems are done once per ``check_every`` iterations.
    """
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    batch, n, m = cost.shape
    rows = valid_mask(n_sizes, batch, n, cost.device)
    cols = valid_mask(m_sizes, batch, m, cost.device)
    inside = rows[:, :, None] & cols[:, None, :]
    c = torch.where(inside, cost.to(dtype), 0.0)
    return run_sinkhorn(
        DenseCost(c),
        log_a,
        log_b,
        rows,
        cols,
        dtype=dtype,
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        check_every=check_every,
        eps_start=eps_start,
        kappa=kappa,
        init_g=init_g,
        return_plan=return_plan,
    )


def run_sinkhorn(
    cost_ops,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    dtype: torch.dtype,
    eps: float,
    max_iters: int,
    tol: float,
    check_every: int,
    eps_start: torch.Tensor | None,
    kappa: float,
    init_g: torch.Tensor | None,
    return_plan: bool,
) -> SinkhornState:
    """The loop, on any cost access ``cost_ops`` with DenseCost's three methods; ``rows``
    ``[B, n]`` and ``cols`` ``[B, m]`` mark the entries inside each problem's sizes."""
    batch, n = rows.shape
    m = cols.shape[1]
    device = rows.device
    empty = ~(rows.any(1) & cols.any(1))
    # An empty problem solves a dummy one (all weights 1, cost 0) so that no inf or NaN enters
    # the graph; its outputs are zeroed at the end.
    la = torch.where(rows, log_a.to(dtype), float("-inf")).masked_fill(empty[:, None], 0.0)
    lb = torch.where(cols, log_b.to(dtype), float("-inf")).masked_fill(empty[:, None], 0.0)
    a = torch.exp(la)

    # e in fp32, as the kernels hold it, so that schedules and stopping points agree.
    eps_final = torch.tensor(eps, dtype=torch.float32)
    kappa32 = torch.tensor(kappa, dtype=torch.float32)
    if eps_start is None:
        e = torch.full((batch,), eps, dtype=torch.float32, device=device)
    else:
        # An empty problem never iterates: its e stays eps (sinkhorn_args.h).
        start = eps_start.to(device=device, dtype=torch.float32)
        e = torch.where((start > eps_final) & ~empty, start, eps_final)

    def row_error(f, g, e_):
        ec = e_.to(dtype)[:, None, None]
        ratio = torch.exp((f - cost_ops.f_update(g, lb, ec)) / ec[:, :, 0])
        return torch.where(a > 0, a * (ratio - 1).abs(), 0.0).sum(1)

    f = torch.zeros(batch, n, dtype=dtype, device=device)
    g = (
        torch.zeros(batch, m, dtype=dtype, device=device)
        if init_g is None
        else torch.where(cols, init_g.to(device=device, dtype=dtype), 0.0)
    )
    iters = torch.zeros(batch, dtype=torch.int32, device=device)
    err = torch.zeros(batch, dtype=dtype, device=device)
    done = empty.clone()
    it = 0
    while not bool(done.all()):
        it += 1
        active = ~done
        ec = e.to(dtype)[:, None, None]
        f_new = cost_ops.f_update(g, lb, ec)
        g_new = cost_ops.g_update(f_new, la, ec)
        f = torch.where(active[:, None], f_new, f)
        g = torch.where(active[:, None], g_new, g)
        iters = torch.where(active, iters + 1, iters)
        stage = e > eps_final
        if it >= max_iters or (it % check_every == 0):
            check = active & (~stage | (it >= max_iters))
            if bool(check.any()):
                err_now = row_error(f, g, e)
                err = torch.where(check, err_now, err)
                done = done | (check & ((err_now < tol) | (it >= max_iters)))
        e = torch.where(active & stage & ~done, torch.maximum(e * kappa32, eps_final), e)

    transport, mass, plan = cost_ops.plan_stats(f, g, la, lb, e, return_plan)
    zero_rows = ~rows | empty[:, None]
    zero_cols = ~cols | empty[:, None]
    f = torch.where(zero_rows, 0.0, f)
    g = torch.where(zero_cols, 0.0, g)
    err = torch.where(empty, 0.0, err)
    transport = torch.where(empty, 0.0, transport)
    mass = torch.where(empty, 0.0, mass)
    if return_plan:
        plan = torch.where(empty[:, None, None], 0.0, plan)
    return SinkhornState(f, g, iters, err, e, transport, mass, plan)
