"""kd_loss benchmark: fastkd backends against torch eager, torch.compile and Liger-Kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import kd_loss
from ..ops._registry import kernel_backends
from ..reference.kd_loss import kd_loss_reference
from .harness import Result, add_loss_impl, format_table, measure

__all__ = ["KdCase", "plain_kd_loss", "run_kd_loss_case"]


@dataclass(frozen=True)
class KdCase:
    rows: int = 2048
    vocab: int = 32000
    dtype: str = "float32"
    divergence: str = "fkl"
    beta: float = 0.5
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def title(self) -> str:
        return (
            f"kd_loss {self.divergence} N={self.rows} V={self.vocab} {self.dtype} on {self.device}"
        )


def plain_kd_loss(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The loss as users write it in plain PyTorch (TRL's generalized JSD form; mean over rows).

    Computes in float32 like the fused kernels. Divergences without a common plain form fall
    back to fastkd's reference.
    """
    lq = F.log_softmax(s.float(), dim=-1)
    lp = F.log_softmax(t.float(), dim=-1)
    if divergence == "fkl" or (divergence == "jsd" and beta == 0.0):
        return F.kl_div(lq, lp, reduction="batchmean", log_target=True)
    if divergence == "rkl" or (divergence == "jsd" and beta == 1.0):
        return F.kl_div(lp, lq, reduction="batchmean", log_target=True)
    if divergence == "jsd":
        lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
        kl_p = F.kl_div(lm, lp, reduction="batchmean", log_target=True)
        kl_q = F.kl_div(lm, lq, reduction="batchmean", log_target=True)
        return beta * kl_p + (1 - beta) * kl_q
    if divergence == "tvd":
        return 0.5 * (lq.exp() - lp.exp()).abs().sum(-1).mean()
    return kd_loss_reference(s, t, divergence=divergence, beta=beta)


def _liger_loss(divergence: str, beta: float):
    """Liger-Kernel's equivalent on log-probabilities, or None where it has none."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerTVDLoss
    except ImportError:
        return None
    if divergence in ("fkl", "rkl", "jsd"):
        b = {"fkl": 0.0, "rkl": 1.0}.get(divergence, beta)
        jsd = LigerJSD(beta=b)
        return lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    if divergence == "tvd":
        tvd = LigerTVDLoss(reduction="batchmean")
        return lambda s, t: tvd(F.softmax(s.float(), -1), F.softmax(t.float(), -1))
    return None


def _impls(case: KdCase, student: torch.Tensor, teacher: torch.Tensor):
    """(implementations, forward-only steps) for one case."""
    device = torch.device(case.device)
    kw = dict(divergence=case.divergence, beta=case.beta)

    impls, fwd = [], {}
    for backend in kernel_backends("kd_loss", device):
        add_loss_impl(
            impls,
            fwd,
            f"fastkd[{backend}]",
            (lambda b: lambda: kd_loss(student, teacher, backend=b, **kw))(backend),
        )

    def eager(s, t):
        return plain_kd_loss(s, t, case.divergence, case.beta)

    add_loss_impl(impls, fwd, "torch eager", lambda: eager(student, teacher), peer=True)
    torch._dynamo.reset()  # a fresh compile cache per case: cases share the function's code
    compiled = torch.compile(eager)
    add_loss_impl(impls, fwd, "torch.compile", lambda: compiled(student, teacher), peer=True)
    if device.type == "cuda":
        liger = _liger_loss(case.divergence, case.beta)
        if liger is not None:
            add_loss_impl(impls, fwd, "liger-kernel", lambda: liger(student, teacher), peer=True)
    return impls, fwd


def run_kd_loss_case(
    case: KdCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures one case; returns the results and a markdown table.

    On CUDA the table also gives the fused forward's achieved memory bandwidth for the bytes it
    must move: both logit rows read once and the gradient written once.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.rows, case.vocab)
    student = (torch.randn(shape, generator=g) * 2).to(case.torch_dtype).to(case.device)
    teacher = (torch.randn(shape, generator=g) * 2).to(case.torch_dtype).to(case.device)
    student.requires_grad_()
    impls, fwd = _impls(case, student, teacher)

    def drop_grad():
        student.grad = None

    results = measure(
        impls,
        torch.device(case.device),
        warmup=warmup,
        reps=reps,
        forward_only=fwd,
        before_each=drop_grad,
    )
    extra_cols: tuple[str, ...] = ()
    if case.device == "cuda":
        itemsize = student.element_size()
        must_move = case.rows * case.vocab * 3 * itemsize
        for r in results:
            if r.fwd_ms:
                r.extra["fwd GB/s"] = f"{must_move / (r.fwd_ms * 1e-3) / 1e9:.0f}"
        extra_cols = ("fwd GB/s",)
    return results, format_table(case.title(), results, extra_cols)
