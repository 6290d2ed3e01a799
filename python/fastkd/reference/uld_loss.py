"""Plain-PyTorch uld_loss: the readable definition and the test oracle.

Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs"): at each aligned position both distributions are
sorted in descending order, the shorter vocabulary is padded with zeros, and the loss is the L1
distance between the sorted vectors. It ignores token identity, so the two vocabularies need
not match. Differentiable by autograd (w.r.t. both models' logits), float64-capable; it holds
sorted copies and sort indices of both models' probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd_loss import mask_ignored_rows, nan_where_no_distribution, reduce_rows

__all__ = ["sorted_l1_rows", "uld_loss_reference"]


def sorted_l1_rows(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_i |q_(i) - p_(i)| per row for probabilities ``q`` ``[N, V_s]`` and ``p`` ``[N, V_t]``,
    each sorted in descending order, the shorter zero-padded. Returns ``[N]``.

    The sort is stable, so that equal probabilities are ranked by column and a tie receives a
    definite subgradient.
    """
    sq = q.sort(dim=-1, descending=True, stable=True).values
    sp = p.sort(dim=-1, descending=True, stable=True).values
    width = max(sq.shape[-1], sp.shape[-1])
    sq = F.pad(sq, (0, width - sq.shape[-1]))
    sp = F.pad(sp, (0, width - sp.shape[-1]))
    return (sq - sp).abs().sum(-1)


def uld_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """uld_loss in plain PyTorch; same arguments and result as ``fastkd.uld_loss``.

    Shapes: ``[..., V_s]`` and ``[..., V_t]`` with equal leading shapes; ``labels`` the leading
    shape. Arithmetic in ``compute_dtype``, by default float64 for float64 students, else
    float32.
    """
    lead = student_logits.shape[:-1]
    if compute_dtype is None:
        compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    t_teacher = temperature if teacher_temperature is None else teacher_temperature
    zs = student_logits.reshape(-1, student_logits.shape[-1]).to(compute_dtype) / temperature
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(compute_dtype) / t_teacher
    zs = mask_ignored_rows(zs, labels, ignore_index)
    zt = mask_ignored_rows(zt, labels, ignore_index)
    rows = sorted_l1_rows(torch.softmax(zs, dim=-1), torch.softmax(zt, dim=-1))
    rows = nan_where_no_distribution(rows, zs, zt)
    valid = None
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    out = reduce_rows(rows, valid, reduction, num_items_in_batch)
    return out.reshape(lead) if reduction == "none" else out
