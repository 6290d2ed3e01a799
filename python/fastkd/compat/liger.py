"""Liger-Kernel's distillation losses with Liger's names, signatures and conventions, computed by
fastkd's ops: replace ``from liger_kernel.transformers import LigerFusedLinearJSD`` (or
``from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss``) by
``from fastkd.compat.liger import ...``. Liger itself is not needed.

Every argument keeps Liger's meaning (read from liger-kernel 0.8.5's source):

- JSD's ``beta`` / ``jsd_beta``: beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q
  with P the teacher, Q the student; 0 is forward KL(P||Q), 1 reverse KL(Q||P). fastkd's
  ``divergence="jsd", beta=...`` is the same function, so beta passes through unchanged.
- ``temperature`` divides both models' logits; no T^2 factor (fastkd's ``t2_scale=False``).
- means are over the tokens whose label is not ``ignore_index`` (all tokens without labels).
- ``LigerFusedLinearJSDLoss``: ``weight_hard_loss * CE + weight_soft_loss * JSD``, the CE on
  the student's unpadded logits at temperature 1; a teacher vocabulary larger than the
  student's is met by zero-padding the student's logits (fastkd's ``vocab_mismatch="pad"``).
- ``LigerKLDIVLoss``: ``reduction`` ``"batchmean"`` divides by the rows, ``"mean"`` by
  rows x vocabulary (every element), ``"sum"``, ``"none"`` (the element-wise terms).

Inputs given as log-probabilities (``LigerJSD``, ``LigerKLDIVLoss``) are taken as logits of
the distributions they describe, so each row must be a (log-)distribution, as for any KL. The
gradient returned for them is the loss's gradient as a function of that distribution: it
differs from Liger's element-wise derivative by a multiple of the row's probabilities, which
vanishes through the ``log_softmax`` that produced them (the gradient with respect to the
logits is the same).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fused_linear_kd_loss import fused_linear_kd_loss
from ..ops.kd_loss import kd_loss

__all__ = [
    "LigerFusedLinearJSD",
    "LigerFusedLinearJSDLoss",
    "LigerJSD",
    "LigerKLDIVLoss",
    "liger_fused_linear_jsd",
    "liger_jsd",
    "liger_kl_div",
]

KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check_pair(input, target) -> None:
    """Liger's element-wise losses take two ``[BT, V]`` tensors of one shape."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [BT, V] tensor (Liger's shape); got {shape}")
    if input.shape != target.shape:
        raise ValueError(
            f"input and target must have one shape [BT, V]; got "
            f"{tuple(input.shape)} and {tuple(target.shape)}"
        )


def _check_temperature(temperature) -> None:
    # Liger asserts temperature != 0; fastkd needs T > 0 (a negative T would flip the
    # distributions, which Liger computes without complaint but no one asks for).
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")


# ---- functional forms (liger_kernel.transformers.functional) --------------------------------


def liger_jsd(
    input: torch.Tensor,
    target: torch.Tensor,
    shift_labels: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Liger's ``liger_jsd``: generalized JSD between the student's log-probabilities ``input``
    ``[BT, V]`` and the teacher's ``target`` ``[BT, V]``, mean over the rows whose
    ``shift_labels`` ``[BT]`` is not ``ignore_index``; fastkd ``kd_loss(divergence="jsd")``."""
    _check_pair(input, target)
    return kd_loss(
        input, target, divergence="jsd", beta=beta, labels=shift_labels, ignore_index=ignore_index
    )


def liger_kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool = True,
    reduce: bool = True,
    reduction: str = "mean",
    log_target: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Liger's ``liger_kl_div``: KL(target || input) with ``input`` ``[BT, V]`` the student's
    log-probabilities and ``target`` the teacher's probabilities (log-probabilities with
    ``log_target``). ``size_average`` and ``reduce`` are accepted and ignored, as Liger does.

    ``"batchmean"``, ``"sum"`` and ``"mean"`` run fastkd's fused ``kd_loss(divergence="fkl")``;
    ``"none"`` returns the ``[BT, V]`` element-wise terms, computed plainly (there is nothing to
    fuse). Without ``log_target``, Liger evaluates ``target * log(max(target, eps))``; fastkd
    takes ``log(target)`` as the teacher's logits, so elements with ``0 < target < eps`` differ
    by at most ``eps / e`` each. With ``log_target``, a ``-inf`` target (probability 0) adds 0
    (0 log 0 = 0), where Liger's ``exp(y) * (y - x)`` gives NaN."""
    del size_average, reduce
    _check_pair(input, target)
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}; got {reduction!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    if reduction == "none":
        if log_target:
            # exp(-inf) * (-inf - input) is NaN in Liger's kernel; 0 log 0 = 0 here, as in the
            # reduced losses.
            terms = target.exp() * (target - input)
            return terms.masked_fill(target == -torch.inf, 0.0)
        return target * (target.clamp_min(eps).log() - input)
    teacher_logits = target if log_target else target.log()
    total = kd_loss(input, teacher_logits, divergence="fkl", reduction="sum")
    rows, vocab = input.shape
    if reduction == "batchmean":
        return total / rows
    if reduction == "mean":
        return total / (rows * vocab)
    return total


def liger_fused_linear_jsd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    shift_labels: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Liger's ``liger_fused_linear_jsd``: JSD(``jsd_beta``) of the two heads' outputs at
    ``temperature``, mean over non-ignored rows, through fastkd's ``fused_linear_kd_loss``.
    ``student_input`` ``[BT, H_s]``, ``student_weight`` ``[V, H_s]``, ``teacher_input``
    ``[BT, H_t]``, ``teacher_weight`` ``[V', H_t]`` (a larger V' zero-pads the student, as
    Liger's chunked losses do), ``shift_labels`` ``[BT]``. ``accum_dtype``: None or
    ``torch.float32`` (grad_W accumulation)."""
    _check_temperature(temperature)
    return fused_linear_kd_loss(
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        divergence="jsd",
        beta=jsd_beta,
        temperature=temperature,
        labels=shift_labels,
        ignore_index=ignore_index,
        accum_dtype=accum_dtype,
        vocab_mismatch="pad",
    )


# ---- modules --------------------------------------------------------------------------------


class LigerJSD(nn.Module):
    """``liger_kernel.transformers.LigerJSD(beta=0.5, ignore_index=-100)``;
    ``forward(log_q [BT, V], log_p [BT, V], shift_labels=None)`` (student first)."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index

    def forward(
        self, log_q: torch.Tensor, log_p: torch.Tensor, shift_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return liger_jsd(log_q, log_p, shift_labels, self.beta, self.ignore_index)


class LigerKLDIVLoss(nn.KLDivLoss):
    """``liger_kernel.transformers.LigerKLDIVLoss(eps=1e-10, *args, **kwargs)``, the arguments
    of ``torch.nn.KLDivLoss`` after ``eps`` (``reduction`` defaults to torch's ``"mean"``:
    over every element); ``forward(y_pred [BT, V] log-probabilities, y_true [BT, V])``."""

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return liger_kl_div(
            y_pred, y_true, reduction=self.reduction, log_target=self.log_target, eps=self.eps
        )


class LigerFusedLinearJSD(nn.Module):
    """``liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100,
    temperature=1.0, accum_dtype=None)``; ``forward(student_input, student_weight,
    teacher_input, teacher_weight, shift_labels)`` as :func:`liger_fused_linear_jsd`."""

    def __init__(
        self,
        jsd_beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        accum_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_temperature(temperature)
        self.jsd_beta = jsd_beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.accum_dtype = accum_dtype

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        shift_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        return liger_fused_linear_jsd(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            shift_labels,
            self.jsd_beta,
            self.ignore_index,
            self.temperature,
            self.accum_dtype,
        )


class LigerFusedLinearJSDLoss(nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0.5,
    weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0, compiled=True,
    chunk_size=1024, return_soft_hard_loss=False)``.

    ``forward(student_input [BT, H_s], student_weight [V_s, H_s], teacher_input [BT, H_t],
    teacher_weight [V_t, H_t], true_labels [BT], student_bias=None, teacher_bias=None)`` returns
    ``weight_hard_loss * CE + weight_soft_loss * JSD`` (each a mean over non-ignored tokens), or
    ``(loss, soft, hard)`` with ``return_soft_hard_loss``. ``V_t > V_s`` zero-pads the student's
    logits for the JSD (not for the CE, which runs over the student's own vocabulary).

    ``compiled`` is accepted and ignored (fastkd's kernels need no ``torch.compile``);
    ``chunk_size`` sets the rows per chunk of the fused op. Where the two weights form
    ``w (1 - h), w h`` with ``h`` in [0, 1] and padding leaves the CE alone, one fused call
    computes both terms (``hard_weight=h``); otherwise the CE is a second call.
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
    ):
        super().__init__()
        _check_temperature(temperature)
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        common = dict(
            student_bias=student_bias,
            labels=true_labels,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
        )
        w_hard, w_soft = float(self.weight_hard_loss), float(self.weight_soft_loss)
        total = w_hard + w_soft
        padded = teacher_weight.shape[0] > student_weight.shape[0]
        if (
            not self.return_soft_hard_loss
            and (w_hard == 0 or not padded)
            and w_hard >= 0
            and w_soft >= 0
            and total > 0
        ):
            # One call: total * ((1 - h) JSD + h CE) with h = w_hard / total.
            loss = fused_linear_kd_loss(
                student_input,
                student_weight,
                teacher_input,
                teacher_weight,
                teacher_bias=teacher_bias,
                divergence="jsd",
                beta=self.beta,
                temperature=self.temperature,
                hard_weight=w_hard / total,
                vocab_mismatch="pad",
                **common,
            )
            return loss * total
        soft = fused_linear_kd_loss(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            teacher_bias=teacher_bias,
            divergence="jsd",
            beta=self.beta,
            temperature=self.temperature,
            vocab_mismatch="pad",
            **common,
        )
        if w_hard == 0 and not self.return_soft_hard_loss:
            hard = soft.new_zeros(())
        else:
            # CE alone (hard_weight=1 gives the soft term weight 0): the student's own detached
            # head stands in for the teacher the op requires.
            hard = fused_linear_kd_loss(
                student_input,
                student_weight,
                student_input.detach(),
                student_weight.detach(),
                teacher_bias=None if student_bias is None else student_bias.detach(),
                hard_weight=1.0,
                **common,
            )
        loss = w_hard * hard + w_soft * soft
        return (loss, soft, hard) if self.return_soft_hard_loss else loss
