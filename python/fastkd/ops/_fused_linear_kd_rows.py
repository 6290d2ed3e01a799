"""fused_linear_kd_loss's row kernel: per chunk, the dense teacher's logits (from its hidden
states and head, or rows of offline logits), then kd_loss's fused row kernel on the student's
chunk of logits, its gradient written over them."""

from __future__ import annotations

from dataclasses import replace

import torch

from ._chunked_lm_head import chunk_logits, gemm_operand, logits_buffer
from ._kd_config import KdConfig
from ._kd_rows import launch_kd_rows
from ._registry import backend_spec


def _teacher_rows(teacher_logits: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Rows [begin, end) of dense teacher logits ``[..., V_t]`` flattened to ``[N, V_t]``: a view
    where the layout allows one, else a gather of just those rows (never a copy of all N)."""
    vocab = teacher_logits.shape[-1]
    try:
        return teacher_logits.view(-1, vocab)[begin:end]
    except RuntimeError:
        index = torch.unravel_index(
            torch.arange(begin, end, device=teacher_logits.device), teacher_logits.shape[:-1]
        )
        return teacher_logits[index]


def _dense_teacher_rows(
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    labels,
    cfg: KdConfig,
    logit_scale: float,
    teacher_logit_scale: float,
    chunk_size: int,
    backend: str,
):
    """The row kernel of a dense teacher: its logits per chunk (computed from its hidden states
    and head, or rows of the offline logits), then kd_loss's fused kernel, whose gradient
    carries the student's ``logit_scale``."""
    cfg = replace(cfg, grad_scale=cfg.grad_scale * logit_scale)
    tw_mm = gemm_operand(teacher_weight)
    n_rows = (teacher_hidden if teacher_logits is None else teacher_logits).shape[0]
    zt_buf = logits_buffer(min(chunk_size, n_rows), tw_mm)

    def run(zs, begin, end, loss, need_grad):
        if teacher_logits is None:
            zt = chunk_logits(
                teacher_hidden[begin:end],
                tw_mm,
                teacher_bias,
                teacher_logit_scale,
                None if zt_buf is None else zt_buf[: end - begin],
            )
        else:
            zt = _teacher_rows(teacher_logits, begin, end)
        launch_kd_rows(
            zs,
            zt,
            None if labels is None else labels[begin:end],
            cfg,
            backend,
            need_grad,
            loss=loss,
            grad=zs
            if need_grad or not backend_spec("fused_linear_kd_loss", backend).skips_unneeded_grad
            else None,
        )

    return run
