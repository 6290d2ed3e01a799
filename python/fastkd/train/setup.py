"""What a run is built from: its config, tokenizer, data, models and the teacher cache's identity.
Shared by ``distill``, ``build_cache`` and ``evaluate_run`` so that all three see the same
sequences in the same order."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .config import CROSS_TOKENIZER_KINDS, Config, load_config
from .data import SequenceDataset, read_documents, split_documents, tokenize_documents
from .models import CausalLM, load_causal_lm
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .xtok_data import tokenize_aligned

__all__ = [
    "LOGITS_WORKSPACE_BYTES",
    "RunData",
    "as_config",
    "autocast_context",
    "cache_fingerprint",
    "load_data",
    "load_models",
    "load_teacher",
    "logit_rows",
    "teacher_dtype",
]

# fp32 logits of one chunk of tokens (evaluation, cache writing): the only [rows, V] tensors
# outside the fused losses, sized like their default CPU budget.
LOGITS_WORKSPACE_BYTES = 256 << 20


def logit_rows(vocab: int, models: int = 1) -> int:
    """Tokens per chunk whose fp32 logits of ``models`` heads of ``vocab`` columns (and as many
    working copies) fit in ``LOGITS_WORKSPACE_BYTES``."""
    return max(1, LOGITS_WORKSPACE_BYTES // (8 * vocab * models))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def as_config(config, overrides=None) -> Config:
    """A ``Config`` from a Config, a config file path or a nested dict, with ``overrides``."""
    return load_config(config, overrides)


@dataclass
class RunData:
    tokenizer: object
    train: SequenceDataset
    eval: SequenceDataset
    tokenizer_fingerprint: str
    # A cross-tokenizer run's teacher tokenizer (the student's when it has none of its own);
    # its training sequences then carry the teacher's tokens and the chunk alignment.
    teacher_tokenizer: object | None = None


def _tokenizer_at(path: str):
    return load_tokenizer(os.path.dirname(path) if os.path.isfile(path) else path)


def load_data(config: Config) -> RunData:
    """The tokenizer and the tokenized training and held-out sequences of ``config``; for a
    cross-tokenizer objective, the training sequences aligned with the teacher's tokenization
    (``tokenize_aligned``)."""
    tokenizer = _tokenizer_at(config.model.tokenizer or config.model.student)
    d = config.data
    keys = dict(
        format=d.format,
        text_key=d.text_key,
        prompt_key=d.prompt_key,
        completion_key=d.completion_key,
    )
    docs = read_documents(d.train, **keys)
    if d.eval:
        train_docs, eval_docs = docs, read_documents(d.eval, **keys)
    else:
        train_docs, eval_docs = split_documents(
            docs, eval_fraction=d.eval_fraction, seed=config.train.seed
        )
    teacher_tokenizer = None
    if config.objective.kind in CROSS_TOKENIZER_KINDS:
        path = config.model.teacher_tokenizer
        teacher_tokenizer = _tokenizer_at(path) if path else tokenizer
        train = tokenize_aligned(train_docs, tokenizer, teacher_tokenizer, seq_len=d.seq_len)
    else:
        train = tokenize_documents(train_docs, tokenizer, seq_len=d.seq_len)
    held_out = tokenize_documents(eval_docs, tokenizer, seq_len=d.seq_len)
    if len(train) == 0:
        raise ValueError(f"data.train yields no training sequence of {d.seq_len} tokens")
    return RunData(tokenizer, train, held_out, tokenizer_fingerprint(tokenizer), teacher_tokenizer)


def teacher_dtype(config: Config, device: torch.device) -> torch.dtype:
    choice = config.model.teacher_dtype
    if choice == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, choice)


def load_teacher(config: Config, device: torch.device) -> CausalLM | None:
    """The teacher of ``config`` (None without one): eval mode, no gradients, in
    ``model.teacher_dtype``."""
    if not config.model.teacher:
        return None
    teacher = load_causal_lm(
        config.model.teacher, dtype=teacher_dtype(config, device), seed=config.train.seed
    ).to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_models(
    config: Config, device: torch.device, *, with_teacher: bool
) -> tuple[CausalLM, CausalLM | None]:
    """The student in training mode with float32 master weights (whatever dtype its checkpoint
    holds; bf16 compute comes from autocast) and, when asked for, the teacher
    (``load_teacher``)."""
    student = load_causal_lm(config.model.student, dtype=torch.float32, seed=config.train.seed).to(
        device
    )
    student.train()
    return student, load_teacher(config, device) if with_teacher else None


def cache_fingerprint(data: RunData) -> str:
    """What a teacher cache's targets refer to: the tokenizer and the exact training sequences
    (their tokens and order), recorded in the cache as its ``tokenizer_fingerprint``."""
    return f"tokenizer={data.tokenizer_fingerprint};data={data.train.fingerprint}"
