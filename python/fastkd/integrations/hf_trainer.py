"""Distillation inside the Hugging Face ``Trainer``: a ``compute_loss`` computing fastkd's fused
losses from the student's final hidden states, against an online teacher (its hidden states and
head, :func:`fastkd.fused_linear_kd_loss`) or the sparse targets of a
:class:`fastkd.TeacherCache` (:func:`fastkd.fused_linear_sparse_kd_loss`). No ``[B, T, V]``
logits are built.

``DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=...,
teacher_model=teacher, divergence="jsd", beta=0.5)`` takes every ``Trainer`` argument plus the
distillation options below. Batches carry ``input_ids``, ``attention_mask`` and ``labels`` in
the Hugging Face convention (``labels`` aligned with ``input_ids``, -100 where not counted; the
loss compares position t's prediction with label t + 1), or, with ``shift_labels=False``,
labels already aligned with the predictions (``labels[t]`` is the token predicted at t, as
fastkd's own data gives them). With a teacher cache, batches also carry ``sequence_index``
``[B]``: each row's sequence number in the cache (keep it with ``remove_unused_columns=False``).

``num_items_in_batch``, which the Trainer passes to ``compute_loss`` with the count of counted
labels over all micro-batches of one optimizer step, divides the summed loss, so gradient
accumulation gives the gradients of one big batch.
"""

from __future__ import annotations

import torch

from ..ops.fused_linear_kd_loss import fused_linear_kd_loss
from ..ops.fused_linear_sparse_kd_loss import fused_linear_sparse_kd_loss
from ._models import hidden_and_head, refuse_distributed, require, shared_softcap

__all__ = ["DistillationTrainer", "distillation_loss"]  # noqa: F822 (module __getattr__)

IGNORE_INDEX = -100


def distillation_loss(
    student,
    inputs: dict,
    *,
    teacher=None,
    teacher_cache=None,
    shift_labels: bool = True,
    num_items_in_batch=None,
    **loss_options,
) -> torch.Tensor:
    """The distillation loss of one batch for a Hugging Face causal LM ``student``.

    Args:
        student: the (unwrapped) student model; its decoder runs with gradients.
        inputs: ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (optional),
            ``labels`` ``[B, T]`` (-100 = not counted), and ``sequence_index`` ``[B]`` with a
            ``teacher_cache``.
        teacher: an online teacher (a Hugging Face causal LM), run under no_grad in eval mode;
            or ``teacher_cache``: a :class:`fastkd.TeacherCache` over the same sequences.
        shift_labels: True for Hugging Face labels (position t predicts label t + 1).
        num_items_in_batch: divides the summed loss where given (else the mean over counted
            tokens).
        loss_options: for an online teacher, the options of :func:`fastkd.kd_loss`
            (``divergence``, ``temperature``, ``beta``, ``alpha``, ``hard_weight``,
            ``t2_scale``, ``softcap``, ``vocab_mismatch``, ``backend``); for a cache,
            ``hard_weight``, ``t2_scale``, ``temperature`` and ``backend``.

    Returns:
        the loss, a float32 scalar in nats per counted token.
    """
    if (teacher is None) == (teacher_cache is None):
        raise ValueError(
            "give exactly one of teacher (an online teacher model) and "
            "teacher_cache (a fastkd.TeacherCache)"
        )
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    labels = inputs["labels"]
    hidden, head = hidden_and_head(student, input_ids, attention_mask)
    cut = slice(None, -1) if shift_labels else slice(None)
    labels = labels[:, 1:] if shift_labels else labels
    common = dict(
        student_bias=head.bias,
        logit_scale=head.logit_scale,
        labels=labels,
        ignore_index=IGNORE_INDEX,
        num_items_in_batch=num_items_in_batch,
    )
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(teacher, input_ids, attention_mask)
        options = dict(loss_options)
        softcap = shared_softcap(head, t_head, options.pop("softcap", None))
        return fused_linear_kd_loss(
            hidden[:, cut],
            head.weight,
            t_hidden[:, cut],
            t_head.weight,
            teacher_bias=t_head.bias,
            teacher_logit_scale=t_head.logit_scale,
            softcap=softcap,
            **common,
            **options,
        )
    if head.softcap is not None:
        raise ValueError(
            f"the student's head caps its logits (softcap {head.softcap}); the "
            f"sparse-target loss takes no softcap: use an online teacher"
        )
    if "sequence_index" not in inputs:
        raise ValueError(
            "a teacher_cache needs each batch's sequence_index [B] (the rows' "
            "sequence numbers in the cache); keep it in the batch with "
            "TrainingArguments(remove_unused_columns=False)"
        )
    targets, lengths = teacher_cache.batch(inputs["sequence_index"].tolist())
    seq_len = input_ids.shape[1]
    if targets.ids.shape[1] != seq_len or bool((lengths != seq_len).any()):
        raise ValueError(
            f"the cache holds sequences of lengths {lengths.tolist()} where the "
            f"batch has {seq_len} tokens each: it was written for other data"
        )
    targets = targets.to(hidden.device)[:, cut]
    return fused_linear_sparse_kd_loss(
        hidden[:, cut], head.weight, targets, **common, **loss_options
    )


def _trainer_class():
    transformers = require("transformers", "train", "fastkd.integrations.hf_trainer")

    class DistillationTrainer(transformers.Trainer):
        """``transformers.Trainer`` whose loss is :func:`distillation_loss`: every Trainer
        argument, plus keyword-only ``teacher_model`` or ``teacher_cache``, ``shift_labels``
        (default True) and the loss options of :func:`distillation_loss` (e.g.
        ``divergence="jsd", beta=0.5, hard_weight=0.1``)."""

        def __init__(
            self, *args, teacher_model=None, teacher_cache=None, shift_labels: bool = True, **kwargs
        ):
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOSS_OPTIONS}
            super().__init__(*args, **kwargs)
            if (teacher_model is None) == (teacher_cache is None):
                raise ValueError("give exactly one of teacher_model and teacher_cache")
            if teacher_model is not None:
                teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
            self.teacher_model = teacher_model
            self.teacher_cache = teacher_cache
            self.shift_labels = shift_labels
            self.loss_options = options
            # The loss divides by num_items_in_batch: the Trainer must count it (over the
            # labels the loss counts) and must not divide by the accumulation steps again.
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = shift_labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            refuse_distributed(self.accelerator, "DistillationTrainer")
            student = self.accelerator.unwrap_model(model)
            loss = distillation_loss(
                student,
                inputs,
                teacher=self.teacher_model,
                teacher_cache=self.teacher_cache,
                shift_labels=self.shift_labels,
                num_items_in_batch=num_items_in_batch,
                **self.loss_options,
            )
            # No logits exist to return as outputs.
            return (loss, {}) if return_outputs else loss

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


_LOSS_OPTIONS = (
    "divergence",
    "temperature",
    "beta",
    "alpha",
    "hard_weight",
    "t2_scale",
    "softcap",
    "vocab_mismatch",
    "backend",
)


def __getattr__(name):
    # The subclass needs transformers, imported only when the class is asked for.
    if name == "DistillationTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
