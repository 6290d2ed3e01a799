"""xtok_ot_loss and sorted_topk_probs: against the plain-PyTorch twin (float64 tight, float32
loose, gradients to both sides and a projection), against sequence_ot_loss without the prior,
the prior and the band on hand-sized problems, the chunk marginals, uncounted and empty
sequences, and input checks."""

import pytest
import torch

from fastkd.ot import sequence_ot_loss
from fastkd.reference.xtok_ot import xtok_ot_loss_reference
from fastkd.xtok.ot import _transport, sorted_topk_probs, xtok_ot_loss

from helpers import FLOAT64_TOL

# eps and the weights below are exact in float32: the solver holds eps as a float32.
EPS = 0.25
# Tight solves for float64 comparisons; float32 runs the native kernel to its own precision.
TIGHT = dict(tol=1e-12, max_iters=20000)
LOOSE = dict(tol=1e-6, max_iters=5000)
# Tolerances (atol, rtol) of float32 results against the float64 twin.
F32_TOL = dict(atol=2e-5, rtol=2e-4)

# Three sequences of 7 student and 9 teacher positions: a -1 inside both sides and a chunk of
# the teacher's the student does not count; a prompt left out (-1) with ids starting at 5;
# no counted student position at all.
STUDENT_IDS = torch.tensor(
    [[0, 0, 1, -1, 2, 3, 4], [-1, -1, 5, 5, 6, 7, 8], [-1] * 7], dtype=torch.int32
)
TEACHER_IDS = torch.tensor(
    [[0, 1, 1, 1, 2, -1, 3, 4, 5], [-1, -1, -1, 5, 6, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
    dtype=torch.int32,
)


def features(dtype, d_s, d_t, *, probs=False, nan=True, seed=0):
    """Student [3, 7, d_s] and teacher [3, 9, d_t] features requiring grad, NaN at every
    position whose chunk id is -1 (with ``nan``); softmax rows with ``probs``."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(3, 7, d_s, generator=g, dtype=torch.float64)
    xt = torch.randn(3, 9, d_t, generator=g, dtype=torch.float64)
    if probs:
        xs, xt = (2 * xs).softmax(-1), (2 * xt).softmax(-1)
    if nan:
        xs[STUDENT_IDS < 0] = float("nan")
        xt[TEACHER_IDS < 0] = float("nan")
    return xs.to(dtype).requires_grad_(), xt.to(dtype).requires_grad_()


def linear(d_s, d_t, dtype, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_s, d_t).to(dtype)


def plan_of(xs, xt, s_ids, t_ids, **opts):
    """The op's plan [B, N, M] (the private solve under the public loss)."""
    defaults = dict(
        cost="cosine",
        projection=None,
        topk=50,
        prior_weight=1.0,
        band=None,
        eps=EPS,
        marginals="positions",
        backend="auto",
        **TIGHT,
    )
    return _transport(xs, xt, s_ids, t_ids, **{**defaults, **opts}).plan


# ---- against the plain-PyTorch twin ------------------------------------------------------------

REFERENCE_CASES = [  # (id, cost, widths (D_s, D_t), projection, options)
    ("cosine", "cosine", (5, 5), False, {}),
    ("sqeuclidean-prior0.5", "sqeuclidean", (5, 5), False, dict(prior_weight=0.5)),
    ("l1-band2", "l1", (5, 5), False, dict(band=2)),
    ("cosine-band0-chunks", "cosine", (5, 5), False, dict(band=0, marginals="chunks")),
    (
        "sqeuclidean-chunks-prior2",
        "sqeuclidean",
        (3, 3),
        False,
        dict(marginals="chunks", prior_weight=2.0),
    ),
    ("projection", "cosine", (4, 6), True, {}),
    ("projection-l1-band1-chunks", "l1", (6, 3), True, dict(band=1, marginals="chunks")),
    ("sorted_l1-full", "sorted_l1", (6, 11), False, dict(topk=None)),
    ("sorted_l1-top3", "sorted_l1", (6, 11), False, dict(topk=3, band=3)),
    ("sorted_l1-top20", "sorted_l1", (11, 6), False, dict(topk=20, prior_weight=0.0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "cost,widths,project,opts",
    [c[1:] for c in REFERENCE_CASES],
    ids=[c[0] for c in REFERENCE_CASES],
)
def test_matches_reference(dtype, cost, widths, project, opts):
    xs, xt = features(dtype, *widths, probs=cost == "sorted_l1")
    proj = linear(*widths, dtype) if project else None
    kwargs = dict(cost=cost, projection=proj, eps=EPS, reduction="none", **opts)
    got = xtok_ot_loss(
        xs, xt, STUDENT_IDS, TEACHER_IDS, **kwargs, **(TIGHT if dtype == torch.float64 else LOOSE)
    )
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    inputs = (xs, xt, *(proj.parameters() if project else ()))
    g_got = torch.autograd.grad((got * weights).sum(), inputs)

    xs64, xt64 = (t.detach().double().requires_grad_() for t in (xs, xt))
    proj64 = linear(*widths, torch.float64) if project else None
    want = xtok_ot_loss_reference(
        xs64, xt64, STUDENT_IDS, TEACHER_IDS, **{**kwargs, "projection": proj64}, **TIGHT
    )
    g_want = torch.autograd.grad(
        (want * weights.double()).sum(), (xs64, xt64, *(proj64.parameters() if project else ()))
    )
    assert got.dtype == dtype and got.shape == (3,) and got[2].item() == 0.0
    tol = FLOAT64_TOL if dtype == torch.float64 else F32_TOL
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b in zip(g_got, g_want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, **tol)
    if project:  # the projection's weight gets a gradient
        assert g_got[2].abs().max() > 0


@pytest.mark.parametrize("marginals", ["positions", "chunks"])
def test_plan_matches_reference(marginals):
    xs, xt = features(torch.float64, 5, 5)
    opts = dict(prior_weight=0.5, band=1, marginals=marginals, eps=EPS, **TIGHT)
    got = plan_of(xs, xt, STUDENT_IDS, TEACHER_IDS, **opts)
    _, want = xtok_ot_loss_reference(
        xs.detach(), xt.detach(), STUDENT_IDS, TEACHER_IDS, return_plans=True, **opts
    )
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


# ---- without the prior: sequence_ot_loss -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cost", ["cosine", "sorted_l1"])
def test_prior_weight_zero_is_sequence_ot_loss(dtype, cost):
    xs, xt = features(dtype, 6, 6 if cost == "cosine" else 9, probs=cost == "sorted_l1")
    solve = TIGHT if dtype == torch.float64 else LOOSE
    got = xtok_ot_loss(
        xs, xt, STUDENT_IDS, TEACHER_IDS, cost=cost, topk=4, prior_weight=0.0, eps=EPS, **solve
    )
    g_got = torch.autograd.grad(got, (xs, xt))
    if cost == "sorted_l1":  # MultiLevelOT's token level: L1 between sorted top-k rows
        s_in, t_in = sorted_topk_probs(xs, 4), sorted_topk_probs(xt, 4)
    else:
        s_in, t_in = xs, xt
    want = sequence_ot_loss(
        s_in,
        t_in,
        student_mask=STUDENT_IDS >= 0,
        teacher_mask=TEACHER_IDS >= 0,
        cost="l1" if cost == "sorted_l1" else cost,
        eps=EPS,
        **solve,
    )
    g_want = torch.autograd.grad(want, (xs, xt))
    tol = FLOAT64_TOL if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(g_got, g_want):
        # NaN at uncounted positions: sequence_ot_loss's gradient there is 0 too
        torch.testing.assert_close(a, b, **tol)


# ---- the prior and the band --------------------------------------------------------------------


@pytest.mark.parametrize("band", [None, 0, 1])
@pytest.mark.parametrize("offset", [0, 10])
def test_prior_and_band_by_hand(band, offset):
    # One student position in chunk c, two teacher positions in chunks c and c + 2, the same
    # vectors (cosine 0): C = [0, prior_weight * 2 / 2]; all of the student's mass must split
    # evenly over both teacher positions (weights 1/2 each), whatever the band: the value is
    # prior_weight / 2 with the band's penalty left out of it.
    x = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    y = torch.tensor([[[1.0, 2.0], [2.0, 4.0]]], dtype=torch.float64)
    s_ids = torch.tensor([[offset]])
    t_ids = torch.tensor([[offset, offset + 2]])
    got = xtok_ot_loss(x, y, s_ids, t_ids, prior_weight=0.75, band=band, eps=EPS, **TIGHT)
    assert got.item() == pytest.approx(0.375, rel=1e-12)


def test_band_restricts_transport():
    # One token per chunk on both sides: every band fits the uniform marginals, and the plan
    # equals the one with the far pairs removed outright.
    g = torch.Generator().manual_seed(5)
    ids = torch.arange(6)[None].repeat(2, 1)
    xs = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 6, 4, generator=g, dtype=torch.float64).flip(1)  # pulls across the band
    for band in (0, 1, 2):
        plan = plan_of(xs, xt, ids, ids, band=band, prior_weight=0.0)
        far = (ids[:, :, None] - ids[:, None, :]).abs() > band
        assert plan[far].sum().item() < 1e-15
        loss = xtok_ot_loss(xs, xt, ids, ids, band=band, prior_weight=0.0, eps=EPS, **TIGHT)
        exact = xtok_ot_loss_reference(
            xs, xt, ids, ids, band=band, prior_weight=0.0, eps=EPS, exact_band=True, **TIGHT
        )
        torch.testing.assert_close(loss, exact, **FLOAT64_TOL)
    unbanded = plan_of(xs, xt, ids, ids, prior_weight=0.0)
    assert unbanded[(ids[:, :, None] - ids[:, None, :]).abs() > 1].sum() > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_marginals_fit_every_band(dtype):
    # Chunks of 2, 1, 3 student and 1, 3, 1 teacher tokens: with uniform marginals band 0
    # cannot hold them and mass leaves the band; with chunk marginals every chunk carries 1/3
    # on both sides, the plan stays inside (block diagonal) and equals the exact banded one.
    s_ids = torch.tensor([[0, 0, 1, 2, 2, 2]])
    t_ids = torch.tensor([[0, 1, 1, 1, 2]])
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(1, 6, 3, generator=g, dtype=torch.float64).to(dtype)
    xt = torch.randn(1, 5, 3, generator=g, dtype=torch.float64).to(dtype)
    solve = TIGHT if dtype == torch.float64 else LOOSE
    far = (s_ids[:, :, None] - t_ids[:, None, :]).abs() > 0
    chunks = plan_of(xs, xt, s_ids, t_ids, band=0, marginals="chunks", **solve).double()
    mass_tol = dict(atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
    rows = torch.tensor([[1 / 6, 1 / 6, 1 / 3, 1 / 9, 1 / 9, 1 / 9]], dtype=torch.float64)
    cols = torch.tensor([[1 / 3, 1 / 9, 1 / 9, 1 / 9, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(chunks.sum(2), rows, **mass_tol)
    torch.testing.assert_close(chunks.sum(1), cols, **mass_tol)
    assert chunks[far].sum().item() < 1e-30
    exact = xtok_ot_loss_reference(
        xs.double(),
        xt.double(),
        s_ids,
        t_ids,
        band=0,
        marginals="chunks",
        eps=EPS,
        exact_band=True,
        **TIGHT,
    )
    got = xtok_ot_loss(xs, xt, s_ids, t_ids, band=0, marginals="chunks", eps=EPS, **solve)
    torch.testing.assert_close(
        got.double(), exact, **(FLOAT64_TOL if dtype == torch.float64 else F32_TOL)
    )
    positions = plan_of(xs, xt, s_ids, t_ids, band=0, **solve)
    # Uniform marginals put 1/3, 1/6, 1/2 on the student's chunks and 1/5, 3/5, 1/5 on the
    # teacher's: at least (1/3 - 1/5) + (1/2 - 1/5) = 0.433 must leave the band.
    assert positions[far].sum().item() > 0.43


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identical_features_identity_chunks_give_the_diagonal(dtype):
    # Orthonormal vectors: cost 0 on the diagonal, 1 + prior elsewhere; at eps = 1/32 an
    # off-diagonal entry weighs e^-32 of a diagonal one.
    q, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    )
    x = (3.0 * q)[None].repeat(2, 1, 1).to(dtype)
    ids = torch.arange(6)[None].repeat(2, 1)
    solve = TIGHT if dtype == torch.float64 else LOOSE
    plan = plan_of(x, x, ids, ids, eps=1 / 32, **solve)
    off = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(
        plan.double(), torch.eye(6, dtype=torch.float64).expand(2, 6, 6) / 6, atol=off, rtol=0
    )
    assert xtok_ot_loss(x, x, ids, ids, eps=1 / 32, **solve).item() < off


# ---- uncounted positions, empty sequences, reductions ------------------------------------------


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "sorted_l1"])
@pytest.mark.parametrize("marginals", ["positions", "chunks"])
def test_uncounted_positions_do_not_leak(cost, marginals):
    probs = cost == "sorted_l1"
    xs, xt = features(torch.float32, 4, 4 if not probs else 7, probs=probs)
    proj = None if probs else linear(4, 4, torch.float32)
    opts = dict(cost=cost, projection=proj, band=2, marginals=marginals, eps=EPS, reduction="none")
    loss = xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, **opts)
    g_s, g_t = torch.autograd.grad(loss.sum(), (xs, xt))
    clean_s, clean_t = (torch.nan_to_num(t.detach(), nan=0.5) for t in (xs, xt))
    want = xtok_ot_loss(clean_s, clean_t, STUDENT_IDS, TEACHER_IDS, **opts)
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    assert torch.equal(g_s[STUDENT_IDS < 0], torch.zeros_like(g_s[STUDENT_IDS < 0]))
    assert torch.equal(g_t[TEACHER_IDS < 0], torch.zeros_like(g_t[TEACHER_IDS < 0]))
    assert torch.isfinite(g_s).all() and torch.isfinite(g_t).all()
    if marginals == "chunks":  # teacher chunk 9 has no student partner: no weight, no gradient
        assert torch.equal(g_t[1, 8], torch.zeros_like(g_t[1, 8]))


def test_reductions():
    xs, xt = features(torch.float64, 5, 5)
    opts = dict(eps=EPS, **TIGHT)
    per_seq = xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, reduction="none", **opts)
    assert per_seq.shape == (3,) and per_seq[2].item() == 0.0 and (per_seq[:2] > 0).all()
    total = xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, reduction="sum", **opts)
    mean = xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, **opts)
    torch.testing.assert_close(total, per_seq.sum())
    torch.testing.assert_close(mean, per_seq.sum() / 2)  # the empty sequence is left out
    for count in (5, torch.tensor(0.5, dtype=torch.float64)):
        scaled = xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, num_items_in_batch=count, **opts)
        torch.testing.assert_close(scaled, per_seq.sum() / count)
    with pytest.raises(ValueError, match="num_items_in_batch must be a number"):
        xtok_ot_loss(xs, xt, STUDENT_IDS, TEACHER_IDS, num_items_in_batch=0, **opts)


@pytest.mark.parametrize(
    "shape_s,shape_t,counted",
    [((2, 4, 3), (2, 5, 3), False), ((2, 0, 3), (2, 5, 3), True), ((0, 4, 3), (0, 5, 3), True)],
    ids=["nothing-counted", "no-student-positions", "no-sequences"],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_gives_zero_and_zero_gradient(shape_s, shape_t, counted, reduction):
    xs = torch.randn(shape_s, requires_grad=True)
    xt = torch.randn(shape_t, requires_grad=True)
    s_ids = torch.full(shape_s[:2], 0 if counted else -1, dtype=torch.int32)
    t_ids = torch.full(shape_t[:2], -1 if not counted else 0, dtype=torch.int32)
    if not counted:
        with torch.no_grad():
            xs.fill_(float("nan"))
    loss = xtok_ot_loss(xs, xt, s_ids, t_ids, reduction=reduction)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, torch.zeros_like(loss))
    assert loss.shape == ((shape_s[0],) if reduction == "none" else ())
    loss.sum().backward()
    assert torch.equal(xs.grad, torch.zeros_like(xs)) and torch.equal(xt.grad, torch.zeros_like(xt))


def test_teacher_gets_gradient_only_when_it_requires_it():
    xs, xt = features(torch.float32, 5, 5)
    loss = xtok_ot_loss(xs, xt.detach(), STUDENT_IDS, TEACHER_IDS)
    loss.backward()
    assert xt.grad is None and torch.isfinite(xs.grad).all() and xs.grad.abs().max() > 0


def test_low_precision_inputs():
    xs, xt = features(torch.float32, 5, 5, nan=False)
    s16 = xs.detach().to(torch.bfloat16).requires_grad_()
    loss = xtok_ot_loss(s16, xt.detach().half(), STUDENT_IDS, TEACHER_IDS, eps=EPS)
    loss.backward()
    want = xtok_ot_loss_reference(
        s16.detach().double(),
        xt.detach().half().double(),
        STUDENT_IDS,
        TEACHER_IDS,
        eps=EPS,
        **TIGHT,
    )
    assert loss.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want, **F32_TOL)


# ---- sorted_topk_probs -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 1, 3, 7, 10])
def test_sorted_topk_probs(k):
    g = torch.Generator().manual_seed(7)
    p = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    got = sorted_topk_probs(p, k)
    full = p.detach().sort(-1, descending=True).values
    width = 7 if k is None else k
    want = torch.zeros(2, 3, width, dtype=torch.float64)
    want[..., : min(width, 7)] = full[..., :width]
    assert torch.equal(got.detach(), want)
    # each kept entry's upstream gradient lands on the entry it came from
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(got, p, upstream)
    order = p.detach().argsort(-1, descending=True)
    expected = torch.zeros_like(p).scatter(-1, order[..., :width], upstream[..., : min(width, 7)])
    assert torch.equal(grad, expected)


# ---- bad inputs --------------------------------------------------------------------------------

S, T = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
S_IDS, T_IDS = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32)

BAD = [
    (dict(student=S.tolist()), TypeError, "student must be a torch.Tensor"),
    (
        dict(teacher=torch.zeros(2, 5, 4, dtype=torch.long)),
        TypeError,
        "teacher must be floating point",
    ),
    (
        dict(student=torch.randn(3, 4)),
        ValueError,
        r"student must have shape \[B, positions, width\]; got \(3, 4\)",
    ),
    (dict(teacher=torch.randn(3, 5, 4)), ValueError, r"\(2, 3, 4\).*\(3, 5, 4\).*batch size"),
    (
        dict(student_chunk_id=torch.zeros(2, 3)),
        TypeError,
        "student_chunk_id must be an integer tensor",
    ),
    (
        dict(teacher_chunk_id=torch.zeros(2, 5, dtype=torch.bool)),
        TypeError,
        "teacher_chunk_id must be an integer",
    ),
    (
        dict(teacher_chunk_id=torch.zeros(2, 4, dtype=torch.int32)),
        ValueError,
        r"teacher_chunk_id must have shape \(2, 5\); got \(2, 4\)",
    ),
    (
        dict(teacher=torch.randn(2, 5, 6)),
        ValueError,
        r"D_s = 4 and teacher width D_t = 6 .*nn.Linear\(4, 6\)",
    ),
    (dict(projection="linear"), TypeError, "projection must be callable"),
    (
        dict(projection=torch.nn.Linear(4, 4), cost="sorted_l1"),
        ValueError,
        "sorted_l1.*no projection",
    ),
    (
        dict(teacher=torch.randn(2, 5, 6), projection=torch.nn.Linear(4, 5)),
        ValueError,
        r"projection must map .*\(2, 3, 6\); got \(2, 3, 5\)",
    ),
    (dict(cost="l2"), ValueError, "unknown cost 'l2'"),
    (dict(topk=0), ValueError, "topk must be None or an int >= 1; got 0"),
    (dict(topk=2.5), ValueError, "topk"),
    (dict(topk=True), ValueError, "topk"),
    (dict(band=-1), ValueError, r"band must be None or an int >= 0 \(chunks\); got -1"),
    (dict(band=1.5), ValueError, "band"),
    (dict(prior_weight=-0.5), ValueError, "prior_weight must be a finite number >= 0; got -0.5"),
    (dict(prior_weight=float("nan")), ValueError, "prior_weight"),
    (dict(prior_weight=float("inf")), ValueError, "prior_weight"),
    (dict(eps=0.0), ValueError, "eps must be .* got 0.0"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(max_iters=0), ValueError, "max_iters"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
    (dict(marginals="tokens"), ValueError, "marginals must be one of"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_inputs(kwargs, error, match):
    kwargs = dict(kwargs)
    args = [
        kwargs.pop(name, default)
        for name, default in (
            ("student", S),
            ("teacher", T),
            ("student_chunk_id", S_IDS),
            ("teacher_chunk_id", T_IDS),
        )
    ]
    with pytest.raises(error, match=match):
        xtok_ot_loss(*args, **kwargs)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_sorted_topk_probs_bad_k(k):
    with pytest.raises(ValueError, match="k must be None or an int >= 1"):
        sorted_topk_probs(torch.rand(2, 5), k)


@pytest.mark.parametrize("probs", [torch.ones(2, 5, dtype=torch.long), [0.5, 0.5]])
def test_sorted_topk_probs_bad_probs(probs):
    with pytest.raises(TypeError, match="probs must be a floating-point tensor"):
        sorted_topk_probs(probs, 2)
