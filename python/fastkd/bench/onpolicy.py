"""The loss step of on-policy distillation, and the teacher's top-k, against their peers.

``loss`` (forward and backward of the student's head; the teacher's head forward only), on the
same student and teacher hidden states ``[N, H]``, heads ``[V, H]`` and sampled tokens ``[N]``:

- ``fastkd logprobs + k3``: ``fused_linear_logprobs`` of the sampled tokens under both heads
  (the teacher's under no_grad) and ``sampled_reverse_kl(estimator="k3")``: the per-token
  reverse-KL signal of on-policy distillation, no ``[N, V]`` tensor.
- ``fastkd top-k FKL + tail``: the teacher's ``fused_linear_topk`` (k ids and the exact tail
  bucket) and ``fused_linear_sparse_kd_loss`` of the student against them.
- ``TRL generalized_jsd_loss``: TRL's ``GKDTrainer.generalized_jsd_loss`` (its own code) on
  both heads' full logits, at ``beta`` (1: reverse KL, GKD's on-policy setting) (peer; needs
  ``trl``).
- ``torch log_softmax + gather + k3``: both heads' full logits, log_softmax, the sampled tokens
  gathered, k3 (peer).

``topk`` (forward only): ``fused_linear_topk`` against ``F.linear`` + ``torch.topk`` +
``torch.logsumexp`` (the tail as log1p of minus the kept mass) on the teacher's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Impl, Result, format_table, measure, recording_step

__all__ = ["OnpolicyCase", "run_onpolicy_case"]


@dataclass(frozen=True)
class OnpolicyCase:
    kind: str = "loss"  # "loss" or "topk"
    rows: int = 4096
    hidden: int = 256
    vocab: int = 32000
    k: int = 16
    beta: float = 1.0  # TRL's generalized JSD: 1 is the reverse KL
    dtype: str = "float32"
    device: str = "cpu"

    def title(self) -> str:
        what = (
            f"on-policy loss step (TRL beta={self.beta})"
            if self.kind == "loss"
            else "teacher top-k + exact tail"
        )
        return (
            f"{what} N={self.rows} H={self.hidden} V={self.vocab} k={self.k} "
            f"{self.dtype} on {self.device}"
        )


def _trl_loss():
    from .distill_step import _trl_loss as trl_loss

    return trl_loss()


def _inputs(case: OnpolicyCase, seed: int):
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(case.hidden)  # logits of about unit spread

    def make(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    hidden = make(case.rows, case.hidden).requires_grad_()
    weight = make(case.vocab, case.hidden, s=scale).requires_grad_()
    t_hidden = make(case.rows, case.hidden)
    t_weight = make(case.vocab, case.hidden, s=scale)
    tokens = torch.randint(0, case.vocab, (case.rows,), generator=g).to(device)
    return hidden, weight, t_hidden, t_weight, tokens


def _loss_impls(case: OnpolicyCase, inputs, first: dict) -> list[Impl]:
    from ..ops.fused_linear_sparse_kd_loss import fused_linear_sparse_kd_loss
    from ..ops.fused_linear_logprobs import fused_linear_logprobs
    from ..ops.fused_linear_topk import fused_linear_topk
    from ..ops.onpolicy_losses import sampled_reverse_kl

    hidden, weight, t_hidden, t_weight, tokens = inputs

    def step_of(name, loss_fn):
        return recording_step(first, name, loss_fn)

    def fused_k3():
        student = fused_linear_logprobs(hidden, weight, tokens).logprob
        with torch.no_grad():
            teacher = fused_linear_logprobs(t_hidden, t_weight, tokens).logprob
        return sampled_reverse_kl(student, teacher, estimator="k3")

    def fused_topk():
        targets = fused_linear_topk(t_hidden, t_weight, k=case.k)
        return fused_linear_sparse_kd_loss(hidden, weight, targets)

    def full_logits():
        with torch.no_grad():
            zt = F.linear(t_hidden, t_weight).float()
        return F.linear(hidden, weight).float(), zt

    def torch_k3():
        zs, zt = full_logits()
        lq = F.log_softmax(zs, -1).gather(1, tokens[:, None])[:, 0]
        lp = F.log_softmax(zt, -1).gather(1, tokens[:, None])[:, 0]
        r = lp - lq
        return (torch.expm1(r) - r).mean()

    impls = [
        Impl("fastkd logprobs + k3", step_of("fastkd logprobs + k3", fused_k3)),
        Impl(
            f"fastkd top-{case.k} FKL + tail",
            step_of(f"fastkd top-{case.k} FKL + tail", fused_topk),
        ),
    ]
    trl_loss = _trl_loss()
    if trl_loss is not None:

        def trl_step():
            zs, zt = full_logits()
            return trl_loss(zs[None], zt[None], beta=case.beta)

        impls.append(
            Impl(
                "TRL generalized_jsd_loss", step_of("TRL generalized_jsd_loss", trl_step), peer=True
            )
        )
    impls.append(
        Impl(
            "torch log_softmax + gather + k3",
            step_of("torch log_softmax + gather + k3", torch_k3),
            peer=True,
        )
    )
    return impls


def _topk_impls(case: OnpolicyCase, inputs, first: dict) -> list[Impl]:
    from ..ops.fused_linear_topk import fused_linear_topk

    _, _, t_hidden, t_weight, _ = inputs

    def fused(name: str, backend: str):
        def make():
            def step():
                targets = fused_linear_topk(t_hidden, t_weight, k=case.k, backend=backend)
                first.setdefault(name, float(targets.tail_mass.sum()))
                return targets.tail_mass

            return step

        return Impl(name, make)

    def plain():
        def step():
            with torch.no_grad():
                z = F.linear(t_hidden, t_weight).float()
                lse = torch.logsumexp(z, -1, keepdim=True)
                values, _ = torch.topk(z, case.k, dim=-1)
                tail = -torch.expm1(torch.logsumexp(values - lse, -1))
            first.setdefault("F.linear + topk + logsumexp", float(tail.sum()))
            return tail

        return step

    impls = [fused("fastkd fused_linear_topk", "auto")]
    if t_hidden.device.type == "cuda":  # the CUDA row kernel against the same chunks' torch.topk
        impls.append(fused("fastkd fused_linear_topk [torch rows]", "torch"))
    return [*impls, Impl("F.linear + topk + logsumexp", plain, peer=True)]


def run_onpolicy_case(
    case: OnpolicyCase, *, warmup: int = 1, reps: int = 3, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures each implementation of ``case``; returns the results and a markdown table."""
    inputs = _inputs(case, seed)
    first: dict[str, float] = {}
    hidden, weight = inputs[:2]
    if case.kind == "loss":
        impls = _loss_impls(case, inputs, first)
    else:
        impls = _topk_impls(case, inputs, first)

    def drop_grads():
        hidden.grad = weight.grad = None

    results = measure(
        impls, torch.device(case.device), warmup=warmup, reps=reps, before_each=drop_grads
    )
    values = ", ".join(f"{name} {value:.8g}" for name, value in first.items())
    what = (
        "First-step loss (nats per token; the objectives differ)"
        if case.kind == "loss"
        else "Sum of the tail masses"
    )
    missing = (
        "\n\nTRL is not installed here: no TRL row."
        if case.kind == "loss" and _trl_loss() is None
        else ""
    )
    label = "step ms" if case.kind == "loss" else "top-k ms"
    return results, format_table(case.title(), results, time_label=label) + (
        f"\n\n{what}: {values}.{missing}"
    )
