"""Smoke test of an installed fastkd: every public op on CPU, each backend that is available,
against the plain-PyTorch path on small inputs, forward and backward.

    python tools/smoke_test.py        # run from outside the source tree to test the wheel

Prints the build report and one line per check; exits non-zero on any failure. Meant for a
wheel installed into a fresh environment (a torch version other than the one it was built
with, another Triton), not as a replacement for the test suite.
"""

from __future__ import annotations

import os
import sys
import traceback

if not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastkd  # noqa: E402


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=what)


def _loss_and_grad(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def check_kd_loss(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 37, generator=g), torch.randn(6, 37, generator=g)
    labels = torch.tensor([1, -100, 3, 4, 5, 6])
    for name in fastkd.DIVERGENCES:

        def loss(x, on, name=name):
            return fastkd.kd_loss(x, t, labels=labels, divergence=name, backend=on)

        ours = _loss_and_grad(lambda x: loss(x, backend), s)
        ref = _loss_and_grad(lambda x: loss(x, "torch"), s)
        _close(ours[0], ref[0], f"kd_loss {name} value")
        _close(ours[1][0], ref[1][0], f"kd_loss {name} gradient")


def check_fused_linear(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(41, 8, generator=g) / 3
    th, tw = torch.randn(2, 5, 12, generator=g), torch.randn(41, 12, generator=g) / 3
    ours = _loss_and_grad(
        lambda a, b: fastkd.fused_linear_kd_loss(
            a, b, th, tw, divergence="jsd", backend=backend, chunk_size=3
        ),
        h,
        w,
    )
    ref = _loss_and_grad(
        lambda a, b: fastkd.kd_loss(a @ b.T, th @ tw.T, divergence="jsd", backend="torch"), h, w
    )
    _close(ours[0], ref[0], "fused_linear_kd_loss value")
    for got, want in zip(ours[1], ref[1]):
        _close(got, want, "fused_linear_kd_loss gradient")


def check_sparse(backend: str) -> None:
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(7, 29, generator=g), torch.randn(7, 29, generator=g)
    targets = fastkd.sample_teacher(t, num_samples=16, seed=3, backend="torch")
    ours = _loss_and_grad(lambda x: fastkd.sparse_kd_loss(x, targets, backend=backend), s)
    ref = _loss_and_grad(lambda x: fastkd.sparse_kd_loss(x, targets, backend="torch"), s)
    _close(ours[0], ref[0], "sparse_kd_loss value")
    _close(ours[1][0], ref[1][0], "sparse_kd_loss gradient")


def check_sample_teacher(backend: str) -> None:
    t = torch.randn(5, 23, generator=torch.Generator().manual_seed(4))
    a = fastkd.sample_teacher(t, num_samples=8, seed=5, backend=backend)
    b = fastkd.sample_teacher(t, num_samples=8, seed=5, backend="torch")
    # The counter-based draws are the same on every backend.
    assert torch.equal(a.ids, b.ids), "sample_teacher ids differ from the torch backend's"
    _close(a.weights, b.weights, "sample_teacher weights")


def check_sinkhorn(backend: str) -> None:
    g = torch.Generator().manual_seed(6)
    cost = torch.rand(3, 9, 11, generator=g)
    ours = _loss_and_grad(lambda c: fastkd.sinkhorn_loss(c, eps=0.2, backend=backend), cost)
    ref = _loss_and_grad(lambda c: fastkd.sinkhorn_loss(c, eps=0.2, backend="torch"), cost)
    _close(ours[0], ref[0], "sinkhorn_loss value")
    _close(ours[1][0], ref[1][0], "sinkhorn_loss gradient")


def check_uld(backend: str) -> None:
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, 31, generator=g), torch.randn(6, 19, generator=g)
    ours = _loss_and_grad(lambda x: fastkd.uld_loss(x, t, backend=backend), s)
    ref = _loss_and_grad(lambda x: fastkd.uld_loss(x, t, backend="torch"), s)
    _close(ours[0], ref[0], "uld_loss value")
    _close(ours[1][0], ref[1][0], "uld_loss gradient")


CHECKS = {
    "kd_loss": check_kd_loss,
    "fused_linear_kd_loss": check_fused_linear,
    "sparse_kd_loss": check_sparse,
    "sample_teacher": check_sample_teacher,
    "sinkhorn": check_sinkhorn,
    "uld_loss": check_uld,
}


def main() -> int:
    info = fastkd.build_info()
    print(
        "build:",
        {
            k: info[k]
            for k in (
                "version",
                "torch",
                "cpu_kernels",
                "cpu_isa",
                "cuda_kernels",
                "cuda_archs",
                "triton",
                "extension_error",
            )
        },
    )
    if not info["cpu_kernels"]:
        print(f"FAIL: the compiled extension did not import: {info['extension_error']}")
        return 1
    failures = 0
    for op, check in CHECKS.items():
        backends = [b for b in fastkd.available_backends(op, "cpu") if b != "torch"]
        for backend in backends:
            try:
                check(backend)
                print(f"ok    {op} [{backend}]")
            except Exception:
                failures += 1
                print(f"FAIL  {op} [{backend}]\n{traceback.format_exc()}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
