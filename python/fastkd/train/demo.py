"""``fastkd demo``: a distillation study end to end on one machine, with nothing downloaded.

1. A corpus from text that ships with Python (the standard library's sources and docstrings),
   split into training and held-out documents.
2. A byte-level BPE tokenizer trained on it.
3. A small Llama-style teacher trained from scratch on the corpus (kept in the output folder and
   reused by later runs).
4. A smaller student distilled several ways from the same initialization and data: cross-entropy
   only (the baseline), online forward KL, online JSD (beta = 0.5), offline from a cache of 50
   random samples per token, offline from a top-12 cache with its tail mass.
5. One results table (held-out CE, KL to the teacher, top-1 agreement, calibration, training
   tokens/s, cache bytes per token) and plots, in the output folder and on the terminal.

Everything is seeded: a second run with the same seed gives the same table (timings aside).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from .report import markdown_table, plot_curves, read_jsonl

__all__ = ["PRESETS", "DemoPreset", "run_demo"]


@dataclass(frozen=True)
class DemoPreset:
    corpus_chars: int
    vocab_size: int
    seq_len: int
    teacher: dict           # LlamaConfig sizes
    student: dict
    teacher_steps: int
    student_steps: int
    micro_batch_size: int
    teacher_lr: float
    student_lr: float
    eval_every: int


PRESETS = {
    # Sized to finish in about five minutes on two CPU cores: a 1.6M-parameter teacher (0.37 s
    # per training step of 2048 tokens there) over about 1.7 epochs of the corpus.
    "small": DemoPreset(corpus_chars=1_200_000, vocab_size=2048, seq_len=128,
                        teacher=dict(hidden_size=160, intermediate_size=448, num_hidden_layers=3,
                                     num_attention_heads=5, num_key_value_heads=5),
                        student=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2),
                        teacher_steps=250, student_steps=120, micro_batch_size=16,
                        teacher_lr=2e-3, student_lr=3e-3, eval_every=40),
    # For a GPU: a teacher of ~30M parameters, a student of ~5M.
    "medium": DemoPreset(corpus_chars=8_000_000, vocab_size=8192, seq_len=256,
                         teacher=dict(hidden_size=512, intermediate_size=1408,
                                      num_hidden_layers=8, num_attention_heads=8,
                                      num_key_value_heads=4),
                         student=dict(hidden_size=192, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=6,
                                      num_key_value_heads=2),
                         teacher_steps=2000, student_steps=800, micro_batch_size=32,
                         teacher_lr=1e-3, student_lr=2e-3, eval_every=100),
    "large": DemoPreset(corpus_chars=40_000_000, vocab_size=32000, seq_len=512,
                        teacher=dict(hidden_size=1024, intermediate_size=2816,
                                     num_hidden_layers=16, num_attention_heads=16,
                                     num_key_value_heads=8),
                        student=dict(hidden_size=384, intermediate_size=1024,
                                     num_hidden_layers=6, num_attention_heads=6,
                                     num_key_value_heads=2),
                        teacher_steps=6000, student_steps=2000, micro_batch_size=32,
                        teacher_lr=6e-4, student_lr=1.5e-3, eval_every=250),
}

# (run name, objective overrides, cache); the students' table rows, in order.
_STUDENT_RUNS = [
    ("ce", {"kind": "ce"}, None),
    ("kd fkl", {"kind": "kd", "divergence": "fkl"}, None),
    ("kd jsd 0.5", {"kind": "kd", "divergence": "jsd", "beta": 0.5}, None),
    ("sparse random 50", {"kind": "sparse"}, "random50"),
    ("sparse top-12", {"kind": "sparse"}, "top12"),
]
_CACHES = {"random50": {"method": "random", "num_samples": 50},
           "top12": {"method": "topk", "k": 12}}


def _say(message: str) -> None:
    print(message, flush=True)


def _write_corpus(path: str, chars: int, seed: int) -> None:
    from .corpus import stdlib_corpus

    if os.path.isfile(path):
        return
    docs = stdlib_corpus(max_chars=chars)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)


def _model_config(path: str, sizes: dict, vocab_size: int, seq_len: int, tokenizer) -> None:
    from transformers import LlamaConfig

    if os.path.isfile(os.path.join(path, "config.json")):
        return
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len,
                         tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **sizes)
    config.save_pretrained(path)


def _base_config(root: str, preset: DemoPreset, seed: int, progress: bool) -> dict:
    return {
        "model": {"tokenizer": os.path.join(root, "tokenizer")},
        "data": {"train": [os.path.join(root, "data", "corpus.jsonl")], "eval_fraction": 0.05,
                 "seq_len": preset.seq_len},
        "train": {"micro_batch_size": preset.micro_batch_size, "warmup_steps": 10,
                  "seed": seed, "weight_decay": 0.01},
        "eval": {"every": preset.eval_every, "batch_size": 32},
        "output": {"progress": progress, "log_every": 10},
    }


def _eval_series(run_dir: str) -> list[tuple[int, float]]:
    path = os.path.join(run_dir, "log.jsonl")
    return [(r["step"], r["eval"]["ce"]) for r in read_jsonl(path) if "eval" in r]


def run_demo(*, out: str = "fastkd-demo", size: str = "small", seed: int = 0,
             progress: bool = True, preset: DemoPreset | None = None) -> dict:
    """Runs the demo into the folder ``out``; returns ``{"rows", "timings", "dir"}``, the
    results table's rows and the seconds of each phase. A teacher, tokenizer or cache already
    in ``out`` (from an earlier run of the same size and seed) is reused. ``preset`` replaces
    the named size's (its folder is then named ``custom``)."""
    from transformers.utils import logging as hf_logging

    from .loop import distill
    from .teacher_cache import build_cache
    from .tokenizer import load_tokenizer, train_bpe_tokenizer

    if preset is None and size not in PRESETS:
        raise ValueError(f"size must be one of {sorted(PRESETS)}; got {size!r}")
    # The demo prints its own progress; per-file loading bars would bury it.
    hf_logging.disable_progress_bar()
    if preset is None:
        preset = PRESETS[size]
    else:
        size = "custom"
    root = os.path.abspath(os.path.join(out, f"{size}-seed{seed}"))
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    timings = {}
    t = time.perf_counter()
    corpus = os.path.join(root, "data", "corpus.jsonl")
    _write_corpus(corpus, preset.corpus_chars, seed)
    tok_dir = os.path.join(root, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        train_bpe_tokenizer(texts, preset.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    timings["corpus and tokenizer"] = time.perf_counter() - t
    _say(f"fastkd demo ({size}): corpus {os.path.getsize(corpus) / 1e6:.1f} MB of Python "
         f"standard-library sources, BPE vocabulary {len(tokenizer)}; output in {root}")

    init = os.path.join(root, "init")
    _model_config(os.path.join(init, "teacher"), preset.teacher, len(tokenizer), preset.seq_len,
                  tokenizer)
    _model_config(os.path.join(init, "student"), preset.student, len(tokenizer),
                  preset.seq_len, tokenizer)
    base = _base_config(root, preset, seed, progress)

    t = time.perf_counter()
    teacher_dir = os.path.join(root, "runs", "teacher")
    teacher_model = os.path.join(teacher_dir, "model")
    if not os.path.isfile(os.path.join(teacher_dir, "results.json")):
        _say(f"training the teacher from scratch ({preset.teacher_steps} steps)")
        distill(base, {"model": {"student": os.path.join(init, "teacher")},
                       "objective": {"kind": "ce"},
                       "train": {"steps": preset.teacher_steps, "lr": preset.teacher_lr},
                       "output": {"dir": teacher_dir}})
    else:
        _say(f"reusing the teacher in {teacher_dir}")
    timings["teacher"] = time.perf_counter() - t
    with open(os.path.join(teacher_dir, "results.json"), encoding="utf-8") as f:
        teacher_eval = json.load(f)["eval"]

    student_base = {**base, "model": {**base["model"], "student": os.path.join(init, "student"),
                                      "teacher": teacher_model},
                    "train": {**base["train"], "steps": preset.student_steps,
                              "lr": preset.student_lr}}
    cache_bytes = {}
    for name, options in _CACHES.items():
        t = time.perf_counter()
        path = os.path.join(root, "caches", name)
        _say(f"writing the teacher cache {name}")
        info = build_cache(student_base, {"cache": {"path": path, **options, "seed": seed}})
        cache_bytes[name] = info["bytes_per_token"]
        timings[f"cache {name}"] = time.perf_counter() - t

    rows = [{"run": "teacher", "ce": teacher_eval["ce"], "ppl": teacher_eval["ppl"],
             "ece": teacher_eval["ece"]}]
    series = {}
    for name, objective, cache in _STUDENT_RUNS:
        t = time.perf_counter()
        run_dir = os.path.join(root, "runs", name.replace(" ", "-"))
        # Students are trained afresh on every run of the demo (the teacher is what is reused).
        shutil.rmtree(run_dir, ignore_errors=True)
        _say(f"student: {name}")
        extra = {"objective": objective, "output": {"dir": run_dir}}
        if cache:
            extra["cache"] = {"path": os.path.join(root, "caches", cache)}
        result = distill(student_base, extra)
        ev = result["eval"]
        rows.append({"run": name, "ce": ev["ce"], "ppl": ev["ppl"], "kl": ev.get("kl"),
                     "agreement": ev.get("agreement"), "ece": ev["ece"],
                     "tokens_per_s": result["tokens_per_s"],
                     "cache_bytes": cache_bytes.get(cache)})
        series[name] = _eval_series(run_dir)
        timings[f"student {name}"] = time.perf_counter() - t

    columns = [("run", "run", ""), ("ce", "held-out CE", ".4f"), ("ppl", "ppl", ".2f"),
               ("kl", "KL(teacher‖student)", ".4f"), ("agreement", "top-1 agreement", ".3f"),
               ("ece", "ECE", ".4f"), ("tokens_per_s", "train tokens/s", ".0f"),
               ("cache_bytes", "cache bytes/token", ".1f")]
    table = markdown_table(rows, columns)
    ce_row = rows[1]
    best = min(rows[2:], key=lambda r: r["ce"])
    verdict = (f"Best distilled student: {best['run']} at held-out CE {best['ce']:.4f} against "
               f"{ce_row['ce']:.4f} for cross-entropy alone "
               f"({'better' if best['ce'] < ce_row['ce'] else 'not better'}).")
    timing_lines = "\n".join(f"- {k}: {v:.0f} s" for k, v in timings.items())
    report = (f"# fastkd demo ({size}, seed {seed})\n\n{table}\n\n{verdict}\n\n"
              f"Timings (this machine):\n{timing_lines}\n")
    with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "timings": timings}, f, indent=1)
    plot_curves(series, os.path.join(root, "students_heldout_ce.png"),
                title="students: held-out cross-entropy", ylabel="nats per token")
    _say("\n" + report)
    return {"rows": rows, "timings": timings, "dir": root}
