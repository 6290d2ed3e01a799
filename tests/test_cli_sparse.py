"""`fastkd bench sparse_kd_loss` and `fastkd bench sample_teacher`: tiny CPU benchmarks."""

import json

import pytest

from fastkd.cli import main


def _bench(op, tmp_path, capsys, *extra):
    """Runs ``fastkd bench OP`` on a tiny CPU case; returns (printed table, markdown, results by
    impl)."""
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "bench",
                op,
                "--device",
                "cpu",
                "--rows",
                "64",
                "--vocab",
                "500",
                "--num-samples",
                "20",
                "--warmup",
                "0",
                "--reps",
                "1",
                "--out",
                str(out),
                "--markdown",
                str(md),
                *extra,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    [case] = json.loads(out.read_text())["cases"]
    assert case["case"]["num_samples"] == 20
    return table, md.read_text(), {r["impl"]: r for r in case["results"]}


@pytest.mark.slow  # 46 s of the full run's 1,025 s
def test_bench_sparse_kd_loss_writes_a_table_and_json(tmp_path, capsys):
    table, md, results = _bench("sparse_kd_loss", tmp_path, capsys)
    assert md.startswith("### sparse_kd_loss N=20 rows=64 V=500")
    assert "| teacher bytes/token |" in table
    for impl in (
        "fastkd[cpu]",
        "torch eager (sparse)",
        "torch.compile (sparse)",
        "fastkd kd_loss (dense)",
    ):
        assert impl in table
        r = results[impl]
        assert r["error"] is None and r["time_ms"] > 0 and r["fwd_ms"] > 0
        assert float(r["extra"]["teacher bytes/token"]) > 0
    # Sparse targets of 20 draws take far less than the dense bf16 row of V x 2 bytes.
    assert results["fastkd kd_loss (dense)"]["extra"]["teacher bytes/token"] == "1000"
    assert float(results["fastkd[cpu]"]["extra"]["teacher bytes/token"]) < 1000


@pytest.mark.slow  # 27 s of the full run's 1,025 s
def test_bench_sample_teacher_writes_a_table_and_json(tmp_path, capsys):
    table, md, results = _bench("sample_teacher", tmp_path, capsys)
    assert md.startswith("### sample_teacher N=20")
    for impl in ("fastkd[cpu]", "torch softmax+multinomial"):
        assert impl in table
        assert results[impl]["error"] is None and results[impl]["time_ms"] > 0


def test_bench_priority_sampling(tmp_path, capsys):
    table, md, results = _bench(
        "sample_teacher", tmp_path, capsys, "--method", "priority", "--k", "16"
    )
    assert md.startswith("### sample_teacher priority k=16 rows=64 V=500")
    for impl in ("fastkd[cpu]", "torch softmax+rand+topk"):
        assert impl in table
        assert results[impl]["error"] is None and results[impl]["time_ms"] > 0
