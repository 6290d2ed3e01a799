"""fastkd.sinkhorn / sinkhorn_loss against closed forms, POT, the float64 reference, finite
differences, and adversarial inputs, on every backend that runs here (Triton's kernel has its
own interpreter tests in test_sinkhorn_triton.py)."""

import math

import pytest
import torch

import fastkd
from fastkd.ops._registry import backend_spec, kernel_backends
from fastkd.ot import pairwise_cost
from fastkd.reference.sinkhorn import sinkhorn_reference

from helpers import HAS_CUDA, compiled_backends

ot = pytest.importorskip("ot")


def _backends():
    cases = [("cpu", b) for b in compiled_backends("sinkhorn")]
    if HAS_CUDA:
        cases += [
            pytest.param("cuda", b, marks=pytest.mark.gpu)
            for b in kernel_backends("sinkhorn", "cuda")
        ]
    return cases


BACKENDS = _backends()
# (cost dtype, atol on plan entries, rtol on transport cost) against POT in float64, for solves
# to a marginal error of 1e-10 (float64) or 1e-6 (float32; the fp32 potentials also carry
# |C| 2^-24 / eps of rounding in the exponents).
PLAN_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-6, 2e-5)}


def _problem(batch, n, m, *, seed=0, dtype=torch.float64, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, n, m, generator=g, dtype=torch.float64) * scale
    a = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return cost.to(device, dtype), a.to(device, dtype), b.to(device, dtype)


def _normalized64(w):
    """Marginals in float64, renormalized: float32 ones differ in mass by rounding, which leaves
    a float64 solver a marginal error it cannot remove (fastkd rescales b itself)."""
    w = w.double().cpu()
    return w / w.sum(-1, keepdim=True)


def _pot_plan(cost, a, b, eps):
    return torch.from_numpy(
        ot.bregman.sinkhorn_log(
            _normalized64(a).numpy(),
            _normalized64(b).numpy(),
            cost.double().cpu().numpy(),
            eps,
            numItermax=100000,
            stopThr=1e-13,
        )
    )


# ---- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_two_point_closed_form(device, backend):
    # a = b = (1/2, 1/2), C = [[0, 1], [1, 0]], eps = 1: off-diagonal plan sigma(-1) / 2 and
    # <P, C> = sigma(-1) = 0.2689414.
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=device)
    r = fastkd.sinkhorn(cost, eps=1.0, tol=1e-7, return_plan=True, backend=backend)
    sig = 1.0 / (1.0 + math.e)
    assert r.transport_cost.item() == pytest.approx(sig, abs=1e-6)
    assert r.plan[0, 1].item() == pytest.approx(sig / 2, abs=1e-6)
    assert r.plan[0, 0].item() == pytest.approx((1 - sig) / 2, abs=1e-6)
    assert bool(r.converged)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.01, 0.3, 5.0])
def test_separable_cost_plan_is_product(device, backend, eps):
    # C_ij = u_i + v_j: the plan is a b^T for every eps, reached in one iteration.
    _, a, b = _problem(3, 9, 14, seed=1, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(3, 9, generator=gen).to(device)
    v = torch.randn(3, 14, generator=gen).to(device)
    cost = u[:, :, None] + v[:, None, :]
    # Exact after one iteration. In fp32 the potentials hold |f| 2^-24 of rounding, which the
    # exponents (f_i - C_ij)/eps carry divided by eps: the measured marginal error has that
    # floor (~1e-5 at |C| ~ 3, eps = 0.01), so tol sits above it.
    tol = max(1e-6, 8 * cost.abs().max().item() / eps * 2.0**-24)
    r = fastkd.sinkhorn(
        cost, a, b, eps=eps, tol=tol, check_every=1, return_plan=True, backend=backend
    )
    torch.testing.assert_close(r.plan, a[:, :, None] * b[:, None, :], atol=1e-6, rtol=1e-4)
    assert r.iters.tolist() == [1, 1, 1]
    expected = (a * u).sum(1) + (b * v).sum(1)
    torch.testing.assert_close(r.transport_cost, expected, atol=1e-5, rtol=1e-5)
    # KL(P || a b^T) = 0: the objective is the transport cost.
    torch.testing.assert_close(r.objective, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_one_dimensional_w1_as_eps_goes_to_zero(device, backend):
    # Uniform points on a line, cost |x - y|: W1 = mean |sort(x) - sort(y)|. The entropic
    # transport cost exceeds it by at most about eps log(n).
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 1, generator=g)
    y = torch.rand(40, 1, generator=g) * 0.7 + 0.5
    w1 = (x.sort(0).values - y.sort(0).values).abs().mean().item()
    gaps = []
    for eps in (0.05, 0.01, 0.002):
        r = fastkd.sinkhorn(
            "l1",
            x=x.to(device),
            y=y.to(device),
            eps=eps,
            eps_scaling=0.5,
            tol=1e-6,
            max_iters=20000,
            backend=backend,
        )
        assert bool(r.converged)
        gap = r.transport_cost.item() - w1
        assert -1e-4 <= gap <= eps * math.log(40) + 1e-4
        gaps.append(gap)
    assert gaps[-1] < gaps[0]


# ---- against POT ----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (7, 1), (13, 29), (64, 64), (97, 33)])
@pytest.mark.parametrize("eps", [0.05, 0.5])
@pytest.mark.slow  # 36 cases, 6 s of the full run's 1,025 s
def test_matches_pot(device, backend, dtype, n, m, eps):
    if dtype == torch.float64 and not backend_spec("sinkhorn", backend).float64:
        pytest.skip("float64 runs on the torch backend")
    cost, a, b = _problem(3, n, m, seed=n * 1000 + m, dtype=dtype, device=device)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    r = fastkd.sinkhorn(
        cost, a, b, eps=eps, tol=tol, max_iters=20000, return_plan=True, backend=backend
    )
    assert r.converged.all()
    atol, rtol = PLAN_TOL[dtype]
    for k in range(3):
        pot = _pot_plan(cost[k], a[k], b[k], eps)
        torch.testing.assert_close(r.plan[k].double().cpu(), pot, atol=atol, rtol=0)
        value = ot.sinkhorn2(
            _normalized64(a[k]).numpy(),
            _normalized64(b[k]).numpy(),
            cost[k].double().cpu().numpy(),
            eps,
            method="sinkhorn_log",
            numItermax=100000,
            stopThr=1e-13,
        )
        assert r.transport_cost[k].item() == pytest.approx(float(value), rel=rtol, abs=1e-7)
    # Marginals: columns exact after the last column update, rows within tol.
    torch.testing.assert_close(r.plan.sum(1), b.to(r.plan.dtype), atol=10 * atol, rtol=1e-5)
    assert ((r.plan.sum(2) - a).abs().sum(1) <= tol * 1.01 + 1e-6).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.slow  # 2 cases, 4 s of the full run's 1,025 s
def test_against_float64_reference(device, backend):
    cost, a, b = _problem(8, 37, 23, seed=11, dtype=torch.float32, device=device)
    r = fastkd.sinkhorn(cost, a, b, eps=0.05, tol=1e-5, return_plan=True, backend=backend)
    a64, b64 = _normalized64(a), _normalized64(b)
    exact = sinkhorn_reference(
        cost.double(),
        a64.log(),
        b64.log(),
        eps=0.05,
        max_iters=100000,
        tol=1e-11,
        check_every=10,
        return_plan=True,
    )
    torch.testing.assert_close(r.plan.double(), exact.plan, atol=3e-6, rtol=0)
    torch.testing.assert_close(r.transport_cost.double(), exact.transport, atol=1e-5, rtol=1e-5)
    # Potentials up to a constant shift per problem.
    shift = (r.f.double() - exact.f).mean(1, keepdim=True)
    torch.testing.assert_close(r.f.double() - shift, exact.f, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.g.double() + shift, exact.g, atol=1e-4, rtol=0)


@pytest.mark.slow  # 5 s of the full run's 1,025 s
def test_cpu_kernel_follows_reference_iterations():
    # The same loop in fp32: the same iteration counts (up to one check where the error sits
    # within rounding of tol) and eps schedules.
    cost, a, b = _problem(16, 20, 30, seed=5, dtype=torch.float32)
    for kwargs in ({}, {"eps_scaling": 0.6}):
        r_cpu = fastkd.sinkhorn(cost, a, b, eps=0.01, tol=1e-5, backend="cpu", **kwargs)
        r_ref = fastkd.sinkhorn(cost, a, b, eps=0.01, tol=1e-5, backend="torch", **kwargs)
        assert (r_cpu.iters - r_ref.iters).abs().max() <= 10
        assert (r_cpu.iters == r_ref.iters).float().mean() >= 0.8


# ---- ragged batches, masks, layouts ---------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ragged_batch_equals_each_problem_alone(device, backend):
    cost, _, _ = _problem(5, 12, 9, seed=7, dtype=torch.float32, device=device)
    n_sizes = torch.tensor([12, 1, 7, 0, 5])
    m_sizes = torch.tensor([9, 4, 1, 3, 9])
    garbage = cost.clone()
    inside = (torch.arange(12)[None, :, None] < n_sizes[:, None, None]) & (
        torch.arange(9)[None, None, :] < m_sizes[:, None, None]
    )
    garbage[~inside.to(device)] = float("nan")
    r = fastkd.sinkhorn(
        garbage,
        n_sizes=n_sizes,
        m_sizes=m_sizes,
        eps=0.1,
        tol=1e-6,
        return_plan=True,
        backend=backend,
    )
    for k in range(5):
        nk, mk = int(n_sizes[k]), int(m_sizes[k])
        if nk == 0 or mk == 0:
            assert r.iters[k] == 0 and r.transport_cost[k] == 0 and r.objective[k] == 0
            assert (r.plan[k] == 0).all() and (r.f[k] == 0).all() and (r.g[k] == 0).all()
            assert bool(r.converged[k])
            continue
        alone = fastkd.sinkhorn(
            cost[k, :nk, :mk], eps=0.1, tol=1e-6, return_plan=True, backend=backend
        )
        torch.testing.assert_close(r.plan[k, :nk, :mk], alone.plan, atol=1e-7, rtol=1e-5)
        assert (r.plan[k, nk:] == 0).all() and (r.plan[k, :, mk:] == 0).all()
        assert (r.f[k, nk:] == 0).all() and (r.g[k, mk:] == 0).all()
        torch.testing.assert_close(r.transport_cost[k], alone.transport_cost)
        torch.testing.assert_close(r.objective[k], alone.objective)
        assert r.iters[k] == alone.iters


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_weights_mask_entries(device, backend):
    cost, a, b = _problem(2, 10, 8, seed=9, dtype=torch.float32, device=device)
    a[:, [2, 5]] = 0
    b[:, 7] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    r = fastkd.sinkhorn(cost, a, b, eps=0.1, tol=1e-6, return_plan=True, backend=backend)
    keep_r = [i for i in range(10) if i not in (2, 5)]
    small = fastkd.sinkhorn(
        cost[:, keep_r][:, :, :7],
        a[:, keep_r],
        b[:, :7],
        eps=0.1,
        tol=1e-6,
        return_plan=True,
        backend=backend,
    )
    torch.testing.assert_close(r.plan[:, keep_r][:, :, :7], small.plan, atol=1e-7, rtol=1e-5)
    assert (r.plan[:, [2, 5]] == 0).all() and (r.plan[:, :, 7] == 0).all()
    torch.testing.assert_close(r.transport_cost, small.transport_cost)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_and_broadcast_costs(device, backend):
    cost, a, b = _problem(3, 11, 11, seed=4, dtype=torch.float32, device=device)
    base = fastkd.sinkhorn(
        cost.mT.contiguous(), b, a, eps=0.1, tol=1e-6, return_plan=True, backend=backend
    )
    transposed = fastkd.sinkhorn(
        cost.mT, b, a, eps=0.1, tol=1e-6, return_plan=True, backend=backend
    )
    torch.testing.assert_close(transposed.plan, base.plan, atol=0, rtol=0)
    shared = cost[0].expand(3, 11, 11)
    assert shared.stride(0) == 0
    r = fastkd.sinkhorn(shared, a, b, eps=0.1, tol=1e-6, return_plan=True, backend=backend)
    alone = fastkd.sinkhorn(
        cost[0].expand(3, 11, 11).contiguous(),
        a,
        b,
        eps=0.1,
        tol=1e-6,
        return_plan=True,
        backend=backend,
    )
    torch.testing.assert_close(r.plan, alone.plan, atol=0, rtol=0)
    # One marginal shared by the batch ([n]) equals it repeated.
    r1 = fastkd.sinkhorn(cost, a[0], b, eps=0.1, tol=1e-6, backend=backend)
    r2 = fastkd.sinkhorn(cost, a[0].expand(3, 11), b, eps=0.1, tol=1e-6, backend=backend)
    torch.testing.assert_close(r1.transport_cost, r2.transport_cost, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_costs(device, backend, dtype):
    # The kernels read the stored bf16/fp16 values exactly and compute in fp32: the result is
    # the fp32 solve of the rounded cost.
    cost, a, b = _problem(4, 19, 26, seed=12, dtype=torch.float32, device=device)
    low = cost.to(dtype)
    r = fastkd.sinkhorn(low, a, b, eps=0.05, tol=1e-6, return_plan=True, backend=backend)
    r32 = fastkd.sinkhorn(low.float(), a, b, eps=0.05, tol=1e-6, return_plan=True, backend=backend)
    torch.testing.assert_close(r.plan, r32.plan, atol=0, rtol=0)
    assert r.f.dtype == torch.float32


# ---- adversarial ----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.slow  # 2 cases, 17 s of the full run's 1,025 s
def test_tiny_eps_with_scaling(device, backend):
    cost, a, b = _problem(4, 30, 30, seed=21, dtype=torch.float32, device=device)
    # tol above the fp32 floor |C| 2^-24 / eps ~ 3e-5 (see test_huge_costs_stay_finite).
    plain = fastkd.sinkhorn(cost, a, b, eps=2e-3, tol=2e-4, max_iters=50000, backend=backend)
    scaled = fastkd.sinkhorn(
        cost,
        a,
        b,
        eps=2e-3,
        tol=2e-4,
        max_iters=50000,
        eps_scaling=0.7,
        return_plan=True,
        backend=backend,
    )
    assert scaled.converged.all() and plain.converged.all()
    assert torch.isfinite(scaled.f).all() and torch.isfinite(scaled.g).all()
    assert scaled.iters.sum() < plain.iters.sum()
    torch.testing.assert_close(scaled.transport_cost, plain.transport_cost, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_huge_costs_stay_finite(device, backend):
    # Costs up to 1e4 at eps = 50: exp(-C/eps) = e^-200 underflows fp32, the log domain never
    # forms it. fp32 potentials of size |C| hold |C| 2^-24 of rounding, 1e-5 of the exponents
    # (f + g - C)/eps here: tol sits above that floor.
    cost, a, b = _problem(3, 17, 23, seed=22, dtype=torch.float32, device=device, scale=1e4)
    r = fastkd.sinkhorn(
        cost,
        a,
        b,
        eps=50.0,
        tol=1e-4,
        max_iters=20000,
        eps_scaling=0.5,
        return_plan=True,
        backend=backend,
    )
    assert torch.isfinite(r.plan).all() and r.converged.all()
    a64, b64 = _normalized64(a), _normalized64(b)
    exact = sinkhorn_reference(
        cost.double(),
        a64.log(),
        b64.log(),
        eps=50.0,
        max_iters=200000,
        tol=1e-10,
        check_every=10,
        return_plan=True,
    )
    torch.testing.assert_close(r.transport_cost.double(), exact.transport, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_max_iters_reached(device, backend):
    cost, a, b = _problem(2, 25, 25, seed=23, dtype=torch.float32, device=device)
    r = fastkd.sinkhorn(cost, a, b, eps=1e-3, tol=1e-9, max_iters=7, backend=backend)
    assert r.iters.tolist() == [7, 7]
    assert not r.converged.any()
    assert (r.marginal_error > 1e-9).all()
    # Stopped inside the eps schedule: the values refer to the e reached, finite.
    r = fastkd.sinkhorn(
        cost, a, b, eps=1e-3, tol=1e-9, max_iters=3, eps_scaling=0.5, backend=backend
    )
    assert r.iters.tolist() == [3, 3] and torch.isfinite(r.objective).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_warm_start(device, backend):
    cost, a, b = _problem(3, 21, 18, seed=24, dtype=torch.float32, device=device)
    cold = fastkd.sinkhorn(cost, a, b, eps=0.05, tol=1e-6, check_every=1, backend=backend)
    warm = fastkd.sinkhorn(
        cost, a, b, eps=0.05, tol=1e-6, check_every=1, init_g=cold.g, backend=backend
    )
    assert (warm.iters <= 2).all() and warm.converged.all()
    torch.testing.assert_close(warm.transport_cost, cold.transport_cost, atol=1e-6, rtol=1e-5)


def test_unnormalized_equal_masses():
    cost, a, b = _problem(2, 8, 6, seed=25)
    r1 = fastkd.sinkhorn(cost, a, b, eps=0.1, tol=1e-12, return_plan=True, backend="torch")
    r3 = fastkd.sinkhorn(cost, 3 * a, 3 * b, eps=0.1, tol=1e-12, return_plan=True, backend="torch")
    # Scaling both marginals by s scales the plan by s (the reference measure a b^T by s^2).
    torch.testing.assert_close(r3.plan, 3 * r1.plan, atol=1e-10, rtol=1e-8)


# ---- gradients ------------------------------------------------------------------------------


def test_envelope_gradient_finite_differences_float64():
    cost, a, b = _problem(2, 5, 4, seed=31)
    opts = dict(eps=0.2, tol=1e-13, max_iters=100000, backend="torch")
    cost.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = fastkd.sinkhorn_loss(cost, a, b, **opts)
    gc, ga, gb = torch.autograd.grad(loss.sum(), (cost, a, b))

    def value(c, aa, bb):
        return fastkd.sinkhorn_loss(c, aa, bb, **opts).sum().item()

    h = 1e-6
    with torch.no_grad():
        for idx in [(0, 0, 0), (0, 4, 3), (1, 2, 1)]:
            d = torch.zeros_like(cost)
            d[idx] = h
            fd = (value(cost + d, a, b) - value(cost - d, a, b)) / (2 * h)
            assert gc[idx].item() == pytest.approx(fd, abs=1e-8)
        # Mass-preserving directions of the marginals.
        da = torch.zeros_like(a)
        da[0, 1], da[0, 3] = h, -h
        fd = (value(cost, a + da, b) - value(cost, a - da, b)) / (2 * h)
        assert (ga[0, 1] - ga[0, 3]).item() == pytest.approx(fd, abs=1e-7)
        db = torch.zeros_like(b)
        db[1, 0], db[1, 2] = h, -h
        fd = (value(cost, a, b + db) - value(cost, a, b - db)) / (2 * h)
        assert (gb[1, 0] - gb[1, 2]).item() == pytest.approx(fd, abs=1e-7)


def test_gradcheck_cost_float64():
    cost, a, b = _problem(2, 4, 3, seed=32)
    cost.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda c: fastkd.sinkhorn_loss(
            c, a, b, eps=0.3, tol=1e-14, max_iters=100000, backend="torch"
        ),
        (cost,),
        eps=1e-6,
        atol=1e-7,
    )


def test_unrolled_gradient_matches_envelope_at_convergence():
    cost, a, b = _problem(2, 6, 7, seed=33)
    grads = {}
    for mode in ("envelope", "unrolled"):
        c = cost.clone().requires_grad_(True)
        aa = a.clone().requires_grad_(True)
        loss = fastkd.sinkhorn_loss(
            c, aa, b, eps=0.3, tol=1e-12, max_iters=5000, grad=mode, backend="torch"
        )
        grads[mode] = torch.autograd.grad(loss.sum(), (c, aa))
    torch.testing.assert_close(grads["unrolled"][0], grads["envelope"][0], atol=1e-9, rtol=0)
    # The marginal gradients agree up to a constant per problem (mass-preserving directions).
    diff = grads["unrolled"][1] - grads["envelope"][1]
    torch.testing.assert_close(
        diff - diff.mean(1, keepdim=True), torch.zeros_like(diff), atol=1e-8, rtol=0
    )


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("value", ["objective", "transport"])
def test_kernel_gradients_match_reference(device, backend, value):
    cost, a, b = _problem(4, 15, 22, seed=34, dtype=torch.float32, device=device)
    out = {}
    for name in ("torch", backend):
        c = cost.clone().requires_grad_(True)
        aa = a.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        loss = fastkd.sinkhorn_loss(c, aa, bb, eps=0.05, tol=1e-7, value=value, backend=name)
        w = torch.arange(1.0, 5.0, device=device)
        grads = torch.autograd.grad((loss * w).sum(), (c, aa, bb), allow_unused=True)
        out[name] = (loss, *grads)
    torch.testing.assert_close(out[backend][0], out["torch"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[backend][1], out["torch"][1], atol=1e-6, rtol=1e-4)
    if value == "objective":
        for k in (2, 3):
            d = out[backend][k] - out["torch"][k]
            torch.testing.assert_close(
                d - d.mean(1, keepdim=True), torch.zeros_like(d), atol=2e-5, rtol=0
            )
    else:
        assert out[backend][2] is None and out[backend][3] is None


@pytest.mark.parametrize("kind", ["l1", "l2", "sqeuclidean", "cosine"])
def test_feature_costs(kind):
    g = torch.Generator().manual_seed(35)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    diff = x[:, :, None, :] - y[:, None, :, :]
    direct = {
        "l1": diff.abs().sum(-1),
        "l2": diff.norm(dim=-1),
        "sqeuclidean": (diff**2).sum(-1),
        "cosine": 1
        - torch.nn.functional.cosine_similarity(x[:, :, None, :], y[:, None, :, :], dim=-1),
    }[kind]
    torch.testing.assert_close(pairwise_cost(kind, x, y), direct, atol=1e-12, rtol=1e-10)
    x.requires_grad_(True)
    y.requires_grad_(True)
    loss = fastkd.sinkhorn_loss(kind, x=x, y=y, eps=0.5, tol=1e-12, backend="torch")
    gx, gy = torch.autograd.grad(loss.sum(), (x, y))
    xd = x.detach().clone().requires_grad_(True)
    yd = y.detach().clone().requires_grad_(True)
    loss2 = fastkd.sinkhorn_loss(pairwise_cost(kind, xd, yd), eps=0.5, tol=1e-12, backend="torch")
    gx2, gy2 = torch.autograd.grad(loss2.sum(), (xd, yd))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gy, gy2)
    # And the finite-difference slope along a random direction.
    d = torch.randn_like(x) * 1e-6
    with torch.no_grad():
        up = fastkd.sinkhorn_loss(kind, x=x + d, y=y, eps=0.5, tol=1e-13).sum()
        down = fastkd.sinkhorn_loss(kind, x=x - d, y=y, eps=0.5, tol=1e-13).sum()
    assert ((up - down) / 2).item() == pytest.approx((gx * d).sum().item(), rel=1e-4, abs=1e-12)


# ---- registration, compile ------------------------------------------------------------------


@pytest.mark.slow  # opcheck's AOT dispatch compiles the op: 4.5 s
def test_opcheck():
    cost, a, b = _problem(3, 6, 5, seed=36, dtype=torch.float32)
    from fastkd.ot.sinkhorn_loss import sinkhorn_loss_envelope
    from fastkd.ot.solver import sinkhorn_solve

    la, lb = a.log(), b.log()
    torch.library.opcheck(
        sinkhorn_solve, (cost, la, lb, None, None, None, None, 0.1, 0.5, 100, 10, 1e-6, True, "cpu")
    )
    c = cost.clone().requires_grad_(True)
    torch.library.opcheck(
        sinkhorn_loss_envelope,
        (c, a, b, None, None, None, 0.1, 0.5, 100, 10, 1e-6, "objective", "cpu"),
    )


@pytest.mark.slow  # 4 s of the full run's 1,025 s
def test_torch_compile():
    cost, a, b = _problem(3, 6, 5, seed=37, dtype=torch.float32)

    def step(c):
        return fastkd.sinkhorn_loss(c * 2, a, b, eps=0.1, validate=False).sum()

    c1 = cost.clone().requires_grad_(True)
    c2 = cost.clone().requires_grad_(True)
    eager = step(c1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(c2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(c2.grad, c1.grad)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"max_iters": 0}, ValueError, "max_iters"),
        ({"eps_scaling": 1.5}, ValueError, "eps_scaling"),
        ({"a": -torch.ones(4) / 4}, ValueError, "marginal a"),
        ({"a": torch.ones(4) / 2}, ValueError, "same positive mass"),
        ({"b": torch.ones(4) / 4}, ValueError, r"\(5,\)"),
        ({"n_sizes": torch.tensor([9, 1])}, ValueError, r"n_sizes must lie in \[0, 4\]"),
        ({"n_sizes": torch.tensor([1])}, ValueError, r"shape \(2,\)"),
        # Checked before the int32 cast, which would wrap 2^32 + 2 to 2 and -(2^32) + 3 to 3.
        ({"n_sizes": torch.tensor([2**32 + 2, 3])}, ValueError, r"n_sizes must lie in \[0, 4\]"),
        ({"m_sizes": torch.tensor([-(2**32) + 3, 3])}, ValueError, r"m_sizes must lie in \[0, 5\]"),
        ({"max_iters": 2**31}, ValueError, r"max_iters must be an int in \[1, 2147483647\]"),
        ({"check_every": 2**31}, ValueError, r"check_every must be an int in \[1, 2147483647\]"),
        ({"max_iters": 10.0}, ValueError, "max_iters"),
        ({"eps": 1e-50}, ValueError, r"eps must be a number in \[2\*\*-126"),
        ({"tol": 1e-50}, ValueError, "tol"),
        ({"eps_scaling": 1e-50}, ValueError, "eps_scaling"),
        ({"x": torch.ones(2, 4, 3)}, ValueError, "named cost"),
        ({"backend": "nope"}, ValueError, "unknown backend"),
    ],
)
def test_bad_input(kwargs, error, match):
    cost = torch.rand(2, 4, 5)
    with pytest.raises(error, match=match):
        fastkd.sinkhorn(cost, **kwargs)


def test_bad_cost_values_and_shapes():
    with pytest.raises(ValueError, match="finite"):
        fastkd.sinkhorn(torch.tensor([[0.0, float("inf")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="finite"):
        fastkd.sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    # Finite costs whose float32 sum overflows pass (the cheap check falls back to the exact
    # one).
    fastkd.sinkhorn(torch.full((3, 3), 3e38), eps=1e38, max_iters=1)
    with pytest.raises(ValueError, match=r"\[n, m\] or \[B, n, m\]"):
        fastkd.sinkhorn(torch.rand(2, 3, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        fastkd.sinkhorn(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown cost"):
        fastkd.sinkhorn("hamming", x=torch.rand(3, 2), y=torch.rand(4, 2))
    with pytest.raises(ValueError, match="same d"):
        fastkd.sinkhorn("l2", x=torch.rand(3, 2), y=torch.rand(4, 3))
    with pytest.raises(ValueError, match="value must be"):
        fastkd.sinkhorn_loss(torch.rand(3, 3), value="plan")
    with pytest.raises(ValueError, match="grad must be"):
        fastkd.sinkhorn_loss(torch.rand(3, 3), grad="implicit")


@pytest.mark.gpu
def test_auto_spreads_few_large_problems_over_the_gpu():
    """backend="auto" on a GPU hands one large problem (one CTA of a kernel would hold it) to
    the torch backend, and keeps many small ones, or few small ones, on the kernels."""
    from fastkd.ot.solver import _few_large_problems_on_gpu

    assert _few_large_problems_on_gpu(torch.empty(1, 1024, 1024, device="cuda"))
    assert not _few_large_problems_on_gpu(torch.empty(4096, 64, 64, device="cuda"))
    assert not _few_large_problems_on_gpu(torch.empty(1, 512, 512, device="cuda"))
    assert not _few_large_problems_on_gpu(torch.empty(1, 1024, 1024))
    cost = torch.rand(1, 1024, 1024, device="cuda")
    auto = fastkd.sinkhorn(cost, eps=0.05, tol=1e-5)
    plain = fastkd.sinkhorn(cost, eps=0.05, tol=1e-5, backend="torch")
    assert torch.equal(auto.iters, plain.iters) and torch.equal(auto.f, plain.f)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "batch,n,m,kw",
    [
        (1, 300, 257, dict()),
        (1, 1, 70000, dict()),
        (
            2,
            401,
            203,
            dict(eps_scaling=0.5, n_sizes=torch.tensor([401, 7]), m_sizes=torch.tensor([150, 203])),
        ),
        (1, 256, 256, dict(max_iters=3)),
    ],
)
@pytest.mark.slow  # 4 cases, 6 s of the full run's 1,025 s
def test_cpu_team_of_threads_solves_like_one_thread(restore_threads, batch, n, m, kw):
    """Fewer problems than threads, each of 2^16 entries or more: all threads share each
    problem's half-iterations, and every output equals the single-thread solve bit for bit."""
    if "cpu" not in fastkd.available_backends("sinkhorn", "cpu"):
        pytest.skip("needs the native CPU kernel")
    g = torch.Generator().manual_seed(batch * n + m)
    cost = torch.rand(batch, n, m, generator=g) * 3
    init = torch.randn(batch, m, generator=g) * 0.1
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        results.append(
            fastkd.sinkhorn(
                cost, eps=0.05, tol=1e-6, init_g=init, return_plan=True, backend="cpu", **kw
            )
        )
    one, team = results
    for name in ("f", "g", "iters", "transport_cost", "objective", "plan", "marginal_error"):
        assert torch.equal(getattr(one, name), getattr(team, name)), name
    ref = fastkd.sinkhorn(
        cost.double(), eps=0.05, tol=1e-6, init_g=init.double(), backend="torch", **kw
    )
    torch.testing.assert_close(
        team.transport_cost.double(), ref.transport_cost, rtol=1e-4, atol=1e-5
    )


def test_empty_problem_keeps_eps_as_its_final_eps():
    """sinkhorn_args.h: an empty problem (n_b = 0) never iterates, and its final e is eps even
    with an eps-scaling start, on every backend."""
    cost = torch.rand(2, 5, 4)
    log_a, log_b = torch.zeros(2, 5), torch.zeros(2, 4)
    sizes = torch.tensor([0, 5], dtype=torch.int32)
    for backend in compiled_backends("sinkhorn"):
        out = torch.ops.fastkd.sinkhorn_solve(
            cost,
            log_a,
            log_b,
            sizes,
            None,
            torch.full((2,), 3.0),
            None,
            0.1,
            0.5,
            100,
            1,
            1e-6,
            False,
            backend,
        )
        iters, eps_final = out[2], out[4]
        assert iters[0] == 0 and float(eps_final[0]) == pytest.approx(0.1), backend
        assert iters[1] > 0 and float(eps_final[1]) == pytest.approx(0.1), backend
