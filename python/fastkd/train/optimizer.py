"""The optimizer of a run and its learning-rate schedule: AdamW with weight decay on matrices
only, and a linear warmup followed by a cosine decay (``train`` section of the config).
"""

from __future__ import annotations

import math

import torch

from .config import Config


def _lr_lambda(config: Config):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    t = config.train
    total, warm, floor = t.steps, t.warmup_steps, t.min_lr_ratio

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm - 1, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _optimizer(module: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases and other vectors)."""
    t = config.train
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
