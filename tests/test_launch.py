"""Pointer lifetimes: every tensor whose data pointer reaches a native kernel is alive until the
kernel returns.

The native kernels take raw pointers; a pointer taken from a temporary (the contiguous copy of a
transposed input, say) dangled once the temporary was freed, and the kernel read freed memory:
a segfault on large inputs, wrong ids or false errors on small ones. ``ops/_launch.launch`` now
holds the tensors for the call; these tests check that nothing bypasses it and run every native
launcher on layouts that force a copy, in a fresh interpreter (where freed large blocks are
unmapped at once, so a dangling read crashes instead of reading stale data)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import fastkd

PACKAGE = pathlib.Path(fastkd.__file__).parent


def test_pointers_are_taken_only_by_launch():
    """A tensor's ``data_ptr()`` is taken only in ``ops/_launch.py`` (Triton launchers take
    tensors); a storage's, used to tell shared storages apart, is no pointer to a kernel."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_launch.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<!untyped_storage\(\))\.data_ptr\(", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "raw pointers taken outside ops/_launch.py:\n" + "\n".join(offenders)


# Each case: a name, then code that defines `check()` comparing a call on an input that needs a
# copy (transposed, sliced 4-D, column-strided, bf16) with the same call on a contiguous clone.
# 262144 x 8 fp32 is 8 MB: freed, it goes straight back to the OS in a fresh process.
_SCRIPT = r"""
import sys, torch, fastkd
torch.manual_seed(0)
big = torch.randn(262144, 8)
layouts = {
    "transposed": big.t(),                                        # [8, 262144], stride (1, 8)
    "sliced_4d": torch.randn(3, 5, 7, 6000)[:, ::2, 1:, ::2],      # strided columns
    "column_strided": torch.randn(64, 4096)[:, ::2],
    "bf16_transposed": big.t().to(torch.bfloat16),
}
def same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        return
    for x, y in zip(a, b):
        same(x, y)
def run(name, fn):
    print("case", name, flush=True)
    for layout, x in layouts.items():
        print("  layout", layout, flush=True)
        same(fn(x), fn(x.contiguous()))
def fields(targets):
    return targets.ids, targets.weights
run("sample_random", lambda x: fields(fastkd.sample_teacher(x, num_samples=16, backend="cpu")))
run("sample_priority",
    lambda x: fields(fastkd.sample_teacher(x, method="priority", k=16, backend="cpu")))
run("kd_loss", lambda x: fastkd.kd_loss(x, x.flip(-1), divergence="jsd", backend="cpu",
                                        reduction="none"))
def kd_grad(x):
    leaf = x.detach().clone().requires_grad_()
    fastkd.kd_loss(leaf, x.flip(-1), backend="cpu").backward()
    return leaf.grad
run("kd_loss_grad", kd_grad)
def sparse(x):
    t = fastkd.sample_teacher(x.flip(-1).contiguous(), num_samples=8, backend="cpu")
    ids = t.ids.transpose(0, -2).contiguous().transpose(0, -2)       # non-contiguous slots
    t = fastkd.SparseTargets(ids=ids, weights=t.weights, vocab_size=t.vocab_size, num_samples=8)
    return fastkd.sparse_kd_loss(x, t, backend="cpu", reduction="none")
run("sparse_kd_loss", sparse)
run("uld_loss", lambda x: fastkd.uld_loss(x, x.flip(-1)[..., : x.shape[-1] // 2 + 1],
                                          backend="cpu", reduction="none"))
# The lm_head row kernels read chunk logits the GEMM wrote; an identity head makes those logits
# the first 16 columns of x exactly, whatever order the GEMM sums in.
def head(x):
    return torch.eye(16, x.shape[-1], dtype=x.dtype), torch.zeros(x.shape[:-1], dtype=torch.long)
run("fused_linear_logprobs", lambda x: tuple(fastkd.fused_linear_logprobs(
    x, *head(x), with_entropy=True, backend="cpu")))
def topk(x):
    t, log_tail, lse = fastkd.fused_linear_topk(x, head(x)[0], k=3, return_stats=True,
                                                backend="cpu")
    return t.ids, t.weights, log_tail, lse
run("fused_linear_topk", topk)
print("case sinkhorn", flush=True)
cost = torch.rand(64, 40, 48).transpose(1, 2)                     # [64, 48, 40], strided
a = torch.rand(48, 64).t()                                        # [64, 48], transposed
b = torch.rand(64, 80)[:, ::2]                                    # [64, 40], column-strided
a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
r1 = fastkd.sinkhorn(cost, a, b, backend="cpu")
r2 = fastkd.sinkhorn(cost.contiguous(), a.contiguous(), b.contiguous(), backend="cpu")
same((r1.f, r1.g, r1.iters), (r2.f, r2.g, r2.iters))
print("ok", flush=True)
"""


@pytest.mark.skipif(
    "cpu" not in fastkd.available_backends("kd_loss", "cpu"),
    reason="needs the compiled CPU kernels",
)
@pytest.mark.slow  # 8 s of the full run's 1,025 s
def test_native_launchers_on_copied_layouts_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.rstrip().endswith("ok"), (
        f"exit code {out.returncode}\nstdout:\n{out.stdout[-2000:]}\nstderr:\n{out.stderr[-2000:]}"
    )
