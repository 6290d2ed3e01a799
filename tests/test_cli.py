"""The `fastkd` command: info, a tiny benchmark, and a short demo run."""

import importlib.util
import json

import pytest
import torch
from fastkd.cli import main


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_kernels"] is True


@pytest.mark.slow  # 31 s of the full run's 1,025 s
def test_bench_writes_a_table_and_json(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "bench",
                "kd_loss",
                "--device",
                "cpu",
                "--rows",
                "8",
                "--vocab",
                "50",
                "--divergence",
                "jsd",
                "--warmup",
                "0",
                "--reps",
                "1",
                "--out",
                str(out),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    for impl in ("fastkd[cpu]", "torch eager", "torch.compile"):
        assert impl in table
    payload = json.loads(out.read_text())
    results = payload["cases"][0]["results"]
    assert all(r["error"] is None and r["time_ms"] > 0 for r in results)
    assert md.read_text().startswith("### kd_loss jsd")


def test_distill_reports_a_config_error_and_exits_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nstudent = "nope"\n[data]\ntrain = ["x.txt"]\n'
        '[objective]\nkind = "ce"\n[train]\nstpes = 3\n'
    )
    assert main(["distill", str(config)]) == 2
    assert "unknown key train.stpes; did you mean train.steps?" in capsys.readouterr().err
    config.write_text(
        '[model]\nstudent = "nope"\n[data]\ntrain = ["x.txt"]\n[objective]\nkind = "ce"\n'
    )
    assert main(["distill", str(config), "--set", "train.steps=3"]) == 2
    assert "model.student: no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--seed", "-5"], "--seed: must be an integer >= 0; got -5"),
        (["demo", "--seed", "x"], "--seed: 'x' is not an integer"),
        (["demo", "--size", "huge"], "--size: invalid choice: 'huge'"),
        (["bench", "nope"], "invalid choice: 'nope'"),
        (["bench", "--rows", "0"], "--rows: must be an integer >= 1"),
        (["bench", "--divergence", "kl"], "invalid choice: 'kl'"),
        (["bench", "sinkhorn", "--eps-scaling", "2"], r"--eps-scaling: must be a finite number in"),
        (["bench", "--beta", "nan"], "--beta: must be a finite number in [0.0, 1.0]"),
        (["bench", "--device", "tpu"], "--device: 'tpu' is not a torch device"),
        (["bench", "--device", "meta"], "--device: fastkd runs on cpu or cuda devices"),
    ],
)
def test_bad_arguments_name_the_option_and_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_bench_on_cuda_without_cuda_says_what_is_missing(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "CUDA is not available here" in capsys.readouterr().err


@pytest.mark.slow  # 11 s of the full run's 1,025 s
def test_bench_distill_step_agrees_with_its_peers(capsys):
    """The trainer's step and the peers on the same models give the same first-step loss (TRL's
    own generalized JSD where trl is installed)."""
    pytest.importorskip("transformers")
    assert (
        main(
            [
                "bench",
                "distill_step",
                "--device",
                "cpu",
                "--rows",
                "64",
                "--seq-len",
                "32",
                "--vocab",
                "500",
                "--hidden",
                "32",
                "--teacher-hidden",
                "64",
                "--warmup",
                "0",
                "--reps",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    note = out.split("First-step loss (nats per token): ")[1].splitlines()[0]
    values = [float(part.rsplit(" ", 1)[1]) for part in note.removesuffix(".").split(", ")]
    assert len(values) == (3 if importlib.util.find_spec("trl") else 2)
    assert max(values) - min(values) <= 1e-5 * max(values)
    assert "failed" not in out
