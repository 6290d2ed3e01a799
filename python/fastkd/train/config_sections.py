"""The sections of a config, one dataclass each: their keys, defaults and allowed values
(a field's ``metadata``: ``range`` with ``low_open``/``high_open``, and ``path`` for a path
taken relative to the config file's folder), and the groups of objective kinds (those that run
the teacher online, those that compare the models across tokenizations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CROSS_TOKENIZER_KINDS",
    "ONLINE_KINDS",
    "CacheConfig",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OnPolicyConfig",
    "OutputConfig",
    "TrainConfig",
]


@dataclass
class ModelConfig:
    """The models. A path is a local Hugging Face model directory (config.json and weights), or a
    config.json (or a directory holding only one) for a randomly initialized model."""

    student: str = field(default="", metadata={"path": True})
    teacher: str | None = field(default=None, metadata={"path": True})
    # The student's tokenizer (and the teacher's, unless teacher_tokenizer); default: the
    # student's directory.
    tokenizer: str | None = field(default=None, metadata={"path": True})
    # A teacher with a tokenizer of its own (a cross-tokenizer objective: uld, gold,
    # gold_hybrid, alm, ot): the data is tokenized by both and aligned by bytes.
    teacher_tokenizer: str | None = field(default=None, metadata={"path": True})
    # The teacher's weights dtype: "auto" is bfloat16 on a GPU that has it, float32 on CPU.
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class DataConfig:
    """Text (``.txt``, or ``.jsonl`` with ``text``) is packed into blocks of ``seq_len`` tokens;
    ``.jsonl`` with ``prompt``/``completion`` gives one sequence per record, the prompt masked."""

    train: list[str] = field(default_factory=list, metadata={"path": True})
    # Held-out files; without them, ``eval_fraction`` of the training documents is held out.
    eval: list[str] = field(default_factory=list, metadata={"path": True})
    eval_fraction: float = field(default=0.05, metadata={"range": (0.0, 0.5)})
    seq_len: int = field(default=512, metadata={"range": (2, None)})
    format: Literal["auto", "txt", "jsonl"] = "auto"
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    shuffle: bool = True


@dataclass
class ObjectiveConfig:
    """What the student is trained on. ``ce``: the data's next tokens only (the baseline);
    ``kd``: an online teacher through ``fused_linear_kd_loss``; ``sparse``: a ``TeacherCache``
    written by ``fastkd cache`` through ``fused_linear_sparse_kd_loss``; ``sampled_rkl``: the
    teacher's log-probabilities of the student's own samples only (``fused_linear_logprobs``),
    a sampled reverse-KL estimator (on-policy: needs ``onpolicy.student_fraction = 1``);
    ``teacher_topk``: the online teacher's top-``topk`` ids with the exact tail mass
    (``fused_linear_topk``) through ``fused_linear_sparse_kd_loss``.

    Cross-tokenizer kinds (the teacher may have its own ``model.teacher_tokenizer``; the two
    tokenizations are aligned into chunks of the same bytes): ``uld``: sorted-probability L1
    between the two models' next-token distributions at each chunk's start; ``gold``: the same
    between GOLD's chain-rule merged distributions of each chunk; ``gold_hybrid``: GOLD's
    hybrid, JSD (``beta``) over the tokens both vocabularies hold plus sorted L1 over the rest;
    ``alm``: approximate likelihood matching of the chunks' log-likelihoods (binary
    cross-entropy at ``temperature``); ``ot``: optimal transport between the student's and
    the teacher's positions, hidden states through a learned projection, the chunk alignment
    as a prior (``ot_prior_weight``, ``ot_eps``). All are averaged over the counted chunks
    (``ot``: over sequences); ``hard_weight`` mixes in the student's cross-entropy."""

    kind: Literal[
        "ce",
        "kd",
        "sparse",
        "sampled_rkl",
        "teacher_topk",
        "uld",
        "gold",
        "gold_hybrid",
        "alm",
        "ot",
    ] = "kd"
    divergence: str = "fkl"
    temperature: float = field(default=1.0, metadata={"range": (2.0**-126, 2.0**126)})
    beta: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    alpha: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    t2_scale: bool = False
    # Weight of the hard-label cross-entropy: loss = (1 - h) KD + h CE.
    hard_weight: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    # Final-logit softcap for both models; None takes the models' own (Gemma-2/3), which must
    # agree.
    softcap: float | None = field(default=None, metadata={"range": (2.0**-126, 2.0**126)})
    backend: Literal["auto", "torch", "cpu", "triton", "cuda"] = "auto"
    # kind = "sampled_rkl": the estimator of KL(student || teacher) on the student's samples
    # (fastkd.sampled_reverse_kl): "reward" and "k2" give the reverse-KL gradient, "k3" the
    # forward-KL one, "k1" none in expectation.
    estimator: Literal["k1", "k2", "k3", "reward"] = "reward"
    # kind = "teacher_topk": the teacher's top-k ids per token, the rest in an exact tail bucket.
    topk: int = field(default=16, metadata={"range": (1, 2**31 - 1)})
    # kind = "ot": entropic regularization (in units of the cosine cost, which lies in [0, 2])
    # and the weight of the chunk prior (a pair of positions costs this much more per chunk
    # of distance, in units of the sequence's chunks).
    ot_eps: float = field(default=0.1, metadata={"range": (0.0, 2.0**126), "low_open": True})
    ot_prior_weight: float = field(default=1.0, metadata={"range": (0.0, 2.0**126)})


# Objectives that compare the models across tokenizations (aligned chunks of bytes).
CROSS_TOKENIZER_KINDS = ("uld", "gold", "gold_hybrid", "alm", "ot")
# Objectives that run the teacher online beside the student.
ONLINE_KINDS = ("kd", "sampled_rkl", "teacher_topk") + CROSS_TOKENIZER_KINDS


@dataclass
class CacheConfig:
    """The teacher cache that ``fastkd cache`` writes and ``kind = "sparse"`` reads."""

    path: str = field(default="", metadata={"path": True})
    method: Literal["random", "topk"] = "random"
    # Draws per token (random) ...
    num_samples: int = field(default=50, metadata={"range": (1, 2**31 - 1)})
    # ... or ids kept per token (topk, its tail mass in a bucket).
    k: int = field(default=12, metadata={"range": (1, 2**31 - 1)})
    seed: int = field(default=0, metadata={"range": (0, 2**64 - 1)})
    # Sequences per teacher forward.
    batch_size: int = field(default=8, metadata={"range": (1, None)})
    shard_tokens: int = field(default=1 << 20, metadata={"range": (1, None)})


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD) with ``objective.kind = "kd"``: per micro-batch, with
    probability ``student_fraction`` (GKD's lambda) the student generates the completions of its
    prompts (a prompt is a sequence's tokens up to its first predicted one: meant for
    prompt/completion data, or at least ``prompt_tokens``); otherwise they are the data's, or
    the teacher's generations with ``teacher_sequences`` (sequence-level KD). Off when
    ``student_fraction`` is 0 and ``teacher_sequences`` false."""

    student_fraction: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    teacher_sequences: bool = False
    # Sampling of the generations: softmax temperature, nucleus mass, completion tokens at most
    # (and no more than the sequence length leaves after the prompt).
    temperature: float = field(default=1.0, metadata={"range": (2.0**-126, 2.0**126)})
    top_p: float = field(default=1.0, metadata={"range": (0.0, 1.0), "low_open": True})
    max_new_tokens: int = field(default=128, metadata={"range": (1, None)})
    # Prompts of at least this many tokens (at most seq_len - 1): on packed text, whose first
    # token is its only unpredicted one, the generation continues the block's beginning.
    prompt_tokens: int = field(default=1, metadata={"range": (1, None)})

    # "fixed": the student's share is student_fraction throughout (GKD). "adaptive": DistiLLM's
    # schedule: the share starts at student_fraction and grows by adaptive_step (up to 1) after
    # each evaluation whose held-out CE is at least adaptive_tolerance above the last reference;
    # student generations are kept in a replay buffer of buffer_size sequences and reused.
    schedule: Literal["fixed", "adaptive"] = "fixed"
    adaptive_step: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    adaptive_tolerance: float = field(default=0.1, metadata={"range": (0.0, None)})
    buffer_size: int = field(default=1000, metadata={"range": (1, None)})
    # The fresh generations' share of the student's: "decreasing" from all to none over the
    # run, "constant" half, "increasing" from none to all; the rest replays the buffer.
    replay: Literal["decreasing", "constant", "increasing"] = "decreasing"

    @property
    def enabled(self) -> bool:
        return self.student_fraction > 0 or self.teacher_sequences or self.schedule == "adaptive"


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata={"range": (1, None)})
    # Sequences per micro-batch on each rank; an optimizer step takes
    # micro_batch_size * grad_accum * world_size sequences.
    micro_batch_size: int = field(default=8, metadata={"range": (1, None)})
    grad_accum: int = field(default=1, metadata={"range": (1, None)})
    lr: float = field(default=3e-4, metadata={"range": (0.0, None)})
    weight_decay: float = field(default=0.01, metadata={"range": (0.0, None)})
    adam_beta1: float = field(default=0.9, metadata={"range": (0.0, 1.0), "high_open": True})
    adam_beta2: float = field(default=0.95, metadata={"range": (0.0, 1.0), "high_open": True})
    adam_eps: float = field(default=1e-8, metadata={"range": (0.0, None)})
    warmup_steps: int = field(default=0, metadata={"range": (0, None)})
    # Linear warmup to lr over warmup_steps, then a cosine decay reaching min_lr_ratio * lr at
    # the last step.
    min_lr_ratio: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    # Gradient clipping by global norm; None or 0 turns it off.
    max_grad_norm: float | None = field(default=1.0, metadata={"range": (0.0, None)})
    seed: int = field(default=0, metadata={"range": (0, 2**63 - 1)})
    compile: bool = False
    # "auto": bfloat16 autocast on a GPU that supports it, float32 elsewhere.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Under torchrun: "auto" is DDP; "fsdp" shards the student with FSDP2 (fully_shard).
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


@dataclass
class EvalConfig:
    # Evaluate every this many steps (0: only at the end).
    every: int = field(default=0, metadata={"range": (0, None)})
    # Held-out sequences per evaluation batch, and at most this many batches (0: all).
    batch_size: int = field(default=8, metadata={"range": (1, None)})
    max_batches: int = field(default=0, metadata={"range": (0, None)})
    # Bins of the expected calibration error.
    ece_bins: int = field(default=15, metadata={"range": (1, None)})
    # With model.teacher set, also KL(teacher || student) and top-1 agreement; for "ce" and
    # "sparse" runs this loads the teacher (on every rank) for evaluation only.
    teacher_metrics: bool = True


@dataclass
class CheckpointConfig:
    # Save every this many steps (0: only at the end and on SIGINT/SIGTERM).
    every: int = field(default=0, metadata={"range": (0, None)})
    # Checkpoints kept (the newest ones).
    keep: int = field(default=2, metadata={"range": (1, None)})
    # "auto" resumes from the output folder's latest checkpoint when there is one.
    resume: Literal["auto", "never"] = "auto"


@dataclass
class OutputConfig:
    dir: str = field(default="fastkd-run", metadata={"path": True})
    # Log a step's line every this many steps (the JSONL log has every step).
    log_every: int = field(default=1, metadata={"range": (1, None)})
    progress: bool = True
    plots: bool = True
