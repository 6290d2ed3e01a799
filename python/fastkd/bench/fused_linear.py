"""fused_linear_kd_loss benchmark: the lm_head fused with the loss, against the logits
materialized by torch eager and torch.compile and, on GPU, Liger-Kernel's fused linear JSD."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import fused_linear_kd_loss
from ..ops._registry import kernel_backends
from .harness import Impl, Result, format_table, measure
from .kd_loss import plain_kd_loss

__all__ = ["FusedLinearCase", "run_fused_linear_case"]

TEACHERS = ("online", "offline")


@dataclass(frozen=True)
class FusedLinearCase:
    rows: int = 2048
    hidden: int = 256
    vocab: int = 32000
    dtype: str = "float32"
    divergence: str = "fkl"
    beta: float = 0.5
    teacher: str = "online"  # "online": hidden + lm_head like the student's; "offline": logits
    device: str = "cpu"

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}; got {self.teacher!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def gemms(self) -> int:
        """GEMMs of [N, H] x [H, V] size in one forward+backward: the student's logits, grad of
        the hidden and grad of the weight, plus the teacher's logits when it is online."""
        return 4 if self.teacher == "online" else 3

    def title(self) -> str:
        return (
            f"fused_linear_kd_loss {self.divergence} {self.teacher} teacher N={self.rows} "
            f"H={self.hidden} V={self.vocab} {self.dtype} on {self.device}"
        )


def _liger_fused_linear(divergence: str, beta: float):
    """Liger-Kernel's fused lm_head + generalized JSD peers as ``{name: fn(x, w, tx, tw)}``;
    empty where Liger is not importable or has no such divergence.

    Conventions, so that the numbers compare with fastkd's: both return the mean over tokens
    (without labels every row counts) and divide the logits by the temperature without a T^2
    factor (the benchmark uses temperature 1). Liger's beta is the weight of the teacher side,
    as in fastkd's jsd: beta 0 is forward KL(teacher || student), 1 reverse KL. Both take an online
    teacher only (hidden states and a weight). ``LigerFusedLinearJSD`` computes fp32 logits from
    the GEMM and the gradients during the forward, like fastkd. The chunked
    ``LigerFusedLinearJSDLoss`` needs labels to count tokens (all-valid ones give the plain
    mean), runs 1024-row chunks under torch.compile, and keeps the logits and log-softmax in the
    inputs' dtype (bf16 on GPU), so it does less fp32 work than the others.
    """
    if divergence not in ("fkl", "rkl", "jsd"):
        return {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return {}
    liger_beta = {"fkl": 0.0, "rkl": 1.0}.get(divergence, beta)
    fused = LigerFusedLinearJSD(jsd_beta=liger_beta)
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta)

    def chunked_loss(x, w, tx, tw):
        all_valid = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return chunked(x, w, tx, tw, all_valid)

    return {
        "liger FusedLinearJSD": lambda x, w, tx, tw: fused(x, w, tx, tw, None),
        "liger chunked JSDLoss": chunked_loss,
    }


def _impls(
    case: FusedLinearCase,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: tuple[torch.Tensor, ...],
) -> list[Impl]:
    """The implementations of one case; ``teacher`` is (hidden, weight) online, (logits,)
    offline, passed after the student's hidden and weight to every loss function."""
    device = torch.device(case.device)
    online = case.teacher == "online"
    kw = dict(divergence=case.divergence, beta=case.beta)

    def train_step(fn):
        def make():
            def step():
                loss = fn(hidden, weight, *teacher)
                loss.backward()
                return loss

            return step

        return make

    def fastkd_loss(backend):
        if online:
            return lambda x, w, tx, tw: fused_linear_kd_loss(x, w, tx, tw, backend=backend, **kw)
        return lambda x, w, tz: fused_linear_kd_loss(x, w, teacher_logits=tz, backend=backend, **kw)

    impls = [
        Impl(f"fastkd[{backend}]", train_step(fastkd_loss(backend)))
        for backend in kernel_backends("fused_linear_kd_loss", device)
    ]

    def eager_online(x, w, tx, tw):
        with torch.no_grad():
            teacher_logits = F.linear(tx, tw)
        return plain_kd_loss(F.linear(x, w), teacher_logits, case.divergence, case.beta)

    def eager_offline(x, w, tz):
        return plain_kd_loss(F.linear(x, w), tz, case.divergence, case.beta)

    eager = eager_online if online else eager_offline
    impls.append(Impl("torch eager", train_step(eager), peer=True))
    torch._dynamo.reset()  # a fresh compile cache per case: cases share the function's code
    impls.append(Impl("torch.compile", train_step(torch.compile(eager)), peer=True))
    if device.type == "cuda" and online:
        impls += [
            Impl(name, train_step(fn), peer=True)
            for name, fn in _liger_fused_linear(case.divergence, case.beta).items()
        ]
    return impls


def _bf16_gemm_ms(case: FusedLinearCase, warmup: int, reps: int) -> float | None:
    """Median time of one bf16 ``[N, H] x [H, V]`` GEMM on this device (the weight laid out
    ``[V, H]`` as an lm_head's is); None if it fails."""
    device = torch.device(case.device)
    x = torch.randn(case.rows, case.hidden, dtype=torch.bfloat16, device=device)
    w = torch.randn(case.vocab, case.hidden, dtype=torch.bfloat16, device=device)
    [result] = measure(
        [Impl("bf16 mm", lambda: lambda: torch.mm(x, w.t()))],
        device,
        warmup=max(warmup, 1),
        reps=reps,
    )
    return result.time_ms


def run_fused_linear_case(
    case: FusedLinearCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures forward+backward (gradients of the student's hidden and weight) of one case;
    returns the results and a markdown table.

    On CUDA the table also gives "GEMM bound %": the time the case's GEMMs would take at the
    speed of a plain bf16 ``torch.mm`` of the same size timed in this run, over the measured
    time, i.e. how close an implementation gets to doing nothing but its matmuls.
    """
    device = torch.device(case.device)
    gemm_ms = _bf16_gemm_ms(case, warmup, reps) if device.type == "cuda" else None

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(shape, generator=g, device=device) * std).to(case.torch_dtype)

    # Weights of std 2/sqrt(H) give logits of std 2, a realistic spread of an lm_head's outputs.
    weight_std = 2 / math.sqrt(case.hidden)
    hidden = randn(case.rows, case.hidden).requires_grad_()
    weight = randn(case.vocab, case.hidden, std=weight_std).requires_grad_()
    if case.teacher == "online":
        teacher = (randn(case.rows, case.hidden), randn(case.vocab, case.hidden, std=weight_std))
    else:
        teacher = (randn(case.rows, case.vocab, std=2.0),)
    impls = _impls(case, hidden, weight, teacher)

    def drop_grads():
        hidden.grad = None
        weight.grad = None

    results = measure(impls, device, warmup=warmup, reps=reps, before_each=drop_grads)
    extra_cols: tuple[str, ...] = ()
    note = ""
    if gemm_ms:
        extra_cols = ("GEMM bound %",)
        for r in results:
            if r.time_ms:
                r.extra["GEMM bound %"] = f"{100 * case.gemms * gemm_ms / r.time_ms:.0f}"
        note = (
            f"\n\nGEMM bound: {case.gemms} GEMMs at {gemm_ms:.3f} ms, the time of one bf16 "
            f"[{case.rows}, {case.hidden}] x [{case.hidden}, {case.vocab}] torch.mm here."
        )
    return results, format_table(case.title(), results, extra_cols) + note
