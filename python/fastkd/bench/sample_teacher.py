"""sample_teacher benchmark: fastkd's samplers against the same sampling in plain PyTorch.

``method="random"``: N draws with replacement per token from softmax(z / T), grouped by id; the
peer is softmax + torch.multinomial with its N draws sorted per row (distinct ids with counts
follow from the sorted runs), fastkd emits (id, count) directly.
``method="priority"``: k distinct ids per token; the peer is softmax, torch.rand and a top-(k+1)
of p / u (torch's own generator, float32), fastkd's kernel ranks float64 keys of counter-based
uniforms. Only a forward exists, so the timed step is the sampling alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import available_backends, sample_teacher
from ..ops._registry import kernel_backends
from .harness import Impl, Result, format_table, measure

__all__ = ["SampleCase", "run_sample_teacher_case"]


@dataclass(frozen=True)
class SampleCase:
    rows: int = 2048
    vocab: int = 32000
    dtype: str = "float32"
    num_samples: int = 50
    temperature: float = 1.0
    device: str = "cpu"
    method: str = "random"
    k: int = 64

    def title(self) -> str:
        what = (
            f"priority k={self.k}"
            if self.method == "priority"
            else f"N={self.num_samples} T={self.temperature}"
        )
        return (
            f"sample_teacher {what} rows={self.rows} V={self.vocab} {self.dtype} on {self.device}"
        )


def plain_sample(logits: torch.Tensor, num_samples: int, temperature: float) -> torch.Tensor:
    """Sampling as written in plain PyTorch: [rows, N] draws, sorted so that each id's count
    is a run."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples, replacement=True).sort(dim=-1).values


def plain_priority_sample(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Priority sampling as written in plain PyTorch: ``(ids [rows, k], weights [rows, k])``, the
    k largest p / u and weights max(p, tau)."""
    p = torch.softmax(logits.float(), dim=-1)
    q, ids = torch.topk(p / torch.rand_like(p), min(k + 1, p.shape[-1]), dim=-1)
    tau = q[:, k : k + 1] if q.shape[-1] > k else torch.zeros_like(q[:, :1])
    return ids[:, :k], torch.maximum(p.gather(1, ids[:, :k]), tau)


def run_sample_teacher_case(
    case: SampleCase, *, warmup: int = 2, reps: int = 5, seed: int = 0
) -> tuple[list[Result], str]:
    """Times one case; the table adds the rate at which each reads the logits (GB/s)."""
    device = torch.device(case.device)
    g = torch.Generator(device=device).manual_seed(seed)
    # LM-like logits, made on the device: a Zipf-like prior over a random ranking plus noise.
    prior = -1.1 * torch.log(torch.arange(1, case.vocab + 1, dtype=torch.float32, device=device))
    ranks = torch.argsort(torch.rand(case.rows, case.vocab, generator=g, device=device), dim=-1)
    logits = prior[ranks] + 4 * torch.randn(case.rows, case.vocab, generator=g, device=device)
    logits = logits.to(getattr(torch, case.dtype))
    del ranks
    if case.method == "priority":
        op, kw = "priority_sample", dict(method="priority", k=case.k)
        peer = Impl(
            "torch softmax+rand+topk",
            lambda: lambda: plain_priority_sample(logits, case.k),
            peer=True,
        )
    else:
        op, kw = "sample_teacher", dict(num_samples=case.num_samples, temperature=case.temperature)
        peer = Impl(
            "torch softmax+multinomial", lambda: lambda: plain_sample(logits, **kw), peer=True
        )

    # The reference sampler is the oracle, not a contender, where a kernel exists; where none
    # does, it is what fastkd runs, so it is measured.
    kernels = kernel_backends(op, device) or available_backends(op, device)
    impls = [
        Impl(
            f"fastkd[{backend}]",
            (lambda b: lambda: lambda: sample_teacher(logits, backend=b, **kw))(backend),
        )
        for backend in kernels
    ]
    impls.append(peer)
    results = measure(impls, device, warmup=warmup, reps=reps)
    nbytes = logits.numel() * logits.element_size()
    for r in results:
        if r.time_ms:
            r.extra["read GB/s"] = f"{nbytes / (r.time_ms * 1e-3) / 1e9:.1f}"
    return results, format_table(case.title(), results, ("read GB/s",), time_label="ms")
