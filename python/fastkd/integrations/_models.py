"""Hugging Face models seen as final hidden states plus a head, for the trainer integrations:
the loss is computed from the hidden states through the fused lm_head, so neither model's
``[B, T, V]`` logits are built."""

from __future__ import annotations

import importlib
import types

import torch
from torch import nn

from ..ops.fused_linear_kd_loss import fused_linear_kd_loss
from ..train.models import CausalLM, Head, adapt

__all__ = [
    "hidden_and_head",
    "next_token_jsd",
    "patch_compute_loss",
    "require",
    "shared_softcap",
]


def require(module: str, extra: str, what: str):
    """``importlib.import_module(module)``, or an ImportError naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the package {module.split('.')[0]!r}: pip install "
            f"'fastkd[{extra}]' (or pip install {module.split('.')[0]})"
        ) from err


def _adapter(model: nn.Module) -> CausalLM:
    """``adapt(model)``, verified once and kept on the model (outside its module tree, so that
    its state dict and ``.modules()`` are unchanged)."""
    lm = model.__dict__.get("_fastkd_adapter")
    if lm is None:
        # accelerate's prepare_model may replace the instance's forward by one running under
        # autocast (TRL's configs default to bf16): adapt checks the head against the class's
        # own forward, in the model's dtype.
        wrapped = model.__dict__.pop("forward", None)
        try:
            lm = adapt(model)
        finally:
            if wrapped is not None:
                model.__dict__["forward"] = wrapped
        object.__setattr__(model, "_fastkd_adapter", lm)
    return lm


def hidden_and_head(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, Head]:
    """``[B, T, H]`` final hidden states of a Hugging Face causal LM (its decoder, no lm_head)
    and its :class:`~fastkd.train.models.Head` (live parameters, logit scale, softcap)."""
    lm = _adapter(model)
    return lm(input_ids, attention_mask), lm.head()


def shared_softcap(student: Head, teacher: Head, softcap: float | None) -> float | None:
    """The one softcap fastkd applies to both models: ``softcap`` where given, else the heads'
    own, which must then agree."""
    if softcap is not None:
        return softcap
    if student.softcap != teacher.softcap:
        raise ValueError(
            f"the student's and the teacher's heads cap logits differently "
            f"({student.softcap} and {teacher.softcap}); pass softcap= to apply "
            f"one cap to both"
        )
    return student.softcap


def refuse_distributed(accelerator, what: str) -> None:
    """Raises under more than one process: the loss runs the unwrapped model's decoder, outside
    the DDP/FSDP wrapper's forward, so gradients would not be synchronized across ranks (and the
    Trainer's per-device loss scaling would be skipped); a silent divergence of the ranks."""
    processes = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    if processes > 1:
        raise NotImplementedError(
            f"{what} runs on one process only for now: with {processes} processes its loss "
            f"would bypass the distributed wrapper's gradient synchronization; use fastkd "
            f"distill (DDP/FSDP2) for multi-process distillation"
        )


def patch_compute_loss(trainer, trainer_class, compute_loss, what: str):
    """``trainer`` (an instance of ``trainer_class``) with ``compute_loss`` bound as its
    ``compute_loss``; TypeError naming ``what`` (the patch function) for another object."""
    if not isinstance(trainer, trainer_class):
        raise TypeError(
            f"{what} takes a trl {trainer_class.__name__}; got {type(trainer).__name__}"
        )
    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    return trainer


# TRL's generalized_jsd_loss masks labels equal to -100 (it takes no ignore_index).
IGNORE_INDEX = -100


def next_token_jsd(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    *,
    beta: float,
    temperature: float = 1.0,
    num_items_in_batch=None,
) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` of both models' next-token distributions on one batch
    (``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``; position p predicts token p + 1,
    labels -100 left out), computed from their hidden states by ``fused_linear_kd_loss``: no
    ``[B, T, V]`` logits. The teacher runs under no_grad."""
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    hidden, head = hidden_and_head(student, input_ids, attention_mask)
    with torch.no_grad():
        t_hidden, t_head = hidden_and_head(teacher, input_ids, attention_mask)
    return fused_linear_kd_loss(
        hidden[:, :-1],
        head.weight,
        t_hidden[:, :-1],
        t_head.weight,
        student_bias=head.bias,
        teacher_bias=t_head.bias,
        logit_scale=head.logit_scale,
        teacher_logit_scale=t_head.logit_scale,
        softcap=shared_softcap(head, t_head, None),
        divergence="jsd",
        beta=float(beta),
        temperature=float(temperature),
        labels=inputs["labels"][:, 1:],
        ignore_index=IGNORE_INDEX,
        num_items_in_batch=num_items_in_batch,
    )
