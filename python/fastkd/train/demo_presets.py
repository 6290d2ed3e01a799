"""What ``fastkd demo`` trains: the sizes of each preset (corpus, vocabulary, teacher and
student, steps, learning rates) and the runs of its results table (the students' objectives,
on-policy settings and teacher caches, and the cross-tokenizer rows).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "DemoPreset"]


@dataclass(frozen=True)
class DemoPreset:
    corpus_chars: int
    vocab_size: int
    seq_len: int
    teacher: dict  # LlamaConfig sizes
    student: dict
    teacher_steps: int
    student_steps: int
    micro_batch_size: int
    teacher_lr: float
    student_lr: float
    eval_every: int


PRESETS = {
    # Sized to finish in about seven minutes on two CPU cores: a 1.6M-parameter teacher (0.37 s
    # per training step of 2048 tokens there) over about 1.7 epochs of the corpus.
    "small": DemoPreset(
        corpus_chars=1_200_000,
        vocab_size=2048,
        seq_len=128,
        teacher=dict(
            hidden_size=160,
            intermediate_size=448,
            num_hidden_layers=3,
            num_attention_heads=5,
            num_key_value_heads=5,
        ),
        student=dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        teacher_steps=250,
        student_steps=120,
        micro_batch_size=16,
        teacher_lr=2e-3,
        student_lr=3e-3,
        eval_every=40,
    ),
    # For a GPU: a teacher of ~30M parameters, a student of ~5M.
    "medium": DemoPreset(
        corpus_chars=8_000_000,
        vocab_size=8192,
        seq_len=256,
        teacher=dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
        student=dict(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
        teacher_steps=2000,
        student_steps=800,
        micro_batch_size=32,
        teacher_lr=1e-3,
        student_lr=2e-3,
        eval_every=100,
    ),
    "large": DemoPreset(
        corpus_chars=40_000_000,
        vocab_size=32000,
        seq_len=512,
        teacher=dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        student=dict(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
        teacher_steps=6000,
        student_steps=2000,
        micro_batch_size=32,
        teacher_lr=6e-4,
        student_lr=1.5e-3,
        eval_every=250,
    ),
}

# (run name, objective overrides, cache, onpolicy overrides); the students' table rows, in
# order. The on-policy row's prompts are the first half of each block, the student's
# generations (half the micro-batches) its second half.
_STUDENT_RUNS = [
    ("ce", {"kind": "ce"}, None, {}),
    ("kd fkl", {"kind": "kd", "divergence": "fkl"}, None, {}),
    ("kd jsd 0.5", {"kind": "kd", "divergence": "jsd", "beta": 0.5}, None, {}),
    (
        "gkd jsd 0.5, λ 0.5",
        {"kind": "kd", "divergence": "jsd", "beta": 0.5},
        None,
        {"student_fraction": 0.5, "prompt_tokens": "half", "max_new_tokens": "half"},
    ),
    (
        "on-policy sampled rkl",
        {"kind": "sampled_rkl"},
        None,
        {"student_fraction": 1.0, "prompt_tokens": "half", "max_new_tokens": "half"},
    ),
    ("sparse random 50", {"kind": "sparse"}, "random50", {}),
    ("sparse top-12", {"kind": "sparse"}, "top12", {}),
]
# The cross-tokenizer rows: a student with a byte-level BPE of its own (another size, trained on
# the same corpus) distilled from the same teacher, each loss mixed half and half with the
# student's cross-entropy (hidden-state OT alone carries nothing of the vocabulary), next to its
# cross-entropy alone.
_CROSS_TOKENIZER_RUNS = [
    ("own tokenizer: ce", {"kind": "ce"}),
    ("own tokenizer: uld + ce", {"kind": "uld", "hard_weight": 0.5}),
    ("own tokenizer: gold + ce", {"kind": "gold", "hard_weight": 0.5}),
    ("own tokenizer: gold hybrid + ce", {"kind": "gold_hybrid", "hard_weight": 0.5}),
    ("own tokenizer: alm + ce", {"kind": "alm", "hard_weight": 0.5}),
    ("own tokenizer: ot + ce", {"kind": "ot", "hard_weight": 0.5}),
]
_CACHES = {
    "random50": {"method": "random", "num_samples": 50},
    "top12": {"method": "topk", "k": 12},
}
