"""The `fastkd` command: info, a tiny benchmark, and a short demo run."""

import json

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
