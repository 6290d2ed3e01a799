"""sinkhorn / sinkhorn_loss: batched entropic optimal transport by log-domain Sinkhorn iterations.

Input checks, the solver as a torch custom op (fake kernel, backend dispatch), and the loss as a
second custom op whose backward rebuilds the plan from the saved potentials (envelope theorem:
O(n + m) saved per problem, not the plan). The iteration every backend follows is stated in
csrc/common/sinkhorn_args.h and, in plain PyTorch, in ``reference/sinkhorn.py``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ..reference.sinkhorn import (log_weights, plan_from_potentials, sinkhorn_reference,
                                  valid_mask)
from ._checks import FLOAT32_MAX, INT32_MAX, check_int, check_kernel_float
from ._launch import launch
from ._native import DTYPE_CODES
from ._registry import (accepts, native_backend, reference_backend, register_op,
                        resolve_backend, supports, triton_backend)
from .sinkhorn_features import (COSTS, StreamedFeatureCost, pairwise_cost, solve_streamed,
                                streamed_ot_value)

__all__ = ["COSTS", "SinkhornResult", "pairwise_cost", "sinkhorn", "sinkhorn_loss"]

# Batched Sinkhorn: one thread (CPU) or one CTA (CUDA) per problem. A streamed feature cost is
# solved by plain PyTorch ops only.
register_op("sinkhorn", [
    reference_backend(streams_features=True),
    native_backend("cpu", "sinkhorn_cpu"),
    native_backend("cuda", "sinkhorn_cuda"),
    triton_backend("sinkhorn"),
], auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")})

# Relative difference of the two marginals' masses accepted by the input check.
MASS_RTOL = 1e-4

# Entries per problem from which backend "auto" hands a batch of few problems on a GPU to the
# torch backend (see _few_large_problems_on_gpu).
_LARGE_PROBLEM_ENTRIES = 1 << 20
# A named cost whose [B, n, m] tensor would exceed this is streamed by default (backend "auto").
FEATURE_COST_BYTES = 256 << 20


class SinkhornResult(NamedTuple):
    """Outputs of ``fastkd.sinkhorn``. Leading shape ``[B]`` for a batch of problems, none for a
    single ``[n, m]`` cost. Potentials and values are float32 (float64 for a float64 cost)."""

    f: torch.Tensor                 # [B, n] row potential, cost units (0 beyond n_b)
    g: torch.Tensor                 # [B, m] column potential
    transport_cost: torch.Tensor    # [B] <P, C>
    objective: torch.Tensor         # [B] entropic objective (dual value at the final potentials)
    iters: torch.Tensor             # [B] int32 iterations run
    converged: torch.Tensor         # [B] bool: marginal error < tol
    marginal_error: torch.Tensor    # [B] L1 error of the row marginal at the final potentials
    plan: torch.Tensor | None       # [B, n, m] when return_plan, else None


# ---- input checks ---------------------------------------------------------------------------

def _check_number(name: str, value, *, low: float, low_open: bool = True,
                  high: float = math.inf, high_open: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, "
                         f"{high}{')' if high_open else ']'}; got {value!r}")


def _check_options(eps, max_iters, tol, check_every, eps_scaling) -> None:
    check_kernel_float("eps", eps, high=FLOAT32_MAX)
    check_int("max_iters", max_iters, 1, INT32_MAX)
    check_int("check_every", check_every, 1, INT32_MAX)
    check_kernel_float("tol", tol, allow_zero=True, high=FLOAT32_MAX)
    if eps_scaling is not None:
        _check_number("eps_scaling", eps_scaling, low=0.0, high=1.0)
        check_kernel_float("eps_scaling", eps_scaling, high=1.0)


def _check_sizes(name: str, sizes, batch: int, limit: int, device) -> torch.Tensor | None:
    if sizes is None:
        return None
    if not isinstance(sizes, torch.Tensor):
        sizes = torch.as_tensor(sizes)
    if sizes.dtype.is_floating_point or sizes.dtype == torch.bool or sizes.dtype.is_complex:
        raise TypeError(f"{name} must hold integers; got dtype {sizes.dtype}")
    if sizes.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one size per problem); got "
                         f"{tuple(sizes.shape)}")
    # Range check in the sizes' own dtype, before the int32 cast that would wrap 2^32 + 2 to 2,
    # where it costs no device sync (problems on CPU, outside traced graphs); elsewhere sizes
    # are clamped to [0, limit] before the cast, as the GPU kernels clamp them.
    if sizes.device.type == "cpu" and sizes.numel() and not torch.compiler.is_compiling():
        lo, hi = int(sizes.min()), int(sizes.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} must lie in [0, {limit}]; got values from {lo} to {hi}")
    return sizes.clamp(0, limit).to(device=device, dtype=torch.int32).contiguous()


def _check_weights(name: str, w, batch: int, length: int, single: bool, like: torch.Tensor,
                   what: str):
    """Marginal ``w`` as [B, length] (a [length] vector is shared by every problem)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {w.dtype}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the cost on {like.device}")
    shapes = [(length,)] if single else [(length,), (batch, length)]
    if tuple(w.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))} for {what}; "
                         f"got {tuple(w.shape)}")
    return w.expand(batch, length)


def _first_bad(name: str, bad: torch.Tensor, values: torch.Tensor, rule: str) -> None:
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{rule}; {name}{idx} = {values[tuple(idx)].item()}")


def _validate_values(p: "_Problem") -> None:
    """Checks on values (one device sync): finite costs (or features) inside the sizes, finite
    non-negative weights, equal positive masses per problem."""
    rows, cols = p.rows, p.cols
    if p.cost is not None:
        cost = p.cost.detach()
        # A NaN or inf anywhere makes the fp32 sum of the cost non-finite, and a sum of finite
        # entries is finite unless it overflows: one cheap reduction decides, and the masked
        # entry-by-entry check runs only where sizes leave entries out or the sum is not finite.
        if (p.n_sizes is not None or p.m_sizes is not None
                or not bool(torch.isfinite(cost.sum(dtype=torch.float32)))):
            inside = rows[:, :, None] & cols[:, None, :]
            _first_bad("cost", inside & ~torch.isfinite(cost), cost,
                       "the cost must be finite inside each problem's sizes")
    else:
        _, x, y = p.features
        _first_bad("x", rows[:, :, None] & ~torch.isfinite(x.detach()), x.detach(),
                   "the features must be finite inside each problem's sizes")
        _first_bad("y", cols[:, :, None] & ~torch.isfinite(y.detach()), y.detach(),
                   "the features must be finite inside each problem's sizes")
    for name, w, mask in (("a", p.a.detach(), rows), ("b", p.b.detach(), cols)):
        _first_bad(name, mask & ~(torch.isfinite(w) & (w >= 0)), w,
                   f"marginal {name} must be finite and >= 0")
    mass_a = torch.where(rows, p.a.detach(), 0).double().sum(1)
    mass_b = torch.where(cols, p.b.detach(), 0).double().sum(1)
    nonempty = rows.any(1) & cols.any(1)
    bad = nonempty & ((mass_a <= 0) | (mass_b <= 0)
                      | ((mass_a - mass_b).abs() > MASS_RTOL * torch.maximum(mass_a, mass_b)))
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"the marginals of problem {k} must have the same positive mass; got "
                         f"sum(a) = {mass_a[k].item():.9g}, sum(b) = {mass_b[k].item():.9g}")


class _Problem(NamedTuple):
    cost: torch.Tensor | None     # [B, n, m]; None when streamed from features
    features: tuple | None        # (kind, x [B, n, d], y [B, m, d]) when streamed
    a: torch.Tensor               # [B, n] weights (0 beyond n_b), compute dtype
    b: torch.Tensor               # [B, m]
    n_sizes: torch.Tensor | None  # [B] int32
    m_sizes: torch.Tensor | None
    rows: torch.Tensor            # [B, n] bool: inside the sizes
    cols: torch.Tensor            # [B, m]
    single: bool                  # the caller passed one problem ([n, m] cost or [n, d] x)


def _prepare(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend) -> _Problem:
    features = None
    if isinstance(cost, str):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TypeError(f"cost={cost!r} needs feature tensors x [B, n, d] and y [B, m, d]")
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; choose from {COSTS} or pass a tensor")
        if x.dim() not in (2, 3) or y.dim() != x.dim() or x.shape[-1] != y.shape[-1] or (
                x.dim() == 3 and x.shape[0] != y.shape[0]):
            raise ValueError(f"x and y must be [n, d] and [m, d] (or [B, n, d] and [B, m, d]) "
                             f"with the same d and B; got {tuple(x.shape)} and {tuple(y.shape)}")
        if not (x.is_floating_point() and y.is_floating_point()):
            raise TypeError(f"x and y must be floating point; got {x.dtype} and {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y on {y.device}")
        x3, y3 = (x[None], y[None]) if x.dim() == 2 else (x, y)
        stream = stream_cost
        if stream is None:
            stream = (supports("sinkhorn", backend, "streams_features")
                      and 4 * x3.shape[0] * x3.shape[1] * y3.shape[1] > FEATURE_COST_BYTES)
        if stream and not supports("sinkhorn", backend, "streams_features"):
            raise ValueError(f"a streamed feature cost runs on plain PyTorch ops; got "
                             f"backend={backend!r} (use 'auto' or 'torch', or "
                             f"stream_cost=False to form the cost)")
        if stream:
            features = (cost, x3, y3)
        else:
            cost = pairwise_cost(cost, x, y)
    elif x is not None or y is not None:
        raise ValueError("x and y are only used with a named cost (cost='l1', 'l2', "
                         "'sqeuclidean' or 'cosine')")
    if features is None:
        if not isinstance(cost, torch.Tensor):
            raise TypeError(f"cost must be a torch.Tensor or one of {COSTS}; got "
                            f"{type(cost).__name__}")
        if not cost.is_floating_point():
            raise TypeError(f"cost must be floating point; got dtype {cost.dtype}")
        if cost.dim() not in (2, 3):
            raise ValueError(f"cost must have shape [n, m] or [B, n, m]; got "
                             f"{tuple(cost.shape)}")
        single = cost.dim() == 2
        cost3 = cost[None] if single else cost
        batch, n, m = cost3.shape
        like, what = cost, f"a cost of shape {tuple(cost.shape)}"
    else:
        _, x3, y3 = features
        single, cost3 = x.dim() == 2, None
        batch, n, m = x3.shape[0], x3.shape[1], y3.shape[1]
        like, what = x, f"features of shapes {tuple(x.shape)} and {tuple(y.shape)}"
    if single and (n_sizes is not None or m_sizes is not None):
        raise ValueError("n_sizes / m_sizes describe a batch: give a batch of problems")
    device = like.device
    n_sizes = _check_sizes("n_sizes", n_sizes, batch, n, device)
    m_sizes = _check_sizes("m_sizes", m_sizes, batch, m, device)
    rows = valid_mask(n_sizes, batch, n, device)
    cols = valid_mask(m_sizes, batch, m, device)
    wdtype = torch.float64 if like.dtype == torch.float64 else torch.float32

    def default(mask):
        count = mask.sum(1, keepdim=True).clamp_min(1)
        return torch.where(mask, 1.0 / count.to(wdtype), 0.0).to(wdtype)

    a3 = default(rows) if a is None else torch.where(
        rows, _check_weights("a", a, batch, n, single, like, what).to(wdtype), 0.0)
    b3 = default(cols) if b is None else torch.where(
        cols, _check_weights("b", b, batch, m, single, like, what).to(wdtype), 0.0)
    p = _Problem(cost3, features, a3, b3, n_sizes, m_sizes, rows, cols, single)
    if validate and not torch.compiler.is_compiling():
        _validate_values(p)
    # Masses equal up to rounding still leave no plan with both marginals: a row error of
    # |sum a - sum b| that no iteration removes. b is rescaled to a's mass.
    if a is not None or b is not None:
        mass_a = a3.sum(1, keepdim=True)
        mass_b = b3.sum(1, keepdim=True)
        b3 = b3 * torch.where(mass_b > 0, mass_a / mass_b.clamp_min(torch.finfo(wdtype).tiny),
                              1.0)
        p = p._replace(b=b3)
    return p


def _eps_start(cost: torch.Tensor, n_sizes, m_sizes) -> torch.Tensor:
    """Per problem, the largest |C_ij| inside its sizes (float32): the first e of eps-scaling,
    the scale at which the plan is still nearly a b^T."""
    batch, n, m = cost.shape
    device = cost.device
    inside = (valid_mask(n_sizes, batch, n, device)[:, :, None]
              & valid_mask(m_sizes, batch, m, device)[:, None, :])
    return torch.where(inside, cost.abs(), 0).amax((1, 2)).float()


# ---- the solver op --------------------------------------------------------------------------

def _launch(cost, log_a, log_b, n_sizes, m_sizes, eps_start, init_g, *, eps, kappa, max_iters,
            check_every, tol, return_plan, backend):
    """Runs one backend; returns (f, g, iters, err, eps_final, transport, mass, plan)."""
    if backend == "torch":
        s = sinkhorn_reference(cost, log_a, log_b, eps=eps, max_iters=max_iters, tol=tol,
                               check_every=check_every, eps_start=eps_start, kappa=kappa,
                               n_sizes=n_sizes, m_sizes=m_sizes, init_g=init_g,
                               return_plan=return_plan)
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
        torch.empty(batch, dtype=torch.float32, device=device) for _ in range(4))
    plan = torch.empty(batch, n, m, dtype=torch.float32, device=device) if return_plan else None
    log_a = log_a.float().contiguous()
    log_b = log_b.float().contiguous()
    if batch == 0:
        return f, g, iters, err, eps_final, transport, mass, (plan if return_plan
                                                              else f.new_empty(0))
    if backend == "triton":
        from ..triton.sinkhorn import sinkhorn_forward
        sinkhorn_forward(cost, log_a, log_b, n_sizes, m_sizes, eps_start, f, g, iters, err,
                         transport, mass, eps_final, plan, eps=eps, kappa=kappa,
                         max_iters=max_iters, check_every=check_every, tol=tol,
                         warm_start=init_g is not None)
    else:
        fields = dict(
            cost=cost, cost_dtype=DTYPE_CODES[cost.dtype], stride_b=cost.stride(0),
            stride_i=cost.stride(1), stride_j=cost.stride(2), log_a=log_a, log_b=log_b,
            n_sizes=n_sizes, m_sizes=m_sizes, eps_start=eps_start, batch=batch, n=n, m=m,
            eps=eps, kappa=kappa, max_iters=max_iters, check_every=check_every, tol=tol,
            warm_start=init_g is not None, f=f, g=g, iters=iters, err=err,
            transport=transport, mass=mass, eps_final=eps_final, plan=plan)
        if backend == "cuda":
            stream = torch.cuda.current_stream(device).cuda_stream
            launch("sinkhorn_cuda", args="SinkhornArgs", **fields, run=dict(stream=stream))
        else:
            launch("sinkhorn_cpu", args="SinkhornArgs", **fields,
                   run=dict(num_threads=torch.get_num_threads()))
    return f, g, iters, err, eps_final, transport, mass, plan if return_plan else f.new_empty(0)


@torch.library.custom_op("fastkd::sinkhorn_solve", mutates_args=())
def sinkhorn_solve(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                   n_sizes: torch.Tensor | None, m_sizes: torch.Tensor | None,
                   eps_start: torch.Tensor | None, init_g: torch.Tensor | None, eps: float,
                   kappa: float, max_iters: int, check_every: int, tol: float,
                   return_plan: bool, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f [B, n], g [B, m], iters [B] int32, err [B], eps_final [B], transport [B], mass [B],
    plan [B, n, m] or empty) of every problem of ``cost [B, n, m]``."""
    return _launch(cost, log_a, log_b, n_sizes, m_sizes, eps_start, init_g, eps=eps,
                   kappa=kappa, max_iters=max_iters, check_every=check_every, tol=tol,
                   return_plan=return_plan, backend=backend)


@sinkhorn_solve.register_fake
def _(cost, log_a, log_b, n_sizes, m_sizes, eps_start, init_g, eps, kappa, max_iters,
      check_every, tol, return_plan, backend):
    batch, n, m = cost.shape
    dtype = torch.float64 if (supports("sinkhorn", backend, "float64")
                              and cost.dtype == torch.float64) else torch.float32
    vec = [cost.new_empty(batch, dtype=dtype) for _ in range(4)]
    plan = cost.new_empty((batch, n, m) if return_plan else (0,), dtype=dtype)
    return (cost.new_empty(batch, n, dtype=dtype), cost.new_empty(batch, m, dtype=dtype),
            cost.new_empty(batch, dtype=torch.int32), vec[0], vec[1], vec[2], vec[3], plan)


class _Solved(NamedTuple):
    problem: _Problem
    f: torch.Tensor
    g: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor
    eps_final: torch.Tensor
    transport: torch.Tensor
    mass: torch.Tensor
    plan: torch.Tensor


def _check_init_g(init_g, batch: int, m: int, single: bool):
    if init_g is None:
        return None
    if not isinstance(init_g, torch.Tensor) or tuple(init_g.shape) not in (
            (m,), (batch, m)) or (single and init_g.dim() != 1):
        raise ValueError(f"init_g must be a tensor of shape ({m},)"
                         + ("" if single else f" or ({batch}, {m})") + "; got "
                         + (str(tuple(init_g.shape)) if isinstance(init_g, torch.Tensor)
                            else type(init_g).__name__))
    return init_g.detach().expand(batch, m)


def _streamed_ops(p: _Problem) -> StreamedFeatureCost:
    kind, x, y = p.features
    return StreamedFeatureCost(kind, x, y, p.rows, p.cols)


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


def _kernel_backend(p: _Problem, backend: str) -> str:
    c = p.cost
    name = resolve_backend("sinkhorn", backend, c.device, dtypes=(c.dtype,),
                           prefer_reference=_few_large_problems_on_gpu(c))
    if not accepts("sinkhorn", name, dtypes=(c.dtype,)):
        raise ValueError(f"backend {name!r} takes float32/bfloat16/float16 costs; got {c.dtype}; "
                         f"use backend='torch'")
    return name


def _solve(cost, a, b, *, eps, max_iters, tol, eps_scaling, check_every, n_sizes, m_sizes, x, y,
           init_g, return_plan, validate, stream_cost, backend) -> _Solved:
    _check_options(eps, max_iters, tol, check_every, eps_scaling)
    p = _prepare(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend)
    batch, m = p.rows.shape[0], p.cols.shape[1]
    init_g = _check_init_g(init_g, batch, m, p.single)
    kappa = 0.5 if eps_scaling is None else float(eps_scaling)
    if p.cost is None:
        ops = _streamed_ops(p)
        with torch.no_grad():
            eps_start = None if eps_scaling is None else ops.max_abs_cost()
            s = solve_streamed(ops, log_weights(p.a), log_weights(p.b), eps=float(eps),
                               max_iters=int(max_iters), tol=float(tol),
                               check_every=int(check_every), eps_start=eps_start, kappa=kappa,
                               init_g=init_g, return_plan=return_plan)
        return _Solved(p, s.f, s.g, s.iters, s.err, s.eps.to(s.f.dtype), s.transport, s.mass,
                       s.plan)
    name = _kernel_backend(p, backend)
    c = p.cost
    eps_start = None if eps_scaling is None else _eps_start(c.detach(), p.n_sizes, p.m_sizes)
    out = sinkhorn_solve(c.detach(), log_weights(p.a.detach()), log_weights(p.b.detach()),
                         p.n_sizes, p.m_sizes, eps_start, init_g, float(eps), kappa,
                         int(max_iters), int(check_every), float(tol), bool(return_plan), name)
    return _Solved(p, *out)


def _objective(a, b, f, g, mass, eps_final):
    """Dual value sum a f + sum b g - e (sum P - sum a sum b): the entropic objective
    <P, C> + e KL(P || a b^T) at the optimum, and a lower bound of it elsewhere."""
    a = a.to(f.dtype)
    b = b.to(f.dtype)
    return ((a * f).sum(1) + (b * g).sum(1)
            - eps_final * (mass - a.sum(1) * b.sum(1)))


def _squeeze(single: bool, *tensors):
    return tuple(t[0] if single and t is not None else t for t in tensors)


def sinkhorn(cost, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             eps: float = 0.1, max_iters: int = 1000, tol: float = 1e-6,
             eps_scaling: float | None = None, check_every: int = 10,
             n_sizes=None, m_sizes=None, x: torch.Tensor | None = None,
             y: torch.Tensor | None = None, init_g: torch.Tensor | None = None,
             return_plan: bool = False, validate: bool = True,
             stream_cost: bool | None = None, backend: str = "auto") -> SinkhornResult:
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
    s = _solve(cost, a, b, eps=eps, max_iters=max_iters, tol=tol, eps_scaling=eps_scaling,
               check_every=check_every, n_sizes=n_sizes, m_sizes=m_sizes, x=x, y=y,
               init_g=init_g, return_plan=return_plan, validate=validate,
               stream_cost=stream_cost, backend=backend)
    p = s.problem
    objective = _objective(p.a.detach(), p.b.detach(), s.f, s.g, s.mass, s.eps_final)
    f, g, transport, objective, iters, err = _squeeze(
        p.single, s.f, s.g, s.transport, objective, s.iters, s.err)
    plan = _squeeze(p.single, s.plan)[0] if return_plan else None
    return SinkhornResult(f, g, transport, objective, iters, err < tol, err, plan)


# ---- the loss op ----------------------------------------------------------------------------

VALUES = ("objective", "transport")
GRADS = ("envelope", "unrolled")


@torch.library.custom_op("fastkd::sinkhorn_loss_envelope", mutates_args=())
def sinkhorn_loss_envelope(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           n_sizes: torch.Tensor | None, m_sizes: torch.Tensor | None,
                           eps_start: torch.Tensor | None, eps: float, kappa: float,
                           max_iters: int, check_every: int, tol: float, value: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """(loss [B], f [B, n], g [B, m], eps_final [B]): the value of every problem and the
    potentials its backward rebuilds the plan from."""
    f, g, _, _, e, transport, mass, _ = _launch(
        cost, log_weights(a), log_weights(b), n_sizes, m_sizes, eps_start, None, eps=eps,
        kappa=kappa, max_iters=max_iters, check_every=check_every, tol=tol, return_plan=False,
        backend=backend)
    loss = transport if value == "transport" else _objective(a, b, f, g, mass, e)
    return loss.to(f.dtype), f, g, e


@sinkhorn_loss_envelope.register_fake
def _(cost, a, b, n_sizes, m_sizes, eps_start, eps, kappa, max_iters, check_every, tol, value,
      backend):
    batch, n, m = cost.shape
    dtype = torch.float64 if (supports("sinkhorn", backend, "float64")
                              and cost.dtype == torch.float64) else torch.float32
    return (cost.new_empty(batch, dtype=dtype), cost.new_empty(batch, n, dtype=dtype),
            cost.new_empty(batch, m, dtype=dtype), cost.new_empty(batch, dtype=dtype))


def _loss_setup_context(ctx, inputs, output):
    cost, a, b, n_sizes, m_sizes = inputs[:5]
    ctx.value = inputs[11]
    _, f, g, e = output
    ctx.save_for_backward(cost, a, b, n_sizes, m_sizes, f, g, e)
    ctx.mark_non_differentiable(f, g, e)


def _loss_backward(ctx, grad_loss, grad_f, grad_g, grad_e):
    # Envelope theorem: at the optimum, d/dC = P, d/da_i = f_i + e (sum b - 1) and
    # d/db_j = g_j + e (sum a - 1) (derivatives of the dual value; the potentials' constant
    # shift leaves mass-preserving directions unchanged). With value="transport" the plan is
    # held fixed: d/dC = P and no gradient to the marginals.
    cost, a, b, n_sizes, m_sizes, f, g, e = ctx.saved_tensors
    batch, n, m = cost.shape
    go = grad_loss.to(f.dtype)
    grad_cost = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        rows = valid_mask(n_sizes, batch, n, cost.device)
        cols = valid_mask(m_sizes, batch, m, cost.device)
        inside = rows[:, :, None] & cols[:, None, :]
        c = torch.where(inside, cost.to(f.dtype), 0.0)
        plan = plan_from_potentials(c, f, g, log_weights(a.to(f.dtype)),
                                    log_weights(b.to(f.dtype)), e)
        grad_cost = (go[:, None, None] * torch.where(inside, plan, 0.0)).to(cost.dtype)
    if ctx.value == "objective":
        if ctx.needs_input_grad[1]:
            grad_a = (go[:, None] * (f + (e * (b.to(f.dtype).sum(1) - 1))[:, None])).to(a.dtype)
            grad_a = torch.where(valid_mask(n_sizes, batch, n, a.device), grad_a, 0.0)
        if ctx.needs_input_grad[2]:
            grad_b = (go[:, None] * (g + (e * (a.to(f.dtype).sum(1) - 1))[:, None])).to(b.dtype)
            grad_b = torch.where(valid_mask(m_sizes, batch, m, b.device), grad_b, 0.0)
    return grad_cost, grad_a, grad_b, *(None,) * 10


sinkhorn_loss_envelope.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def _unrolled_value(p: _Problem, *, eps, max_iters, tol, check_every, eps_start, kappa, value):
    """The value, differentiable through the iterations (the plain-PyTorch loop under
    autograd)."""
    loop = dict(eps=eps, max_iters=max_iters, tol=tol, check_every=check_every,
                eps_start=eps_start, kappa=kappa)
    if p.cost is None:
        s = solve_streamed(_streamed_ops(p), log_weights(p.a), log_weights(p.b), init_g=None,
                           return_plan=False, **loop)
    else:
        s = sinkhorn_reference(p.cost, log_weights(p.a), log_weights(p.b), n_sizes=p.n_sizes,
                               m_sizes=p.m_sizes, **loop)
    if value == "transport":
        return s.transport
    return _objective(p.a, p.b, s.f, s.g, s.mass, s.eps.to(s.f.dtype))


def sinkhorn_loss(cost, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
                  eps: float = 0.1, max_iters: int = 1000, tol: float = 1e-6,
                  eps_scaling: float | None = None, check_every: int = 10, n_sizes=None,
                  m_sizes=None, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                  value: str = "objective", grad: str = "envelope", validate: bool = True,
                  stream_cost: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """Entropic OT value of every problem, differentiable w.r.t. the cost (or the features
    ``x``, ``y`` of a named cost) and the marginals.

    Arguments as ``sinkhorn``, plus:
        value: ``"objective"`` (default): the entropic objective
            OT_eps = <P, C> + eps KL(P || a b^T), computed as the dual value
            sum a f + sum b g - eps (sum P - sum a sum b) at the final potentials;
            ``"transport"``: <P, C> alone (SinKD's and MultiLevelOT's loss).
        grad: ``"envelope"`` (default): gradients from the saved potentials, O(n + m) memory
            per problem: dOT_eps/dC = P, dOT_eps/da = f + eps (sum b - 1) (exact at
            convergence), dOT_eps/db likewise; for ``value="transport"`` the plan is held
            fixed (d/dC = P, nothing to a, b), as SinKD and POT's envelope mode do.
            ``"unrolled"``: autograd through every iteration of the plain-PyTorch solver
            (memory grows with the iterations; any backend argument is ignored).

    Returns:
        ``[B]`` (or a scalar for an ``[n, m]`` cost): float32 (float64 for a float64 cost), in
        the units of the cost times mass.
    """
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}; got {value!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}; got {grad!r}")
    _check_options(eps, max_iters, tol, check_every, eps_scaling)
    p = _prepare(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend)
    kappa = 0.5 if eps_scaling is None else float(eps_scaling)
    loop = dict(eps=float(eps), max_iters=int(max_iters), tol=float(tol),
                check_every=int(check_every), kappa=kappa)
    if p.cost is None:
        ops = _streamed_ops(p)
        with torch.no_grad():
            eps_start = None if eps_scaling is None else ops.max_abs_cost()
    else:
        eps_start = None if eps_scaling is None else _eps_start(p.cost.detach(), p.n_sizes,
                                                               p.m_sizes)
    if grad == "unrolled":
        loss = _unrolled_value(p, eps_start=eps_start, value=value, **loop)
    elif p.cost is None:
        loss = streamed_ot_value(ops, p.a, p.b, value=value, objective_fn=_objective,
                                 eps_start=eps_start, **loop)
    else:
        loss = sinkhorn_loss_envelope(p.cost, p.a, p.b, p.n_sizes, p.m_sizes, eps_start,
                                      loop["eps"], kappa, loop["max_iters"],
                                      loop["check_every"], loop["tol"], value,
                                      _kernel_backend(p, backend))[0]
    return loss[0] if p.single else loss
