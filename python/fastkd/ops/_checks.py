"""Input checks shared by the kd_loss family of ops: they raise before any kernel runs, with the
offending shapes or values in the message."""

from __future__ import annotations

import numbers

import torch

from ..divergences import DIVERGENCES
from ._vocab_mismatch import VOCAB_MISMATCH

__all__ = [
    "FLOAT32_MAX",
    "INT32_MAX",
    "INT64_MAX",
    "KERNEL_FLOAT_MAX",
    "KERNEL_FLOAT_MIN",
    "REDUCTIONS",
    "check_int",
    "check_kd_options",
    "check_kernel_float",
    "check_labels",
    "check_logits",
    "check_num_items",
]

REDUCTIONS = ("mean", "sum", "none")

# Positive float options (temperatures, caps, eps) reach the kernels as float32 and are used with
# their reciprocals: both must be normal float32 numbers, [2^-126, 2^126]. Outside, a value such
# as softcap=1e-50 would arrive as 0.0f and silently switch its option off, and 1/T would
# overflow to inf.
KERNEL_FLOAT_MIN = 2.0**-126
KERNEL_FLOAT_MAX = 2.0**126
# The largest finite float32, for options used without their reciprocal's precision mattering
# (Sinkhorn's eps may match costs near it).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Integer arguments bound to C int32_t / int64_t parameters.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _check_unit_interval(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")


def check_kernel_float(
    name: str, value, *, allow_zero: bool = False, high: float = KERNEL_FLOAT_MAX
) -> None:
    """``value`` is a real number in [2^-126, ``high``] (or exactly 0 with ``allow_zero``): it
    survives the conversion to float32 together with its reciprocal."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (allow_zero and v == 0.0) or KERNEL_FLOAT_MIN <= v <= high
    if not ok:
        zero = "0 or " if allow_zero else ""
        raise ValueError(
            f"{name} must be {zero}a number in [2**-126, {high:.6g}] (the kernels "
            f"take it as a float32 with its reciprocal); got {value!r}"
        )


def check_int(name: str, value, low: int, high: int) -> None:
    """``value`` is an int (not a bool) in [low, high]."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be an int in [{low}, {high}]; got {value!r}")


def check_num_items(num_items_in_batch) -> None:
    """``num_items_in_batch`` is None, a finite number > 0, or a one-element real tensor whose
    value is checked likewise where that costs no device sync (a CPU tensor outside traced
    graphs); a device tensor that is not > 0 makes the reduced loss NaN (``reduce_total``)."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        t = num_items_in_batch
        if t.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar; got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real number; got dtype {t.dtype}")
        if t.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value = t.item()
    elif isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
        value = num_items_in_batch
    else:
        raise TypeError(
            f"num_items_in_batch must be a number or a one-element tensor; got "
            f"{type(num_items_in_batch).__name__}"
        )
    # 1 / num_items_in_batch is the kernels' float32 gradient weight.
    if not KERNEL_FLOAT_MIN <= float(value) <= KERNEL_FLOAT_MAX:
        raise ValueError(
            f"num_items_in_batch must be a number in [2**-126, 2**126] (the count "
            f"of tokens the loss is divided by); got {num_items_in_batch!r}"
        )


def check_logits(name: str, t) -> None:
    """``t`` is a floating tensor ``[..., V]`` with V >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {t.dtype}")
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1; got {tuple(t.shape)}")


def check_kd_options(
    *,
    divergence,
    temperature,
    beta,
    alpha,
    ignore_index,
    hard_weight,
    softcap,
    reduction,
    num_items_in_batch,
    has_labels: bool,
    vocab_mismatch: str = "cut",
) -> None:
    """The scalar options every kd_loss-style op takes (``vocab_mismatch``: those comparing
    two dense vocabularies)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(DIVERGENCES)}")
    check_kernel_float("temperature", temperature)
    _check_unit_interval("beta", beta)
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("hard_weight", hard_weight)
    if softcap is not None:
        check_kernel_float("softcap", softcap)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not isinstance(vocab_mismatch, str) or vocab_mismatch not in VOCAB_MISMATCH:
        raise ValueError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}; got {vocab_mismatch!r}")
    check_num_items(num_items_in_batch)
    check_int("ignore_index", ignore_index, -INT64_MAX - 1, INT64_MAX)
    if not has_labels and hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} needs labels for the cross-entropy term")


def check_labels(
    labels,
    lead: torch.Size,
    device: torch.device,
    vocab: int,
    ignore_index: int,
    what: str = "the logits",
    vocab_name: str = "the common vocabulary min(V_s, V_t)",
) -> None:
    """``labels`` (or None) is an integer tensor of shape ``lead`` on ``device`` whose entries
    lie in [0, vocab) (``vocab_name`` in the message) or equal ``ignore_index``."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        # Compared in the labels' dtype, -100 would wrap (to 156 in uint8) in some backends and
        # not in others.
        raise ValueError(
            f"labels of dtype {labels.dtype} hold [{info.min}, {info.max}] and "
            f"cannot equal ignore_index={ignore_index}; pass int64 labels "
            f"(labels.long()) or an ignore_index in that range"
        )
    if labels.shape != lead:
        raise ValueError(
            f"labels must have the leading shape {tuple(lead)} of {what}; got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {what} on {device}")
    # Range check where it costs no device sync (and outside torch.compile graphs, where it
    # would be data-dependent control flow); elsewhere an out-of-range label with
    # hard_weight > 0 yields a NaN loss for its token (the kernels never read past V).
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            values = labels[bad].unique()[:5].tolist()
            raise ValueError(
                f"labels must lie in [0, {vocab}) ({vocab_name}) or equal "
                f"ignore_index={ignore_index}; found {values}"
            )
