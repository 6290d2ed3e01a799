"""sinkd_loss and sequence_ot_loss: against the plain-PyTorch twins, the published fixed-round
procedure on hand-computed examples, closed forms of the converged solver, gradients, masking
and input checks."""

import math

import pytest
import torch

import fastkd.ot.losses as ot_losses
from fastkd.ot import l1_cost, sequence_ot_loss, sinkd_loss, sinkhorn_loss
from fastkd.reference.ot_losses import (
    pairwise_cost_reference,
    sequence_ot_loss_reference,
    sinkd_loss_reference,
)

from helpers import FLOAT64_TOL

COSTS = ("l1", "l2", "sqeuclidean", "cosine")
# Tight solves for float64 comparisons; float32 runs the native kernel to its own precision.
TIGHT = dict(tol=1e-12, max_iters=20000)
LOOSE = dict(tol=1e-6, max_iters=5000)
# Tolerances (atol, rtol) of float32 results against the float64 twin.
F32_TOL = dict(atol=2e-5, rtol=2e-4)


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def published_rounds(cost, eps, n_iters):
    """The published loop on a list-of-lists cost, in Python floats: K = exp(-C / eps), then
    n_iters rounds of row normalization followed by column normalization. Returns (P, value)."""
    plan = [[math.exp(-c / eps) for c in row] for row in cost]
    for _ in range(n_iters):
        plan = [[v / sum(row) for v in row] for row in plan]
        cols = [sum(row[j] for row in plan) for j in range(len(plan[0]))]
        plan = [[v / cols[j] for j, v in enumerate(row)] for row in plan]
    value = sum(p * c for prow, crow in zip(plan, cost) for p, c in zip(prow, crow))
    return plan, value


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def batch_inputs(dtype, rows=7, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)
    zt = (2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[[1, 4]] = -100
    return zs.requires_grad_(), zt, labels


def sequence_inputs(dtype, seed=0):
    """Three sequences: a non-prefix student mask, an empty student sequence, a full one."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(dtype)
    xt = torch.randn(3, 6, 4, generator=g, dtype=torch.float64).to(dtype)
    ms = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    mt = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1]])
    return xs.requires_grad_(), xt.requires_grad_(), ms, mt


# ---- against the plain-PyTorch twins -----------------------------------------------------------

SINKD_CASES = [  # (parity, value, cost)
    (False, "transport", "l1"),
    (False, "objective", "l1"),
    (False, "transport", "cosine"),
    (False, "transport", "sqeuclidean"),
    (True, "transport", "l1"),
    (True, "transport", "l2"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("parity,value,cost", SINKD_CASES)
def test_sinkd_matches_reference(dtype, parity, value, cost):
    zs, zt, labels = batch_inputs(dtype)
    opts = dict(temperature=1.5, eps=0.2, cost=cost, labels=labels, parity=parity, value=value)
    solve = TIGHT if dtype == torch.float64 else LOOSE
    got = sinkd_loss(zs, zt, **opts, **solve)
    (g_got,) = torch.autograd.grad(got, zs)
    zs64 = zs.detach().double().requires_grad_()
    want = sinkd_loss_reference(zs64, zt.double(), **opts, **TIGHT)
    (g_want,) = torch.autograd.grad(want, zs64)
    assert got.dtype == dtype and g_got.dtype == dtype
    tol = FLOAT64_TOL if dtype == torch.float64 else F32_TOL
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(g_got.double(), g_want, **tol)
    # the float32 twin runs too (the oracle's own float32 path)
    if dtype == torch.float32:
        ref32 = sinkd_loss_reference(zs.detach(), zt, **opts, **LOOSE)
        torch.testing.assert_close(ref32.double(), want, **F32_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("cost", COSTS)
def test_sequence_matches_reference(dtype, parity, cost):
    xs, xt, ms, mt = sequence_inputs(dtype)
    opts = dict(
        student_mask=ms, teacher_mask=mt, cost=cost, eps=0.5, parity=parity, reduction="none"
    )
    solve = TIGHT if dtype == torch.float64 else LOOSE
    got = sequence_ot_loss(xs, xt, **opts, **solve)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    g_got = torch.autograd.grad((got * weights).sum(), (xs, xt))
    xs64, xt64 = (t.detach().double().requires_grad_() for t in (xs, xt))
    want = sequence_ot_loss_reference(xs64, xt64, **opts, **TIGHT)
    g_want = torch.autograd.grad((want * weights.double()).sum(), (xs64, xt64))
    tol = FLOAT64_TOL if dtype == torch.float64 else F32_TOL
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("masks", ["student", "teacher", "none"])
def test_sequence_one_or_no_mask(parity, masks):
    xs, xt, ms, mt = sequence_inputs(torch.float32)
    opts = dict(
        student_mask=ms if masks == "student" else None,
        teacher_mask=mt if masks == "teacher" else None,
        cost="l1",
        eps=0.5,
        parity=parity,
        reduction="none",
    )
    got = sequence_ot_loss(xs, xt, **opts)
    g_got = torch.autograd.grad(got.sum(), (xs, xt))
    xs64, xt64 = (t.detach().double().requires_grad_() for t in (xs, xt))
    want = sequence_ot_loss_reference(xs64, xt64, **opts, **TIGHT)
    g_want = torch.autograd.grad(want.sum(), (xs64, xt64))
    torch.testing.assert_close(got.double(), want, **F32_TOL)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b, **F32_TOL)


# ---- the published procedure on hand-computed examples -----------------------------------------

# Student q = (0.9, 0.1), (0.4, 0.6); teacher p = (0.7, 0.3), (0.2, 0.8): L1 costs
# C = [[0.4, 1.4], [0.6, 0.4]].
HAND_Q = [[0.9, 0.1], [0.4, 0.6]]
HAND_P = [[0.7, 0.3], [0.2, 0.8]]
HAND_C = [[0.4, 1.4], [0.6, 0.4]]


def test_sinkd_parity_one_round_by_hand():
    # eps = 1, K = exp(-C). Rows first: row 1 -> (sigma(1), sigma(-1)), row 2 ->
    # (sigma(-0.2), sigma(0.2)); then each column divided by its sum.
    r11, r12, r21, r22 = sigmoid(1.0), sigmoid(-1.0), sigmoid(-0.2), sigmoid(0.2)
    p11, p21 = r11 / (r11 + r21), r21 / (r11 + r21)
    p12, p22 = r12 / (r12 + r22), r22 / (r12 + r22)
    expected = 0.4 * p11 + 1.4 * p12 + 0.6 * p21 + 0.4 * p22
    got = sinkd_loss(logits_of(HAND_Q), logits_of(HAND_P), eps=1.0, parity=True, n_iters=1)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.2046880969884655, rel=1e-12)


@pytest.mark.parametrize("eps,n_iters", [(1.0, 2), (1.0, 20), (0.1, 20), (0.3, 7)])
def test_sinkd_parity_matches_published_loop(eps, n_iters):
    _, expected = published_rounds(HAND_C, eps, n_iters)
    got = sinkd_loss(logits_of(HAND_Q), logits_of(HAND_P), eps=eps, parity=True, n_iters=n_iters)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_sinkd_parity_limit_closed_form():
    # Alternating normalizations converge to the doubly stochastic [[x, 1-x], [1-x, x]] with
    # the cross ratio of K: x^2 / (1-x)^2 = K11 K22 / (K12 K21) = exp((1.4 + 0.6 - 0.8) / eps).
    ratio = math.exp(1.2)
    x = math.sqrt(ratio) / (1 + math.sqrt(ratio))
    expected = x * (0.4 + 0.4) + (1 - x) * (1.4 + 0.6)
    got = sinkd_loss(logits_of(HAND_Q), logits_of(HAND_P), eps=1.0, parity=True, n_iters=200)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_sinkd_parity_converges_to_n_times_default():
    # With enough rounds the published plan is doubly stochastic with unit row and column
    # sums: N times the plan between uniform weights 1/N that the default solver returns.
    zs, zt, labels = batch_inputs(torch.float64)
    n_valid = int((labels != -100).sum())
    eps = torch.tensor(0.3, dtype=torch.float32).item()  # the solver holds eps in float32
    parity = sinkd_loss(zs, zt, labels=labels, eps=eps, parity=True, n_iters=2000)
    converged = sinkd_loss(zs, zt, labels=labels, eps=eps, **TIGHT)
    torch.testing.assert_close(parity, n_valid * converged, atol=1e-10, rtol=1e-9)


def test_sequence_parity_puts_teacher_on_rows():
    # MultiLevelOT's cost has the teacher's positions on the rows: with 2 student and 3
    # teacher positions the rounds end on the student columns, so the plan's mass is 2.
    xs = torch.tensor([[[0.9, 0.1], [0.4, 0.6]]], dtype=torch.float64)
    xt = torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]], dtype=torch.float64)
    cost_ts = [
        [sum(abs(a - b) for a, b in zip(t, s)) for s in xs[0].tolist()] for t in xt[0].tolist()
    ]
    plan, expected = published_rounds(cost_ts, 0.5, 3)
    assert sum(map(sum, plan)) == pytest.approx(2.0)
    _, student_rows = published_rounds([list(r) for r in zip(*cost_ts)], 0.5, 3)
    assert abs(student_rows - expected) > 1e-3  # the orientation matters here
    got = sequence_ot_loss(xs, xt, cost="l1", eps=0.5, parity=True, n_iters=3)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---- the converged solver ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,backend", [(torch.float64, "torch"), (torch.float32, "cpu"), (torch.float32, "torch")]
)
def test_sinkd_equals_sinkhorn_loss_on_formed_cost(dtype, backend):
    zs, zt, _ = batch_inputs(dtype, rows=6, vocab=9)
    q = torch.softmax(zs.detach() / 2.0, -1)
    p = torch.softmax(zt / 2.0, -1)
    cost = torch.cdist(q, p, p=1.0)
    got = sinkd_loss(zs, zt, temperature=2.0, eps=0.1, backend=backend)
    want = sinkhorn_loss(cost, eps=0.1, value="transport", backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eps", [1.0, 0.3, 0.1, 0.03])
def test_sinkd_identical_pair_closed_form(eps):
    # Two points, student == teacher: C = [[0, c], [c, 0]] with weights 1/2. The plan puts
    # (1/2) sigma(-c / eps) on each off-diagonal entry, so <P, C> = c sigma(-c / eps): not 0
    # (the entropic plan is not the identity), but -> 0 as eps -> 0.
    z = logits_of([[0.8, 0.15, 0.05], [0.1, 0.3, 0.6]])
    c = (torch.softmax(z[0], -1) - torch.softmax(z[1], -1)).abs().sum().item()
    got = sinkd_loss(z, z, eps=eps, eps_scaling=0.5, **TIGHT)
    eps32 = torch.tensor(eps, dtype=torch.float32).item()  # the solver holds eps in float32
    assert got.item() == pytest.approx(c * sigmoid(-c / eps32), rel=1e-9, abs=1e-15)


def test_sinkd_identical_sets_bounds():
    zs, _, _ = batch_inputs(torch.float32, rows=6)
    z = zs.detach()
    p = torch.softmax(z, -1)
    mean_cost = torch.cdist(p, p, p=1.0).mean().item()
    losses = [
        sinkd_loss(z, z, eps=eps, eps_scaling=0.5, max_iters=20000).item()
        for eps in (1.0, 0.1, 0.01)
    ]
    # <P, C> <= <a b^T, C> (a b^T has zero KL), decreasing in eps towards the unregularized
    # value 0 (the identity plan).
    assert mean_cost >= losses[0]
    assert all(x > y for x, y in zip(losses, losses[1:]))
    assert 0 <= losses[-1] < 1e-6


# ---- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parity,value", [(False, "objective"), (True, "transport")])
def test_sinkd_gradcheck(parity, value):
    # The envelope gradient (dC = P) is the exact derivative of the objective at convergence;
    # parity mode is differentiated through its rounds. value="transport" in converged mode is
    # not the derivative of <P, C> (the plan is held fixed) and is checked against the twin.
    zs, zt, labels = batch_inputs(torch.float64, rows=5, vocab=6)

    def loss(z):
        return sinkd_loss(
            z, zt, labels=labels, eps=0.3, parity=parity, value=value, n_iters=5, **TIGHT
        )

    assert torch.autograd.gradcheck(loss, (zs,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "parity,value,cost,eps",
    [
        (False, "objective", "sqeuclidean", 2.0),
        (False, "objective", "cosine", 0.5),
        (True, "transport", "l2", 0.5),
    ],
)
def test_sequence_gradcheck(parity, value, cost, eps):
    xs, xt, ms, mt = sequence_inputs(torch.float64)

    def loss(s, t):
        return sequence_ot_loss(
            s,
            t,
            student_mask=ms,
            teacher_mask=mt,
            cost=cost,
            eps=eps,
            parity=parity,
            value=value,
            n_iters=4,
            **TIGHT,
        )

    # fast mode: directional derivatives along random vectors, both inputs at once
    assert torch.autograd.gradcheck(loss, (xs, xt), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("parity", [False, True])
def test_sinkd_teacher_gets_no_grad(parity):
    zs, zt, _ = batch_inputs(torch.float32)
    zt.requires_grad_()
    sinkd_loss(zs, zt, parity=parity).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0


# ---- masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkd_ignored_rows(parity, dtype):
    zs, zt, labels = batch_inputs(dtype)
    keep = labels != -100
    garbage_s, garbage_t = zs.detach().clone(), zt.clone()
    garbage_s[~keep], garbage_t[~keep] = float("nan"), float("inf")
    garbage_s.requires_grad_()
    got = sinkd_loss(garbage_s, garbage_t, labels=labels, parity=parity)
    got.backward()
    sub = zs.detach()[keep].requires_grad_()
    want = sinkd_loss(sub, zt[keep], parity=parity)
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(garbage_s.grad[~keep], torch.zeros_like(garbage_s.grad[~keep]))
    torch.testing.assert_close(garbage_s.grad[keep], sub.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("parity", [False, True])
def test_sinkd_all_rows_ignored(parity):
    zs, zt, _ = batch_inputs(torch.float32, rows=5)
    labels = torch.full((5,), -100)
    loss = sinkd_loss(zs, zt, labels=labels, parity=parity)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(zs.grad, torch.zeros_like(zs))


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("cost", COSTS)
def test_sequence_masked_positions_do_not_leak(parity, cost):
    xs, xt, ms, mt = sequence_inputs(torch.float32)
    gs, gt = xs.detach().clone(), xt.detach().clone()
    gs[ms == 0], gt[mt == 0] = float("nan"), float("-inf")
    gs.requires_grad_(), gt.requires_grad_()
    loss = sequence_ot_loss(
        gs,
        gt,
        student_mask=ms.bool(),
        teacher_mask=mt.float(),
        cost=cost,
        parity=parity,
        eps=0.5,
        reduction="none",
    )
    loss.sum().backward()
    for k in range(3):
        s = xs.detach()[k][ms[k] == 1][None]
        t = xt.detach()[k][mt[k] == 1][None]
        if s.shape[1] == 0:
            assert loss[k].item() == 0.0
            continue
        want = sequence_ot_loss(s, t, cost=cost, parity=parity, eps=0.5)
        torch.testing.assert_close(loss[k], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(gs.grad[ms == 0], torch.zeros_like(gs.grad[ms == 0]))
    assert torch.equal(gt.grad[mt == 0], torch.zeros_like(gt.grad[mt == 0]))
    assert torch.isfinite(gs.grad).all() and torch.isfinite(gt.grad).all()


@pytest.mark.parametrize("parity", [False, True])
def test_sequence_reductions(parity):
    xs, xt, ms, mt = sequence_inputs(torch.float64)
    opts = dict(student_mask=ms, teacher_mask=mt, parity=parity, **TIGHT)
    per_seq = sequence_ot_loss(xs, xt, reduction="none", **opts)
    assert per_seq.shape == (3,) and per_seq[1].item() == 0.0
    torch.testing.assert_close(sequence_ot_loss(xs, xt, reduction="sum", **opts), per_seq.sum())
    # the empty sequence is left out of the mean
    torch.testing.assert_close(sequence_ot_loss(xs, xt, **opts), per_seq.sum() / 2)


# ---- layouts and dtypes ------------------------------------------------------------------------


def test_sinkd_leading_shape_and_vocab_prefix():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    zt = torch.randn(2, 3, 8, generator=g)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    got = sinkd_loss(zs, zt, labels=labels)
    got.backward()
    flat = zs.detach().reshape(6, 10)[:, :8].requires_grad_()
    want = sinkd_loss(flat, zt.reshape(6, 8), labels=labels.reshape(6))
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(zs.grad.reshape(6, 10)[:, :8], flat.grad)
    assert torch.equal(zs.grad[..., 8:], torch.zeros(2, 3, 2))


def test_sinkd_low_precision_and_neg_inf():
    zs, zt, labels = batch_inputs(torch.float32)
    zs_bf16 = zs.detach().to(torch.bfloat16)
    zs_bf16[0, :3] = float("-inf")  # outside the support
    zs_bf16.requires_grad_()
    loss = sinkd_loss(zs_bf16, zt.to(torch.float16), labels=labels)
    loss.backward()
    want = sinkd_loss_reference(zs_bf16.detach().float(), zt.half().float(), labels=labels)
    assert loss.dtype == torch.float32 and zs_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(zs_bf16.grad.float()).all()


@pytest.mark.parametrize(
    "shape_x,shape_y", [((5, 9), (4, 9)), ((2, 5, 9), (2, 3, 9)), ((1, 1, 1), (1, 6, 1))]
)
def test_l1_cost_tiles_match_materialized(monkeypatch, shape_x, shape_y):
    # The tiled backward pass (the default off CPU); a tile budget far below n * m * d forces
    # tiles over both rows and features.
    monkeypatch.setattr(ot_losses, "L1_TILE_ELEMENTS", 7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape_x, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape_y, generator=g, dtype=torch.float64, requires_grad=True)
    cost = l1_cost(x, y, tiled=True)
    upstream = torch.randn(cost.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(cost, (x, y), upstream)
    want = (x.unsqueeze(-2) - y.unsqueeze(-3)).abs().sum(-1)
    want_grads = torch.autograd.grad(want, (x, y), upstream, retain_graph=True)
    torch.testing.assert_close(cost, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    # an expanded (stride-0) upstream gradient, as from .sum()
    (gx,) = torch.autograd.grad(l1_cost(x, y, tiled=True).sum(), (x,))
    (wx,) = torch.autograd.grad(want.sum(), (x,))
    torch.testing.assert_close(gx, wx)


def test_reference_costs_match_pairwise_cost():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y[0] = 0.0
    for kind in COSTS:
        torch.testing.assert_close(ot_losses._cost(kind, x, y), pairwise_cost_reference(kind, x, y))


# ---- bad inputs --------------------------------------------------------------------------------

Z = torch.randn(4, 6)
SEQ_S, SEQ_T = torch.randn(2, 3, 4), torch.randn(2, 5, 4)

SINKD_BAD = [
    (
        dict(student_logits=torch.randn(4, 6), teacher_logits=torch.randn(5, 6)),
        ValueError,
        r"\(4, 6\).*\(5, 6\)",
    ),
    (dict(student_logits=torch.randint(0, 3, (4, 6))), TypeError, "floating point"),
    (dict(eps=0.0), ValueError, "eps .* got 0.0"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(temperature=0.0), ValueError, "temperature .* got 0.0"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(cost="wasserstein"), ValueError, "unknown cost 'wasserstein'"),
    (dict(n_iters=0), ValueError, "n_iters .* got 0"),
    (dict(value="plan"), ValueError, "value must be one of"),
    (dict(parity=True, value="objective"), ValueError, "parity"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"\(4,\).*\(3,\)"),
    (dict(labels=torch.zeros(4)), TypeError, "integer"),
    (dict(labels=torch.tensor([0, 1, 9, -100])), ValueError, r"\[9\]"),
    (dict(max_iters=0), ValueError, "max_iters"),
]


@pytest.mark.parametrize("kwargs,error,match", SINKD_BAD)
def test_sinkd_bad_inputs(kwargs, error, match):
    kwargs = dict(kwargs)
    zs = kwargs.pop("student_logits", Z)
    zt = kwargs.pop("teacher_logits", Z)
    with pytest.raises(error, match=match):
        sinkd_loss(zs, zt, **kwargs)


SEQUENCE_BAD = [
    (dict(teacher=torch.randn(2, 5, 3)), ValueError, r"\(2, 3, 4\).*\(2, 5, 3\).*widths"),
    (dict(teacher=torch.randn(3, 5, 4)), ValueError, "batch size"),
    (dict(student=torch.randn(3, 4)), ValueError, r"\[B, T, D\]; got \(3, 4\)"),
    (dict(student=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "floating point"),
    (dict(student_mask=torch.ones(2, 4)), ValueError, r"student_mask .*\(2, 3\).*\(2, 4\)"),
    (dict(teacher_mask=[1, 1]), TypeError, "teacher_mask"),
    (dict(cost="kl"), ValueError, "unknown cost 'kl'"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(parity=True, value="objective"), ValueError, "parity"),
    (dict(n_iters=1.5), ValueError, "n_iters"),
]


@pytest.mark.parametrize("kwargs,error,match", SEQUENCE_BAD)
def test_sequence_bad_inputs(kwargs, error, match):
    kwargs = dict(kwargs)
    xs = kwargs.pop("student", SEQ_S)
    xt = kwargs.pop("teacher", SEQ_T)
    with pytest.raises(error, match=match):
        sequence_ot_loss(xs, xt, **kwargs)
