"""The `fastkd` command: info, a tiny benchmark, and a short demo run."""

import json

import pytest
import torch

from fastkd.cli import main


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_kernels"] is True


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["bench", "kd_loss", "--device", "cpu", "--rows", "8", "--vocab", "50",
                 "--divergence", "jsd", "--warmup", "0", "--reps", "1", "--out", str(out),
                 "--markdown", str(md)]) == 0
    table = capsys.readouterr().out
    for impl in ("fastkd[cpu]", "torch eager", "torch.compile"):
        assert impl in table
    payload = json.loads(out.read_text())
    results = payload["cases"][0]["results"]
    assert all(r["error"] is None and r["time_ms"] > 0 for r in results)
    assert md.read_text().startswith("### kd_loss jsd")


def test_demo_distills(capsys):
    assert main(["demo", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl"):
        assert f"\n{name} " in out


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "--steps: must be an integer >= 1; got 0"),
    (["demo", "--steps", "-5"], "--steps: must be an integer >= 1; got -5"),
    (["demo", "--steps", "x"], "--steps: 'x' is not an integer"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["bench", "--rows", "0"], "--rows: must be an integer >= 1"),
    (["bench", "--divergence", "kl"], "invalid choice: 'kl'"),
    (["bench", "sinkhorn", "--eps-scaling", "2"], r"--eps-scaling: must be a finite number in"),
    (["bench", "--beta", "nan"], "--beta: must be a finite number in [0.0, 1.0]"),
    (["bench", "--device", "tpu"], "--device: 'tpu' is not a torch device"),
    (["bench", "--device", "meta"], "--device: fastkd runs on cpu or cuda devices"),
])
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
