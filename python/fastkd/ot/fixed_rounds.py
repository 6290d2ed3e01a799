"""The published fixed-round Sinkhorn of SinKD and MultiLevelOT, run by ``sinkd_loss`` and
``sequence_ot_loss`` with ``parity=True``: a fixed number of un-stabilized row and column
normalizations of K = exp(-C / eps), differentiated through by autograd."""

from __future__ import annotations

import torch


def _safe_normalize(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t / t.sum(dim), with 0 where the whole sum is 0 (masked rows and columns; the published
    code divides 0 by 0 there and returns NaN). Bitwise the plain division elsewhere."""
    total = t.sum(dim, keepdim=True)
    return t / torch.where(total > 0, total, 1.0)


def _fixed_rounds_value(
    cost: torch.Tensor, valid: torch.Tensor, eps: float, n_iters: int
) -> torch.Tensor:
    """SinKD's / MultiLevelOT's Sinkhorn for cost ``[B, n, m]`` restricted to ``valid``:
    P = exp(-C / eps), then ``n_iters`` rounds of (divide every row by its sum, then every
    column by its sum); the value is sum_ij P_ij C_ij. Un-stabilized (a row whose entries all
    underflow contributes 0) and differentiated through by autograd, as published. Every
    column of P sums to 1 after a round, so the plan's mass is the number of valid columns,
    not 1. Returns ``[B]``."""
    plan = torch.where(valid, torch.exp(-cost / eps), 0.0)
    for _ in range(n_iters):
        plan = _safe_normalize(plan, 2)
        plan = _safe_normalize(plan, 1)
    return (plan * cost).sum((1, 2))
