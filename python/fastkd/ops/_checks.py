"""Input checks shared by the kd_loss family of ops: they raise before any kernel runs, with the
offending shapes or values in the message."""

from __future__ import annotations

import math
import numbers

import torch

from ._kd_config import DIVERGENCES

__all__ = ["REDUCTIONS", "check_kd_options", "check_labels", "check_logits"]

REDUCTIONS = ("mean", "sum", "none")


def _check_unit_interval(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")


def check_logits(name: str, t) -> None:
    """``t`` is a floating tensor ``[..., V]`` with V >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {t.dtype}")
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1; got {tuple(t.shape)}")


def check_kd_options(*, divergence, temperature, beta, alpha, ignore_index, hard_weight, softcap,
                     reduction, num_items_in_batch, has_labels: bool) -> None:
    """The scalar options every kd_loss-style op takes."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(DIVERGENCES)}")
    if not isinstance(temperature, numbers.Real) or not (0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    _check_unit_interval("beta", beta)
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("hard_weight", hard_weight)
    if softcap is not None and (not isinstance(softcap, numbers.Real)
                                or not (0 < float(softcap) < math.inf)):
        raise ValueError(f"softcap must be None or a finite number > 0; got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a scalar; got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        elif not isinstance(num_items_in_batch, numbers.Real) or not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be > 0; got {num_items_in_batch!r}")
    if not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    if not has_labels and hard_weight > 0:
        raise ValueError(f"hard_weight={hard_weight} needs labels for the cross-entropy term")


def check_labels(labels, lead: torch.Size, device: torch.device, vocab: int,
                 ignore_index: int, what: str = "the logits",
                 vocab_name: str = "the common vocabulary min(V_s, V_t)") -> None:
    """``labels`` (or None) is an integer tensor of shape ``lead`` on ``device`` whose entries
    lie in [0, vocab) (``vocab_name`` in the message) or equal ``ignore_index``."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels must have the leading shape {tuple(lead)} of {what}; "
                         f"got {tuple(labels.shape)}")
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
                f"ignore_index={ignore_index}; found {values}")
