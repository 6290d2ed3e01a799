"""The configuration of ``fastkd distill``, ``fastkd cache`` and ``fastkd eval``: one file (TOML or
YAML) plus ``--set section.key=value`` overrides, checked in full before anything runs.

A config is a tree of sections, each a dataclass (``config_sections``); ``Config`` holds them,
and ``Config.from_dict`` validates it: an unknown key names the closest valid one, a bad value
names the key, the value and what is allowed (``config_build``), a combination of keys that
cannot run names them, and a path that must exist names the path. ``load_config`` reads a file
and overrides (``config_files``) into a checked ``Config``. ``Config.to_dict`` is the resolved
config that a run writes to its output folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .config_build import ConfigError, _bad, _build
from .config_files import _merge, _read_file, parse_overrides
from .config_sections import (
    CROSS_TOKENIZER_KINDS,
    ONLINE_KINDS,
    CacheConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OnPolicyConfig,
    OutputConfig,
    TrainConfig,
)

__all__ = [
    "CROSS_TOKENIZER_KINDS",
    "ONLINE_KINDS",
    "CacheConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OnPolicyConfig",
    "OutputConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
]


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
