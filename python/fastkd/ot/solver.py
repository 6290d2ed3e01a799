"""sinkhorn: batched entropic optimal transport by log-domain Sinkhorn iterations.

The public ``sinkhorn``, which returns the potentials and values without a gradient
(``sinkhorn_loss`` is the differentiable value), on the solver's torch custom op
(``solver_op.py``: fake kernel, backend dispatch). The iteration every backend follows is stated
in csrc/common/sinkhorn_args.h and, in plain PyTorch, in ``reference/sinkhorn.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference.sinkhorn import log_weights
from .features import solve_streamed
from .problem import (
    Problem,
    check_init_g,
    check_options,
    max_abs_cost,
    prepare_problem,
    streamed_cost,
)
from .solver_op import _few_large_problems_on_gpu, kernel_backend, launch_sinkhorn, sinkhorn_solve

__all__ = [
    "SinkhornResult",
    "_few_large_problems_on_gpu",
    "dual_objective",
    "kernel_backend",
    "launch_sinkhorn",
    "sinkhorn",
    "sinkhorn_solve",
]


class SinkhornResult(NamedTuple):
    """Outputs of ``fastkd.sinkhorn``. Leading shape ``[B]`` for a batch of problems, none for a
    single ``[n, m]`` cost. Potentials and values are float32 (float64 for a float64 cost)."""

    f: torch.Tensor  # [B, n] row potential, cost units (0 beyond n_b)
    g: torch.Tensor  # [B, m] column potential
    transport_cost: torch.Tensor  # [B] <P, C>
    objective: torch.Tensor  # [B] entropic objective (dual value at the final potentials)
    iters: torch.Tensor  # [B] int32 iterations run
    converged: torch.Tensor  # [B] bool: marginal error < tol
    marginal_error: torch.Tensor  # [B] L1 error of the row marginal at the final potentials
    plan: torch.Tensor | None  # [B, n, m] when return_plan, else None


class _Solved(NamedTuple):
    problem: Problem
    f: torch.Tensor
    g: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor
    eps_final: torch.Tensor
    transport: torch.Tensor
    mass: torch.Tensor
    plan: torch.Tensor


def _solve(
    cost,
    a,
    b,
    *,
    eps,
    max_iters,
    tol,
    eps_scaling,
    check_every,
    n_sizes,
    m_sizes,
    x,
    y,
    init_g,
    return_plan,
    validate,
    stream_cost,
    backend,
) -> _Solved:
    check_options(eps, max_iters, tol, check_every, eps_scaling)
    p = prepare_problem(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend)
    batch, m = p.rows.shape[0], p.cols.shape[1]
    init_g = check_init_g(init_g, batch, m, p.single)
    kappa = 0.5 if eps_scaling is None else float(eps_scaling)
    if p.cost is None:
        ops = streamed_cost(p)
        with torch.no_grad():
            eps_start = None if eps_scaling is None else ops.max_abs_cost()
            s = solve_streamed(
                ops,
                log_weights(p.a),
                log_weights(p.b),
                eps=float(eps),
                max_iters=int(max_iters),
                tol=float(tol),
                check_every=int(check_every),
                eps_start=eps_start,
                kappa=kappa,
                init_g=init_g,
                return_plan=return_plan,
            )
        return _Solved(
            p, s.f, s.g, s.iters, s.err, s.eps.to(s.f.dtype), s.transport, s.mass, s.plan
        )
    name = kernel_backend(p, backend)
    c = p.cost
    eps_start = None if eps_scaling is None else max_abs_cost(c.detach(), p.n_sizes, p.m_sizes)
    out = sinkhorn_solve(
        c.detach(),
        log_weights(p.a.detach()),
        log_weights(p.b.detach()),
        p.n_sizes,
        p.m_sizes,
        eps_start,
        init_g,
        float(eps),
        kappa,
        int(max_iters),
        int(check_every),
        float(tol),
        bool(return_plan),
        name,
    )
    return _Solved(p, *out)


def dual_objective(a, b, f, g, mass, eps_final):
    """Dual value sum a f + sum b g - e (sum P - sum a sum b): the entropic objective
    <P, C> + e KL(P || a b^T) at the optimum, and a lower bound of it elsewhere."""
    a = a.to(f.dtype)
    b = b.to(f.dtype)
    return (a * f).sum(1) + (b * g).sum(1) - eps_final * (mass - a.sum(1) * b.sum(1))


def _squeeze(single: bool, *tensors):
    return tuple(t[0] if single and t is not None else t for t in tensors)


def sinkhorn(
    cost,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float = 0.1,
    max_iters: int = 1000,
    tol: float = 1e-6,
    eps_scaling: float | None = None,
    check_every: int = 10,
    n_sizes=None,
    m_sizes=None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    init_g: torch.Tensor | None = None,
    return_plan: bool = False,
    validate: bool = True,
    stream_cost: bool | None = None,
    backend: str = "auto",
) -> SinkhornResult:
    """Entropic optimal transport for a batch of problems, by log-domain Sinkhorn iterations.

    Solves, per problem, min_P <P, C> + eps KL(P || a b^T) over plans P >= 0 with row sums a
    and column sums b. Iterates the potentials f (rows) and g (columns):
    f_i = -eps LSE_j((g_j - C_ij)/eps + log b_j), then g_j = -eps LSE_i((f_i - C_ij)/eps +
    log a_i); the plan is P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps). Each problem stops on its
    own when the L1 error of its row marginal, sum_i |sum_j P_ij - a_i| (the columns are exact
    after each iteration), is below ``tol``; the error is checked every ``check_every``
    iterations and at ``max_iters``.

    Args:
        cost: ``[B, n, m]`` or ``[n, m]`` float tensor (float32/bfloat16/float16; float64 runs
            on the ``torch`` backend), any strides (a stride-0 batch shares one cost). Finite
            inside each problem's sizes (checked when ``validate``); entries beyond the sizes
            are never read. Or the name of a cost computed from features ``x``/``y``:
            ``"l1"``, ``"l2"``, ``"sqeuclidean"``, ``"cosine"`` (see ``pairwise_cost``).
        a, b: marginals ``[n]``/``[m]`` (shared by the batch) or ``[B, n]``/``[B, m]``;
            default uniform over each problem's sizes. Non-negative, the same total mass per
            problem (need not be 1; a relative difference up to 1e-4, e.g. rounding, is
            accepted and b rescaled to a's mass). Zero entries mask their rows or columns out
            of the problem.
        eps: regularization, in the units of the cost (> 0).
        max_iters: iteration cap (one iteration = a row and a column update).
        tol: stopping threshold on the L1 row-marginal error, in units of mass.
        eps_scaling: None, or kappa in (0, 1): start at e = max |C_ij| of the problem and run
            one iteration per e, e <- max(kappa e, eps), before iterating at eps (counted in
            ``iters``). For small eps, where plain iterations converge slowly.
        check_every: iterations between error checks.
        n_sizes, m_sizes: ``[B]`` integers: problem b uses rows ``:n_sizes[b]`` and columns
            ``:m_sizes[b]`` (ragged batches); 0 makes an empty problem (all outputs 0).
        x, y: features ``[B, n, d]``, ``[B, m, d]`` (or ``[n, d]``, ``[m, d]``) for a named
            cost.
        init_g: ``[m]`` or ``[B, m]`` starting column potential (e.g. a previous solve's g).
        return_plan: also return the plan ``[B, n, m]`` (float32; 0 outside the sizes).
        stream_cost: for a named cost: True computes it block by block inside every
            iteration (plain PyTorch ops on any device; memory O(B (n + m) d) plus a 64 MiB
            block, never the [B, n, m] cost), False forms the cost tensor and runs the
            kernels; None (default) streams when that tensor would exceed 256 MiB and the
            backend is "auto" or "torch".
        validate: check values (finite costs, non-negative weights, equal masses), which costs
            one device synchronization; shapes and options are always checked.
        backend: ``"auto"`` (cpu on CPU; cuda, then triton, on CUDA, but torch there for a
            batch of fewer than SMs / 4 problems of 2^20 entries or more, which one CTA per
            problem cannot spread over the GPU; torch for float64), ``"torch"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``.

    In float32 the potentials hold |C| 2^-24 of rounding, which the exponents (f + g - C)/eps
    carry divided by eps: the marginal error cannot go much below max|C| / eps * 1e-7, and a
    ``tol`` under that floor runs to ``max_iters`` (use float64 costs, or a larger eps).

    Returns:
        ``SinkhornResult`` (f, g, transport_cost, objective, iters, converged,
        marginal_error, plan). No gradient flows through it: use ``sinkhorn_loss``.
    """
    s = _solve(
        cost,
        a,
        b,
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        eps_scaling=eps_scaling,
        check_every=check_every,
        n_sizes=n_sizes,
        m_sizes=m_sizes,
        x=x,
        y=y,
        init_g=init_g,
        return_plan=return_plan,
        validate=validate,
        stream_cost=stream_cost,
        backend=backend,
    )
    p = s.problem
    objective = dual_objective(p.a.detach(), p.b.detach(), s.f, s.g, s.mass, s.eps_final)
    f, g, transport, objective, iters, err = _squeeze(
        p.single, s.f, s.g, s.transport, objective, s.iters, s.err
    )
    plan = _squeeze(p.single, s.plan)[0] if return_plan else None
    return SinkhornResult(f, g, transport, objective, iters, err < tol, err, plan)
