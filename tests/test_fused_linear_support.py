"""fastkd.fused_linear_support (a model's log-probs at given ids and its exact tail mass, chunked)
and fastkd.student_support_targets against a plain-PyTorch float64 computation on the full
logits; the tail summed over its own columns against 1 - sum; input errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd

from helpers import backend_params, column_major

OP = "fused_linear_support"
FP32 = dict(atol=1e-6, rtol=1e-5)  # fp32 outputs against float64


def head(rows, vocab, hidden=8, *, seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / 2
    b = torch.randn(vocab, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def random_ids(lead, vocab, k, *, seed=1):
    """k distinct ids per row in random order, then a padding slot."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    return torch.cat([ids, torch.full((n, 1), -1)], 1).reshape(*lead, k + 1)


def oracle(x, w, b, ids, *, temperature=1.0, logit_scale=1.0):
    """(logprobs [..., K] (0 at padding), tail mass [...]) in float64 from the whole logits."""
    z = logit_scale * (x.double() @ w.double().T + (0 if b is None else b.double()))
    lp = torch.log_softmax(z / temperature, -1)
    ids = ids.long()
    at = torch.where(ids >= 0, lp.gather(-1, ids.clamp(min=0)), 0.0)
    member = torch.nn.functional.one_hot(ids.clamp(min=0), w.shape[0]) * (ids >= 0)[..., None]
    tail = lp.exp().masked_fill(member.sum(-2) > 0, 0.0).sum(-1)
    return at, tail


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize(
    "vocab,k,dtype,temperature",
    [
        (1, 1, torch.float32, 1.0),
        (7, 1, torch.float32, 2.0),
        (7, 7, torch.float64, 0.7),
        (1000, 1, torch.float32, 1.0),
        (1000, 50, torch.float64, 1.3),
        (1000, 1000, torch.float32, 1.0),
        (1000, 50, torch.bfloat16, 1.0),
    ],
)
def test_matches_full_logits(backend, vocab, k, dtype, temperature):
    x, w, b = head((3, 5), vocab, seed=2, dtype=dtype)
    ids = random_ids((3, 5), vocab, k, seed=3)
    targets = fastkd.fused_linear_support(
        x, w, ids, bias=b, temperature=temperature, logit_scale=0.9, chunk_size=4, backend=backend
    )
    lp, tail = oracle(x, w, b, ids, temperature=temperature, logit_scale=0.9)
    assert targets.method == "support" and targets.tail == "bucket"
    assert targets.vocab_size == vocab and targets.ids.dtype == torch.int32
    assert torch.equal(targets.ids, ids.int())
    # bf16 logits: the GEMM runs on the fp32 copy, whose sums torch rounds differently.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(targets.logprobs.double(), lp, **tol)
    torch.testing.assert_close(targets.weights.double(), lp.exp() * (ids >= 0), **tol)
    torch.testing.assert_close(targets.tail_mass.double(), tail, **tol)
    if k == vocab:
        assert torch.all(targets.tail_mass == 0)


def test_tail_summed_over_its_columns():
    """Where the kept mass is far from 1, the tail equals 1 - sum p_k; where it is within 1e-6
    of 1, the tail keeps its relative accuracy, which 1 - sum p_k (all rounding) loses."""
    vocab = 1000
    x = torch.eye(4, 8)
    w = torch.zeros(vocab, 8)
    w[:4, :4] = 24.0 * torch.eye(4)  # token r: logit 24 at id r, 0 elsewhere (tail ~1e-7)
    ids = torch.arange(4)[:, None]
    near_one = fastkd.fused_linear_support(x, w, ids)
    exact = oracle(x, w, None, ids)[1]
    assert torch.all(exact < 1e-6)
    rel = (near_one.tail_mass.double() - exact).abs() / exact
    assert rel.max() < 1e-5
    one_minus = 1.0 - near_one.weights.sum(-1).double()
    assert ((one_minus - exact).abs() / exact).max() > 1e-2

    x, w, b = head((6,), vocab, seed=4)
    ids = random_ids((6,), vocab, 5, seed=5)
    far = fastkd.fused_linear_support(x, w, ids, bias=b)
    assert torch.all(far.tail_mass > 0.5)
    torch.testing.assert_close(far.tail_mass, 1.0 - far.weights.sum(-1), atol=1e-6, rtol=0)


def test_neg_inf_logits_duplicates_and_padding():
    """An id at a -inf logit keeps its slot with logprob -inf; a repeated id is scored in its
    first slot and its later slots become padding; padding slots have logprob 0."""
    x, w, b = head((3,), 9, seed=6)
    b[2] = -math.inf
    ids = torch.tensor([[2, 4, 4, -1], [1, 2, 3, 1], [-1, -1, -1, -1]])
    t = fastkd.fused_linear_support(x, w, ids, bias=b)
    assert torch.equal(t.ids, torch.tensor([[2, 4, -1, -1], [1, 2, 3, -1], [-1, -1, -1, -1]]).int())
    assert t.logprobs[0, 0] == -math.inf and t.weights[0, 0] == 0
    assert torch.all(t.logprobs[t.ids < 0] == 0) and torch.all(t.weights[t.ids < 0] == 0)
    lp, tail = oracle(x, w, b, t.ids)
    torch.testing.assert_close(t.logprobs[t.ids >= 0].double(), lp[t.ids >= 0], **FP32)
    torch.testing.assert_close(t.tail_mass.double(), tail, **FP32)
    torch.testing.assert_close(t.tail_mass[2], torch.tensor(1.0))


def test_non_contiguous_inputs_and_no_gradient():
    x, w, b = head((5, 6), 40, seed=7)
    ids = random_ids((5, 6), 40, 3, seed=8)
    x_nc, w_nc = column_major(x), w.t().contiguous().t()
    x_nc.requires_grad_()
    with torch.enable_grad():
        t = fastkd.fused_linear_support(x_nc, w_nc.requires_grad_(), column_major(ids), bias=b)
    assert not t.logprobs.requires_grad and not t.tail_mass.requires_grad
    expected = fastkd.fused_linear_support(x, w, ids, bias=b)
    torch.testing.assert_close(t.logprobs, expected.logprobs)
    torch.testing.assert_close(t.tail_mass, expected.tail_mass)


@pytest.mark.parametrize("vs,vt", [(50, 50), (60, 45), (45, 60)])
def test_student_support_targets(vs, vt):
    """The student's top k (over V = min(V_s, V_t)) scored by the teacher; zero-mass student ids
    are padding."""
    xs, ws, bs = head((2, 3), vs, seed=9)
    xt, wt, bt = head((2, 3), vt, hidden=5, seed=10)
    bs[7] = -math.inf
    vocab, k = min(vs, vt), 6
    t = fastkd.student_support_targets(
        xs, ws, xt, wt, k, student_bias=bs, teacher_bias=bt, temperature=1.5, chunk_size=4
    )
    assert t.vocab_size == vt and t.lead_shape == (2, 3)
    zs = (xs @ ws.T + bs)[..., :vocab]
    top = zs.topk(k, -1).indices.sort(-1).values
    assert torch.equal(t.ids.long().sort(-1).values, top)
    lp, tail = oracle(xt, wt, bt, t.ids, temperature=1.5)
    torch.testing.assert_close(t.logprobs.double(), lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.tail_mass.double(), tail, atol=1e-6, rtol=1e-5)

    xs[0, 0] = 0.0  # token 0's logits: the bias alone, -inf at id 7
    bs.fill_(-math.inf)
    bs[:3] = 0.0
    t = fastkd.student_support_targets(xs, ws, xt, wt, 4, student_bias=bs, teacher_bias=bt)
    assert torch.all((t.ids >= 0).sum(-1) == 3)


def test_support_targets_give_zero_reverse_kl_against_the_same_model():
    """Scored by the student itself, the student's support targets give L = 0, gradient 0."""
    x, w, b = head((4,), 30, seed=11)
    t = fastkd.student_support_targets(x, w, x, w, 5, student_bias=b, teacher_bias=b)
    h = x.clone().requires_grad_()
    loss = fastkd.fused_linear_sparse_kd_loss(h, w, t, student_bias=b, direction="reverse")
    loss.backward()
    assert abs(loss.item()) < 1e-6 and h.grad.abs().max() < 1e-6


X, W, B = head((2,), 10, seed=12)
IDS = torch.tensor([[0, 1], [2, -1]])
BAD = [
    (dict(ids=IDS.float()), TypeError, "ids must be an integer tensor; got dtype torch.float32"),
    (
        dict(ids=IDS[:1]),
        ValueError,
        r"ids must have shape \[..., K\] with the leading shape \(2,\)",
    ),
    (dict(ids=torch.tensor([[0, 10], [1, -1]])), ValueError, r"\[0, 10\).*found \[10\]"),
    (dict(ids=torch.tensor([[0, -2], [1, -1]])), ValueError, r"found \[-2\]"),
    (dict(temperature=0.0), ValueError, r"temperature must be a number in \[2\*\*-126"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(weight=torch.randn(10, 3)), ValueError, "must agree on H"),
    (dict(backend="cpu"), RuntimeError, "no cpu kernel for fused_linear_support"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    weight = kwargs.pop("weight", W)
    ids = kwargs.pop("ids", IDS)
    with pytest.raises(exc, match=match):
        fastkd.fused_linear_support(X, weight, ids, **kwargs)


def test_student_support_targets_bad_inputs():
    xs, ws, _ = head((2, 3), 20, seed=13)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V\] = \[1, 15\].*got 16"):
        fastkd.student_support_targets(xs, ws, xs, ws[:15], 16)
    with pytest.raises(ValueError, match="must have one leading shape"):
        fastkd.student_support_targets(xs, ws, xs[:1], ws, 3)
    with pytest.raises(ValueError, match="student_hidden .* and student_weight"):
        fastkd.student_support_targets(xs, ws[:, :3], xs, ws, 3)
