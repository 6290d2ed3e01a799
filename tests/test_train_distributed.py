"""fastkd distill under torchrun: two CPU processes (gloo) with DDP and with FSDP2 train like one
process taking the same sequences per step, with the tokens counted over both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fastkd.train import distill  # noqa: E402
from fastkd.train.report import read_jsonl  # noqa: E402

_SCRIPT = """
import json, sys
from fastkd.train import distill
with open(sys.argv[1]) as f:
    distill(json.load(f))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, tree: dict, nproc: int) -> None:
    config = tmp_path / f"config-{nproc}-{tree['train']['distributed']}.json"
    config.write_text(json.dumps(tree))
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def _result(out: str):
    from safetensors.torch import load_file

    losses = [r["loss"] for r in read_jsonl(os.path.join(out, "log.jsonl"))]
    return losses, load_file(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.slow  # 2 cases, 41 s of the full run's 1,025 s
def test_two_ranks_train_like_one_process(tiny, tmp_path, strategy):
    """Also the evaluation: one held-out sequence per batch, an odd count of them, so that one
    rank runs a pass with nothing to count (FSDP's layer forwards are collectives)."""
    steps = {"steps": 3, "micro_batch_size": 2}
    evaluation = {"batch_size": 1, "max_batches": 0}
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "completion":
                                            f" return x + {i}"}) + "\n" for i in range(3)))
    data = {"eval": [str(held_out)]}
    single = str(tmp_path / "single")
    distill(tiny.config(single, train={**steps, "grad_accum": 2}, eval=evaluation, data=data,
                        objective={"kind": "kd", "divergence": "jsd"}))
    multi = str(tmp_path / f"two-{strategy}")
    _torchrun(tmp_path, tiny.config(multi, train={**steps, "grad_accum": 1,
                                                  "distributed": strategy}, eval=evaluation,
                                    data=data, objective={"kind": "kd", "divergence": "jsd"}), 2)
    (l1, p1), (l2, p2) = _result(single), _result(multi)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    assert p1.keys() == p2.keys()
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=1e-4, atol=1e-6, msg=key)
    one, two = (json.loads(open(os.path.join(out, "results.json")).read())["eval"]
                for out in (single, multi))
    assert two["tokens"] == one["tokens"] > 0
    for key in ("ce", "kl", "agreement", "ece"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
