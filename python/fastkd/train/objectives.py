"""Training objectives: what a micro-batch's loss is, from the student's final hidden states and
head, without a tokens x vocab tensor.

Every objective returns the micro-batch's summed loss divided by the whole optimizer step's
count (all micro-batches, all ranks) of what it averages over, so that the gradients summed over
the step equal those of one big batch's mean. ``counts`` (``step_counts``) holds the step's
``tokens`` (labels other than -100), ``chunks`` (counted chunks of a cross-tokenizer batch) and
``sequences`` (a cross-tokenizer batch's sequences with a counted chunk; else all), each at
least 1. A new objective subclasses ``Objective``, builds itself from the run in ``create`` and
is listed in ``OBJECTIVES`` under its ``kind`` (and in ``ObjectiveConfig.kind``); the trainer
gives it the batch, the student and whatever ``teacher_inputs`` its ``prepare`` returned outside
the student's forward.
"""

from __future__ import annotations

import torch

from ..ops.fused_linear_kd_loss import fused_linear_kd_loss
from ..ops.fused_linear_sparse_kd_loss import fused_linear_sparse_kd_loss
from ..ops.fused_linear_logprobs import fused_linear_logprobs
from ..ops.fused_linear_topk import fused_linear_topk
from ..ops.onpolicy_losses import sampled_reverse_kl
from ..sparse.targets import SparseTargets
from .config import ObjectiveConfig
from .data import IGNORE_INDEX
from .models import CausalLM, Head
from .setup import autocast_context

__all__ = [
    "COUNTS",
    "CrossEntropy",
    "OBJECTIVES",
    "Objective",
    "OnlineKD",
    "SampledReverseKL",
    "SparseKD",
    "TeacherTopK",
    "batch_counts",
    "cross_entropy",
    "make_objective",
]


COUNTS = ("tokens", "chunks", "sequences")


def batch_counts(batch: dict) -> torch.Tensor:
    """float64 ``[3]``: the micro-batch's ``COUNTS`` (see the module docstring)."""
    tokens = (batch["labels"] != IGNORE_INDEX).sum()
    chunks = batch.get("chunk_count")
    if chunks is None:
        sequences = torch.tensor(batch["labels"].shape[0], device=tokens.device)
        chunks = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
    else:
        sequences, chunks = (chunks > 0).sum(), chunks.sum()
    return torch.stack([tokens, chunks, sequences]).double()


def label_targets(labels: torch.Tensor, vocab_size: int) -> SparseTargets:
    """The one-hot targets of ``labels`` ``[B, T]`` (-100: none): KL(one-hot || q) is exactly the
    cross-entropy -log q(label), so the fused sparse loss computes CE without logits."""
    ids = torch.where(labels == IGNORE_INDEX, -1, labels).to(torch.int32)[..., None]
    return SparseTargets(
        ids=ids,
        weights=(ids >= 0).float(),
        vocab_size=vocab_size,
        num_samples=1,
        method="topk",
        tail="renorm",
    )


def cross_entropy(
    hidden: torch.Tensor, head: Head, labels: torch.Tensor, num_items: int, backend: str
) -> torch.Tensor:
    """The student's cross-entropy on ``labels`` summed and divided by ``num_items``, from its
    hidden states and head (the fused sparse loss against one-hot targets, no logits)."""
    return fused_linear_sparse_kd_loss(
        hidden,
        head.weight,
        label_targets(labels, head.weight.shape[0]),
        student_bias=head.bias,
        logit_scale=head.logit_scale,
        labels=labels,
        num_items_in_batch=num_items,
        backend=backend,
    )


def _student_softcap(head: Head, what: str, whose: str = "student") -> None:
    if head.softcap is not None:
        raise ValueError(
            f"{what} has no final-logit softcap option yet; the {whose}'s head "
            f"caps logits at {head.softcap} (Gemma-2/3): use objective.kind = "
            f"'kd', which applies it"
        )


class Objective:
    """One kind of training loss. ``prepare`` runs outside the student's forward (teacher
    forward under no_grad, cache lookups) and returns its ``teacher_inputs``; ``loss`` runs
    inside it, where a sharded head is gathered."""

    kind = ""

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    @classmethod
    def create(
        cls,
        config: ObjectiveConfig,
        *,
        teacher: CausalLM | None,
        cache,
        autocast: torch.dtype | None,
        **run,
    ) -> "Objective":
        """The objective of a run: its config and what the run loaded (the teacher, the
        teacher cache, the autocast dtype; in ``run``, the ``student`` and both
        ``tokenizers``), each taken where the objective needs it."""
        return cls(config)

    def prepare(self, batch: dict, indices: list[int]) -> dict:
        return {}

    def loss(
        self,
        hidden: torch.Tensor,
        head: Head,
        batch: dict,
        teacher_inputs: dict,
        counts: dict[str, int],
    ) -> torch.Tensor:
        raise NotImplementedError

    def trainable(self) -> dict[str, torch.nn.Module]:
        """Modules of the objective trained with the student (a learned projection), by
        name; the trainer optimizes, synchronizes and checkpoints them with it."""
        return {}


class CrossEntropy(Objective):
    """The data's next tokens only: the baseline every comparison shows."""

    kind = "ce"

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        _student_softcap(head, "the fused cross-entropy")
        return cross_entropy(hidden, head, batch["labels"], counts["tokens"], self.config.backend)


class OnlineKD(Objective):
    """An online teacher: its final hidden states under no_grad, then ``fused_linear_kd_loss``
    of both heads with every kd_loss option."""

    kind = "kd"

    def __init__(self, config: ObjectiveConfig, teacher: CausalLM, autocast: torch.dtype | None):
        super().__init__(config)
        self.teacher = teacher
        self.autocast = autocast

    @classmethod
    def create(cls, config, *, teacher, cache, autocast, **run):
        return cls(config, teacher, autocast)

    def prepare(self, batch, indices):
        with torch.no_grad():
            with autocast_context(batch["input_ids"].device, self.autocast):
                hidden = self.teacher(batch["input_ids"], batch["attention_mask"])
        return {"hidden": hidden}

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        c = self.config
        t_head = self.teacher.head()
        softcap = c.softcap
        if softcap is None:
            if head.softcap != t_head.softcap:
                raise ValueError(
                    f"the student's and the teacher's heads cap logits differently "
                    f"({head.softcap} and {t_head.softcap}); set objective.softcap "
                    f"to apply one cap to both"
                )
            softcap = head.softcap
        return fused_linear_kd_loss(
            hidden,
            head.weight,
            teacher_inputs["hidden"],
            t_head.weight,
            student_bias=head.bias,
            teacher_bias=t_head.bias,
            logit_scale=head.logit_scale,
            teacher_logit_scale=t_head.logit_scale,
            softcap=softcap,
            divergence=c.divergence,
            temperature=c.temperature,
            beta=c.beta,
            alpha=c.alpha,
            t2_scale=c.t2_scale,
            hard_weight=c.hard_weight,
            labels=batch["labels"],
            num_items_in_batch=counts["tokens"],
            backend=c.backend,
        )


class SparseKD(Objective):
    """Offline: the sparse teacher targets of a ``TeacherCache`` (written by ``fastkd cache``
    over the same sequences), through ``fused_linear_sparse_kd_loss``."""

    kind = "sparse"

    def __init__(self, config: ObjectiveConfig, cache):
        super().__init__(config)
        self.cache = cache

    @classmethod
    def create(cls, config, *, teacher, cache, autocast, **run):
        return cls(config, cache)

    def prepare(self, batch, indices):
        targets, lengths = self.cache.batch(indices)
        seq_len = batch["labels"].shape[1]
        if targets.ids.shape[1] != seq_len or bool((lengths != seq_len).any()):
            raise ValueError(
                f"the cache holds sequences of lengths {lengths.tolist()} where the "
                f"data has {seq_len} tokens each: it was written for other data"
            )
        return {"targets": targets.to(batch["labels"].device)}

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        _student_softcap(head, "the fused sparse loss")
        c = self.config
        return fused_linear_sparse_kd_loss(
            hidden,
            head.weight,
            teacher_inputs["targets"],
            student_bias=head.bias,
            logit_scale=head.logit_scale,
            hard_weight=c.hard_weight,
            labels=batch["labels"],
            num_items_in_batch=counts["tokens"],
            backend=c.backend,
        )


def _uncapped_heads(head: Head, teacher: CausalLM, kind: str) -> Head:
    """The teacher's head, after checking that neither head caps its logits (the sparse fused
    ops have no softcap option) and that both share one vocabulary."""
    t_head = teacher.head()
    _student_softcap(head, f'objective.kind = "{kind}"')
    _student_softcap(t_head, f'objective.kind = "{kind}"', "teacher")
    if head.weight.shape[0] != t_head.weight.shape[0]:
        raise ValueError(
            f'objective.kind = "{kind}" compares the models on one vocabulary; '
            f"the student's head has {head.weight.shape[0]} rows and the "
            f"teacher's {t_head.weight.shape[0]}"
        )
    return t_head


class SampledReverseKL(OnlineKD):
    """On-policy with sparse signals: on the student's own samples (the completions of every
    micro-batch, ``onpolicy.student_fraction = 1``), the log-probabilities both models give the
    sampled tokens, from ``fused_linear_logprobs`` (the teacher's under no_grad), and a sampled
    estimator of KL(student || teacher) over the completion tokens (``sampled_reverse_kl``). No
    full distribution of either model is compared, only one log-probability per token."""

    kind = "sampled_rkl"

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        c = self.config
        t_head = _uncapped_heads(head, self.teacher, self.kind)
        labels = batch["labels"]
        student = fused_linear_logprobs(
            hidden,
            head.weight,
            labels,
            bias=head.bias,
            logit_scale=head.logit_scale,
            backend=c.backend,
        )
        with torch.no_grad():
            teacher = fused_linear_logprobs(
                teacher_inputs["hidden"],
                t_head.weight,
                labels,
                bias=t_head.bias,
                logit_scale=t_head.logit_scale,
                backend=c.backend,
            )
        total = sampled_reverse_kl(
            student.logprob,
            teacher.logprob,
            estimator=c.estimator,
            mask=labels != IGNORE_INDEX,
            reduction="sum",
        )
        return total / counts["tokens"]


class TeacherTopK(OnlineKD):
    """The online teacher's ``topk`` most probable ids per token with the exact mass of the rest
    (``fused_linear_topk``, computed from the full log-sum-exp), then the fused sparse loss: a
    forward KL over the kept ids and the tail bucket, without either model's logits."""

    kind = "teacher_topk"

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        c = self.config
        t_head = _uncapped_heads(head, self.teacher, self.kind)
        with torch.no_grad():
            targets = fused_linear_topk(
                teacher_inputs["hidden"],
                t_head.weight,
                k=c.topk,
                bias=t_head.bias,
                logit_scale=t_head.logit_scale,
                backend=c.backend,
            )
        return fused_linear_sparse_kd_loss(
            hidden,
            head.weight,
            targets,
            student_bias=head.bias,
            logit_scale=head.logit_scale,
            hard_weight=c.hard_weight,
            labels=batch["labels"],
            num_items_in_batch=counts["tokens"],
            backend=c.backend,
        )


OBJECTIVES = {
    cls.kind: cls for cls in (CrossEntropy, OnlineKD, SparseKD, SampledReverseKL, TeacherTopK)
}


def make_objective(
    config: ObjectiveConfig,
    *,
    teacher: CausalLM | None = None,
    cache=None,
    autocast: torch.dtype | None = None,
    student: CausalLM | None = None,
    tokenizers: tuple | None = None,
) -> Objective:
    """The objective registered under ``config.kind``, built with what it needs
    (``tokenizers``: the student's and the teacher's, for cross-tokenizer kinds)."""
    return OBJECTIVES[config.kind].create(
        config,
        teacher=teacher,
        cache=cache,
        autocast=autocast,
        student=student,
        tokenizers=tokenizers,
    )


# The cross-tokenizer objectives subclass the ones above (registered here, after them).
from .xtok_objectives import CROSS_TOKENIZER_OBJECTIVES  # noqa: E402

OBJECTIVES.update((cls.kind, cls) for cls in CROSS_TOKENIZER_OBJECTIVES)
