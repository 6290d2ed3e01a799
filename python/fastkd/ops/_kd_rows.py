"""kd_loss's row kernel: its backends' registration and its launcher, which kd_loss and the chunked
lm_head loss (fused_linear_kd_loss, on each chunk's logits) share."""

from __future__ import annotations

import torch

from ._fused_rows import grad_buffer
from ._kd_config import KdConfig
from ._launch import launch_native
from ._layout import row_layout
from ._native import DTYPE_CODES
from ._registry import native_backend, reference_backend, register_op, triton_backend

__all__ = ["KD_LOSS", "launch_kd_rows"]

# Preference of backend="auto", best first. Set from the benchmark harness (`fastkd bench`): on
# CPU the C++ kernel beats torch eager and torch.compile; on CUDA see benchmarks/results/ for
# the CUDA-vs-Triton comparison. Every kernel reads a row's logits before it writes that row's
# gradient, so the gradient may overwrite the student's logits.
KD_LOSS = register_op(
    "kd_loss",
    [
        reference_backend(),
        native_backend(
            "cpu", "kd_loss_forward_cpu", skips_unneeded_grad=True, grad_may_alias_input=True
        ),
        native_backend("cuda", "kd_loss_forward_cuda", grad_may_alias_input=True),
        triton_backend("kd_loss", grad_may_alias_input=True),
    ],
    auto={"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
)


def launch_kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: KdConfig,
    backend: str,
    need_grad: bool,
    *,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs one fused kernel; returns (per-row loss fp32 [lead], grad like student).

    ``loss`` (contiguous fp32, the leading shape) and ``grad`` (contiguous, the student's shape)
    may be given to write into; ``grad`` may be ``student`` itself when that is contiguous:
    every kernel reads a row's logits before it writes that row's gradient.
    """
    lead = student.shape[:-1]
    vs, vt = student.shape[-1], teacher.shape[-1]
    vocab = min(vs, vt)
    if loss is None:
        loss = torch.empty(lead, dtype=torch.float32, device=student.device)
    if grad is None:
        grad = grad_buffer(student, need_grad, backend)
    n_rows = loss.numel()
    if n_rows == 0:
        return loss, grad
    s, inner_rows, s_layout = row_layout(student)
    t, inner_rows, t_layout = row_layout(teacher, inner_rows)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    if backend == "triton":
        from ..triton.kd_loss import kd_loss_forward

        kd_loss_forward(
            s,
            t,
            flat_labels,
            grad,
            loss,
            n_rows=n_rows,
            inner_rows=inner_rows,
            student_layout=s_layout,
            teacher_layout=t_layout,
            vocab=vocab,
            grad_vocab=vs,
            cfg=cfg,
        )
        return loss, grad
    w_p, w_q = cfg.mixture_weights
    fields = dict(
        student=s,
        student_dtype=DTYPE_CODES[s.dtype],
        s_outer=s_layout.outer_stride,
        s_inner=s_layout.inner_stride,
        teacher=t,
        teacher_dtype=DTYPE_CODES[t.dtype],
        t_outer=t_layout.outer_stride,
        t_inner=t_layout.inner_stride,
        inner_rows=inner_rows,
        n_rows=n_rows,
        vocab=vocab,
        grad_vocab=vs,
        labels=flat_labels,
        grad=grad,
        loss=loss,
        divergence=cfg.divergence,
        temperature=cfg.temperature,
        softcap=cfg.softcap,
        soft_weight=cfg.soft_weight,
        hard_weight=cfg.hard_weight,
        grad_scale=cfg.grad_scale,
        ignore_index=cfg.ignore_index,
        log_wp=cfg.log_wp,
        log_wq=cfg.log_wq,
        w_p=w_p,
        w_q=w_q,
    )
    launch_native("kd_loss", backend, student.device, args="KdLossArgs", **fields)
    return loss, grad
