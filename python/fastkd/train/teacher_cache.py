"""``fastkd cache``: runs the teacher over the training sequences and writes a ``TeacherCache`` of
sparse targets, resuming after an interruption.

Sequence i of the training set (in dataset order, the order ``distill`` indexes it by) is cached
as sequence i. The teacher's logits are formed for chunks of tokens within a memory budget and
sampled there: the draws are keyed by (seed, global token index), the global index of position
t of sequence i being i * seq_len + t, so the targets do not depend on the chunking, the batch
size or where a resumed run restarted.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..ops.sample_teacher import sample_teacher
from ..sparse.cache import TeacherCache
from ..sparse.targets import SparseTargets
from .data import collate
from .distributed import init_distributed
from .report import Progress
from .setup import as_config, cache_fingerprint, load_data, load_teacher, logit_rows

__all__ = ["build_cache"]


def _sample_rows(
    hidden: torch.Tensor,
    head,
    *,
    method: str,
    num_samples: int,
    k: int,
    seed: int,
    token_offset: int,
) -> SparseTargets:
    """Sparse targets of ``head``'s fp32 logits of ``hidden`` ``[N, H]``, chunk by chunk
    (``head`` prepared by ``Head.for_float_logits``)."""
    rows = logit_rows(head.weight.shape[0])
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        logits = head.float_logits(hidden[start : start + rows])
        if method == "random":
            pieces.append(
                sample_teacher(
                    logits, num_samples=num_samples, seed=seed, token_offset=token_offset + start
                )
            )
        else:
            pieces.append(sample_teacher(logits, method="topk", k=k, tail="bucket"))
    first = pieces[0]
    return SparseTargets(
        ids=torch.cat([p.ids for p in pieces]),
        weights=torch.cat([p.weights for p in pieces]),
        tail_mass=(None if first.tail_mass is None else torch.cat([p.tail_mass for p in pieces])),
        vocab_size=first.vocab_size,
        num_samples=first.num_samples,
        temperature=first.temperature,
        seed=first.seed,
        method=first.method,
        tail=first.tail,
    )


def build_cache(config, overrides=None) -> dict:
    """Writes (or completes) the teacher cache ``cache.path`` of ``config``; returns
    ``{"path", "sequences", "tokens", "bytes_per_token", "seconds"}``."""
    config = as_config(config, overrides)
    c = config.cache
    if not c.path:
        raise ValueError("cache.path is required: the folder to write the teacher cache to")
    if not config.model.teacher:
        raise ValueError("model.teacher is required: the model whose targets are cached")
    dist_info = init_distributed(config.train.device)
    if dist_info.enabled:
        dist_info.close()
        raise RuntimeError(
            "fastkd cache runs in one process (one writer per cache); start it without torchrun"
        )
    device = dist_info.device
    data = load_data(config)
    teacher = load_teacher(config, device)
    head = teacher.head().for_float_logits()
    seq_len = config.data.seq_len
    method = c.method
    n = c.num_samples if method == "random" else c.k
    started = time.perf_counter()
    # The writer holds the cache's lock: a second `fastkd cache` on it is refused.
    with TeacherCache.create(
        c.path,
        vocab_size=head.weight.shape[0],
        num_samples=n,
        method=method,
        seed=c.seed if method == "random" else 0,
        tail="bucket" if method == "topk" else None,
        teacher_name=os.path.basename(config.model.teacher.rstrip("/")),
        tokenizer_fingerprint=cache_fingerprint(data),
        shard_tokens=c.shard_tokens,
        resume=True,
    ) as writer:
        total = len(data.train)
        first = writer.num_sequences
        batches = math.ceil(total / c.batch_size)
        progress = Progress(
            batches,
            start=first // c.batch_size,
            enabled=config.output.progress,
            every=max(1, batches // 20),
            label="cache ",
        )
        for start in range(first, total, c.batch_size):
            indices = list(range(start, min(start + c.batch_size, total)))
            batch = {k: v.to(device) for k, v in collate([data.train[i] for i in indices]).items()}
            with torch.no_grad():
                hidden = teacher(batch["input_ids"], batch["attention_mask"])
                targets = _sample_rows(
                    hidden.reshape(-1, hidden.shape[-1]),
                    head,
                    method=method,
                    num_samples=c.num_samples,
                    k=c.k,
                    seed=c.seed,
                    token_offset=start * seq_len,
                )
            writer.extend(targets.reshape(len(indices), seq_len).to("cpu"))
            progress.update(start // c.batch_size + 1)
    cache = TeacherCache.open(c.path)
    return {
        "path": c.path,
        "sequences": len(cache),
        "tokens": cache.num_tokens,
        "bytes_per_token": cache.bytes_per_token(),
        "seconds": time.perf_counter() - started,
    }
