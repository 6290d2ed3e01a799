"""`fastkd bench fused_linear_kd_loss`: a tiny CPU benchmark per kind of teacher."""

import json

import pytest

from fastkd.cli import main


@pytest.mark.parametrize("teacher", ["online", "offline"])
@pytest.mark.slow  # 2 cases, 74 s of the full run's 1,025 s
def test_bench_fused_linear_writes_a_table_and_json(tmp_path, capsys, teacher):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "bench",
                "fused_linear_kd_loss",
                "--device",
                "cpu",
                "--rows",
                "64",
                "--hidden",
                "32",
                "--vocab",
                "500",
                "--teacher",
                teacher,
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
    payload = json.loads(out.read_text())
    [case] = payload["cases"]
    assert case["case"]["teacher"] == teacher and case["case"]["hidden"] == 32
    results = {r["impl"]: r for r in case["results"]}
    for impl in ("fastkd[cpu]", "torch eager", "torch.compile"):
        assert impl in table
        assert results[impl]["error"] is None and results[impl]["time_ms"] > 0
    assert md.read_text().startswith(f"### fused_linear_kd_loss jsd {teacher} teacher")


def test_bench_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no_such_op", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "fused_linear_kd_loss" in capsys.readouterr().err
