"""One online distillation step of the trainer against TRL's: the same Llama-style student and
teacher built from configs, the same tokens, generalized JSD (beta 0.5).

- ``fastkd trainer step``: ``train.engine.StudentStep`` as ``fastkd distill`` runs it: the
  teacher's final hidden states under no_grad, the student's, and ``fused_linear_kd_loss`` of
  both heads (no tokens x vocab logits).
- ``TRL GKD loss``: TRL's ``GKDTrainer.generalized_jsd_loss`` (its own code) on both models'
  full ``.logits``, as ``GKDTrainer.compute_loss`` computes them (peer; needs ``trl``).
- ``HF logits + fastkd.kd_loss``: the fused loss on the materialized logits (peer), which
  separates the cost of the logits from that of the loss.

Every implementation does forward and backward of the student and the teacher's forward. The
table notes the first step's loss of each, which must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .harness import Impl, Result, format_table, measure, recording_step

__all__ = ["DistillStepCase", "run_distill_step_case"]


@dataclass(frozen=True)
class DistillStepCase:
    rows: int = 2048  # tokens per step: rows // seq_len sequences
    seq_len: int = 512
    vocab: int = 32000
    student_hidden: int = 256
    teacher_hidden: int = 512
    layers: int = 2
    beta: float = 0.5
    device: str = "cpu"

    def title(self) -> str:
        return (
            f"distill step jsd(beta={self.beta}) tokens={self.rows} V={self.vocab} "
            f"student H={self.student_hidden} teacher H={self.teacher_hidden} "
            f"layers={self.layers} on {self.device}"
        )


def _model(hidden: int, case: DistillStepCase, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..train.models import adapt

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=case.vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=case.layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=case.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return adapt(LlamaForCausalLM(config).to(case.device))


def _trl_loss():
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return None
    return GKDTrainer.generalized_jsd_loss


def run_distill_step_case(
    case: DistillStepCase, *, warmup: int = 1, reps: int = 3, seed: int = 0
) -> tuple[list[Result], str]:
    """Measures one training step (student forward+backward, teacher forward) of each
    implementation; returns the results and a markdown table."""
    from ..ops.kd_loss import kd_loss
    from ..train.config import ObjectiveConfig
    from ..train.engine import StudentStep
    from ..train.objectives import OnlineKD

    device = torch.device(case.device)
    student = _model(case.student_hidden, case, seed)
    teacher = _model(case.teacher_hidden, case, seed + 1).eval().requires_grad_(False)
    batch_size = max(case.rows // case.seq_len, 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (batch_size, case.seq_len + 1), generator=g)
    batch = {
        "input_ids": ids[:, :-1].to(device),
        "labels": ids[:, 1:].to(device),
        "attention_mask": torch.ones(batch_size, case.seq_len, dtype=torch.long, device=device),
    }
    num_items = batch["labels"].numel()
    objective = OnlineKD(
        ObjectiveConfig(kind="kd", divergence="jsd", beta=case.beta), teacher, None
    )
    module = StudentStep(student, objective)
    first = {}

    def step_of(name, loss_fn):
        return recording_step(first, name, loss_fn)

    def fastkd_step():
        return module(batch, objective.prepare(batch, []), {"tokens": num_items})

    def logits():
        with torch.no_grad():
            zt = teacher.model_logits(batch["input_ids"], batch["attention_mask"])
        return student.model_logits(batch["input_ids"], batch["attention_mask"]), zt

    def kd_on_logits():
        zs, zt = logits()
        return kd_loss(zs, zt, labels=batch["labels"], divergence="jsd", beta=case.beta)

    impls = [Impl("fastkd trainer step", step_of("fastkd trainer step", fastkd_step))]
    trl_loss = _trl_loss()
    if trl_loss is not None:

        def trl_step():
            zs, zt = logits()
            return trl_loss(
                zs, zt, labels=batch["labels"], beta=case.beta, num_items_in_batch=num_items
            )

        impls.append(Impl("TRL GKD loss", step_of("TRL GKD loss", trl_step), peer=True))
    impls.append(
        Impl(
            "HF logits + fastkd.kd_loss",
            step_of("HF logits + fastkd.kd_loss", kd_on_logits),
            peer=True,
        )
    )

    def drop_grads():
        student.zero_grad(set_to_none=True)

    results = measure(impls, device, warmup=warmup, reps=reps, before_each=drop_grads)
    losses = ", ".join(f"{name} {value:.8g}" for name, value in first.items())
    missing = "" if trl_loss is not None else "\n\nTRL is not installed here: no TRL row."
    note = f"\n\nFirst-step loss (nats per token): {losses}.{missing}"
    return results, format_table(case.title(), results, time_label="step ms") + note
