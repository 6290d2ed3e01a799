"""One micro-batch of the student: its forward and the objective's loss in one module call."""

from __future__ import annotations

import torch
from torch import nn

from .models import CausalLM
from .objectives import Objective
from .setup import autocast_context

__all__ = ["StudentStep"]


class StudentStep(nn.Module):
    """The student and its objective as one module, the unit DDP and FSDP wrap: ``forward``
    computes the final hidden states and, from them and the head, the micro-batch's loss, so
    that a sharded head is gathered while the fused loss reads it and DDP sees every parameter
    used within its forward.

    ``forward(batch, teacher_inputs, counts)`` -> the micro-batch's loss sum divided by the
    step's count over all micro-batches and ranks (``counts``: see ``objectives``), a 0-d
    float32 tensor. The objective's own trained modules (``Objective.trainable``) are
    submodules, so that the optimizer, DDP, FSDP and checkpoints see them with the student.
    """

    def __init__(
        self, student: CausalLM, objective: Objective, autocast: torch.dtype | None = None
    ):
        super().__init__()
        self.student = student
        self.objective = objective
        trained = objective.trainable()
        if trained:
            self.objective_modules = nn.ModuleDict(trained)
        self.autocast = autocast

    def forward(self, batch: dict, teacher_inputs: dict, counts: dict) -> torch.Tensor:
        with autocast_context(batch["input_ids"].device, self.autocast):
            hidden = self.student(batch["input_ids"], batch["attention_mask"])
        return self.objective.loss(hidden, self.student.head(), batch, teacher_inputs, counts)
