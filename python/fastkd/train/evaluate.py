"""Held-out evaluation: cross-entropy and perplexity, KL(teacher || student), top-1 agreement with
the teacher and expected calibration error, over the tokens that have a label.

Logits are formed for chunks of labelled tokens at a time (a bounded ``[rows, V]`` fp32
workspace), never for the whole batch.
"""

from __future__ import annotations

import math

import torch

from ..ops.kd_loss import kd_loss
from .data import IGNORE_INDEX, collate
from .models import CausalLM
from .setup import autocast_context, logit_rows

__all__ = ["evaluate", "evaluate_run"]


@torch.no_grad()
def evaluate(
    student: CausalLM,
    dataset,
    *,
    teacher: CausalLM | None = None,
    batch_size: int = 8,
    max_batches: int = 0,
    ece_bins: int = 15,
    device: torch.device | str = "cpu",
    autocast: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    all_reduce=None,
) -> dict | None:
    """Metrics of ``student`` on ``dataset`` (items with ``input_ids``, ``labels``,
    ``attention_mask`` ``[T]``), over this rank's share of its sequences (every
    ``world_size``-th, from ``rank``); ``all_reduce(tensor)`` sums partial sums of a CPU tensor
    over ranks in place.

    Every rank runs the same number of forward passes (a rank short of sequences repeats one and
    counts nothing from it): under FSDP each layer's forward is a collective.

    Returns None when the dataset has no labelled token; else a dict: ``ce`` (nats per labelled
    token), ``ppl`` (exp(ce)), ``accuracy`` (student's top-1 equals the label), ``ece``
    (expected calibration error of the student's top-1 probability in ``ece_bins`` equal-width
    bins), ``tokens``; with a teacher, ``kl`` (KL(teacher || student) at temperature 1, nats per
    token) and ``agreement`` (equal top-1 tokens). Logits are fp32 from the GEMM, for chunks of
    labelled tokens at a time.
    """
    if len(dataset) == 0:
        return None
    device = torch.device(device)
    was_training = student.training
    student.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # ce, correct, tokens, kl, agree
    bins = torch.zeros(3, ece_bins, dtype=torch.float64)  # count, confidence sum, correct sum
    indices = list(range(rank, len(dataset), world_size))
    passes = math.ceil(math.ceil(len(dataset) / world_size) / batch_size)
    if max_batches:
        passes = min(passes, max_batches)
    head = student.head().for_float_logits()
    t_head = teacher.head().for_float_logits() if teacher is not None else None
    rows = logit_rows(head.weight.shape[0], 1 if teacher is None else 2)
    for p in range(passes):
        chosen = indices[p * batch_size : (p + 1) * batch_size]
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in (chosen or [0])]).items()}
        with autocast_context(device, autocast):
            hidden = student(batch["input_ids"], batch["attention_mask"])
            t_hidden = (
                teacher(batch["input_ids"], batch["attention_mask"])
                if teacher is not None
                else None
            )
        mask = batch["labels"] != IGNORE_INDEX
        if not chosen:
            mask = torch.zeros_like(mask)
        hidden = hidden[mask]
        labels = batch["labels"][mask]
        t_hidden = None if t_hidden is None else t_hidden[mask]
        for start in range(0, labels.numel(), rows):
            end = min(start + rows, labels.numel())
            zs = head.float_logits(hidden[start:end])
            lq = torch.log_softmax(zs, -1)
            y = labels[start:end]
            confidence, pred = lq.max(-1)
            confidence = confidence.exp().double().cpu()
            correct = (pred == y).double().cpu()
            sums[0] += -lq.gather(-1, y[:, None]).sum().double().cpu()
            sums[1] += correct.sum()
            sums[2] += end - start
            which = (confidence * ece_bins).long().clamp(max=ece_bins - 1)
            bins[0].index_add_(0, which, torch.ones_like(confidence))
            bins[1].index_add_(0, which, confidence)
            bins[2].index_add_(0, which, correct)
            if t_head is not None:
                zt = t_head.float_logits(t_hidden[start:end])
                sums[3] += kd_loss(zs, zt, reduction="sum").double().cpu()
                sums[4] += (zt.argmax(-1) == pred).sum().double().cpu()
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(bins)
    student.train(was_training)
    tokens = float(sums[2])
    if tokens == 0:
        return None
    ce = float(sums[0]) / tokens
    ece = float((bins[1] - bins[2]).abs().sum()) / tokens
    out = {
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        "accuracy": float(sums[1]) / tokens,
        "ece": ece,
        "tokens": int(tokens),
    }
    if teacher is not None:
        out["kl"] = float(sums[3]) / tokens
        out["agreement"] = float(sums[4]) / tokens
    return out


def evaluate_run(config, overrides=None, *, model: str | None = None) -> dict:
    """``fastkd eval``: the metrics of a trained student on ``config``'s held-out data (with the
    teacher's KL and agreement when ``model.teacher`` is set and shares the student's
    tokenizer). ``model`` defaults to the run's
    exported ``output.dir/model``, else ``model.student``."""
    import os

    from .distributed import init_distributed
    from .models import load_causal_lm
    from .setup import as_config, load_data, load_teacher

    config = as_config(config, overrides)
    dist_info = init_distributed(config.train.device)
    try:
        data = load_data(config)
        if len(data.eval) == 0:
            raise ValueError(
                "the held-out split is empty: give data.eval files, or a "
                "data.eval_fraction > 0 over at least two training documents"
            )
        exported = os.path.join(config.output.dir, "model")
        path = model or (exported if os.path.isdir(exported) else config.model.student)
        student = load_causal_lm(path, seed=config.train.seed).to(dist_info.device)
        # KL and agreement compare the models on one vocabulary: not with a teacher that has
        # a tokenizer of its own.
        same_vocabulary = not config.model.teacher_tokenizer
        metrics = evaluate(
            student,
            data.eval,
            teacher=load_teacher(config, dist_info.device) if same_vocabulary else None,
            batch_size=config.eval.batch_size,
            max_batches=config.eval.max_batches,
            ece_bins=config.eval.ece_bins,
            device=dist_info.device,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            all_reduce=dist_info.all_reduce_sum_cpu,
        )
        if metrics is None:
            raise ValueError("the held-out split has no labelled token")
        return {**metrics, "model": path}
    finally:
        dist_info.close()
