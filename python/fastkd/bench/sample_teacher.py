"""sample_teacher benchmark: fastkd's sampler against softmax + torch.multinomial.

Both produce N draws with replacement per token from softmax(z / T) and group them by id: the
peer sorts its N draws per row (distinct ids with counts follow from the sorted runs), fastkd
emits (id, count) directly. Only a forward exists, so the timed step is the sampling alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import available_backends, sample_teacher
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

    def title(self) -> str:
        return (f"sample_teacher N={self.num_samples} T={self.temperature} rows={self.rows} "
                f"V={self.vocab} {self.dtype} on {self.device}")


def plain_sample(logits: torch.Tensor, num_samples: int, temperature: float) -> torch.Tensor:
    """Sampling as written in plain PyTorch: [rows, N] draws, sorted so that each id's count
    is a run."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples, replacement=True).sort(dim=-1).values


def run_sample_teacher_case(case: SampleCase, *, warmup: int = 2, reps: int = 5,
                            seed: int = 0) -> tuple[list[Result], str]:
    """Times one case; the table adds the rate at which each reads the logits (GB/s)."""
    device = torch.device(case.device)
    g = torch.Generator(device=device).manual_seed(seed)
    # LM-like logits, made on the device: a Zipf-like prior over a random ranking plus noise.
    prior = -1.1 * torch.log(torch.arange(1, case.vocab + 1, dtype=torch.float32, device=device))
    ranks = torch.argsort(torch.rand(case.rows, case.vocab, generator=g, device=device), dim=-1)
    logits = prior[ranks] + 4 * torch.randn(case.rows, case.vocab, generator=g, device=device)
    logits = logits.to(getattr(torch, case.dtype))
    del ranks
    kw = dict(num_samples=case.num_samples, temperature=case.temperature)

    # The reference sampler is the oracle, not a contender, where a kernel exists; where none
    # does (CUDA), it is what fastkd runs, so it is measured.
    backends = available_backends("sample_teacher", device)
    kernels = [b for b in backends if b != "torch"] or backends
    impls = [Impl(f"fastkd[{backend}]",
                  (lambda b: lambda: lambda: sample_teacher(logits, backend=b, **kw))(backend))
             for backend in kernels]
    impls.append(Impl("torch softmax+multinomial",
                      lambda: lambda: plain_sample(logits, **kw), peer=True))
    results = measure(impls, device, warmup=warmup, reps=reps)
    nbytes = logits.numel() * logits.element_size()
    for r in results:
        if r.time_ms:
            r.extra["read GB/s"] = f"{nbytes / (r.time_ms * 1e-3) / 1e9:.1f}"
    return results, format_table(case.title(), results, ("read GB/s",), time_label="ms")
