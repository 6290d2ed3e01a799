"""sinkhorn: batched entropic optimal transport by log-domain Sinkhorn iterations.

The solver as a torch custom op (fake kernel, backend dispatch) and the public ``sinkhorn``,
which returns the potentials and values without a gradient (``sinkhorn_loss`` is the
differentiable value). The iteration every backend follows is stated in
csrc/common/sinkhorn_args.h and, in plain PyTorch, in ``reference/sinkhorn.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops._launch import launch
from ..ops._native import DTYPE_CODES
from ..ops._op_args import register_named_fake
from ..ops._registry import (
    accepts,
    native_backend,
    reference_backend,
    register_op,
    resolve_backend,
    supports,
    triton_backend,
)
from ..reference.sinkhorn import log_weights, sinkhorn_reference
from .features import solve_streamed
from .problem import (
    Problem,
    check_init_g,
    check_options,
    max_abs_cost,
    prepare_problem,
    streamed_cost,
)

__all__ = [
    "SinkhornResult",
    "dual_objective",
    "kernel_backend",
    "launch_sinkhorn",
    "sinkhorn",
    "sinkhorn_solve",
]

# Batched Sinkhorn: one thread (CPU) or one CTA (CUDA) per problem. A streamed feature cost is
# solved by plain PyTorch ops only.
register_op(
    "sinkhorn",
    [
        reference_backend(streams_features=True),
        native_backend("cpu", "sinkhorn_cpu"),
        native_backend("cuda", "sinkhorn_cuda"),
        triton_backend("sinkhorn"),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
)

# Entries per problem from which backend "auto" hands a batch of few problems on a GPU to the
# torch backend (see _few_large_problems_on_gpu).
_LARGE_PROBLEM_ENTRIES = 1 << 20


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


# ---- the solver op --------------------------------------------------------------------------


def launch_sinkhorn(
    cost,
    log_a,
    log_b,
    n_sizes,
    m_sizes,
    eps_start,
    init_g,
    *,
    eps,
    kappa,
    max_iters,
    check_every,
    tol,
    return_plan,
    backend,
):
    """Runs one backend; returns (f, g, iters, err, eps_final, transport, mass, plan)."""
    if backend == "torch":
        s = sinkhorn_reference(
            cost,
            log_a,
            log_b,
            eps=eps,
            max_iters=max_iters,
            tol=tol,
            check_every=check_every,
            eps_start=eps_start,
            kappa=kappa,
            n_sizes=n_sizes,
            m_sizes=m_sizes,
            init_g=init_g,
            return_plan=return_plan,
        )
        plan = s.plan if return_plan else s.f.new_empty(0)
        return s.f, s.g, s.iters, s.err, s.eps.to(s.f.dtype), s.transport, s.mass, plan
    batch, n, m = cost.shape
    device = cost.device
    f = torch.empty(batch, n, dtype=torch.float32, device=device)
    g = torch.zeros(batch, m, dtype=torch.float32, device=device)
    if init_g is not None:
        g.copy_(init_g.expand(batch, m))
    iters = torch.empty(batch, dtype=torch.int32, device=device)
    err, eps_final, transport, mass = (
        torch.empty(batch, dtype=torch.float32, device=device) for _ in range(4)
    )
    plan = torch.empty(batch, n, m, dtype=torch.float32, device=device) if return_plan else None
    log_a = log_a.float().contiguous()
    log_b = log_b.float().contiguous()
    if batch == 0:
        return (
            f,
            g,
            iters,
            err,
            eps_final,
            transport,
            mass,
            (plan if return_plan else f.new_empty(0)),
        )
    if backend == "triton":
        from ..triton.sinkhorn import sinkhorn_forward

        sinkhorn_forward(
            cost,
            log_a,
            log_b,
            n_sizes,
            m_sizes,
            eps_start,
            f,
            g,
            iters,
            err,
            transport,
            mass,
            eps_final,
            plan,
            eps=eps,
            kappa=kappa,
            max_iters=max_iters,
            check_every=check_every,
            tol=tol,
            warm_start=init_g is not None,
        )
    else:
        fields = dict(
            cost=cost,
            cost_dtype=DTYPE_CODES[cost.dtype],
            stride_b=cost.stride(0),
            stride_i=cost.stride(1),
            stride_j=cost.stride(2),
            log_a=log_a,
            log_b=log_b,
            n_sizes=n_sizes,
            m_sizes=m_sizes,
            eps_start=eps_start,
            batch=batch,
            n=n,
            m=m,
            eps=eps,
            kappa=kappa,
            max_iters=max_iters,
            check_every=check_every,
            tol=tol,
            warm_start=init_g is not None,
            f=f,
            g=g,
            iters=iters,
            err=err,
            transport=transport,
            mass=mass,
            eps_final=eps_final,
            plan=plan,
        )
        if backend == "cuda":
            stream = torch.cuda.current_stream(device).cuda_stream
            launch("sinkhorn_cuda", args="SinkhornArgs", **fields, run=dict(stream=stream))
        else:
            launch(
                "sinkhorn_cpu",
                args="SinkhornArgs",
                **fields,
                run=dict(num_threads=torch.get_num_threads()),
            )
    return f, g, iters, err, eps_final, transport, mass, plan if return_plan else f.new_empty(0)


@torch.library.custom_op("fastkd::sinkhorn_solve", mutates_args=())
def sinkhorn_solve(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    n_sizes: torch.Tensor | None,
    m_sizes: torch.Tensor | None,
    eps_start: torch.Tensor | None,
    init_g: torch.Tensor | None,
    eps: float,
    kappa: float,
    max_iters: int,
    check_every: int,
    tol: float,
    return_plan: bool,
    backend: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(f [B, n], g [B, m], iters [B] int32, err [B], eps_final [B], transport [B], mass [B],
    plan [B, n, m] or empty) of every problem of ``cost [B, n, m]``."""
    return launch_sinkhorn(
        cost,
        log_a,
        log_b,
        n_sizes,
        m_sizes,
        eps_start,
        init_g,
        eps=eps,
        kappa=kappa,
        max_iters=max_iters,
        check_every=check_every,
        tol=tol,
        return_plan=return_plan,
        backend=backend,
    )


def _fake_solve(a):
    batch, n, m = a.cost.shape
    dtype = (
        torch.float64
        if (supports("sinkhorn", a.backend, "float64") and a.cost.dtype == torch.float64)
        else torch.float32
    )
    vec = [a.cost.new_empty(batch, dtype=dtype) for _ in range(4)]
    plan = a.cost.new_empty((batch, n, m) if a.return_plan else (0,), dtype=dtype)
    return (
        a.cost.new_empty(batch, n, dtype=dtype),
        a.cost.new_empty(batch, m, dtype=dtype),
        a.cost.new_empty(batch, dtype=torch.int32),
        vec[0],
        vec[1],
        vec[2],
        vec[3],
        plan,
    )


register_named_fake(sinkhorn_solve, _fake_solve)


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


def _few_large_problems_on_gpu(c: torch.Tensor) -> bool:
    """True for a batch too small to occupy a GPU's SMs with problems too large for one SM.

    The CUDA and Triton kernels give each problem one CTA (program): a single 4096 x 4096
    problem, such as sinkd_loss's batch-level one, runs on one SM of a hundred-odd and reads
    its 64 MB cost at that SM's bandwidth every half-iteration, while the torch backend spreads
    each half-iteration over the whole GPU. Below about 1M entries per problem a kernel's
    half-iteration should take microseconds, less than the torch backend's launches. The
    threshold comes from that argument, not from a measurement; benchmarks/gpu_check.sh times
    the batch-1 4096 x 4096 case on every backend.
    """
    if c.device.type != "cuda":
        return False
    batch, n, m = c.shape
    sms = torch.cuda.get_device_properties(c.device).multi_processor_count
    return 4 * batch < sms and n * m >= _LARGE_PROBLEM_ENTRIES


def kernel_backend(p: Problem, backend: str) -> str:
    c = p.cost
    name = resolve_backend(
        "sinkhorn",
        backend,
        c.device,
        dtypes=(c.dtype,),
        prefer_reference=_few_large_problems_on_gpu(c),
    )
    if not accepts("sinkhorn", name, dtypes=(c.dtype,)):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 costs; got {c.dtype}; "
            f"use backend='torch'"
        )
    return name


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
