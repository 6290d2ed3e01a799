"""The streamed feature cost of fastkd.sinkhorn / sinkhorn_loss (cost computed block by block
from x, y inside every iteration) against the same problems with the cost formed."""

import pytest
import torch

import fastkd
from fastkd.ot import features
from fastkd.ot.features import pairwise_cost

from helpers import FLOAT64_TOL, extra_peak_kb

KINDS = ["l1", "l2", "sqeuclidean", "cosine"]


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of a few rows, so that every path crosses block boundaries.
    monkeypatch.setattr(features, "STREAM_BLOCK_BYTES", 5 * features.BLOCK_TEMPORARIES * 4 * 3 * 20)


def _features(batch, n, m, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, n, d, generator=g, dtype=dtype),
        torch.randn(batch, m, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.slow  # 8 cases, 100 s of the full run's 1,025 s
def test_streamed_equals_formed_cost(small_blocks, kind, dtype):
    x, y = _features(3, 17, 20, 4, seed=1, dtype=dtype)
    opts = dict(eps=0.1, tol=1e-6, return_plan=True, backend="torch")
    streamed = fastkd.sinkhorn(kind, x=x, y=y, stream_cost=True, **opts)
    formed = fastkd.sinkhorn(pairwise_cost(kind, x, y), **opts)
    exact = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(streamed.plan, formed.plan, **exact)
    torch.testing.assert_close(streamed.transport_cost, formed.transport_cost, **exact)
    torch.testing.assert_close(streamed.objective, formed.objective, **exact)
    # In fp32 the blocks' costs round differently from the whole (cdist picks its algorithm by
    # shape), which can move a stop by one check.
    assert (streamed.iters - formed.iters).abs().max() <= (0 if dtype == torch.float64 else 10)


@pytest.mark.slow  # 3 s of the full run's 1,025 s
def test_streamed_ragged_with_garbage_and_eps_scaling(small_blocks):
    x, y = _features(4, 15, 11, 3, seed=2)
    n_sizes = torch.tensor([15, 4, 0, 9])
    m_sizes = torch.tensor([11, 11, 3, 1])
    xg, yg = x.clone(), y.clone()
    for k in range(4):
        xg[k, n_sizes[k] :] = float("nan")
        yg[k, m_sizes[k] :] = float("inf")
    opts = dict(
        eps=0.01,
        eps_scaling=0.5,
        tol=1e-9,
        n_sizes=n_sizes,
        m_sizes=m_sizes,
        return_plan=True,
        backend="torch",
    )
    streamed = fastkd.sinkhorn("sqeuclidean", x=xg, y=yg, stream_cost=True, **opts)
    formed = fastkd.sinkhorn(pairwise_cost("sqeuclidean", x, y), **opts)
    torch.testing.assert_close(streamed.plan, formed.plan, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(streamed.transport_cost, formed.transport_cost)
    assert torch.equal(streamed.iters, formed.iters)
    assert torch.isfinite(streamed.f).all() and torch.isfinite(streamed.g).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["objective", "transport"])
@pytest.mark.slow  # 8 cases, 4 s of the full run's 1,025 s
def test_streamed_gradients_equal_formed(small_blocks, kind, value):
    x, y = _features(2, 13, 9, 5, seed=3)
    a = torch.rand(2, 13, dtype=torch.float64) + 0.2
    a = a / a.sum(1, keepdim=True)
    grads = {}
    for stream in (True, False):
        xs = x.clone().requires_grad_(True)
        ys = y.clone().requires_grad_(True)
        aa = a.clone().requires_grad_(True)
        loss = fastkd.sinkhorn_loss(
            kind,
            aa,
            x=xs,
            y=ys,
            eps=0.2,
            tol=1e-12,
            value=value,
            stream_cost=stream,
            backend="torch",
        )
        w = torch.tensor([1.0, -2.0], dtype=torch.float64)
        grads[stream] = (
            loss,
            *torch.autograd.grad((loss * w).sum(), (xs, ys, aa), allow_unused=True),
        )
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[True][1], grads[False][1], **FLOAT64_TOL)
    torch.testing.assert_close(grads[True][2], grads[False][2], **FLOAT64_TOL)
    if value == "objective":
        torch.testing.assert_close(grads[True][3], grads[False][3], **FLOAT64_TOL)
    else:
        assert grads[True][3] is None and grads[False][3] is None


def test_streamed_unrolled_matches_envelope(small_blocks):
    x, y = _features(1, 8, 6, 3, seed=4)
    out = {}
    for mode in ("envelope", "unrolled"):
        xs = x.clone().requires_grad_(True)
        loss = fastkd.sinkhorn_loss(
            "l2", x=xs, y=y, eps=0.3, tol=1e-12, grad=mode, stream_cost=True
        )
        out[mode] = torch.autograd.grad(loss.sum(), xs)[0]
    torch.testing.assert_close(out["unrolled"], out["envelope"], atol=1e-9, rtol=1e-7)


def test_streaming_choice_and_errors():
    x, y = _features(1, 5, 4, 2, seed=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="streamed feature cost runs on plain PyTorch"):
        fastkd.sinkhorn("l2", x=x, y=y, stream_cost=True, backend="cpu")
    bad = x.clone()
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="features must be finite"):
        fastkd.sinkhorn("l2", x=bad, y=y, stream_cost=True)
    # Small problems form the cost and run the kernels by default.
    r = fastkd.sinkhorn("l2", x=x, y=y)
    assert r.transport_cost.shape == (1,)


_PEAK_SCRIPT = r"""
import sys
import torch
import fastkd

def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

g = torch.Generator().manual_seed(0)
x = torch.randn(1, 6000, 4, generator=g)
y = torch.randn(1, 6000, 4, generator=g)
fastkd.sinkhorn("sqeuclidean", x=x[:, :8], y=y[:, :8], stream_cost=sys.argv[1] == "streamed")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
base = rss_kb("VmRSS")
r = fastkd.sinkhorn("sqeuclidean", x=x, y=y, eps=5.0, max_iters=4, check_every=2,
                    stream_cost=sys.argv[1] == "streamed")
assert bool(torch.isfinite(r.transport_cost).all())
print(rss_kb("VmHWM") - base)
"""


@pytest.mark.slow  # 17 s of the full run's 1,025 s
def test_streamed_peak_memory_below_the_cost():
    """6000 x 6000 points: the formed fp32 cost alone is 144 MB; the streamed solve's peak stays
    below it (blocks of 64 MiB), measured as the peak RSS of a fresh process. glibc's malloc
    keeps freed blocks of this size in its heap once its dynamic mmap threshold has grown past
    them, which would count the allocator's cache as peak: a fixed threshold makes every large
    tensor its own mapping, returned when freed."""
    extra_kb = {
        mode: extra_peak_kb(_PEAK_SCRIPT, mode, {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        for mode in ("streamed", "formed")
    }
    assert extra_kb["formed"] > 144_000, extra_kb
    assert extra_kb["streamed"] < 144_000 / 2, extra_kb
