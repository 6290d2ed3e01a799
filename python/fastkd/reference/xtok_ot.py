"""Plain-PyTorch optimal transport across tokenizations: the readable statement of
``fastkd.xtok.xtok_ot_loss`` and its test oracle.

Written for clarity, not speed: one sequence at a time, its counted positions selected by
boolean indexing, the chunk prior and the band built entry by entry in Python loops, and the
plan from a plain log-domain Sinkhorn loop of its own, run to ``tol`` in the cost's dtype. The
value is stated with the plan held fixed, so autograd gives the envelope gradient dC = P.
"""

from __future__ import annotations

import torch

from .ot_losses import pairwise_cost_reference

__all__ = ["log_sinkhorn_plan", "xtok_ot_loss_reference"]

# The band's penalty: the cost's bound plus prior_weight plus this many eps (xtok/ot.py).
BAND_PENALTY_EPS = 100.0
COST_BOUND = {"cosine": 2.0, "sorted_l1": 2.0, "l1": 1.0, "sqeuclidean": 1.0}


def log_sinkhorn_plan(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, eps: float, tol: float, max_iters: int
) -> torch.Tensor:
    """The entropic OT plan of one ``[n, m]`` cost between weights ``a [n]`` and ``b [m]`` (all
    positive), by log-domain Sinkhorn: f_i = -eps LSE_j((g_j - C_ij) / eps + log b_j), then
    g_j likewise, until the L1 error of the row marginal is below ``tol``. ``+inf`` costs are
    pairs that carry no mass. No gradient flows through it."""
    c = cost.detach()
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(max_iters):
        f = -eps * torch.logsumexp((g[None, :] - c) / eps + log_b[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - c) / eps + log_a[:, None], dim=0)
        plan = torch.exp((f[:, None] + g[None, :] - c) / eps + log_a[:, None] + log_b[None, :])
        if float((plan.sum(1) - a).abs().sum()) < tol:
            break
    return plan


def _sorted_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """Each row sorted in descending order, then cut or zero-padded to ``width`` entries."""
    rows = x.sort(dim=-1, descending=True).values[:, :width]
    return torch.cat([rows, rows.new_zeros(rows.shape[0], width - rows.shape[1])], dim=1)


def _weights(ids: list[int], other_ids: list[int], marginals: str) -> list[float]:
    """Each counted position's weight (0 for the others) of one side of one sequence."""
    if marginals == "positions":
        counted = [k for k in ids if k >= 0]
        return [1.0 / len(counted) if k >= 0 else 0.0 for k in ids]
    shared = {k for k in ids if k >= 0} & {k for k in other_ids if k >= 0}
    return [1.0 / (len(shared) * ids.count(k)) if k in shared else 0.0 for k in ids]


def _sequence(xs, xt, s_ids, t_ids, opts, exact_band, dtype):
    """(value, plan [N, M]) of one sequence in ``dtype``; None when a side has no counted
    position."""
    s_w = _weights(s_ids, t_ids, opts["marginals"])
    t_w = _weights(t_ids, s_ids, opts["marginals"])
    rows = [i for i, w in enumerate(s_w) if w > 0]
    cols = [j for j, w in enumerate(t_w) if w > 0]
    if not rows or not cols:
        return None
    kind = opts["cost"]
    x, y = xs[rows], xt[cols]
    if opts["projection"] is not None:
        x = opts["projection"](x)
    x, y = x.to(dtype), y.to(dtype)
    if kind == "sorted_l1":
        width = opts["topk"] if opts["topk"] is not None else max(x.shape[1], y.shape[1])
        c = pairwise_cost_reference("l1", _sorted_rows(x, width), _sorted_rows(y, width))
    else:
        c = pairwise_cost_reference(kind, x, y)
    top = float(c.detach().max())
    if kind in ("l1", "sqeuclidean") and top > 0:
        c = c / top  # a constant: no gradient through the maximum
    s_c, t_c = [s_ids[i] for i in rows], [t_ids[j] for j in cols]
    span = max(1, max(s_c + t_c) - min(s_c + t_c))
    # 0 on the same chunk, prior_weight between the sequence's two farthest chunks
    prior = [[opts["prior_weight"] * abs(ci - cj) / span for cj in t_c] for ci in s_c]
    c = c + torch.tensor(prior, dtype=c.dtype)
    solve = c.detach().clone()
    band = opts["band"]
    if band is not None:
        penalty = (
            float("inf")
            if exact_band
            else COST_BOUND[kind] + opts["prior_weight"] + BAND_PENALTY_EPS * opts["eps"]
        )
        for i, ci in enumerate(s_c):
            for j, cj in enumerate(t_c):
                if abs(ci - cj) > band:
                    solve[i, j] += penalty
    a = torch.tensor([s_w[i] for i in rows], dtype=c.dtype)
    b = torch.tensor([t_w[j] for j in cols], dtype=c.dtype)
    plan = log_sinkhorn_plan(
        solve, a, b, eps=opts["eps"], tol=opts["tol"], max_iters=opts["max_iters"]
    )
    full = torch.zeros(len(s_ids), len(t_ids), dtype=c.dtype)
    full[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = plan
    return (plan * c).sum(), full


def xtok_ot_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_chunk_id: torch.Tensor,
    teacher_chunk_id: torch.Tensor,
    *,
    cost: str = "cosine",
    projection=None,
    topk: int | None = 50,
    prior_weight: float = 1.0,
    band: int | None = None,
    eps: float = 0.1,
    max_iters: int = 1000,
    tol: float = 1e-6,
    reduction: str = "mean",
    marginals: str = "positions",
    exact_band: bool = False,
    return_plans: bool = False,
):
    """``xtok_ot_loss`` (see there) sequence by sequence: the counted positions (chunk id >= 0,
    and with ``marginals="chunks"`` a chunk both sides count), the cost c(x_i, y_j) (l1 and
    sqeuclidean divided by their largest value), plus prior_weight |c_i - c_j| / span, the
    band's penalty on the pairs more than ``band`` chunks apart (``exact_band``: +inf, which
    removes them from the plan outright), the plan from ``log_sinkhorn_plan``, and the value
    <P, C> without the penalty. Computes in float64 for float64 inputs, else float32.

    Returns the loss (scalar, or ``[B]`` for ``"none"``), and with ``return_plans`` also the
    plans ``[B, N, M]`` (0 at uncounted positions and for sequences without any)."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    opts = dict(
        cost=cost,
        projection=projection,
        topk=topk,
        prior_weight=float(prior_weight),
        band=band,
        eps=float(eps),
        max_iters=max_iters,
        tol=tol,
        marginals=marginals,
    )
    batch, n, m = student.shape[0], student.shape[1], teacher.shape[1]
    values, plans, counted = [], torch.zeros(batch, n, m, dtype=dtype), 0
    for k in range(batch):
        out = _sequence(
            student[k],
            teacher[k],
            student_chunk_id[k].tolist(),
            teacher_chunk_id[k].tolist(),
            opts,
            exact_band,
            dtype,
        )
        if out is None:
            values.append(torch.zeros((), dtype=dtype))
            continue
        counted += 1
        values.append(out[0].to(dtype))
        plans[k] = out[1]
    per_seq = torch.stack(values) if values else torch.zeros(0, dtype=dtype)
    if reduction == "none":
        loss = per_seq
    elif reduction == "sum":
        loss = per_seq.sum()
    else:
        loss = per_seq.sum() / max(counted, 1)
    return (loss, plans) if return_plans else loss
