"""fused_linear_kd_loss: the lm_head of the student (and of an online teacher) fused with kd_loss.

Tokens are processed in chunks. Per chunk of C rows:

    z_s = s_s * (x_s W_s^T + b_s)          [C, V_s] fp32, straight from the matmul
    z_t = s_t * (x_t W_t^T + b_t)          [C, V_t] fp32, no grad (or rows of dense logits)
    loss rows and g = grad_scale * dL/dz_s  by the fused kd_loss row kernel, g written over z_s
    grad_x[rows] = s_s * g W_s              [C, H_s]
    grad_W      += s_s * g^T x_s            [V_s, H_s]     grad_b += s_s * sum_rows g

so the gradients exist when the forward returns, and the backward only scales them by the
incoming gradient (in place in eager mode). No [N, V] buffer of any dtype is allocated: the
workspace is one chunk of fp32 logits per model (plus, where the GEMMs run in bf16/fp16, the
gradient's copy in that dtype), sized from a memory budget. Where no low-precision GEMM with fp32
output exists (CPU), a bf16/fp16 head is multiplied through an fp32 copy of its weight, and
grad_W accumulates in fp32: [V, H] fp32 buffers outside that budget.

``reduction="none"`` gets a per-token incoming gradient, which cannot rescale grad_W after the
fact: there the forward computes the loss only and the backward runs the chunks again with each
row's gradient weighted by its incoming value (one more pass of the two logits GEMMs).

This module holds the custom op and the public function; the input checks are in
``_fused_linear_checks.py`` and the row kernel (each chunk's teacher logits, then kd_loss's
kernel) in ``_fused_linear_kd_rows.py``.
"""

from __future__ import annotations

import torch

from ..reference.fused_linear_kd_loss import fused_linear_kd_loss_reference
from ._op_args import register_named_fake
from ._checks import check_kd_options, check_labels
from ._chunked_lm_head import (
    autocast_operands,
    default_memory_budget,
    fake_outputs,
    register_chunked_autograd,
    resolve_chunk_size,
    run_chunks,
)
from ._fused_linear_checks import _check_inputs, check_fused_linear_options
from ._fused_linear_kd_rows import _dense_teacher_rows
from ._fused_rows import mean_grad_scale, reduce_total
from ._kd_config import KdConfig, make_kd_config
from ._kd_rows import KD_LOSS
from ._registry import accepts, register_op, resolve_backend
from ._vocab_mismatch import match_student_head

__all__ = ["check_fused_linear_options", "fused_linear_kd_loss"]

# The row kernel of the chunked lm_head + loss: the same kernels as kd_loss, each writing a
# chunk's gradient over its logits (fused_linear_sparse_kd_loss.py runs sparse_kd_loss's).
register_op("fused_linear_kd_loss", list(KD_LOSS.backends.values()), auto=KD_LOSS.auto)


# ---- the custom op --------------------------------------------------------------------------


@torch.library.custom_op("fastkd::fused_linear_kd_loss_fused", mutates_args=())
def fused_linear_kd_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    row_scale: torch.Tensor | None,
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
    logit_scale: float,
    teacher_logit_scale: float,
    chunk_size: int,
    accum_fp32: bool,
    reduce: bool,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias). ``hidden`` is ``[N, H_s]``, ``labels``
    ``[N]`` int64, ``row_scale`` ``[N]`` fp32 (a weight per row's gradient) or None. The loss is
    the fp32 sum of the rows when ``reduce`` (a scalar) else the rows ``[N]``; gradients are
    ``grad_scale`` times those of the summed rows, empty where not requested."""
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
    with torch.autocast(hidden.device.type, enabled=False):
        rows = _dense_teacher_rows(
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_logits,
            labels,
            cfg,
            logit_scale,
            teacher_logit_scale,
            chunk_size,
            backend,
        )
        loss, *grads = run_chunks(
            hidden,
            weight,
            bias,
            rows,
            row_scale,
            logit_scale,
            chunk_size,
            accum_fp32,
            need_hidden,
            need_weight,
            need_bias,
        )
    return (loss.sum() if reduce else loss), *grads


register_named_fake(fused_linear_kd_loss_fused, fake_outputs)


register_chunked_autograd(fused_linear_kd_loss_fused)


# ---- public entry points -------------------------------------------------------------------


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    accum_dtype: torch.dtype | None = None,
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
    """kd_loss of the student's lm_head output against the teacher's, without materializing
    either model's ``[N, V]`` logits.

    Student logits are ``logit_scale * (student_hidden @ student_weight.T + student_bias)``,
    computed chunk by chunk in fp32 (no low-precision rounding of the logits). The teacher is
    either online, ``teacher_logit_scale * (teacher_hidden @ teacher_weight.T + teacher_bias)``
    under no_grad, or dense offline ``teacher_logits``. Gradients reach ``student_hidden``,
    ``student_weight`` and ``student_bias``, never the teacher.

    Args:
        student_hidden: ``[..., H_s]`` float32/bfloat16/float16 (float64: ``torch`` backend).
        student_weight: ``[V_s, H_s]`` lm_head weight (tied embeddings work; it may be frozen).
        teacher_hidden, teacher_weight: ``[..., H_t]`` (same leading shape; H_t may differ from
            H_s) and ``[V_t, H_t]``.
        teacher_logits: ``[..., V_t]`` instead of the two above.
        student_bias, teacher_bias: ``[V_s]``, ``[V_t]`` or None.
        chunk_size: tokens per chunk; by default the most whose workspace (fp32 logits of both
            models, and on CUDA the gradient's bf16/fp16 copy) fits in ``memory_budget``.
        memory_budget: bytes of that workspace; default 256 MiB on CPU, 1 GiB on CUDA.
        logit_scale, teacher_logit_scale: multipliers of the heads' outputs (e.g. Cohere's
            ``logit_scale``); applied before ``softcap`` and the temperature.
        accum_dtype: None accumulates grad_W and grad_b over chunks in the weight's dtype where
            the GEMMs run in it (CUDA); ``torch.float32`` accumulates in fp32 with fp32 GEMMs
            for grad_W (more memory, slower). On CPU the GEMMs and accumulation are fp32.
        divergence ... num_items_in_batch: as in :func:`fastkd.kd_loss`; labels and
            reductions take the leading shape of ``student_hidden``. The default divergence is
            ``"fkl"``; Liger-Kernel's ``LigerFusedLinearJSD`` computes JSD (its default
            ``jsd_beta=0.5``): pass ``divergence="jsd", beta=0.5`` for the same loss.
        vocab_mismatch: as in :func:`fastkd.kd_loss`: ``"cut"`` (default) compares the common
            prefix ``min(V_s, V_t)``; ``"pad"`` (Liger-Kernel's convention) appends
            ``V_t - V_s`` zero rows to the student's head (logit 0 for those ids; their
            gradients are dropped), at the cost of one ``[V_t, H_s]`` copy of the weight.
        backend: row kernel, as in :func:`fastkd.kd_loss`; ``"torch"`` is the plain
            (unchunked) PyTorch path.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for
        ``reduction="none"``. With ``reduction="none"`` and gradients wanted, the backward
        recomputes the logits once more (the per-token incoming gradient weights every row).
    """
    _check_inputs(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        logit_scale=logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        accum_dtype=accum_dtype,
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
    lead = student_hidden.shape[:-1]
    device = student_hidden.device
    vocab_s = student_weight.shape[0]
    vocab_t = teacher_logits.shape[-1] if teacher_logits is not None else teacher_weight.shape[0]
    check_labels(labels, lead, device, min(vocab_s, vocab_t), ignore_index, "student_hidden")
    student_weight, student_bias, vocab_s = match_student_head(
        student_weight, student_bias, vocab_t, vocab_mismatch
    )

    student_hidden, student_weight, student_bias = autocast_operands(
        [student_hidden, student_weight, student_bias], device.type
    )
    if teacher_logits is None:
        teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
            [teacher_hidden, teacher_weight, teacher_bias], device.type
        )
    kd_kwargs = dict(
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
    operands = [
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
    ]
    dtypes = tuple(t.dtype for t in operands if t is not None)
    name = resolve_backend("fused_linear_kd_loss", backend, device, dtypes=dtypes)
    if name == "torch":
        return fused_linear_kd_loss_reference(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            teacher_logits=teacher_logits,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            logit_scale=logit_scale,
            teacher_logit_scale=teacher_logit_scale,
            **kd_kwargs,
        )
    if not accepts("fused_linear_kd_loss", name, dtypes=dtypes):
        raise ValueError(
            f"backend {name!r} takes float32/bfloat16/float16 operands; got "
            f"{[None if t is None else t.dtype for t in operands]}; use backend='torch'"
        )

    n_rows = lead.numel()
    hidden = student_hidden.reshape(n_rows, student_hidden.shape[-1])
    t_hidden = (
        None
        if teacher_hidden is None
        else teacher_hidden.detach().reshape(n_rows, teacher_hidden.shape[-1])
    )
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    grad_on = torch.is_grad_enabled()
    need = [
        grad_on and t is not None and t.requires_grad
        for t in (hidden, student_weight, student_bias)
    ]
    reduce = reduction != "none"
    if chunk_size is None:
        low_precision_grad = device.type == "cuda" and student_weight.dtype != torch.float32
        chunk_size = resolve_chunk_size(
            n_rows,
            vocab_s,
            vocab_t if teacher_logits is None else None,
            low_precision_grad,
            memory_budget if memory_budget is not None else default_memory_budget(device),
        )
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
    loss, *_ = fused_linear_kd_loss_fused(
        hidden,
        student_weight,
        student_bias,
        t_hidden,
        None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        None if teacher_logits is None else teacher_logits.detach(),
        flat_labels,
        None,
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
        float(logit_scale),
        float(teacher_logit_scale),
        int(chunk_size),
        accum_dtype == torch.float32,
        reduce,
        name,
        *(need if reduce else (False,) * 3),
    )
    if not reduce:
        return loss.reshape(lead)
    valid = None if labels is None else labels != ignore_index
    return reduce_total(loss, n_rows, valid, reduction, num_items_in_batch)
