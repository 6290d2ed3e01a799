"""`fastkd bench sinkhorn`: a tiny CPU run of the benchmark's table and JSON."""

import importlib.util
import json

import pytest

from fastkd.cli import main


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow  # 9 s of the full run's 1,025 s
def test_bench_sinkhorn_writes_a_table_and_json(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "bench",
                "sinkhorn",
                "--device",
                "cpu",
                "--batch",
                "3",
                "--n",
                "8",
                "--m",
                "6",
                "--max-iters",
                "30",
                "--pot-limit",
                "2",
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
    assert md.read_text().startswith("### sinkhorn B=3 n=8 m=6 d=8 eps=0.05")
    assert "| time / fastkd best | iters (mean) | converged |" in table
    [case] = json.loads(out.read_text())["cases"]
    assert case["case"]["batch"] == 3 and case["case"]["pot_limit"] == 2
    results = {r["impl"]: r for r in case["results"]}

    rows = ["fastkd[cpu]", "plain PyTorch batched (fastkd[torch])"]
    if _installed("ot"):
        rows += [
            "POT sinkhorn_log loop f64 [first 2 of 3, time x1.5]",
            "POT sinkhorn_log loop f32 [first 2 of 3, time x1.5]",
        ]
        if _installed("ot.batch"):
            rows.append("POT solve_batch (torch f32)")
        assert "Same problem? <P, C> of problem 0" in table
    if _installed("geomloss"):
        rows += [
            "GeomLoss S_eps debiased, scaling=0.5",
            "GeomLoss OT_eps (debias=False), scaling=0.5",
        ]
    assert list(results) == rows
    for impl in rows:
        assert f"| {impl} |" in table
        r = results[impl]
        assert r["error"] is None and r["time_ms"] > 0
        assert float(r["extra"]["iters (mean)"]) > 0
    # The problems are easy: fastkd meets its own rule on all three within the cap.
    assert results["fastkd[cpu]"]["extra"]["time / fastkd best"] == "1.00x"
    assert results["fastkd[cpu]"]["extra"]["converged"] == "1.000"


@pytest.mark.slow  # 3 s of the full run's 1,025 s
def test_bench_sinkhorn_peers_and_eps_scaling(capsys):
    assert (
        main(
            [
                "bench",
                "sinkhorn",
                "--device",
                "cpu",
                "--batch",
                "2",
                "--n",
                "5",
                "--m",
                "7",
                "--eps",
                "0.01",
                "--eps-scaling",
                "0.5",
                "--max-iters",
                "40",
                "--peers",
                "torch",
                "--warmup",
                "0",
                "--reps",
                "1",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.startswith("### sinkhorn B=2 n=5 m=7 d=8 eps=0.01 eps_scaling=0.5")
    assert "| fastkd[cpu] |" in table and "| plain PyTorch batched (fastkd[torch]) |" in table
    rows = table.split("\n\n")[1]
    assert "POT" not in rows and "GeomLoss" not in rows
