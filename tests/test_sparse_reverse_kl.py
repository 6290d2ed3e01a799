"""sparse_kd_loss and fused_linear_sparse_kd_loss with direction="reverse" (the reverse KL over
the targets' ids plus the tail bucket) on every backend that has it, against a plain-PyTorch
float64 computation on the full logits (autograd for gradients); closed forms, the dense rkl
where the support is all of V, the fused-lm_head form, and input errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.ops._registry import interpreted
from fastkd.reference.sparse_kd_loss import sparse_kd_loss_reference
from fastkd.sparse import SparseTargets

from helpers import (
    assert_within_torch_error,
    backend_params,
    column_major,
    make_labels,
    make_logits,
)

OP = "sparse_kd_loss_reverse"


def _q_log_ratio(q, lq, lp):
    """q (lq - lp), 0 where q == 0, with no NaN in the gradient of the unused branch."""
    safe = torch.where(q > 0, lq - lp, torch.zeros_like(lq))
    return torch.where(q > 0, q * safe, torch.zeros_like(q))


def oracle_rows(z, ids, logprobs, tail_mass, temperature=1.0):
    """Per-row reverse KL of logits ``z`` [N, V] (float64, autograd) over the ids (the first slot
    of an id counts) and the bucket, from a one-hot membership of the ids."""
    n, vocab = z.shape
    ids = ids.reshape(n, -1).long()
    lp = logprobs.reshape(n, -1).double()
    present = ids >= 0
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(-1)
    first = present & ~((ids[:, :, None] == ids[:, None, :]) & earlier).any(-1)
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), vocab) * first[..., None]
    member = onehot.sum(1) > 0
    lq = torch.log_softmax(z / temperature, -1)
    q = lq.exp()
    lq_ids = torch.where(first, lq.gather(1, ids.clamp(min=0)), 0.0)
    q_ids = torch.where(first, q.gather(1, ids.clamp(min=0)), 0.0)
    rows = _q_log_ratio(q_ids, lq_ids, torch.where(first, lp, 0.0)).sum(-1)
    q_b = (q * ~member).sum(-1)
    lq_b = torch.log(torch.where(q_b > 0, q_b, torch.ones_like(q_b)))
    p_b = tail_mass.reshape(n).double()
    lp_b = torch.where(p_b > 0, p_b.clamp(min=1e-300).log(), -math.inf)
    return rows + _q_log_ratio(q_b, lq_b, lp_b)


def oracle(
    z,
    targets,
    *,
    temperature=1.0,
    labels=None,
    hard_weight=0.0,
    t2_scale=False,
    reduction="mean",
    num_items_in_batch=None,
):
    """(loss, dloss/dz) in float64 of the full loss: soft rows, CE mixing, ignored rows and the
    reduction, written out plainly."""
    n, vocab = z.shape[0] if z.dim() == 2 else z.shape[:-1].numel(), z.shape[-1]
    zz = z.detach().double().reshape(n, vocab).requires_grad_()
    soft = oracle_rows(zz, targets.ids, targets.logprobs, targets.tail_mass, temperature)
    rows = (1 - hard_weight) * (temperature**2 if t2_scale else 1.0) * soft
    valid = torch.ones(n, dtype=torch.bool)
    if labels is not None:
        valid = labels.reshape(n) != -100
        if hard_weight > 0:
            ce = -torch.log_softmax(zz, -1).gather(1, labels.reshape(n, 1).clamp(min=0))[:, 0]
            rows = rows + hard_weight * ce
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        count = num_items_in_batch if num_items_in_batch is not None else max(int(valid.sum()), 1)
        loss = rows.sum() / count
    loss.sum().backward()
    shape = z.shape[:-1] if reduction == "none" else ()
    return loss.detach().reshape(shape), zz.grad.reshape(z.shape)


def make_targets(lead, vocab, k, *, seed=0, temperature=1.0, pad=True, teacher=None):
    """Support targets from teacher logits: k distinct ids per row in random order (plus a padding
    slot with ``pad``), the teacher's log-probs at them and its exact tail mass."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    zt = make_logits((n,), vocab, seed=seed + 50) if teacher is None else teacher.reshape(n, -1)
    lp = torch.log_softmax(zt.double() / temperature, -1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    if pad:
        ids = torch.cat([ids, torch.full((n, 1), -1)], 1)
    logprobs = torch.where(ids >= 0, lp.gather(1, ids.clamp(min=0)), 0.0)
    member = torch.zeros(n, vocab + 1, dtype=torch.bool)
    member = member.scatter_(1, torch.where(ids >= 0, ids, vocab), True)[:, :vocab]
    tail = lp.masked_fill(member, -math.inf).logsumexp(-1).exp()
    return SparseTargets(
        ids=ids.int().reshape(*lead, -1),
        weights=torch.where(ids >= 0, logprobs.exp(), 0.0).float().reshape(*lead, -1),
        logprobs=logprobs.float().reshape(*lead, -1),
        tail_mass=tail.float().reshape(lead),
        vocab_size=vocab,
        num_samples=k,
        method="support",
        tail="bucket",
    )


def run(student, targets, backend, fn=fastkd.sparse_kd_loss, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, targets, direction="reverse", backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def torch_fp32(student, targets, **kw):
    """plain PyTorch's own float32 result (the reference evaluated in float32)."""
    s = student.detach().float().requires_grad_()
    loss = sparse_kd_loss_reference(
        s, targets, direction="reverse", compute_dtype=torch.float32, **kw
    )
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def assert_matches_oracle(student, targets, backend, **kw):
    loss, grad = run(student, targets, backend, **kw)
    exact_loss, exact_grad = oracle(student, targets, **kw)
    if student.dtype == torch.float64:
        torch.testing.assert_close(loss, exact_loss, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(grad, exact_grad, atol=1e-10, rtol=1e-9)
        return loss, grad
    t_loss, t_grad = torch_fp32(student, targets, **kw)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_within_torch_error("loss", loss, exact_loss, t_loss)
    assert_within_torch_error("grad", grad, exact_grad, t_grad)
    return loss, grad


# (vocab, k, options): odd sizes, K = 1, K = V (an empty bucket), temperatures, CE, t2.
CASES = [
    (1, 1, {}),
    (7, 1, {"temperature": 2.0}),
    (7, 7, {}),
    (7, 3, {"temperature": 0.5, "t2_scale": True, "hard_weight": 0.3}),
    (1000, 1, {"hard_weight": 0.5}),
    (1000, 40, {"temperature": 1.7, "t2_scale": True}),
    (1000, 1000, {"temperature": 0.8}),
]


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("vocab,k,options", CASES, ids=lambda c: str(c))
def test_matches_dense_oracle(backend, vocab, k, options):
    if interpreted(OP, backend, "cpu") and vocab > 37:
        vocab, k = 37, min(k, 37)
    lead = (3, 2)
    s = make_logits(lead, vocab, seed=1)
    targets = make_targets(lead, vocab, k, seed=2, temperature=options.get("temperature", 1.0))
    labels = make_labels(lead, vocab, ignore_every=3)
    assert_matches_oracle(s, targets, backend, labels=labels, reduction="none", **options)


def test_reference_float64_and_gradient_formula():
    """The float64 reference equals the oracle to rounding, and its gradient is the derived
    dL/da_j = q_j (c_j - L): c_j = log q_j - log p_j at the ids, log q_b - log p_b elsewhere."""
    s = make_logits((5,), 30, seed=3, dtype=torch.float64)
    targets = make_targets((5,), 30, 6, seed=4)
    loss, grad = assert_matches_oracle(s, targets, "torch", reduction="none")
    lq = torch.log_softmax(s, -1)
    ids = targets.ids.long()
    lp_cols = torch.full_like(lq, math.nan)
    present = ids >= 0
    for r in range(5):
        lp_cols[r, ids[r][present[r]]] = targets.logprobs[r][present[r]].double()
    member = ~lp_cols.isnan()
    q_b = (lq.exp() * ~member).sum(-1, keepdim=True)
    c = torch.where(member, lq - lp_cols, q_b.log() - targets.tail_mass.double()[:, None].log())
    expected = lq.exp() * (c - loss[:, None])
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_closed_forms(backend):
    """q = p on the support: L = 0 and a zero gradient. Two tokens by hand: q = (1/4, 3/4),
    the id 0 with p_0 = 1/2 and the bucket {1} with p_b = 1/2."""
    z = make_logits((4,), 9, seed=5)
    same = make_targets((4,), 9, 3, seed=6, teacher=z)
    loss, grad = run(z, same, backend, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(4), atol=2e-7, rtol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=2e-7, rtol=0)

    z = torch.tensor([[0.0, math.log(3.0)]])
    half = torch.tensor([[math.log(0.5)]])
    targets = SparseTargets(
        ids=torch.tensor([[0]], dtype=torch.int32),
        weights=torch.tensor([[0.5]]),
        logprobs=half,
        tail_mass=torch.tensor([0.5]),
        vocab_size=2,
        method="support",
        tail="bucket",
    )
    loss, grad = run(z, targets, backend, reduction="sum")
    value = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    c0, cb = math.log(0.5), math.log(1.5)
    expected = torch.tensor([[0.25 * (c0 - value), 0.75 * (cb - value)]])
    torch.testing.assert_close(loss, torch.tensor(value), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_equals_kd_loss_rkl(backend, temperature):
    vocab = 37 if interpreted(OP, backend, "cpu") else 300
    s = make_logits((5,), vocab, seed=7)
    teacher = make_logits((5,), vocab, seed=8)
    targets = make_targets((5,), vocab, vocab, seed=9, temperature=temperature, teacher=teacher)
    loss, grad = run(s, targets, backend, temperature=temperature)
    s_dense = s.clone().requires_grad_()
    dense = fastkd.kd_loss(s_dense, teacher, divergence="rkl", temperature=temperature)
    dense.backward()
    torch.testing.assert_close(loss, dense.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad, s_dense.grad, atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_neg_inf_logits_and_zero_probabilities(backend):
    """-inf student logits: no term, no gradient (at an id too); a target log-prob of -inf
    where the student has mass makes the loss +inf; student mass outside the ids against a tail
    mass of 0 too."""
    vocab = 23
    s = make_logits((4,), vocab, seed=10)
    targets = make_targets((4,), vocab, 4, seed=11)
    s[:, 20:] = -math.inf
    ids = targets.ids
    s[0, ids[0, 0]] = -math.inf  # an id the student gives no mass
    lp = targets.logprobs.clone()
    lp[2, 1] = -math.inf  # a target of zero probability at an id the student gives mass
    s[2, ids[2, 1]] = 0.0
    tail = targets.tail_mass.clone()
    tail[3] = 0.0
    spoiled = SparseTargets(
        ids=ids,
        weights=lp.exp() * (ids >= 0),
        logprobs=lp,
        tail_mass=tail,
        vocab_size=vocab,
        method="support",
        tail="bucket",
    )
    loss, grad = run(s, spoiled, backend, reduction="none")
    assert loss[2] == math.inf and loss[3] == math.inf
    assert_matches_oracle(s[:2], spoiled[:2], backend, reduction="none")
    assert torch.all(grad[:2, 20:] == 0) and grad[0, ids[0, 0]] == 0


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize(
    "reduction,num_items", [("mean", None), ("sum", None), ("mean", 7), ("none", None)]
)
def test_reductions_ignored_rows_and_num_items(backend, reduction, num_items):
    s = make_logits((6,), 29, seed=12)
    targets = make_targets((6,), 29, 5, seed=13)
    labels = make_labels((6,), 29, ignore_every=2)
    assert_matches_oracle(
        s,
        targets,
        backend,
        labels=labels,
        hard_weight=0.25,
        reduction=reduction,
        num_items_in_batch=num_items,
    )


@pytest.mark.parametrize("backend", backend_params(OP))
def test_non_contiguous_logits_and_duplicate_ids(backend):
    """Column-major logits; an id repeated in a row counts once (its first slot's log-prob)."""
    s = column_major(make_logits((6,), 31, seed=14))
    targets = make_targets((6,), 31, 4, seed=15, pad=False)
    ids = torch.cat([targets.ids, targets.ids[:, :1]], 1)
    lp = torch.cat([targets.logprobs, targets.logprobs[:, :1] - 1.0], 1)
    doubled = SparseTargets(
        ids=ids,
        weights=lp.exp(),
        logprobs=lp,
        tail_mass=targets.tail_mass,
        vocab_size=31,
        method="support",
        tail="bucket",
    )
    loss, grad = assert_matches_oracle(s, doubled, backend, reduction="none")
    torch.testing.assert_close(loss, run(s, targets, backend, reduction="none")[0])


@pytest.mark.parametrize("backend", backend_params(OP))
def test_nan_rule(backend):
    """A NaN log-prob or tail mass makes a counted row's loss and gradient NaN; an ignored row
    stays 0; where the ids cover all V the tail mass is not read."""
    targets = make_targets((4,), 5, 5, seed=16)
    lp = targets.logprobs.clone()
    lp[0, 1] = math.nan
    lp[1, 0] = math.nan
    tail = torch.tensor([0.0, 0.0, math.nan, math.nan])
    spoiled = SparseTargets(
        ids=targets.ids,
        weights=targets.weights,
        logprobs=lp,
        tail_mass=tail,
        vocab_size=5,
        method="support",
        tail="bucket",
    )
    s = make_logits((4,), 5, seed=17)
    labels = torch.tensor([1, -100, 2, 3])
    loss, grad = run(s, spoiled, backend, labels=labels, reduction="none")
    assert loss[0].isnan() and grad[0].isnan().all()
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isfinite(loss[2:]).all() and torch.isfinite(grad[2:]).all()


@pytest.mark.parametrize("backend", backend_params(OP, small_ok=False))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_student_within_torch_error(backend, dtype):
    s = make_logits((8,), 500, seed=18, dtype=dtype)
    targets = make_targets((8,), 500, 20, seed=19)
    loss, grad = run(s, targets, backend, reduction="none", temperature=1.5)
    exact_loss, exact_grad = oracle(s, targets, reduction="none", temperature=1.5)
    low = s.detach().requires_grad_()
    low_loss = sparse_kd_loss_reference(
        low, targets, direction="reverse", compute_dtype=dtype, reduction="none", temperature=1.5
    )
    low_loss.sum().backward()
    assert grad.dtype == dtype
    assert_within_torch_error("loss", loss, exact_loss, low_loss.detach())
    assert_within_torch_error("grad", grad, exact_grad, low.grad)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_form_equals_materialized_logits(backend, reduction):
    g = torch.Generator().manual_seed(20)
    vocab = 37 if interpreted(OP, backend, "cpu") else 301
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(vocab, 8, generator=g) / 2
    bias = torch.randn(vocab, generator=g)
    targets = make_targets((2, 5), vocab, 6, seed=21)
    labels = make_labels((2, 5), vocab, ignore_every=4)
    kw = dict(labels=labels, hard_weight=0.2, temperature=1.3, reduction=reduction)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fastkd.fused_linear_sparse_kd_loss(
        leaves[0],
        leaves[1],
        targets,
        student_bias=leaves[2],
        chunk_size=3,
        logit_scale=0.7,
        direction="reverse",
        backend=backend,
        **kw,
    )
    (loss.sum() if loss.dim() else loss).backward()
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = 0.7 * (refs[0] @ refs[1].T + refs[2])
    expected = fastkd.sparse_kd_loss(logits, targets, direction="reverse", backend="torch", **kw)
    (expected.sum() if expected.dim() else expected).backward()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for leaf, ref in zip(leaves, refs):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_forward_direction_is_unchanged_by_logprobs():
    """The forward direction reads the weights only: support targets give the forward KL."""
    s = make_logits((4,), 40, seed=22)
    targets = make_targets((4,), 40, 8, seed=23)
    forward = fastkd.sparse_kd_loss(s, targets, reduction="none", backend="cpu")
    plain = SparseTargets(
        ids=targets.ids,
        weights=targets.weights,
        tail_mass=targets.tail_mass,
        vocab_size=40,
        method="topk",
        tail="bucket",
    )
    torch.testing.assert_close(forward, fastkd.sparse_kd_loss(s, plain, reduction="none"))


def _topk_renorm(lead, vocab):
    ids = torch.arange(3, dtype=torch.int32).expand(*lead, 3)
    return SparseTargets(
        ids=ids,
        weights=torch.full((*lead, 3), 1 / 3),
        logprobs=torch.full((*lead, 3), -math.log(3)),
        vocab_size=vocab,
        method="topk",
        tail="renorm",
    )


BAD = [
    (dict(direction="sideways"), r"direction must be one of \('forward', 'reverse'\); got 'side"),
    (dict(direction=None), "direction must be one of"),
    (
        dict(targets=fastkd.sample_teacher(make_logits((2,), 10), num_samples=4)),
        "direction='reverse' needs targets.logprobs",
    ),
    (dict(targets=_topk_renorm((2,), 10)), r"needs tail='bucket' targets.*got tail='renorm'"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
@pytest.mark.parametrize("fused_linear", [False, True])
def test_bad_inputs_name_the_argument(kwargs, match, fused_linear):
    kwargs = dict(kwargs)
    targets = kwargs.pop("targets", make_targets((2,), 10, 3))
    kwargs.setdefault("direction", "reverse")
    with pytest.raises(ValueError, match=match):
        if fused_linear:
            fastkd.fused_linear_sparse_kd_loss(
                torch.randn(2, 4), torch.randn(10, 4), targets, **kwargs
            )
        else:
            fastkd.sparse_kd_loss(make_logits((2,), 10), targets, **kwargs)


def test_registry_declares_the_reverse_backends():
    assert set(fastkd.available_backends(OP, "cpu")) >= {"cpu", "torch"}
    s = make_logits((2,), 10, dtype=torch.float64).requires_grad_()
    assert fastkd.sparse_kd_loss(s, make_targets((2,), 10, 3), direction="reverse").dtype == (
        torch.float64
    )


@pytest.mark.gpu
@pytest.mark.triton
def test_triton_on_cuda_matches_cpu_backend_on_large_rows():
    """Compiled on a GPU: bf16 logits over a 128256-column vocabulary (many chunks per row),
    student-side supports of 64 ids scored by the teacher with fused_linear_support on CUDA,
    against the CPU kernel on the same targets."""
    vocab, hidden, n = 128256, 64, 8
    g = torch.Generator().manual_seed(31)
    x_s, x_t = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * 0.2
    w_t = torch.randn(vocab, hidden, generator=g) * 0.2
    targets = fastkd.student_support_targets(x_s.cuda(), w_s.cuda(), x_t.cuda(), w_t.cuda(), 64)
    cpu_targets = fastkd.student_support_targets(x_s, w_s, x_t, w_t, 64)
    torch.testing.assert_close(targets.logprobs.cpu(), cpu_targets.logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(targets.tail_mass.cpu(), cpu_targets.tail_mass, rtol=1e-4, atol=0)
    s = (x_s @ w_s.t()).to(torch.bfloat16)
    labels = make_labels((n,), vocab)
    kw = dict(hard_weight=0.1, temperature=2.0, reduction="none", labels=labels)
    ref_loss, ref_grad = run(s, cpu_targets, "cpu", **kw)
    kw["labels"] = labels.cuda()
    loss, grad = run(s.cuda(), targets, "triton", **kw)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.cpu().float(), ref_grad.float(), atol=1e-8, rtol=8e-3)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_targets_without_slots_are_the_bucket_alone(backend):
    """K = 0: the support is the bucket alone (q_b = 1), so L = -log p_b and the gradient is 0;
    the direction must not depend on a logprobs tensor being non-empty."""
    s = make_logits((2,), 9, seed=3)
    empty = torch.zeros(2, 0)
    targets = SparseTargets(
        ids=torch.zeros(2, 0, dtype=torch.int32),
        weights=empty,
        logprobs=empty,
        tail_mass=torch.tensor([0.5, 0.25]),
        vocab_size=9,
        method="support",
        tail="bucket",
    )
    loss, grad = run(s, targets, backend, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), math.log(4.0)]))
    # c_b - L, a difference of fp32 logs of size log 4, is 0 to a few ulps of 1.4: 2e-7 seen.
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", backend_params(OP, fused_only=True))
def test_a_bucket_below_the_smallest_probability_counts_as_empty(backend):
    """p_b = 0 with a bucket whose student mass is below 2^-126: the kernels take q_b as 0 (as
    kd_loss's rkl takes such an element), so its term and its columns' gradient are 0, never
    0 * inf."""
    s = torch.full((1, 66), 0.0)
    s[0, 64], s[0, 65] = -87.0, -150.0
    ids = torch.arange(64, dtype=torch.int32).reshape(1, 64)
    logprobs = torch.full((1, 64), -math.log(64.0))
    targets = SparseTargets(
        ids=ids,
        weights=logprobs.exp(),
        logprobs=logprobs,
        tail_mass=torch.zeros(1),
        vocab_size=66,
        method="support",
        tail="bucket",
    )
    loss, grad = run(s, targets, backend, reduction="none")
    assert loss.isfinite().all() and grad.isfinite().all(), (loss, grad)
    assert (grad[0, 64:] == 0).all()
