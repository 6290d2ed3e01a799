"""The demo end to end at a tiny size, and a training run stopped by a signal or killed in the
middle of writing a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from fastkd.train import checkpoint as ckpt  # noqa: E402
from fastkd.train.demo import DemoPreset, run_demo  # noqa: E402
from fastkd.train.report import read_jsonl  # noqa: E402

TINY = DemoPreset(
    corpus_chars=40_000,
    vocab_size=300,
    seq_len=32,
    teacher=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    student=dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    teacher_steps=6,
    student_steps=4,
    micro_batch_size=4,
    teacher_lr=3e-3,
    student_lr=3e-3,
    eval_every=2,
)


@pytest.mark.slow  # 59 s of the full run's 1,025 s
def test_demo_end_to_end_at_a_tiny_size(tmp_path, capsys):
    result = run_demo(out=str(tmp_path), preset=TINY, progress=False)
    runs = [r["run"] for r in result["rows"]]
    assert runs == [
        "teacher",
        "ce",
        "kd fkl",
        "kd jsd 0.5",
        "gkd jsd 0.5, λ 0.5",
        "on-policy sampled rkl",
        "sparse random 50",
        "sparse top-12",
        "own tokenizer: ce",
        "own tokenizer: uld + ce",
        "own tokenizer: gold + ce",
        "own tokenizer: gold hybrid + ce",
        "own tokenizer: alm + ce",
        "own tokenizer: ot + ce",
    ]
    for row in result["rows"][1:8]:
        assert row["ce"] > 0 and 0 <= row["agreement"] <= 1 and row["kl"] >= 0
    # Across tokenizers the teacher's KL and agreement are not defined (two vocabularies).
    for row in result["rows"][8:]:
        assert row["ce"] > 0 and row["kl"] is None and row["agreement"] is None
    assert result["rows"][6]["cache_bytes"] > 0 and result["rows"][7]["cache_bytes"] > 0
    # Every student run reports its peak memory above the process's when it began (Linux RSS):
    # at least its own models' parameters.
    for row in result["rows"][1:]:
        assert row["peak_mb"] is None or row["peak_mb"] > 0, row
    assert all(row["peak_mb"] is not None for row in result["rows"][1:]) or not os.path.exists(
        "/proc/self/clear_refs"
    )
    # The on-policy run recorded where each of its 4 micro-batches' completions came from.
    gkd_log = read_jsonl(os.path.join(result["dir"], "runs", "gkd-jsd-0.5-0.5", "log.jsonl"))
    assert sum(r["completions"]["student"] + r["completions"]["data"] for r in gkd_log) == 4
    folder = result["dir"]
    table = open(os.path.join(folder, "results.md")).read()
    assert "| sparse top-12 |" in table and "cross-entropy alone" in table and "peak MB" in table
    assert "| own tokenizer: ot + ce |" in table and "With its own tokenizer" in table
    assert "held-out CE" in capsys.readouterr().out
    # A second run reuses the teacher, the tokenizer and the caches and gives the same table.
    again = run_demo(out=str(tmp_path), preset=TINY, progress=False)
    assert "reusing the teacher" in capsys.readouterr().out
    assert [r["ce"] for r in again["rows"]] == [r["ce"] for r in result["rows"]]


_RUN = """
import json, os, signal, sys
from fastkd.train import distill, checkpoint
config = json.loads(sys.argv[1])
mode = sys.argv[2]
if mode == "kill":
    real = checkpoint._save_tensors
    calls = []
    def save_then_die(state, path):
        real(state, path)
        calls.append(path)
        if len(calls) == 2:          # in the middle of the second checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._save_tensors = save_then_die
print(json.dumps(distill(config)), flush=True)
"""


def _config(tiny, out, **train):
    return tiny.config(
        out, train={"steps": 40, **train}, checkpoint={"every": 1}, output={"log_every": 1}
    )


@pytest.mark.slow  # 31 s of the full run's 1,025 s
def test_kill_9_while_writing_a_checkpoint_leaves_the_previous_one(tiny, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(_config(tiny, out)), "kill"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = os.path.join(out, "checkpoints")
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step-000001"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), 0)
    assert state["trainer"]["step"] == 1
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(_config(tiny, out, steps=3)), "normal"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["resumed"] and result["step"] == 3


@pytest.mark.slow  # 13 s of the full run's 1,025 s
def test_sigint_stops_after_the_step_with_a_checkpoint(tiny, tmp_path):
    out = str(tmp_path / "run")
    config = tiny.config(out, train={"steps": 10_000})
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN, json.dumps(config), "normal"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = os.path.join(out, "log.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(log) and len(read_jsonl(log)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "SIGINT" and 2 <= result["step"] < 10_000
    latest = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))
    assert os.path.basename(latest) == f"step-{result['step']:06d}"
