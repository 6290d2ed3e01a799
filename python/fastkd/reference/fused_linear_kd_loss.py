"""fused_linear_kd_loss in plain PyTorch: the logits materialized by ``F.linear``, then kd_loss.

The test oracle of ``fastkd.fused_linear_kd_loss`` and the path users take without fastkd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd_loss import kd_loss_reference

__all__ = ["fused_linear_kd_loss_reference", "linear_logits"]


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``scale * (hidden @ weight.T + bias)``: ``[..., H] x [V, H] -> [..., V]``, evaluated in
    ``compute_dtype`` (default: the inputs' dtype, as a plain lm_head would)."""
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    logits = F.linear(hidden, weight, bias)
    return logits * scale if scale != 1.0 else logits


def fused_linear_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    **kd_kwargs,
) -> torch.Tensor:
    """Same arguments and result as ``fastkd.fused_linear_kd_loss`` (less the chunking ones).

    The logits of both models are computed whole, in ``compute_dtype`` (default: the inputs'
    dtype), the teacher's under no_grad; ``kd_kwargs`` go to ``kd_loss_reference``, whose own
    arithmetic runs in float32 or wider.
    """
    student_logits = linear_logits(
        student_hidden, student_weight, student_bias, logit_scale, compute_dtype
    )
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = linear_logits(
                teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, compute_dtype
            )
    return kd_loss_reference(student_logits, teacher_logits.detach(), **kd_kwargs)
