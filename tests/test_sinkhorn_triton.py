"""The Triton Sinkhorn kernel, called through its launcher, against the reference loop.

Runs under TRITON_INTERPRET=1 on CPU (small fp32 problems: the interpreter runs one problem at a
time) and compiled on a GPU, where fp16/bf16 costs run as well. Each case is solved by the kernel
and by ``sinkhorn_reference`` in fp32: iteration counts agree within ``check_every`` (an error
within rounding of tol may stop one check apart) and problems that stop before max_iters are
converged. Then every problem is re-solved by the reference for exactly the kernel's iteration
count (tol = 0), in fp32 and in float64, and the kernel's potentials (up to the additive
constant), plan, transport, mass and error are held to the fp32 reference's own distance from
the float64 one (as helpers.assert_within_torch_error), and eps_final equals the reference's e.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastkd.reference.sinkhorn import sinkhorn_reference, valid_mask

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not INTERPRET and not torch.cuda.is_available(),
        reason="Triton needs a GPU or TRITON_INTERPRET=1",
    ),
]

# The kernel may be ERR_FACTOR times further from float64 than the fp32 reference, plus
# FLOOR_EPS fp32 epsilons of the value's magnitude.
ERR_FACTOR = 8.0
FLOOR_EPS = 16.0
EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    m: int
    batch: int = 3
    eps: float = 0.1
    tol: float = 1e-5
    max_iters: int = 300
    check_every: int = 3
    kappa: float = 0.5
    sizes: tuple | None = None  # (n_sizes, m_sizes), each a tuple of batch ints
    zero_weights: float = 0.0  # fraction of log weights set to -inf within the sizes
    scaling: bool = False  # eps_start = max |C| within the sizes
    warm: bool = False  # init_g = N(0, 0.1^2)
    layout: str = "contiguous"  # "broadcast": one cost expanded over the batch (stride 0);
    # "transposed": a [B, m, n] tensor's transpose
    nan_outside: bool = False  # NaN in the cost, log weights and init_g beyond the sizes
    plan: bool = True
    converges: bool = True  # False: every problem runs max_iters
    streamed: bool = False  # also run the streamed kernel (in small tiles)
    dtype: torch.dtype = torch.float32
    gpu_only: bool = False


CASES = [
    Case("1x1", 1, 1),
    Case("1x7", 1, 7),
    Case("7x1", 7, 1),
    Case("13x29", 13, 29, streamed=True),
    Case("33x17", 33, 17),
    Case(
        "ragged_nan_outside",
        11,
        19,
        batch=5,
        sizes=((11, 0, 4, 7, 1), (19, 6, 1, 0, 13)),
        nan_outside=True,
        streamed=True,
    ),
    Case("zero_weights", 12, 21, zero_weights=0.3, streamed=True),
    Case("eps_scaling", 9, 14, eps=0.04, tol=1e-4, scaling=True, check_every=4),
    Case("warm_start", 10, 13, warm=True, sizes=((10, 6, 3), (13, 13, 8)), nan_outside=True),
    Case("broadcast_cost", 8, 15, layout="broadcast", check_every=1),
    Case("transposed_cost", 15, 8, layout="transposed", check_every=2),
    Case("no_plan", 6, 9, plan=False),
    Case("max_iters", 10, 12, eps=0.01, tol=1e-9, max_iters=7, converges=False),
    # max_iters = 3 while e is still above eps: the solve stops mid-schedule.
    Case(
        "max_iters_mid_schedule",
        9,
        11,
        eps=0.01,
        max_iters=3,
        scaling=True,
        converges=False,
        streamed=True,
    ),
    Case("fp16", 40, 70, dtype=torch.float16, scaling=True, eps=0.02, tol=1e-4, gpu_only=True),
    Case("bf16", 70, 40, dtype=torch.bfloat16, streamed=True, gpu_only=True),
]


def make_inputs(case: Case, seed: int = 0) -> SimpleNamespace:
    """The case's inputs on the CPU: cost in case.dtype (values beyond the sizes NaN with
    nan_outside), normalized log weights (-inf at zero weights), sizes, eps_start, init_g."""
    gen = torch.Generator().manual_seed(seed)
    batch, n, m = case.batch, case.n, case.m
    if case.layout == "broadcast":
        cost = torch.rand(1, n, m, generator=gen).expand(batch, n, m)
    elif case.layout == "transposed":
        cost = torch.rand(batch, m, n, generator=gen).transpose(1, 2)
    else:
        cost = torch.rand(batch, n, m, generator=gen)
    n_sizes = m_sizes = None
    rows = torch.ones(batch, n, dtype=torch.bool)
    cols = torch.ones(batch, m, dtype=torch.bool)
    if case.sizes is not None:
        n_sizes = torch.tensor(case.sizes[0], dtype=torch.int32)
        m_sizes = torch.tensor(case.sizes[1], dtype=torch.int32)
        rows = valid_mask(n_sizes, batch, n, torch.device("cpu"))
        cols = valid_mask(m_sizes, batch, m, torch.device("cpu"))

    def log_weights(valid):
        w = torch.rand(valid.shape, generator=gen) + 0.1
        if case.zero_weights:
            zero = torch.rand(valid.shape, generator=gen) < case.zero_weights
            zero[:, 0] = False  # every problem keeps a nonzero weight
            w = torch.where(zero, 0.0, w)
        w = torch.where(valid, w, 0.0)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
        return torch.where(valid, w.log(), float("nan") if case.nan_outside else 0.0)

    log_a = log_weights(rows)
    log_b = log_weights(cols)
    inside = rows[:, :, None] & cols[:, None, :]
    if case.nan_outside:
        cost = torch.where(inside, cost, float("nan"))
    cost = cost.to(case.dtype)
    eps_start = None
    if case.scaling:
        eps_start = torch.where(inside, cost.float().abs(), 0.0).amax((1, 2))
    init_g = None
    if case.warm:
        init_g = torch.randn(batch, m, generator=gen) * 0.1
        if case.nan_outside:
            init_g = torch.where(cols, init_g, float("nan"))
    return SimpleNamespace(
        cost=cost,
        log_a=log_a,
        log_b=log_b,
        n_sizes=n_sizes,
        m_sizes=m_sizes,
        eps_start=eps_start,
        init_g=init_g,
        rows=rows,
        cols=cols,
    )


def solve(case: Case, x: SimpleNamespace) -> SimpleNamespace:
    """The launcher on DEVICE, outputs prefilled with NaN (iters with -1) so that every entry
    must be written; results back on the CPU."""
    from fastkd.triton.sinkhorn import sinkhorn_forward

    def dev(t):
        return None if t is None else t.to(DEVICE)

    batch, n, m = case.batch, case.n, case.m

    def nans(*shape):
        return torch.full(shape, float("nan"), device=DEVICE)

    g = nans(batch, m) if x.init_g is None else x.init_g.to(DEVICE, copy=True)
    out = SimpleNamespace(
        f=nans(batch, n),
        g=g,
        iters=torch.full((batch,), -1, dtype=torch.int32, device=DEVICE),
        err=nans(batch),
        transport=nans(batch),
        mass=nans(batch),
        eps_final=nans(batch),
        plan=nans(batch, n, m) if case.plan else None,
    )
    cost = x.cost.to(DEVICE)
    if case.layout == "broadcast":
        cost = cost[:1].expand(batch, n, m)
    elif case.layout == "transposed":
        cost = cost.transpose(1, 2).contiguous().transpose(1, 2)
    sinkhorn_forward(
        cost,
        dev(x.log_a),
        dev(x.log_b),
        dev(x.n_sizes),
        dev(x.m_sizes),
        dev(x.eps_start),
        out.f,
        out.g,
        out.iters,
        out.err,
        out.transport,
        out.mass,
        out.eps_final,
        out.plan,
        eps=case.eps,
        kappa=case.kappa,
        max_iters=case.max_iters,
        check_every=case.check_every,
        tol=case.tol,
        warm_start=x.init_g is not None,
    )
    return SimpleNamespace(**{k: None if v is None else v.cpu() for k, v in vars(out).items()})


def reference_run(case: Case, x: SimpleNamespace, b: int, iters: int, dtype) -> SimpleNamespace:
    """Problem b by the reference in ``dtype`` for exactly ``iters`` iterations (tol = 0 never
    stops it before max_iters = iters)."""
    sl = slice(b, b + 1)

    def part(t):
        return None if t is None else t[sl]

    s = sinkhorn_reference(
        x.cost[sl].to(dtype),
        x.log_a[sl].to(dtype),
        x.log_b[sl].to(dtype),
        eps=case.eps,
        max_iters=iters,
        tol=0.0,
        check_every=case.check_every,
        eps_start=part(x.eps_start),
        kappa=case.kappa,
        n_sizes=part(x.n_sizes),
        m_sizes=part(x.m_sizes),
        init_g=part(x.init_g),
        return_plan=True,
    )
    return SimpleNamespace(**{k: v[0] for k, v in s._asdict().items()})


def assert_near(name, value, exact, ref32, floor_scale=None):
    """|value - exact| <= ERR_FACTOR |ref32 - exact| + FLOOR_EPS eps32 floor_scale (default:
    max |exact|), in float64."""
    value, exact, ref32 = value.double(), exact.double(), ref32.double()
    assert torch.isfinite(value).all(), f"{name}: not finite"
    err = (value - exact).abs().max().item()
    ref_err = (ref32 - exact).abs().max().item()
    scale = exact.abs().max().item() if floor_scale is None else floor_scale
    floor = FLOOR_EPS * EPS32 * scale
    assert err <= ERR_FACTOR * ref_err + floor, (
        f"{name}: error {err:.3g} vs fp32 reference {ref_err:.3g} (floor {floor:.3g})"
    )


def check_problem(case, x, out, b):
    """Problem b of the kernel's output against the reference at the same iteration count."""
    n_b = case.n if x.n_sizes is None else int(x.n_sizes[b])
    m_b = case.m if x.m_sizes is None else int(x.m_sizes[b])
    iters = int(out.iters[b])
    if n_b == 0 or m_b == 0:
        assert iters == 0
        for name in ("f", "g", "err", "transport", "mass") + (("plan",) if case.plan else ()):
            assert (getattr(out, name)[b] == 0).all(), f"empty problem {b}: {name} not 0"
        assert out.eps_final[b].item() == np.float32(case.eps)
        return
    assert 1 <= iters <= case.max_iters
    exact = reference_run(case, x, b, iters, torch.float64)
    ref32 = reference_run(case, x, b, iters, torch.float32)
    assert out.eps_final[b].item() == exact.eps.item()
    # Potentials up to the constant that (f + k, g - k) leaves the plan unchanged by.
    f, g = out.f[b].double(), out.g[b].double()
    f32, g32 = ref32.f.double(), ref32.g.double()
    shift = (f[:n_b] - exact.f[:n_b]).mean()
    shift32 = (f32[:n_b] - exact.f[:n_b]).mean()
    assert_near("f", f[:n_b] - shift, exact.f[:n_b], f32[:n_b] - shift32)
    assert_near("g", g[:m_b] + shift, exact.g[:m_b], g32[:m_b] + shift32)
    assert (out.f[b, n_b:] == 0).all() and (out.g[b, m_b:] == 0).all()
    assert_near("transport", out.transport[b], exact.transport, ref32.transport)
    assert_near("mass", out.mass[b], exact.mass, ref32.mass)
    # E sums a_i |exp(d_i / e) - 1| with d_i = f_i - F(g)_i of a few ulps of f.
    assert_near(
        "err",
        out.err[b],
        exact.err,
        ref32.err,
        floor_scale=exact.f[:n_b].abs().max().item() / exact.eps.item(),
    )
    if case.plan:
        assert_near("plan", out.plan[b], exact.plan, ref32.plan)
        assert (out.plan[b, n_b:] == 0).all() and (out.plan[b, :, m_b:] == 0).all()


def check_case(case: Case, out: SimpleNamespace, x: SimpleNamespace):
    ref = sinkhorn_reference(
        x.cost.float(),
        x.log_a,
        x.log_b,
        eps=case.eps,
        max_iters=case.max_iters,
        tol=case.tol,
        check_every=case.check_every,
        eps_start=x.eps_start,
        kappa=case.kappa,
        n_sizes=x.n_sizes,
        m_sizes=x.m_sizes,
        init_g=x.init_g,
    )
    assert ((out.iters - ref.iters).abs() <= case.check_every).all(), (
        f"iterations {out.iters.tolist()} vs reference {ref.iters.tolist()}"
    )
    nonempty = out.iters > 0
    stopped = nonempty & (out.iters < case.max_iters)
    assert (out.err[stopped] < case.tol).all()
    if case.converges:
        assert bool((stopped | ~nonempty).all()), f"not converged: {out.iters.tolist()}"
    else:
        assert (out.iters[nonempty] == case.max_iters).all()
        assert (out.err[nonempty] >= case.tol).all()
    for b in range(case.batch):
        check_problem(case, x, out, b)


def case_params(streamed: bool):
    params = []
    for case in CASES:
        if streamed and not case.streamed:
            continue
        skip = case.gpu_only and INTERPRET
        params.append(
            pytest.param(
                case,
                id=case.name,
                marks=pytest.mark.skipif(skip, reason="half-precision costs run compiled only"),
            )
        )
    return params


@pytest.mark.parametrize("case", case_params(streamed=False))
@pytest.mark.slow  # 14 cases, 8 s of the full run's 1,025 s
def test_resident(case):
    x = make_inputs(case)
    check_case(case, solve(case, x), x)


@pytest.mark.parametrize("case", case_params(streamed=True))
@pytest.mark.slow  # 4 cases, 13 s of the full run's 1,025 s
def test_streamed(case, monkeypatch):
    # Every problem through the streamed kernel, in tiles small enough that F and G each take
    # several tiles per row and per column block.
    import fastkd.triton.sinkhorn as kernel

    monkeypatch.setattr(kernel, "RESIDENT_ELEMENTS", 0)
    monkeypatch.setattr(kernel, "STREAM_BLOCK_N", 8)
    monkeypatch.setattr(kernel, "STREAM_BLOCK_M", 16)
    x = make_inputs(case)
    check_case(case, solve(case, x), x)


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 4, 0), (0, 3, 3)])
def test_empty_dimensions(shape):
    # n == 0 or m == 0: every problem is empty (no kernel runs); B == 0: nothing to write.
    case = Case("empty", shape[1], shape[2], batch=shape[0])
    x = make_inputs(case)
    out = solve(case, x)
    assert (out.iters == 0).all()
    for name in ("f", "g", "err", "transport", "mass", "plan"):
        assert (getattr(out, name) == 0).all()
    assert (out.eps_final == np.float32(case.eps)).all()
