"""The Sinkhorn problem: checks of the cost (or features), the marginals, the sizes and the
options of ``fastkd.sinkhorn`` / ``sinkhorn_loss``, and the checked batch they describe.

Shapes and options are always checked; values (finite costs, non-negative weights, equal masses)
when ``validate`` is set, at the price of one device synchronization.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ..ops._checks import FLOAT32_MAX, INT32_MAX, check_int, check_kernel_float
from ..ops._registry import supports
from ..reference.sinkhorn import valid_mask
from .features import COSTS, StreamedFeatureCost, pairwise_cost

__all__ = [
    "FEATURE_COST_BYTES",
    "MASS_RTOL",
    "Problem",
    "check_init_g",
    "check_options",
    "max_abs_cost",
    "prepare_problem",
    "streamed_cost",
]

# Relative difference of the two marginals' masses accepted by the input check.
MASS_RTOL = 1e-4

# A named cost whose [B, n, m] tensor would exceed this is streamed by default (backend "auto").
FEATURE_COST_BYTES = 256 << 20


def _check_number(
    name: str,
    value,
    *,
    low: float,
    low_open: bool = True,
    high: float = math.inf,
    high_open: bool = True,
) -> None:
    ok = isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(
            f"{name} must be a finite number in {'(' if low_open else '['}{low}, "
            f"{high}{')' if high_open else ']'}; got {value!r}"
        )


def check_options(eps, max_iters, tol, check_every, eps_scaling) -> None:
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
        raise ValueError(
            f"{name} must have shape ({batch},) (one size per problem); got {tuple(sizes.shape)}"
        )
    # Range check in the sizes' own dtype, before the int32 cast that would wrap 2^32 + 2 to 2,
    # where it costs no device sync (problems on CPU, outside traced graphs); elsewhere sizes
    # are clamped to [0, limit] before the cast, as the GPU kernels clamp them.
    if sizes.device.type == "cpu" and sizes.numel() and not torch.compiler.is_compiling():
        lo, hi = int(sizes.min()), int(sizes.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} must lie in [0, {limit}]; got values from {lo} to {hi}")
    return sizes.clamp(0, limit).to(device=device, dtype=torch.int32).contiguous()


def _check_weights(
    name: str, w, batch: int, length: int, single: bool, like: torch.Tensor, what: str
):
    """Marginal ``w`` as [B, length] (a [length] vector is shared by every problem)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {w.dtype}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the cost on {like.device}")
    shapes = [(length,)] if single else [(length,), (batch, length)]
    if tuple(w.shape) not in shapes:
        raise ValueError(
            f"{name} must have shape {' or '.join(map(str, shapes))} for {what}; "
            f"got {tuple(w.shape)}"
        )
    return w.expand(batch, length)


def _first_bad(name: str, bad: torch.Tensor, values: torch.Tensor, rule: str) -> None:
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{rule}; {name}{idx} = {values[tuple(idx)].item()}")


def _validate_values(p: "Problem") -> None:
    """Checks on values (one device sync): finite costs (or features) inside the sizes, finite
    non-negative weights, equal positive masses per problem."""
    rows, cols = p.rows, p.cols
    if p.cost is not None:
        cost = p.cost.detach()
        # A NaN or inf anywhere makes the fp32 sum of the cost non-finite, and a sum of finite
        # entries is finite unless it overflows: one cheap reduction decides, and the masked
        # entry-by-entry check runs only where sizes leave entries out or the sum is not finite.
        if (
            p.n_sizes is not None
            or p.m_sizes is not None
            or not bool(torch.isfinite(cost.sum(dtype=torch.float32)))
        ):
            inside = rows[:, :, None] & cols[:, None, :]
            _first_bad(
                "cost",
                inside & ~torch.isfinite(cost),
                cost,
                "the cost must be finite inside each problem's sizes",
            )
    else:
        _, x, y = p.features
        _first_bad(
            "x",
            rows[:, :, None] & ~torch.isfinite(x.detach()),
            x.detach(),
            "the features must be finite inside each problem's sizes",
        )
        _first_bad(
            "y",
            cols[:, :, None] & ~torch.isfinite(y.detach()),
            y.detach(),
            "the features must be finite inside each problem's sizes",
        )
    for name, w, mask in (("a", p.a.detach(), rows), ("b", p.b.detach(), cols)):
        _first_bad(
            name,
            mask & ~(torch.isfinite(w) & (w >= 0)),
            w,
            f"marginal {name} must be finite and >= 0",
        )
    mass_a = torch.where(rows, p.a.detach(), 0).double().sum(1)
    mass_b = torch.where(cols, p.b.detach(), 0).double().sum(1)
    nonempty = rows.any(1) & cols.any(1)
    bad = nonempty & (
        (mass_a <= 0)
        | (mass_b <= 0)
        | ((mass_a - mass_b).abs() > MASS_RTOL * torch.maximum(mass_a, mass_b))
    )
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"the marginals of problem {k} must have the same positive mass; got "
            f"sum(a) = {mass_a[k].item():.9g}, sum(b) = {mass_b[k].item():.9g}"
        )


class Problem(NamedTuple):
    cost: torch.Tensor | None  # [B, n, m]; None when streamed from features
    features: tuple | None  # (kind, x [B, n, d], y [B, m, d]) when streamed
    a: torch.Tensor  # [B, n] weights (0 beyond n_b), compute dtype
    b: torch.Tensor  # [B, m]
    n_sizes: torch.Tensor | None  # [B] int32
    m_sizes: torch.Tensor | None
    rows: torch.Tensor  # [B, n] bool: inside the sizes
    cols: torch.Tensor  # [B, m]
    single: bool  # the caller passed one problem ([n, m] cost or [n, d] x)


def prepare_problem(cost, a, b, n_sizes, m_sizes, x, y, validate, stream_cost, backend) -> Problem:
    features = None
    if isinstance(cost, str):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TypeError(f"cost={cost!r} needs feature tensors x [B, n, d] and y [B, m, d]")
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; choose from {COSTS} or pass a tensor")
        if (
            x.dim() not in (2, 3)
            or y.dim() != x.dim()
            or x.shape[-1] != y.shape[-1]
            or (x.dim() == 3 and x.shape[0] != y.shape[0])
        ):
            raise ValueError(
                f"x and y must be [n, d] and [m, d] (or [B, n, d] and [B, m, d]) "
                f"with the same d and B; got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if not (x.is_floating_point() and y.is_floating_point()):
            raise TypeError(f"x and y must be floating point; got {x.dtype} and {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y on {y.device}")
        x3, y3 = (x[None], y[None]) if x.dim() == 2 else (x, y)
        stream = stream_cost
        if stream is None:
            stream = (
                supports("sinkhorn", backend, "streams_features")
                and 4 * x3.shape[0] * x3.shape[1] * y3.shape[1] > FEATURE_COST_BYTES
            )
        if stream and not supports("sinkhorn", backend, "streams_features"):
            raise ValueError(
                f"a streamed feature cost runs on plain PyTorch ops; got "
                f"backend={backend!r} (use 'auto' or 'torch', or "
                f"stream_cost=False to form the cost)"
            )
        if stream:
            features = (cost, x3, y3)
        else:
            cost = pairwise_cost(cost, x, y)
    elif x is not None or y is not None:
        raise ValueError(
            "x and y are only used with a named cost (cost='l1', 'l2', 'sqeuclidean' or 'cosine')"
        )
    if features is None:
        if not isinstance(cost, torch.Tensor):
            raise TypeError(
                f"cost must be a torch.Tensor or one of {COSTS}; got {type(cost).__name__}"
            )
        if not cost.is_floating_point():
            raise TypeError(f"cost must be floating point; got dtype {cost.dtype}")
        if cost.dim() not in (2, 3):
            raise ValueError(f"cost must have shape [n, m] or [B, n, m]; got {tuple(cost.shape)}")
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

    a3 = (
        default(rows)
        if a is None
        else torch.where(rows, _check_weights("a", a, batch, n, single, like, what).to(wdtype), 0.0)
    )
    b3 = (
        default(cols)
        if b is None
        else torch.where(cols, _check_weights("b", b, batch, m, single, like, what).to(wdtype), 0.0)
    )
    p = Problem(cost3, features, a3, b3, n_sizes, m_sizes, rows, cols, single)
    if validate and not torch.compiler.is_compiling():
        _validate_values(p)
    # Masses equal up to rounding still leave no plan with both marginals: a row error of
    # |sum a - sum b| that no iteration removes. b is rescaled to a's mass.
    if a is not None or b is not None:
        mass_a = a3.sum(1, keepdim=True)
        mass_b = b3.sum(1, keepdim=True)
        b3 = b3 * torch.where(mass_b > 0, mass_a / mass_b.clamp_min(torch.finfo(wdtype).tiny), 1.0)
        p = p._replace(b=b3)
    return p


def max_abs_cost(cost: torch.Tensor, n_sizes, m_sizes) -> torch.Tensor:
    """Per problem, the largest |C_ij| inside its sizes (float32): the first e of eps-scaling,
    the scale at which the plan is still nearly a b^T."""
    batch, n, m = cost.shape
    device = cost.device
    inside = (
        valid_mask(n_sizes, batch, n, device)[:, :, None]
        & valid_mask(m_sizes, batch, m, device)[:, None, :]
    )
    return torch.where(inside, cost.abs(), 0).amax((1, 2)).float()


def check_init_g(init_g, batch: int, m: int, single: bool):
    """``init_g`` ``[m]`` or ``[B, m]`` as a detached ``[B, m]`` view (None stays None)."""
    if init_g is None:
        return None
    if (
        not isinstance(init_g, torch.Tensor)
        or tuple(init_g.shape) not in ((m,), (batch, m))
        or (single and init_g.dim() != 1)
    ):
        raise ValueError(
            f"init_g must be a tensor of shape ({m},)"
            + ("" if single else f" or ({batch}, {m})")
            + "; got "
            + (
                str(tuple(init_g.shape))
                if isinstance(init_g, torch.Tensor)
                else type(init_g).__name__
            )
        )
    return init_g.detach().expand(batch, m)


def streamed_cost(p: Problem) -> StreamedFeatureCost:
    """The block-by-block cost access of a problem given by features."""
    kind, x, y = p.features
    return StreamedFeatureCost(kind, x, y, p.rows, p.cols)
