"""kd_loss: input checks, the fused custom op with its fake kernel and autograd, backend dispatch.

The fused backends (``cpu``, ``triton``, ``cuda``) run one kernel that writes the per-token loss
and ``grad_scale * dLoss_token/dstudent_logits`` in the forward, ``grad_scale`` being the
reduction's weight where it is known without a device sync (1/#tokens for a mean on CPU). The
backward only rescales that stored gradient by ``incoming / grad_scale``, in place, and skips the
rows where that ratio is 1 (on CPU). The ``torch`` backend is the plain-PyTorch reference. The
row kernel's registration and launcher, shared with fused_linear_kd_loss, are in ``_kd_rows``;
the gradient buffer, the autograd formula and the reduction in the fused-row framework
(``_fused_rows``).
"""

from __future__ import annotations

import torch

from ..reference.kd_loss import kd_loss_reference
from ._op_args import register_named_fake
from ._checks import check_kd_options, check_labels, check_logits
from ._fused_rows import (
    call_fused,
    grad_buffer,
    mean_grad_scale,
    pick_backend,
    reduce_rows,
    register_stored_grad_autograd,
)
from ._kd_config import KdConfig, make_kd_config
from ._kd_rows import launch_kd_rows
from ._vocab_mismatch import match_student_logits

__all__ = ["kd_loss"]


def _check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels,
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
    vocab_mismatch,
) -> None:
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same leading shape; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits is on {student.device} but teacher_logits on {teacher.device}"
        )
    check_kd_options(
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        softcap=softcap,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        has_labels=labels is not None,
        vocab_mismatch=vocab_mismatch,
    )
    check_labels(
        labels,
        student.shape[:-1],
        student.device,
        min(student.shape[-1], teacher.shape[-1]),
        ignore_index,
    )


# ---- the fused op ---------------------------------------------------------------------------


def _kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: int,
    temperature: float,
    softcap: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    log_wp: float,
    log_wq: float,
    coef: float,
    grad_scale: float,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (fp32, leading shape) and grad_scale * dLoss_token/dstudent (student's
    shape and dtype; empty on CPU when not ``need_grad``). The second output is returned so that
    autograd can save it: the backward rescales it in place and returns it as the gradient."""
    cfg = KdConfig(
        divergence,
        temperature,
        softcap,
        soft_weight,
        hard_weight,
        ignore_index,
        log_wp,
        log_wq,
        coef,
        grad_scale,
    )
    return launch_kd_rows(student, teacher, labels, cfg, backend, need_grad)


kd_loss_fused = torch.library.custom_op("fastkd::kd_loss_fused", mutates_args=())(_kd_loss_rows)


def _fake_kd_loss(a):
    loss = a.student.new_empty(a.student.shape[:-1], dtype=torch.float32)
    return loss, grad_buffer(a.student, a.need_grad, a.backend)


register_named_fake(kd_loss_fused, _fake_kd_loss)


register_stored_grad_autograd(kd_loss_fused)


# ---- public entry point ---------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = False,
    softcap: float | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_mismatch: str = "cut",
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits, fused with the softmax.

    Args:
        student_logits: ``[..., V_s]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        teacher_logits: ``[..., V_t]``, same leading shape; no gradient flows to it through the
            fused backends. Where V_s != V_t, see ``vocab_mismatch``. ``-inf`` logits mark
            tokens outside the support (0 log 0 = 0). A counted token where either model has
            no softmax over the prefix (all ``-inf``, or a NaN / ``+inf`` logit, after
            ``softcap`` where set: it maps +-inf to +-c) gets loss NaN and gradient NaN, as
            plain PyTorch gives; an ignored one stays 0.
        divergence: a name in ``fastkd.DIVERGENCES``, which describes each (its formula, the
            parameters it reads and the edge cases where it equals another), e.g. ``"fkl"``
            KL(p||q) (the default; Liger-Kernel's fused JSD losses default to JSD instead),
            ``"rkl"`` KL(q||p), ``"jsd"`` (``beta``: beta KL(p||m) + (1-beta) KL(q||m),
            m = beta p + (1-beta) q; beta=0 is exactly fkl, beta=1 rkl), ``"skl"`` and
            ``"srkl"`` (``alpha``); p = softmax(teacher/T), q = softmax(student/T).
        temperature: T applied to both models (after ``softcap``), in [2^-126, 2^126]: the
            kernels take T and 1/T as float32 (every positive float option has this range).
        t2_scale: multiply the soft loss by T^2 (keeps gradient magnitudes comparable across T).
        softcap: c in [2^-126, 2^126] maps logits z -> c tanh(z / c) for both models
            (Gemma-style heads).
        labels: integer tensor of the leading shape, of a dtype that can hold ``ignore_index``
            (int64 or int32 for the default -100; uint8 labels are refused there); tokens
            equal to ``ignore_index`` contribute nothing to loss or gradient.
        ignore_index: an int64 value.
        hard_weight: h in [0, 1]; loss = (1-h) soft + h CE(student logits at T=1, labels).
        reduction: ``"mean"`` over valid tokens (or divided by ``num_items_in_batch`` when
            given, for gradient accumulation; 0 when no token is valid), ``"sum"``, or
            ``"none"`` (per-token loss in the leading shape, 0 at ignored tokens).
        num_items_in_batch: a number in [2^-126, 2^126] or a one-element tensor; a CPU tensor
            is checked likewise, a device tensor is not read on the host (no sync): there a
            count <= 0 gives a NaN loss.
        vocab_mismatch: ``"cut"`` (default): both are cut to the common prefix
            ``min(V_s, V_t)``; student columns beyond it get zero gradient. ``"pad"``
            (Liger-Kernel's convention): a smaller student's logits are padded with zeros up to
            V_t, so the teacher's extra ids have student logit 0 (the hard-label term then runs
            over the padded logits too); V_s > V_t raises. Labels always lie in
            [0, min(V_s, V_t)).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. Units: nats per token (times T^2 with ``t2_scale``).
    """
    _check_inputs(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        softcap=softcap,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        vocab_mismatch=vocab_mismatch,
    )
    student_logits = match_student_logits(student_logits, teacher_logits.shape[-1], vocab_mismatch)
    device = student_logits.device
    name = pick_backend("kd_loss", backend, student_logits, teacher_logits)
    kwargs = dict(
        divergence=divergence,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        t2_scale=t2_scale,
        softcap=softcap,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
    if name == "torch":
        return kd_loss_reference(student_logits, teacher_logits, **kwargs)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    cfg = make_kd_config(
        divergence,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        softcap=softcap,
        hard_weight=hard_weight,
        t2_scale=t2_scale,
        ignore_index=ignore_index,
        grad_scale=mean_grad_scale(
            n_rows, device, labels, ignore_index, reduction, num_items_in_batch
        ),
    )
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (
        student_logits,
        teacher_logits.detach(),
        labels,
        cfg.divergence,
        cfg.temperature,
        cfg.softcap,
        cfg.soft_weight,
        cfg.hard_weight,
        cfg.ignore_index,
        cfg.log_wp,
        cfg.log_wq,
        cfg.coef,
        cfg.grad_scale,
        name,
        need_grad,
    )
    rows, _ = call_fused(kd_loss_fused, _kd_loss_rows, args, need_grad=need_grad)
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(rows, valid, reduction, num_items_in_batch)
