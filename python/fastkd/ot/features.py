"""Optimal transport between point clouds whose cost is computed from features, streamed.

For x ``[B, n, d]`` and y ``[B, m, d]`` the cost C_ij = c(x_i, y_j) is formed one block of rows
(or columns) at a time inside every half-iteration and again in the backward, so that a solve
holds O(B (n + m) d) plus one block, never the ``[B, n, m]`` cost or plan. Each block costs
B r m d operations per half-iteration on top of the log-sum-exp: the price of the memory. The
iteration is ``reference/sinkhorn.py``'s loop (``run_sinkhorn``) on this cost access, in plain
PyTorch ops on any device.

Gradients (envelope theorem, as ``sinkhorn_loss``): dL/dx_i = sum_j P_ij d c(x_i, y_j)/dx_i
and likewise for y, each block's cost rebuilt under autograd and contracted with that block of
the plan, which is rebuilt from the saved potentials.
"""

from __future__ import annotations

import torch

from ..reference.sinkhorn import log_weights, plan_from_potentials, run_sinkhorn

__all__ = [
    "COSTS",
    "STREAM_BLOCK_BYTES",
    "StreamedFeatureCost",
    "pairwise_cost",
    "solve_streamed",
    "streamed_ot_value",
]

# Costs computed from features x [B, n, d], y [B, m, d].
COSTS = ("l1", "l2", "sqeuclidean", "cosine")

# Bytes of one block's temporaries: about BLOCK_TEMPORARIES [B, r, m] tensors live at once (the
# cost block, its mask, the scaled exponents, the log-sum-exp's shifted values and exponentials).
STREAM_BLOCK_BYTES = 64 << 20
BLOCK_TEMPORARIES = 12


def pairwise_cost(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = c(x_i, y_j) for x ``[..., n, d]``, y ``[..., m, d]``: ``"l1"`` sum |x - y|,
    ``"l2"`` |x - y|, ``"sqeuclidean"`` |x - y|^2, ``"cosine"`` 1 - cos(x, y) (1 for a zero
    vector against anything). Differentiable in x and y."""
    if kind == "l1":
        return torch.cdist(x, y, p=1.0)
    if kind == "l2":
        return torch.cdist(x, y, p=2.0)
    if kind == "sqeuclidean":
        sq = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.mT
        return sq.clamp_min(0.0)
    if kind == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        yn = y / y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
        return 1.0 - xn @ yn.mT
    raise ValueError(f"unknown cost {kind!r}; choose from {COSTS} or pass a cost tensor")


def _block(length: int, batch: int, other: int, dtype: torch.dtype) -> int:
    per_line = BLOCK_TEMPORARIES * batch * max(other, 1) * torch.finfo(dtype).bits // 8
    return max(1, min(length, STREAM_BLOCK_BYTES // per_line))


class StreamedFeatureCost:
    """``run_sinkhorn``'s cost access for C = pairwise_cost(kind, x, y), by blocks; entries
    outside the sizes (``rows`` ``[B, n]``, ``cols`` ``[B, m]``) read as 0 whatever the
    features hold there."""

    def __init__(
        self, kind: str, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ):
        self.kind, self.x, self.y, self.rows, self.cols = kind, x, y, rows, cols
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.dtype = dtype
        batch, n = rows.shape
        m = cols.shape[1]
        self.row_block = _block(n, batch, m, dtype)
        self.col_block = _block(m, batch, n, dtype)

    def rows_cost(self, r0: int, r1: int, x=None, y=None) -> torch.Tensor:
        """C[:, r0:r1, :] (0 outside the sizes), from ``x``/``y`` (default: the stored ones)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        c = pairwise_cost(self.kind, x[:, r0:r1].to(self.dtype), y.to(self.dtype))
        inside = self.rows[:, r0:r1, None] & self.cols[:, None, :]
        return torch.where(inside, c, 0.0)

    def max_abs_cost(self) -> torch.Tensor:
        """[B] float32: max |C_ij| inside each problem's sizes (eps-scaling's first e)."""
        n = self.rows.shape[1]
        return (
            torch.stack(
                [
                    self.rows_cost(r0, min(r0 + self.row_block, n)).abs().amax((1, 2))
                    for r0 in range(0, n, self.row_block)
                ]
            )
            .amax(0)
            .float()
        )

    def cols_cost(self, c0: int, c1: int) -> torch.Tensor:
        c = pairwise_cost(self.kind, self.x.to(self.dtype), self.y[:, c0:c1].to(self.dtype))
        inside = self.rows[:, :, None] & self.cols[:, None, c0:c1]
        return torch.where(inside, c, 0.0)

    def f_update(self, g, lb, ec):
        n = self.rows.shape[1]
        return torch.cat(
            [
                -ec[:, :, 0]
                * torch.logsumexp(
                    (g[:, None, :] - self.rows_cost(r0, min(r0 + self.row_block, n))) / ec
                    + lb[:, None, :],
                    2,
                )
                for r0 in range(0, n, self.row_block)
            ],
            dim=1,
        )

    def g_update(self, f, la, ec):
        m = self.cols.shape[1]
        return torch.cat(
            [
                -ec[:, 0, :]
                * torch.logsumexp(
                    (f[:, :, None] - self.cols_cost(c0, min(c0 + self.col_block, m))) / ec
                    + la[:, :, None],
                    1,
                )
                for c0 in range(0, m, self.col_block)
            ],
            dim=1,
        )

    def plan_stats(self, f, g, la, lb, e, return_plan):
        n = self.rows.shape[1]
        transport = mass = 0
        blocks = []
        for r0 in range(0, n, self.row_block):
            r1 = min(r0 + self.row_block, n)
            c = self.rows_cost(r0, r1)
            plan = plan_from_potentials(c, f[:, r0:r1], g, la[:, r0:r1], lb, e)
            transport = transport + (plan * c).sum((1, 2))
            mass = mass + plan.sum((1, 2))
            if return_plan:
                blocks.append(plan)
        return transport, mass, torch.cat(blocks, dim=1) if return_plan else None


def solve_streamed(ops: StreamedFeatureCost, log_a, log_b, **loop):
    """``run_sinkhorn`` on the streamed cost; ``loop`` holds its keyword options."""
    return run_sinkhorn(ops, log_a, log_b, ops.rows, ops.cols, dtype=ops.dtype, **loop)


class _StreamedOT(torch.autograd.Function):
    """The OT value of every problem from features, with the envelope gradient by blocks."""

    @staticmethod
    def forward(ctx, x, y, a, b, ops, value, objective_fn, loop):
        with torch.no_grad():
            s = solve_streamed(
                ops, log_weights(a), log_weights(b), init_g=None, return_plan=False, **loop
            )
        out = (
            s.transport
            if value == "transport"
            else objective_fn(a, b, s.f, s.g, s.mass, s.eps.to(s.f.dtype))
        )
        ctx.ops, ctx.value = ops, value
        ctx.save_for_backward(x, y, a, b, s.f, s.g, s.eps.to(s.f.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, y, a, b, f, g, e = ctx.saved_tensors
        ops = ctx.ops
        go = grad_out.to(f.dtype)
        la, lb = log_weights(a.to(f.dtype)), log_weights(b.to(f.dtype))
        grad_x = grad_y = grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            xd = x.detach().requires_grad_(True)
            yd = y.detach().requires_grad_(True)
            grad_x = torch.zeros_like(x)
            grad_y = torch.zeros_like(y)
            n = ops.rows.shape[1]
            for r0 in range(0, n, ops.row_block):
                r1 = min(r0 + ops.row_block, n)
                with torch.enable_grad():
                    c = ops.rows_cost(r0, r1, xd, yd)
                with torch.no_grad():
                    plan = plan_from_potentials(c.detach(), f[:, r0:r1], g, la[:, r0:r1], lb, e)
                gx, gy = torch.autograd.grad(c, (xd, yd), (go[:, None, None] * plan).to(c.dtype))
                grad_x += gx
                grad_y += gy
        if ctx.value == "objective":
            # d/da_i = f_i + e (sum b - 1), d/db_j = g_j + e (sum a - 1) (see sinkhorn_loss).
            if ctx.needs_input_grad[2]:
                grad_a = torch.where(
                    ops.rows, go[:, None] * (f + (e * (b.sum(1) - 1))[:, None]), 0.0
                ).to(a.dtype)
            if ctx.needs_input_grad[3]:
                grad_b = torch.where(
                    ops.cols, go[:, None] * (g + (e * (a.sum(1) - 1))[:, None]), 0.0
                ).to(b.dtype)
        return grad_x, grad_y, grad_a, grad_b, None, None, None, None


def streamed_ot_value(ops: StreamedFeatureCost, a, b, *, value, objective_fn, **loop):
    """[B] OT values from features (``value`` "objective" or "transport"), differentiable in
    the features and (objective) the marginals. ``objective_fn(a, b, f, g, mass, e)`` forms the
    objective from the solution."""
    return _StreamedOT.apply(ops.x, ops.y, a, b, ops, value, objective_fn, loop)
