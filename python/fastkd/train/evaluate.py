"""Held-out evaluation: cross-entropy and perplexity, KL(teacher || student), top-1 agreement with
the teacher and expected calibration error, over the tokens that have a label.

Logits are formed for chunks of labelled tokens at a time (a bounded ``[rows, V]`` fp32
workspace), never for the whole batch.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..ops.kd_loss import kd_loss
from .models import CausalLM

__all__ = ["evaluate", "evaluate_run"]

IGNORE_INDEX = -100
# fp32 logits of both models and the student's log-probabilities per chunk of rows.
_WORKSPACE_BYTES = 256 << 20


@torch.no_grad()
def evaluate(student: CausalLM, dataset, *, teacher: CausalLM | None = None, batch_size: int = 8,
             max_batches: int = 0, ece_bins: int = 15, device: torch.device | str = "cpu",
             autocast: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
             all_reduce=None) -> dict:
    """Metrics of ``student`` on ``dataset`` (items with ``input_ids``, ``labels``,
    ``attention_mask`` ``[T]``), over this rank's share of its sequences (every
    ``world_size``-th, from ``rank``); ``all_reduce(tensor)`` sums partial sums over ranks.

    Returns a dict: ``ce`` (nats per labelled token), ``ppl`` (exp(ce)), ``accuracy`` (student's
    top-1 equals the label), ``ece`` (expected calibration error of the student's top-1
    probability in ``ece_bins`` equal-width bins), ``tokens``; with a teacher, ``kl`` (KL(teacher
    || student) at temperature 1, nats per token) and ``agreement`` (equal top-1 tokens).
    """
    from .data import collate

    device = torch.device(device)
    was_training = student.training
    student.eval()
    sums = torch.zeros(6, dtype=torch.float64)          # ce, correct, tokens, kl, agree, -
    bins = torch.zeros(3, ece_bins, dtype=torch.float64)  # count, confidence sum, correct sum
    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    for batch_indices in batches:
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in batch_indices]).items()}
        mask = batch["labels"] != IGNORE_INDEX
        if not mask.any():
            continue
        with (torch.autocast(device.type, dtype=autocast) if autocast
              else contextlib.nullcontext()):
            hidden = student(batch["input_ids"], batch["attention_mask"])[mask]
            t_hidden = (teacher(batch["input_ids"], batch["attention_mask"])[mask]
                        if teacher is not None else None)
        labels = batch["labels"][mask]
        head = student.head()
        vocab = head.weight.shape[0] + (teacher.head().weight.shape[0] if teacher else 0)
        rows = max(1, _WORKSPACE_BYTES // (8 * vocab))
        for start in range(0, labels.numel(), rows):
            end = min(start + rows, labels.numel())
            zs = head.logits(hidden[start:end].float()).float()
            lq = torch.log_softmax(zs, -1)
            y = labels[start:end]
            confidence, pred = lq.max(-1)
            confidence = confidence.exp()
            correct = (pred == y).double()
            sums[0] += -lq.gather(-1, y[:, None]).sum().double().cpu()
            sums[1] += correct.sum().cpu()
            sums[2] += end - start
            which = (confidence.double() * ece_bins).long().clamp(max=ece_bins - 1).cpu()
            bins[0].index_add_(0, which, torch.ones_like(which, dtype=torch.float64))
            bins[1].index_add_(0, which, confidence.double().cpu())
            bins[2].index_add_(0, which, correct.cpu())
            if teacher is not None:
                zt = teacher.head().logits(t_hidden[start:end].float()).float()
                sums[3] += kd_loss(zs, zt, reduction="sum").double().cpu()
                sums[4] += (zt.argmax(-1) == pred).sum().double().cpu()
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(bins)
    student.train(was_training)
    tokens = float(sums[2])
    if tokens == 0:
        raise ValueError("the evaluation set has no labelled token")
    ce = float(sums[0]) / tokens
    ece = float((bins[1] - bins[2]).abs().sum()) / tokens
    out = {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "accuracy": float(sums[1]) / tokens,
           "ece": ece, "tokens": int(tokens)}
    if teacher is not None:
        out["kl"] = float(sums[3]) / tokens
        out["agreement"] = float(sums[4]) / tokens
    return out


def evaluate_run(config, overrides=None, *, model: str | None = None) -> dict:
    """``fastkd eval``: the metrics of a trained student on ``config``'s held-out data (with the
    teacher's KL and agreement when ``model.teacher`` is set). ``model`` defaults to the run's
    exported ``output.dir/model``, else ``model.student``."""
    import os

    from .distributed import init_distributed
    from .models import load_causal_lm
    from .setup import as_config, load_data, load_models

    config = as_config(config, overrides)
    dist_info = init_distributed(config.train.device)
    try:
        data = load_data(config)
        exported = os.path.join(config.output.dir, "model")
        path = model or (exported if os.path.isdir(exported) else config.model.student)
        student = load_causal_lm(path, seed=config.train.seed).to(dist_info.device)
        _, teacher = load_models(config, dist_info.device, with_teacher=True)

        def reduce(t):
            if dist_info.enabled:
                t.copy_(dist_info.all_reduce_sum(t.to(dist_info.device)).cpu())
            return t
        metrics = evaluate(student, data.eval, teacher=teacher,
                           batch_size=config.eval.batch_size,
                           max_batches=config.eval.max_batches, ece_bins=config.eval.ece_bins,
                           device=dist_info.device, rank=dist_info.rank,
                           world_size=dist_info.world_size, all_reduce=reduce)
        metrics["model"] = path
        return metrics
    finally:
        dist_info.close()
