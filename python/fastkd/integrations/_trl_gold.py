"""fastkd's losses inside TRL's GOLD trainer (``trl.experimental.gold.GOLDTrainer``).

``GOLDTrainer.compute_loss`` (trl 1.x) runs both models to their full ``[B, T, V]`` logits.
With ``use_uld_loss`` and a teacher tokenizer it re-tokenizes each example for the teacher and
calls ``ULDLoss`` (per example: softmax of the answer positions, grouping by byte offsets,
GOLD's merge, sorted L1 or the hybrid); otherwise it calls ``generalized_jsd_loss`` at the
trainer's temperature. :func:`gold_compute_loss` computes the same value from both models'
final hidden states and lm_heads through :func:`fastkd.xtok.fused_linear_gold_loss` and
:func:`fastkd.fused_linear_kd_loss`: no ``[B, T, V]`` tensor of either model.

TRL's conventions, kept so that values are equal (tested against TRL's own code):

* ULD: the answer is where the labels are not -100 (its first index and its count, less one
  per side with ``uld_skip_student_eos`` / ``uld_skip_teacher_eos``); ``uld_token_merge_strategy
  = "observed"`` pairs position p's distribution with the token *at* p (TRL's indexing: no shift
  by one); byte-offset groups come from TRL's own ``ULDLoss._align_by_byte_offsets`` (pairs with
  an empty side dropped), or position by position up to the shorter answer without
  ``use_extended_uld``; the vocabulary map of the hybrid is TRL's (exact token strings), and its
  default weights are the matched share of the teacher's logits and the rest; each example's
  loss is the mean over its groups, the batch's the mean over examples (an example without an
  answer counts as 0), times ``uld_distillation_weight``, plus ``uld_crossentropy_weight`` x the
  student's next-token cross-entropy over the labels. ``num_items_in_batch`` is not used, as in
  TRL's ULD path.
* JSD (same tokenizer): ``generalized_jsd_loss`` at ``args.temperature`` with no T² factor,
  over the shifted labels, divided by ``num_items_in_batch`` when the Trainer passes it.

Refused with a clear error rather than computed differently: ``uld_token_merge_strategy =
"bayesian"``, vision-language inputs, logit softcapping (a Gemma-2 style head) in the ULD path,
and more than one process.
"""

from __future__ import annotations

import torch

from ..ops.fused_linear_logprobs import fused_linear_logprobs
from ..xtok.fused_gold import fused_linear_gold_loss
from ..xtok.vocab_map import VocabMap
from ._models import (
    IGNORE_INDEX,
    hidden_and_head,
    next_token_jsd,
    patch_compute_loss,
    refuse_distributed,
    require,
)

__all__ = [
    "apply_fastkd_to_gold_trainer",
    "gold_compute_loss",
    "gold_trainer_class",
    "gold_trainer_subclass",
]


def gold_trainer_class():
    """TRL's ``GOLDTrainer`` (``trl.experimental.gold``)."""
    require("trl", "trl", "fastkd.integrations.trl")
    from trl.experimental.gold import GOLDTrainer

    return GOLDTrainer


def _answer_spans(labels: torch.Tensor, skip_last: bool) -> list[tuple[int, int]]:
    """Per example ``(first index, count)`` of the labels that are not -100, less the last one
    with ``skip_last`` (TRL's ``_get_start_and_size_answers`` and its EOS skip)."""
    keep = labels.ne(IGNORE_INDEX)
    counts = keep.sum(1).tolist()
    first = torch.where(keep.any(1), keep.to(torch.int8).argmax(1), 0).tolist()
    return [(f, n - 1 if skip_last and n > 0 else n) for f, n in zip(first, counts)]


def _groups(uld, s_offsets, t_offsets, s_span, t_span, extended: bool):
    """TRL's alignment of one example's two answers: lists of positions (relative to each
    answer's start), one pair per group, both sides non-empty."""
    (s0, ns), (t0, nt) = s_span, t_span
    if not extended:
        m = min(ns, nt)
        single = [[j] for j in range(m)]
        return single, single
    s_groups, t_groups = uld._align_by_byte_offsets(
        s_offsets[s0 : s0 + ns].tolist(), t_offsets[t0 : t0 + nt].tolist()
    )
    pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
    return [sg for sg, _ in pairs], [tg for _, tg in pairs]


def _chunk_ids(uld, inputs, t_labels, t_offsets, length_s: int, length_t: int, device):
    """int64 ``[B, T_s]``, ``[B, T_t]`` chunk ids (-1 outside groups) and each example's group
    count ``[B]``, from TRL's answer spans and grouping rule."""
    s_spans = _answer_spans(inputs["labels"], uld.skip_student_eos)
    t_spans = _answer_spans(t_labels, uld.skip_teacher_eos)
    batch = len(s_spans)
    s_ids = torch.full((batch, length_s), -1, dtype=torch.int64)
    t_ids = torch.full((batch, length_t), -1, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    s_offsets = inputs.get("byte_offsets")
    if uld.use_extended_uld and s_offsets is None:
        raise ValueError("Input batches must include `byte_offsets` when `use_extended_uld=True`.")
    for i, (s_span, t_span) in enumerate(zip(s_spans, t_spans)):
        if s_span[1] <= 0 or t_span[1] <= 0:
            continue
        s_groups, t_groups = _groups(
            uld,
            None if s_offsets is None else s_offsets[i],
            t_offsets[i],
            s_span,
            t_span,
            uld.use_extended_uld,
        )
        for side, groups, start in ((s_ids, s_groups, s_span[0]), (t_ids, t_groups, t_span[0])):
            for chunk, group in enumerate(groups):
                side[i, [start + j for j in group]] = chunk
        counts[i] = len(s_groups)
    return s_ids.to(device), t_ids.to(device), counts.to(device)


def _trl_vocab_map(uld, vocab_s: int, vocab_t: int) -> VocabMap:
    """TRL's hybrid vocabulary map (token strings equal in both vocabularies) as a VocabMap."""
    teacher_ids = torch.tensor(sorted(uld._teacher_matched_ids), dtype=torch.int64)
    student_ids = uld.mapping_tensor.cpu()[teacher_ids]
    order = student_ids.argsort()
    return VocabMap(student_ids[order], teacher_ids[order], vocab_s, vocab_t)


def _refuse_unsupported(trainer, inputs) -> None:
    uld = trainer.uld_loss_fn
    if uld is not None and uld.token_merge_strategy != "observed":
        raise NotImplementedError(
            f"fastkd's GOLD loss implements uld_token_merge_strategy='observed' (TRL's default); "
            f"got {uld.token_merge_strategy!r}"
        )
    vision = trainer._get_model_forward_kwargs(inputs)
    if vision or getattr(trainer, "_teacher_processor", None) is not None:
        raise NotImplementedError(
            "fastkd's GOLD loss takes text-only batches; this one has vision-language inputs"
        )


def _uld_loss(trainer, student, teacher, inputs) -> torch.Tensor:
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts

    uld = trainer.uld_loss_fn
    device = inputs["input_ids"].device
    t_input_ids, t_labels, t_mask, t_offsets = build_teacher_inputs_from_texts(
        trainer.teacher_tokenizer,
        inputs["original_prompt_text"],
        inputs["original_completion_text"],
        use_extended_uld=uld.use_extended_uld,
    )
    t_input_ids, t_mask = t_input_ids.to(device), t_mask.to(device)
    hidden, head = hidden_and_head(student, inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        t_hidden, t_head = hidden_and_head(teacher, t_input_ids, t_mask)
    if head.softcap is not None or t_head.softcap is not None:
        raise NotImplementedError(
            "fastkd's GOLD loss does not apply a logit softcap; these heads cap their logits"
        )
    s_chunks, t_chunks, counts = _chunk_ids(
        uld, inputs, t_labels, t_offsets, hidden.shape[1], t_hidden.shape[1], device
    )
    vocab_s, vocab_t = head.weight.shape[0], t_head.weight.shape[0]
    vocab_map = matched_weight = unmatched_weight = None
    if uld.use_hybrid_loss and uld._vocab_mapping is not None:
        vocab_map = _trl_vocab_map(uld, vocab_s, vocab_t)
        matched_weight, unmatched_weight = uld.hybrid_matched_weight, uld.hybrid_unmatched_weight
        if matched_weight is None:
            matched_weight = len(uld._teacher_matched_ids) / max(1, vocab_t)
            unmatched_weight = 1.0 - matched_weight
    per_chunk = fused_linear_gold_loss(
        hidden,
        head.weight,
        t_hidden,
        t_head.weight,
        inputs["input_ids"],
        t_input_ids,
        s_chunks,
        t_chunks,
        student_bias=head.bias,
        teacher_bias=t_head.bias,
        logit_scale=head.logit_scale,
        teacher_logit_scale=t_head.logit_scale,
        temperature=uld.student_temperature,
        teacher_temperature=uld.teacher_temperature,
        vocab_map=vocab_map,
        beta=float(uld.beta),
        matched_weight=matched_weight,
        unmatched_weight=unmatched_weight,
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    per_example = per_chunk.sum(1) / counts.clamp(min=1).to(per_chunk.dtype)
    loss = uld.distillation_weight * per_example.mean()
    if uld.crossentropy_weight > 0:
        logprob = fused_linear_logprobs(
            hidden[:, :-1],
            head.weight,
            inputs["labels"][:, 1:],
            bias=head.bias,
            logit_scale=head.logit_scale,
            ignore_index=IGNORE_INDEX,
        ).logprob
        counted = inputs["labels"][:, 1:].ne(IGNORE_INDEX)
        cross_entropy = -(logprob * counted).sum() / counted.sum().clamp(min=1)
        loss = loss + uld.crossentropy_weight * cross_entropy
    return loss


def gold_compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``GOLDTrainer.compute_loss`` with fastkd's fused losses: the same value (to fp32
    rounding) without either model's logits. ``trainer`` is a GOLDTrainer (it needs
    ``teacher_model``, ``use_uld_loss``, ``uld_loss_fn``, ``teacher_tokenizer``, ``beta``,
    ``temperature`` and ``accelerator``).

    Returns the loss, or ``(loss, {})`` with ``return_outputs`` (no logits exist to return)."""
    accelerator = getattr(trainer, "accelerator", None)
    refuse_distributed(accelerator, "fastkd's GOLD loss")
    _refuse_unsupported(trainer, inputs)
    student = accelerator.unwrap_model(model) if accelerator is not None else model
    teacher = trainer.teacher_model
    teacher = accelerator.unwrap_model(teacher) if accelerator is not None else teacher
    teacher.eval()
    if trainer.use_uld_loss and trainer.teacher_tokenizer is not None:
        loss = _uld_loss(trainer, student, teacher, inputs)
    else:
        loss = next_token_jsd(
            student,
            teacher,
            inputs,
            beta=trainer.beta,
            temperature=trainer.temperature,
            num_items_in_batch=num_items_in_batch,
        )
    return (loss, {}) if return_outputs else loss


def apply_fastkd_to_gold_trainer(trainer):
    """Replaces ``trainer.compute_loss`` (a TRL ``GOLDTrainer``) by :func:`gold_compute_loss`;
    returns the trainer. Generation, buffering and logging are untouched."""
    return patch_compute_loss(
        trainer, gold_trainer_class(), gold_compute_loss, "apply_fastkd_to_gold_trainer"
    )


def gold_trainer_subclass():
    """``FastKDGOLDTrainer``: TRL's ``GOLDTrainer`` whose loss is :func:`gold_compute_loss`."""
    gold = gold_trainer_class()

    class FastKDGOLDTrainer(gold):
        """TRL's ``GOLDTrainer`` whose loss is fastkd's (:func:`gold_compute_loss`): GOLD's ULD
        or hybrid ULD across tokenizers, or generalized JSD, from hidden states; every argument
        is GOLDTrainer's."""

        compute_loss = gold_compute_loss

    return FastKDGOLDTrainer
