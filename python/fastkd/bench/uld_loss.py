"""uld_loss benchmark: fastkd's fused sorted-probability L1 (Universal Logit Distillation) against
the published formulation in plain PyTorch (softmax, sort both, zero-pad, L1), eager and
torch.compile, forward+backward w.r.t. the student logits.

The teacher's logits are LM-like (``lm_like_logits``) over its own vocabulary, which may differ
from the student's (``--teacher-vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import uld_loss
from ..ops._registry import kernel_backends
from .harness import Result, add_loss_impl, format_table, measure
from .sparse_kd_loss import lm_like_logits

__all__ = ["UldCase", "plain_uld_loss", "run_uld_loss_case"]


@dataclass(frozen=True)
class UldCase:
    rows: int = 2048
    vocab: int = 32000  # student's
    teacher_vocab: int = 50257
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def title(self) -> str:
        return (
            f"uld_loss rows={self.rows} V_s={self.vocab} V_t={self.teacher_vocab} "
            f"{self.dtype} on {self.device}"
        )


def plain_uld_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ULD as published, in plain PyTorch: softmax of both in float32, each sorted in descending
    order, the shorter zero-padded, L1 per token, mean over tokens."""
    sq = F.softmax(s.float(), dim=-1).sort(dim=-1, descending=True).values
    sp = F.softmax(t.float(), dim=-1).sort(dim=-1, descending=True).values
    width = max(sq.shape[-1], sp.shape[-1])
    sq = F.pad(sq, (0, width - sq.shape[-1]))
    sp = F.pad(sp, (0, width - sp.shape[-1]))
    return (sq - sp).abs().sum(-1).mean()


def run_uld_loss_case(
    case: UldCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures one case; returns the results and a markdown table."""
    device = torch.device(case.device)
    g = torch.Generator(device=device).manual_seed(seed)
    teacher = lm_like_logits(case.rows, case.teacher_vocab, g, device).to(case.torch_dtype)
    student = (
        (torch.randn(case.rows, case.vocab, generator=g, device=device) * 2)
        .to(case.torch_dtype)
        .requires_grad_()
    )
    impls, fwd = [], {}
    for backend in kernel_backends("uld_loss", device):
        add_loss_impl(
            impls,
            fwd,
            f"fastkd[{backend}]",
            (lambda b: lambda: uld_loss(student, teacher, backend=b))(backend),
        )
    add_loss_impl(impls, fwd, "torch eager", lambda: plain_uld_loss(student, teacher), peer=True)
    torch._dynamo.reset()  # a fresh compile cache per case: cases share the function's code
    compiled = torch.compile(plain_uld_loss)
    add_loss_impl(impls, fwd, "torch.compile", lambda: compiled(student, teacher), peer=True)

    def drop_grad():
        student.grad = None

    results = measure(
        impls, device, warmup=warmup, reps=reps, forward_only=fwd, before_each=drop_grad
    )
    return results, format_table(case.title(), results)
