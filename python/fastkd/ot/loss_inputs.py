"""What the OT losses (``losses``) do with their inputs before forming a cost: the checks of their
options, the compute dtype, the masks of sequence-level OT and the uniform weights on the valid
points. Masked points get zero weight and ``_apply_mask`` zeroes their vectors before any
arithmetic, so no host synchronization drops them and garbage there never leaks."""

from __future__ import annotations

import math
import numbers

import torch

from .features import COSTS
from .sinkhorn_loss import VALUES


def _check_positive(name: str, value) -> None:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not (0 < float(value) < math.inf)
    ):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _check_common(*, eps, cost, parity, n_iters, value) -> None:
    _check_positive("eps", eps)
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose from {COSTS}")
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}; got {value!r}")
    if not isinstance(n_iters, numbers.Integral) or isinstance(n_iters, bool) or n_iters < 1:
        raise ValueError(f"n_iters must be an int >= 1; got {n_iters!r}")
    if parity and value != "transport":
        raise ValueError(
            f"parity=True reproduces the published value <P, C>; value={value!r} "
            f"has no published counterpart (use value='transport')"
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _uniform_weights(valid: torch.Tensor, count: torch.Tensor, dtype) -> torch.Tensor:
    """[B, n] weights 1/count on the valid points, 0 elsewhere; a problem without valid points
    gets uniform dummy weights (its value is zeroed by the caller), since an all-zero marginal
    has no plan."""
    n = valid.shape[1]
    w = torch.where(valid, 1.0 / count.clamp_min(1).to(dtype)[:, None], 0.0)
    return torch.where((count > 0)[:, None], w, 1.0 / max(n, 1)).to(dtype)


def _apply_mask(name: str, mask, x: torch.Tensor):
    """(x with the vectors at masked positions zeroed, mask [B, T] bool); (x, None) without a
    mask. ``mask`` is bool or numbers, nonzero = valid."""
    if mask is None:
        return x, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(mask).__name__}")
    shape = tuple(x.shape[:2])
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} (batch, positions); got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but its vectors on {x.device}")
    mask = mask != 0
    # Garbage at masked positions never enters the arithmetic; torch.where sends it an exact
    # zero gradient.
    return torch.where(mask[..., None], x, 0.0), mask
