"""A small end-to-end distillation run on text that ships with Python.

Teacher: a smoothed character trigram model of a few standard-library sources (exact
log-probabilities, no download). Student: a tiny neural character model that sees the same two
previous characters. The student is distilled with each divergence through
``fastkd.fused_linear_kd_loss`` (its output layer fused with the loss, plus a little hard
cross-entropy), and the run reports the held-out KL(teacher || student) computed with
``fastkd.kd_loss``, next-character agreement with the teacher, and time per training step.
"""

from __future__ import annotations

import importlib.util
import time

import torch

from .ops import fused_linear_kd_loss, kd_loss

__all__ = ["run_demo"]

_SOURCES = ("argparse", "textwrap", "string", "json.decoder", "random")


def _corpus() -> str:
    text = []
    for name in _SOURCES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                text.append(f.read())
    return "\n".join(text)


def _trigram_teacher(ids: torch.Tensor, vocab: int, smoothing: float = 0.05) -> torch.Tensor:
    """log p(c | a, b) as a [V, V, V] table, add-`smoothing` counts."""
    counts = torch.full((vocab, vocab, vocab), smoothing, dtype=torch.float64)
    counts.index_put_((ids[:-2], ids[1:-1], ids[2:]), torch.ones(len(ids) - 2, dtype=torch.float64),
                      accumulate=True)
    return (counts / counts.sum(-1, keepdim=True)).log().float()


class _Student(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 24, hidden: int = 128):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Sequential(torch.nn.Linear(2 * dim, hidden), torch.nn.Tanh())
        self.lm_head = torch.nn.Linear(hidden, vocab)

    def hidden(self, context: torch.Tensor) -> torch.Tensor:  # [B, 2] -> [B, hidden]
        return self.body(self.embed(context).flatten(1))

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # [B, 2] -> [B, V]
        return self.lm_head(self.hidden(context))


def run_demo(steps: int = 100, seed: int = 0, batch: int = 512) -> int:
    text = _corpus()
    chars = sorted(set(text))
    vocab = len(chars)
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    teacher = _trigram_teacher(ids[:split], vocab)
    held = torch.arange(split, len(ids) - 2)
    held_ctx = torch.stack([ids[held], ids[held + 1]], 1)
    held_teacher = teacher[held_ctx[:, 0], held_ctx[:, 1]]
    print(f"corpus: {len(text)} characters from {', '.join(_SOURCES)}; vocab {vocab}; "
          f"teacher: smoothed trigram; {steps} steps of {batch} positions per divergence\n")
    print(f"{'divergence':<10} {'held-out KL(p||q)':>18} {'top-1 agree':>12} {'ms/step':>10}")
    for divergence in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl"):
        torch.manual_seed(seed)
        student = _Student(vocab)
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        spent = 0.0
        for _ in range(steps):
            pos = torch.randint(0, split - 2, (batch,), generator=g)
            ctx = torch.stack([ids[pos], ids[pos + 1]], 1)
            t0 = time.perf_counter()
            loss = fused_linear_kd_loss(
                student.hidden(ctx), student.lm_head.weight, student_bias=student.lm_head.bias,
                teacher_logits=teacher[ctx[:, 0], ctx[:, 1]], divergence=divergence,
                labels=ids[pos + 2], hard_weight=0.1, temperature=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            spent += time.perf_counter() - t0
        with torch.no_grad():
            student_logits = student(held_ctx)
            kl = kd_loss(student_logits, held_teacher, divergence="fkl").item()
            agree = (student_logits.argmax(-1) == held_teacher.argmax(-1)).float().mean().item()
        print(f"{divergence:<10} {kl:>18.4f} {agree:>12.3f} {1e3 * spent / steps:>10.2f}")
    print("\n(KL in nats per character. ms/step covers the student's forward, the loss, backward "
          "and Adam; `fastkd bench` times the loss alone at LLM vocabularies.)")
    return 0

