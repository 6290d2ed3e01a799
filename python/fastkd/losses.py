"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from .ops.kd_loss import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`fastkd.kd_loss`; takes the same keyword arguments.

    ``forward(student_logits [..., V_s], teacher_logits [..., V_t], labels=None)`` returns the
    reduced loss (float32), or the per-token loss for ``reduction="none"``.
    """

    def __init__(self, *, divergence: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                 alpha: float = 0.1, ignore_index: int = -100, hard_weight: float = 0.0,
                 t2_scale: bool = False, softcap: float | None = None, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.options = dict(divergence=divergence, temperature=temperature, beta=beta,
                            alpha=alpha, ignore_index=ignore_index, hard_weight=hard_weight,
                            t2_scale=t2_scale, softcap=softcap, reduction=reduction,
                            backend=backend)
        # Check the options now rather than at the first forward.
        probe = torch.zeros(1, 1)
        kd_loss(probe, probe, labels=torch.zeros(1, dtype=torch.long) if hard_weight > 0 else None,
                **{**self.options, "backend": "torch"})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels,
                       num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
