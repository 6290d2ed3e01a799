"""The configuration of ``fastkd distill``, ``fastkd cache`` and ``fastkd eval``: one file (TOML or
YAML) plus ``--set section.key=value`` overrides, checked in full before anything runs.

A config is a tree of sections, each a dataclass below; ``Config.from_dict`` validates it: an
unknown key names the closest valid one, a bad value names the key, the value and what is
allowed, and a path that must exist names the path. ``Config.to_dict`` is the resolved config
that a run writes to its output folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CROSS_TOKENIZER_KINDS",
    "CacheConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OutputConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A config that cannot run: the message names the key, the value and what is allowed."""


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, tree: dict, *, base_dir: str = ".", check_paths: bool = True) -> "Config":
        """The config ``tree`` (nested dicts) checked and filled with defaults. Relative paths
        are taken relative to ``base_dir`` (the config file's folder)."""
        config = _build(cls, tree, "", base_dir)
        config.check(check_paths=check_paths)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, *, check_paths: bool = True) -> None:
        """Checks across keys; with ``check_paths``, that every path read exists."""
        from ..divergences import DIVERGENCES

        if self.objective.divergence not in DIVERGENCES:
            raise ConfigError(
                _bad(
                    "objective.divergence",
                    self.objective.divergence,
                    f"one of {sorted(DIVERGENCES)}",
                )
            )
        if not self.model.student:
            raise ConfigError("model.student is required: a local model directory or a config.json")
        if not self.data.train:
            raise ConfigError("data.train is required: text (.txt) or .jsonl files or folders")
        kind = self.objective.kind
        if kind in ONLINE_KINDS and not self.model.teacher:
            raise ConfigError(
                f'objective.kind = "{kind}" needs model.teacher (an online '
                f'teacher); use kind = "ce" without one, or "sparse" with a cache'
            )
        if self.model.teacher_tokenizer and kind not in CROSS_TOKENIZER_KINDS + ("ce",):
            raise ConfigError(
                f"model.teacher_tokenizer gives the teacher a tokenizer of its own: "
                f"objective.kind must be one of {', '.join(CROSS_TOKENIZER_KINDS)} (they align "
                f'the two tokenizations) or "ce" (the teacher unused); got kind = "{kind}", '
                f"which compares the models on one vocabulary"
            )
        if kind in ("sampled_rkl", "teacher_topk") and self.objective.temperature != 1.0:
            raise ConfigError(
                f"objective.temperature = {self.objective.temperature!r}: kind = "
                f'"{kind}" compares the models at temperature 1'
            )
        if kind == "sampled_rkl":
            if self.objective.hard_weight > 0:
                raise ConfigError(
                    "objective.hard_weight applies to kinds with a cross-entropy "
                    "term (kd, sparse, teacher_topk); on the student's own "
                    "samples there is no data label to learn"
                )
            o = self.onpolicy
            if o.student_fraction != 1.0 or o.schedule != "fixed":
                raise ConfigError(
                    f'objective.kind = "sampled_rkl" estimates KL(student || '
                    f"teacher) from the student's own samples: set "
                    f'onpolicy.student_fraction = 1 with schedule = "fixed" '
                    f'(got {o.student_fraction} and "{o.schedule}")'
                )
            if o.temperature != 1.0 or o.top_p != 1.0:
                raise ConfigError(
                    f'objective.kind = "sampled_rkl" needs samples from the '
                    f"student's distribution itself: onpolicy.temperature = 1 and "
                    f"top_p = 1 (got {o.temperature} and {o.top_p})"
                )
        if self.objective.kind == "ce" and self.objective.hard_weight > 0:
            raise ConfigError(
                'objective.hard_weight applies to kind = "kd" or "sparse"; '
                'kind = "ce" is the hard loss alone'
            )
        if self.objective.kind in ("ce", "sparse") and self.objective.temperature != 1.0:
            raise ConfigError(
                f"objective.temperature = {self.objective.temperature!r} applies to "
                f'kind = "kd" (both models\' softmax); a {self.objective.kind} '
                f"run's targets are at temperature 1 (the data's tokens, or the "
                f"cache's samples of the teacher's distribution)"
            )
        if self.objective.kind == "sparse" and not self.cache.path:
            raise ConfigError(
                'objective.kind = "sparse" needs cache.path (written by `fastkd cache`)'
            )
        if kind in CROSS_TOKENIZER_KINDS and self.onpolicy.enabled:
            raise ConfigError(
                f'objective.kind = "{kind}" is offline: the teacher scores the data\'s text '
                f"under its own tokenizer; on-policy generation (onpolicy.student_fraction, "
                f"teacher_sequences) is not supported with it"
            )
        if kind == "ot" and self.objective.temperature != 1.0:
            raise ConfigError(
                f"objective.temperature = {self.objective.temperature!r}: kind = "
                f'"ot" compares hidden states, not distributions'
            )
        if self.onpolicy.enabled and self.objective.kind not in ONLINE_KINDS:
            raise ConfigError(
                f"onpolicy (student_fraction = {self.onpolicy.student_fraction}, "
                f"teacher_sequences = {self.onpolicy.teacher_sequences}) needs an "
                f"online teacher to score the generated completions: "
                f"objective.kind one of {', '.join(ONLINE_KINDS)}; got kind = "
                f'"{self.objective.kind}"'
            )
        if self.onpolicy.schedule == "adaptive":
            if self.onpolicy.buffer_size < self.train.micro_batch_size:
                raise ConfigError(
                    f"onpolicy.buffer_size = {self.onpolicy.buffer_size} must hold "
                    f"a micro-batch (train.micro_batch_size = "
                    f"{self.train.micro_batch_size}): a replayed micro-batch is "
                    f"drawn from it"
                )
            if not self.eval.every:
                raise ConfigError(
                    'onpolicy.schedule = "adaptive" follows the held-out loss: set eval.every > 0'
                )
        if not check_paths:
            return
        paths = [
            ("model.student", self.model.student),
            ("model.teacher", self.model.teacher),
            ("model.tokenizer", self.model.tokenizer),
            ("model.teacher_tokenizer", self.model.teacher_tokenizer),
        ]
        paths += [(f"data.train[{i}]", p) for i, p in enumerate(self.data.train)]
        paths += [(f"data.eval[{i}]", p) for i, p in enumerate(self.data.eval)]
        for key, path in paths:
            if path and not os.path.exists(path):
                raise ConfigError(f"{key}: no such file or directory: {path}")


# ---- building and checking ---------------------------------------------------------------


def _bad(key: str, value, allowed: str) -> str:
    return f"{key} = {value!r} is not allowed: expected {allowed}"


def _check_value(key: str, value, annotation, meta: dict, base_dir: str):
    """``value`` converted to the field's type, or ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is _union_type()):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0], meta, base_dir)
    if origin is Literal:
        if value not in args:
            raise ConfigError(_bad(key, value, "one of " + ", ".join(repr(a) for a in args)))
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(_bad(key, value, "a list"))
        return [
            _check_value(f"{key}[{i}]", v, args[0], meta, base_dir) for i, v in enumerate(value)
        ]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(_bad(key, value, "true or false"))
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(_bad(key, value, "an integer" + _range_text(meta)))
        _check_range(key, value, meta)
        return value
    if annotation is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(_bad(key, value, "a finite number" + _range_text(meta)))
        _check_range(key, float(value), meta)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(_bad(key, value, "a string"))
        if meta.get("path") and value:
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        return value
    raise TypeError(f"unsupported config type {annotation!r} of {key}")


def _union_type():
    import types

    return types.UnionType


def _range_text(meta: dict) -> str:
    low, high = meta.get("range", (None, None))
    if low is None and high is None:
        return ""
    if high is None:
        return f" >= {low}"
    opening = "(" if meta.get("low_open") else "["
    return f" in {opening}{low}, {high}{')' if meta.get('high_open') else ']'}"


def _check_range(key: str, value, meta: dict) -> None:
    low, high = meta.get("range", (None, None))
    above = high is not None and (value >= high if meta.get("high_open") else value > high)
    below = low is not None and (value <= low if meta.get("low_open") else value < low)
    if below or above:
        raise ConfigError(_bad(key, value, "a number" + _range_text(meta)))


def _closest(key: str, options: list[str]) -> str | None:
    """The valid key ``key`` most likely meant: one that begins the other (``lr_rate`` ->
    ``lr``), else the closest spelling."""
    prefixed = [o for o in options if key.startswith(o) or o.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return close[0] if close else None


def _build(cls, tree, prefix: str, base_dir: str):
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the config'} must be a table of keys; got {tree!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = _closest(str(key), list(fields))
            hint = (
                f"; did you mean {prefix}{close}?"
                if close
                else f"; valid keys: {', '.join(prefix + f for f in fields)}"
            )
            raise ConfigError(f"unknown key {full}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = _build(annotation, value, f"{full}.", base_dir)
        else:
            values[key] = _check_value(
                full, value, annotation, dict(fields[key].metadata), base_dir
            )
    return cls(**values)


# ---- files and overrides ------------------------------------------------------------------


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(
                f"{path} is YAML, which needs PyYAML (pip install pyyaml); or "
                f"write the config as TOML"
            ) from exc
        with open(path, encoding="utf-8") as f:
            try:
                tree = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        return tree or {}
    with open(path, "rb") as f:
        try:
            return _toml().load(f)
        except _toml().TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _toml():
    # tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib

    return tomllib


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-3", "data.train=['a.txt']"]`` as a nested dict. A value is read as a
    TOML value where it parses as one (numbers, booleans, strings in quotes, lists), else as a
    bare string."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set takes section.key=value; got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
        try:
            value: Any = _toml().loads(f"v = {text}")["v"]
        except _toml().TOMLDecodeError:
            value = text
        if text.strip().lower() in ("none", "null"):
            value = None
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    source: str | os.PathLike | dict | Config | None = None,
    overrides: list[str] | dict | None = None,
    *,
    check_paths: bool = True,
) -> Config:
    """A checked ``Config`` from a config file (TOML, or YAML by its extension), a nested dict,
    a ``Config`` or None (the defaults), with ``overrides`` (``--set`` strings or a nested dict)
    applied. Relative paths are taken from the config file's folder, those given in
    ``overrides`` included; without a file, from the current directory."""
    base_dir = os.getcwd()
    if isinstance(source, Config):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = source
    elif source is None:
        tree = {}
    else:
        path = os.fspath(source)
        tree = _read_file(path)
        base_dir = os.path.dirname(os.path.abspath(path))
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        tree = _merge(tree, extra)
    return Config.from_dict(tree, base_dir=base_dir, check_paths=check_paths)
