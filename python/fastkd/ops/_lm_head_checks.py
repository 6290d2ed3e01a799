"""The checks of an lm_head (hidden states ``[..., H]``, weight ``[V, H]``, bias ``[V]``: tensors,
shapes, devices, dtypes), of a logit scale and of the chunking options of the chunked lm_head
engine (``_chunked_lm_head``), which re-exports them. Errors name the argument and the offending
value or shape."""

from __future__ import annotations

import numbers

import torch

from ._checks import KERNEL_FLOAT_MAX, KERNEL_FLOAT_MIN

__all__ = ["check_chunking", "check_head", "check_scale", "check_tensor"]


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def check_tensor(name: str, t, *, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if _is_dtensor(t):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(t.placements)}); the fused lm_head ops need "
            f"the full tensor on every rank. Call it inside the FSDP-wrapped module's forward "
            f"(FSDP2's fully_shard unshards parameters there; FSDP1: under "
            f"FSDP.summon_full_params), or pass {name}.full_tensor()"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s); got shape {tuple(t.shape)}")


def check_head(prefix: str, hidden, weight, bias) -> None:
    """hidden ``[..., H]``, weight ``[V, H]``, bias ``[V]`` or None, on one device; the
    messages name them ``<prefix>_hidden`` etc. (``hidden`` etc. for an empty prefix)."""
    prefix = f"{prefix}_" if prefix else ""
    check_tensor(f"{prefix}hidden", hidden)
    check_tensor(f"{prefix}weight", weight, dim=2)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., H]; got a scalar")
    if weight.shape[0] < 1:
        raise ValueError(
            f"{prefix}weight must have shape [V, H] with V >= 1; got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden [..., H] and {prefix}weight [V, H] must agree on H; "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}bias must have shape [V] = [{weight.shape[0]}] like "
                f"{prefix}weight's rows; got {tuple(bias.shape)}"
            )
    for name, t in ((f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {prefix}hidden on {hidden.device}")
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{name} and {prefix}hidden must have one dtype (as F.linear "
                f"needs); got {t.dtype} and {hidden.dtype}"
            )


def check_scale(name: str, value) -> None:
    # The scale enters the row kernels' float32 gradient weight: its magnitude must survive the
    # cast as the other kernel floats do (_checks.check_kernel_float).
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not KERNEL_FLOAT_MIN <= abs(float(value)) <= KERNEL_FLOAT_MAX
    ):
        raise ValueError(
            f"{name} must be a nonzero number of magnitude in [2**-126, 2**126] "
            f"(the kernels take it as a float32); got {value!r}"
        )


def check_chunking(chunk_size, memory_budget, accum_dtype) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    if memory_budget is not None and (
        not isinstance(memory_budget, numbers.Integral) or memory_budget < 1
    ):
        raise ValueError(
            f"memory_budget must be None or a number of bytes >= 1; got {memory_budget!r}"
        )
    if accum_dtype not in (None, torch.float32):
        raise ValueError(
            f"accum_dtype must be None (the weight's dtype) or torch.float32; got {accum_dtype!r}"
        )
