"""Knowledge-distillation training: ``fastkd distill``, ``fastkd cache`` and ``fastkd eval``.

Python API: ``distill(config)`` trains a student (``config`` a file path, a nested dict or a
``Config``), ``build_cache(config)`` writes the teacher cache an offline run reads,
``evaluate_run(config)`` evaluates a trained student. ``load_config`` checks a config;
``CausalLM``/``adapt`` wrap a model as final hidden states plus an output head.
"""

from .config import Config, ConfigError, load_config
from .evaluate import evaluate, evaluate_run
from .loop import distill
from .models import CausalLM, Head, adapt, load_causal_lm
from .teacher_cache import build_cache

__all__ = [
    "CausalLM",
    "Config",
    "ConfigError",
    "Head",
    "adapt",
    "build_cache",
    "distill",
    "evaluate",
    "evaluate_run",
    "load_causal_lm",
    "load_config",
]
