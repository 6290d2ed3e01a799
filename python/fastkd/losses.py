"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from .ops._checks import check_kd_options, check_kernel_float
from .ops._registry import check_backend_name
from .ops.fused_linear_kd_loss import check_fused_linear_options, fused_linear_kd_loss
from .ops.kd_loss import kd_loss
from .ops.uld_loss import uld_loss

__all__ = ["FusedLinearKDLoss", "KDLoss", "ULDLoss"]


def _check_kd_module_options(options: dict) -> None:
    """Checks a module's kd_loss options when it is built rather than at its first forward
    (labels come with each call, so the hard-label term's need for them is checked there)."""
    check_kd_options(
        **{
            k: options[k]
            for k in (
                "divergence",
                "temperature",
                "beta",
                "alpha",
                "ignore_index",
                "hard_weight",
                "softcap",
                "reduction",
                "vocab_mismatch",
            )
        },
        num_items_in_batch=None,
        has_labels=True,
    )
    check_backend_name(options["backend"])


class KDLoss(nn.Module):
    """Module form of :func:`fastkd.kd_loss`; takes the same keyword arguments.

    ``forward(student_logits [..., V_s], teacher_logits [..., V_t], labels=None)`` returns the
    reduced loss (float32), or the per-token loss for ``reduction="none"``.
    """

    def __init__(
        self,
        *,
        divergence: str = "fkl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        ignore_index: int = -100,
        hard_weight: float = 0.0,
        t2_scale: bool = False,
        softcap: float | None = None,
        reduction: str = "mean",
        vocab_mismatch: str = "cut",
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            t2_scale=t2_scale,
            softcap=softcap,
            reduction=reduction,
            vocab_mismatch=vocab_mismatch,
            backend=backend,
        )
        _check_kd_module_options(self.options)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fastkd.fused_linear_kd_loss`; takes its keyword options (those of
    :func:`fastkd.kd_loss` plus ``chunk_size``, ``memory_budget``, ``logit_scale``,
    ``teacher_logit_scale``, ``accum_dtype`` and ``vocab_mismatch``).

    ``forward(student_hidden [..., H_s], student_weight [V_s, H_s], teacher_hidden=None
    [..., H_t], teacher_weight=None [V_t, H_t], *, teacher_logits=None [..., V_t],
    student_bias=None, teacher_bias=None, labels=None, num_items_in_batch=None)`` returns the
    reduced loss (float32), or the per-token loss for ``reduction="none"``. The module holds no
    parameters: pass the heads' weights (e.g. ``model.lm_head.weight``) at each call.
    """

    def __init__(
        self,
        *,
        divergence: str = "fkl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        ignore_index: int = -100,
        hard_weight: float = 0.0,
        t2_scale: bool = False,
        softcap: float | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        accum_dtype: torch.dtype | None = None,
        vocab_mismatch: str = "cut",
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            t2_scale=t2_scale,
            softcap=softcap,
            reduction=reduction,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            logit_scale=logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            accum_dtype=accum_dtype,
            vocab_mismatch=vocab_mismatch,
            backend=backend,
        )
        _check_kd_module_options(self.options)
        check_fused_linear_options(
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            accum_dtype=accum_dtype,
            logit_scale=logit_scale,
            teacher_logit_scale=teacher_logit_scale,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class ULDLoss(nn.Module):
    """Module form of :func:`fastkd.uld_loss`; takes the same keyword arguments.

    ``forward(student_logits [..., V_s], teacher_logits [..., V_t], labels=None)`` (aligned
    positions, vocabularies of any sizes) returns the reduced loss (float32), or the per-token
    loss for ``reduction="none"``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        teacher_temperature: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )
        # Checked now rather than at the first forward: kd_loss's options that uld_loss does
        # not take at their defaults.
        check_kd_options(
            divergence="fkl",
            temperature=temperature,
            beta=0.5,
            alpha=0.1,
            ignore_index=ignore_index,
            hard_weight=0.0,
            softcap=None,
            reduction=reduction,
            num_items_in_batch=None,
            has_labels=False,
        )
        if teacher_temperature is not None:
            check_kernel_float("teacher_temperature", teacher_temperature)
        check_backend_name(backend)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return uld_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
