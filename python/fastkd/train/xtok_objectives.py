"""Cross-tokenizer objectives: the teacher reads the same text under its own tokenizer and the
losses compare the models on chunks of the same bytes (``xtok_data`` aligns the data once).

Each batch carries the teacher's ``teacher_input_ids``/``teacher_labels``/
``teacher_attention_mask`` ``[B, T_t]`` and both sides' chunk ids of the tokens each position
predicts (``student_chunk_id`` ``[B, T]``, ``teacher_chunk_id`` ``[B, T_t]``). Every loss is
computed from the final hidden states and the heads, without a tokens x vocab tensor: the
per-token log-probabilities by ``fused_linear_logprobs``, the rows a chunk's distribution needs
by blocks of counted chunks. With ``hard_weight`` h the loss is (1 - h) x the chunk loss + h x
the student's cross-entropy on its own labels (averaged over tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fused_linear_logprobs import fused_linear_logprobs
from ..xtok.chunk_losses import alm_loss, chunk_logprobs, chunk_mask
from ..xtok.fused_gold import fused_linear_gold_loss
from ..xtok.ot import xtok_ot_loss
from ..xtok.vocab_map import vocab_map
from .objectives import OnlineKD, _student_softcap, cross_entropy
from .setup import autocast_context

__all__ = [
    "ApproximateLikelihoodMatching",
    "ChunkOT",
    "CrossTokenizer",
    "GoldULD",
    "GoldHybrid",
    "ChunkStartULD",
    "CROSS_TOKENIZER_OBJECTIVES",
]


class CrossTokenizer(OnlineKD):
    """An online teacher on its own tokenization of the batch's text; subclasses give the
    chunk loss's sum (``chunk_loss``) and the count it is averaged over (``per``)."""

    per = "chunks"

    def prepare(self, batch, indices):
        with torch.no_grad():
            with autocast_context(batch["input_ids"].device, self.autocast):
                hidden = self.teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        return {"hidden": hidden}

    def heads(self, head):
        """The teacher's head, after checking that neither head caps its logits (the chunk
        losses have no softcap option)."""
        t_head = self.teacher.head()
        _student_softcap(head, f'objective.kind = "{self.kind}"')
        _student_softcap(t_head, f'objective.kind = "{self.kind}"', "teacher")
        return t_head

    def chunk_loss(self, hidden, head, batch, teacher_inputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, hidden, head, batch, teacher_inputs, counts):
        h = self.config.hard_weight
        total = self.chunk_loss(hidden, head, batch, teacher_inputs) / counts[self.per]
        if h == 0:
            return total
        ce = cross_entropy(hidden, head, batch["labels"], counts["tokens"], self.config.backend)
        return (1.0 - h) * total + h * ce


class _Gold(CrossTokenizer):
    merge = True

    def vocab_map(self):
        return None

    def chunk_loss(self, hidden, head, batch, teacher_inputs):
        c = self.config
        t_head = self.heads(head)
        return fused_linear_gold_loss(
            hidden,
            head.weight,
            teacher_inputs["hidden"],
            t_head.weight,
            batch["labels"],
            batch["teacher_labels"],
            batch["student_chunk_id"],
            batch["teacher_chunk_id"],
            student_bias=head.bias,
            teacher_bias=t_head.bias,
            logit_scale=head.logit_scale,
            teacher_logit_scale=t_head.logit_scale,
            merge=self.merge,
            temperature=c.temperature,
            vocab_map=self.vocab_map(),
            beta=c.beta,
            reduction="sum",
            backend=c.backend,
        )


class ChunkStartULD(_Gold):
    """ULD (sorted-probability L1) between the two models' next-token distributions where a
    chunk starts: there both have read the same bytes, so the distributions predict the same
    text, each in its own vocabulary."""

    kind = "uld"
    merge = False


class GoldULD(_Gold):
    """GOLD: each side's distributions merged over a chunk by the chain rule (the first
    position's distribution times the probabilities of the chunk's other tokens), then ULD's
    sorted L1 between the merged rows."""

    kind = "gold"


class GoldHybrid(_Gold):
    """GOLD's hybrid: JSD (``beta``) of the merged rows over the tokens both vocabularies hold
    (the same bytes), sorted L1 over the rest, weighted by the matched share of the teacher's
    vocabulary."""

    kind = "gold_hybrid"

    def __init__(self, config, teacher, autocast, student_tokenizer, teacher_tokenizer):
        super().__init__(config, teacher, autocast)
        self._map = vocab_map(student_tokenizer, teacher_tokenizer)

    @classmethod
    def create(cls, config, *, teacher, cache, autocast, tokenizers=None, **run):
        if tokenizers is None:
            raise ValueError('objective.kind = "gold_hybrid" needs both tokenizers')
        return cls(config, teacher, autocast, *tokenizers)

    def vocab_map(self):
        return self._map


class ApproximateLikelihoodMatching(CrossTokenizer):
    """ALM: per chunk, each model's log-likelihood of the chunk's bytes (the sum of its own
    tokens' log-probabilities, ``fused_linear_logprobs``), compared by the binary cross-entropy
    of the two likelihoods at ``temperature`` (``alm_loss``)."""

    kind = "alm"

    def chunk_loss(self, hidden, head, batch, teacher_inputs):
        c = self.config
        t_head = self.heads(head)
        s_ids, t_ids = batch["student_chunk_id"], batch["teacher_chunk_id"]
        width = int(torch.stack([s_ids.max(), t_ids.max()]).max()) + 1
        student = fused_linear_logprobs(
            hidden,
            head.weight,
            batch["labels"],
            bias=head.bias,
            logit_scale=head.logit_scale,
            backend=c.backend,
        ).logprob
        with torch.no_grad():
            teacher = fused_linear_logprobs(
                teacher_inputs["hidden"],
                t_head.weight,
                batch["teacher_labels"],
                bias=t_head.bias,
                logit_scale=t_head.logit_scale,
                backend=c.backend,
            ).logprob
        s_chunks = chunk_logprobs(student, s_ids, num_chunks=width)
        t_chunks = chunk_logprobs(teacher, t_ids, num_chunks=width)
        return alm_loss(
            s_chunks,
            t_chunks,
            chunk_mask(s_ids, width=width),
            temperature=c.temperature,
            reduction="sum",
        )


class ChunkOT(CrossTokenizer):
    """Optimal transport between the student's and the teacher's positions of each sequence:
    cosine cost between the student's hidden states (through a learned projection to the
    teacher's width) and the teacher's, plus the chunk prior (``ot_prior_weight``), entropic
    regularization ``ot_eps``; the value is averaged over sequences."""

    kind = "ot"
    per = "sequences"

    def __init__(self, config, teacher, autocast, student_width: int, device=None):
        super().__init__(config, teacher, autocast)
        teacher_width = teacher.head().weight.shape[1]
        # The student's hidden states mapped to the teacher's width, trained with the student.
        self.projection = nn.Linear(student_width, teacher_width, device=device)

    @classmethod
    def create(cls, config, *, teacher, cache, autocast, student=None, **run):
        if student is None:
            raise ValueError('objective.kind = "ot" needs the student (its hidden width)')
        weight = student.head().weight
        return cls(config, teacher, autocast, weight.shape[1], weight.device)

    def trainable(self):
        return {"projection": self.projection}

    def chunk_loss(self, hidden, head, batch, teacher_inputs):
        c = self.config
        return xtok_ot_loss(
            self.projection(hidden.float()),
            teacher_inputs["hidden"].float(),
            batch["student_chunk_id"],
            batch["teacher_chunk_id"],
            cost="cosine",
            prior_weight=c.ot_prior_weight,
            eps=c.ot_eps,
            reduction="sum",
        )


CROSS_TOKENIZER_OBJECTIVES = (
    ChunkStartULD,
    GoldULD,
    GoldHybrid,
    ApproximateLikelihoodMatching,
    ChunkOT,
)
