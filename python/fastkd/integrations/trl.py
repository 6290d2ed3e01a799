"""fastkd's fused loss inside TRL's ``GKDTrainer``.

``GKDTrainer.compute_loss`` (trl 1.x, ``trl.experimental.gkd``) runs both models to their full
``[B, T, V]`` logits and calls ``generalized_jsd_loss`` on them. The replacement computed here
runs both models' decoders to their final hidden states and gives them, with the two lm_heads,
to :func:`fastkd.fused_linear_kd_loss`: the same loss without any ``[B, T, V]`` tensor.

TRL's conventions, kept: ``beta`` is TRL's (``beta`` KL(teacher || M) + (1 - beta)
KL(student || M), M = beta teacher + (1 - beta) student; 0 is forward KL, 1 reverse KL), which
is fastkd's ``divergence="jsd", beta=beta`` unchanged; the loss is at temperature 1 (TRL's
``compute_loss`` passes no temperature; ``args.temperature`` only samples generations); labels
are shifted by one and ``-100`` marks the tokens left out; the mean is over the counted tokens,
or the sum divided by ``num_items_in_batch`` when the Trainer passes it.

Use either::

    from fastkd.integrations.trl import FastKDGKDTrainer      # a GKDTrainer subclass
    trainer = FastKDGKDTrainer(model=..., teacher_model=..., args=GKDConfig(...), ...)

or, on a trainer that already exists (Liger's ``apply_liger_kernel_to_*`` style)::

    from fastkd.integrations.trl import apply_fastkd_to_gkd_trainer
    apply_fastkd_to_gkd_trainer(trainer)

TRL's GOLD trainer (``trl.experimental.gold``, distillation across tokenizers) likewise:
``FastKDGOLDTrainer`` or ``apply_fastkd_to_gold_trainer(trainer)``, its ULD, hybrid ULD and
generalized JSD losses computed from hidden states (``fastkd/integrations/_trl_gold.py`` lists
the conventions kept). TRL's ``DistillationTrainer`` already computes its loss from hidden
states in chunks and is not replaced.
"""

from __future__ import annotations


from ._models import next_token_jsd, patch_compute_loss, refuse_distributed, require
from ._trl_gold import (
    apply_fastkd_to_gold_trainer,
    gold_compute_loss,
    gold_trainer_class,
    gold_trainer_subclass,
)

__all__ = [
    "FastKDGKDTrainer",  # noqa: F822 (module __getattr__)
    "FastKDGOLDTrainer",  # noqa: F822 (module __getattr__)
    "apply_fastkd_to_gkd_trainer",
    "apply_fastkd_to_gold_trainer",
    "gkd_compute_loss",
    "gkd_trainer_class",
    "gold_compute_loss",
    "gold_trainer_class",
]


def gkd_trainer_class():
    """TRL's ``GKDTrainer`` (``trl.experimental.gkd`` in trl >= 1.0, ``trl`` before)."""
    require("trl", "trl", "fastkd.integrations.trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer


def gkd_compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``GKDTrainer.compute_loss`` with fastkd's fused loss: the same value (to fp32 rounding)
    without the two models' logits. ``trainer`` needs ``teacher_model`` and ``beta`` (a
    GKDTrainer has both) and, where the model is wrapped (DDP, ...), ``accelerator``.

    Returns the loss, or ``(loss, {})`` with ``return_outputs`` (no logits exist to return)."""
    accelerator = getattr(trainer, "accelerator", None)
    refuse_distributed(accelerator, "fastkd's GKD loss")
    student = accelerator.unwrap_model(model) if accelerator is not None else model
    teacher = trainer.teacher_model
    teacher = accelerator.unwrap_model(teacher) if accelerator is not None else teacher
    teacher.eval()
    # TRL's compute_loss passes no temperature: the loss is at T = 1.
    loss = next_token_jsd(
        student, teacher, inputs, beta=trainer.beta, num_items_in_batch=num_items_in_batch
    )
    return (loss, {}) if return_outputs else loss


def apply_fastkd_to_gkd_trainer(trainer):
    """Replaces ``trainer.compute_loss`` (a TRL ``GKDTrainer``) by :func:`gkd_compute_loss`;
    returns the trainer. Generation (``lmbda``, ``seq_kd``) is untouched."""
    return patch_compute_loss(
        trainer, gkd_trainer_class(), gkd_compute_loss, "apply_fastkd_to_gkd_trainer"
    )


def _subclass():
    gkd = gkd_trainer_class()

    class FastKDGKDTrainer(gkd):
        """TRL's ``GKDTrainer`` whose loss is fastkd's fused generalized JSD on the hidden
        states (:func:`gkd_compute_loss`); every argument is GKDTrainer's."""

        compute_loss = gkd_compute_loss

    return FastKDGKDTrainer


_SUBCLASSES = {"FastKDGKDTrainer": _subclass, "FastKDGOLDTrainer": gold_trainer_subclass}


def __getattr__(name):
    # The subclasses need trl, imported only when a class is asked for.
    if name in _SUBCLASSES:
        cls = _SUBCLASSES[name]()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
