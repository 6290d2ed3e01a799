"""fastkd.sparse_kd_loss on every backend available here, against the float64 reference; its
properties (equal to kd_loss for the full teacher distribution, >= 0, unbiased gradients of
sampled targets), the custom op's registration, torch.compile and input errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import fastkd
from fastkd.ops._registry import interpreted
from fastkd.ops.sparse_kd_loss import sparse_kd_loss
from fastkd.reference.sparse_kd_loss import sparse_kd_loss_reference
from fastkd.sparse import SparseTargets

from helpers import assert_within_torch_error, backend_params, make_labels, make_logits

BACKENDS = fastkd.available_backends("sparse_kd_loss", "cpu")


# Target kinds: "counts" (N draws from p, weights count/N), "importance" (N draws from
# softmax(z/2), weights (count/N) p/r: W != 1), "renorm" (top-k renormalized), "bucket" (top-k of
# p with the tail mass 1 - sum), "full" (every id, weights p).
KINDS = ["counts", "importance", "renorm", "bucket"]


def make_targets(lead, vocab, kind, *, k=6, seed=0, teacher=None, temperature=1.0):
    """Targets from teacher logits (random, or ``teacher`` [*lead, vocab]) at ``temperature``,
    with one padding slot more than needed and the slots in random order."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    zt = make_logits((n,), vocab, seed=seed + 100) if teacher is None else teacher.reshape(n, -1)
    zt = zt.double() / temperature
    p = zt.softmax(-1)
    tail_mass, method, tail = None, "random", None
    if kind in ("counts", "importance"):
        proposal = p if kind == "counts" else (zt / 2).softmax(-1)
        draws = torch.multinomial(proposal, k, replacement=True, generator=g)
        counts = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(n, k, dtype=torch.float64)
        )
        c, ids = counts.topk(min(k, vocab), -1)
        w = c / k
        if kind == "importance":
            w = w * p.gather(1, ids) / proposal.gather(1, ids)
        ids, w = torch.where(c > 0, ids, -1), torch.where(c > 0, w, 0.0)
    elif kind == "full":
        ids, w = torch.arange(vocab).expand(n, vocab), p
        method, tail = "topk", "renorm"
    else:
        w, ids = p.topk(min(k, vocab), -1)
        method, tail = "topk", kind
        if kind == "bucket":
            tail_mass = (1.0 - w.sum(-1)).clamp(min=0).float().reshape(lead)
        else:
            w = w / w.sum(-1, keepdim=True)
    ids = torch.cat([ids, torch.full((n, 1), -1)], 1)
    w = torch.cat([w, torch.zeros(n, 1, dtype=w.dtype)], 1)
    perm = torch.rand(ids.shape, generator=g).argsort(-1)
    ids, w = ids.gather(1, perm), w.gather(1, perm)
    return SparseTargets(
        ids=ids.to(torch.int32).reshape(*lead, -1),
        weights=w.float().reshape(*lead, -1),
        tail_mass=tail_mass,
        vocab_size=vocab,
        num_samples=k,
        method=method,
        tail=tail,
    )


def run_fused(student, targets, backend, **kw):
    s = student.detach().clone().requires_grad_()
    loss = sparse_kd_loss(s, targets, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def run_reference(student, targets, compute_dtype=torch.float64, **kw):
    s = student.detach().to(compute_dtype if compute_dtype == torch.float64 else student.dtype)
    s = s.requires_grad_()
    loss = sparse_kd_loss_reference(s, targets, compute_dtype=compute_dtype, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def assert_close_fp32(student, targets, backend, **kw):
    loss, grad = run_fused(student, targets, backend, **kw)
    ref_loss, ref_grad = run_reference(student, targets, **kw)
    t32_loss, t32_grad = run_reference(student.float(), targets, torch.float32, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_within_torch_error("loss", loss, ref_loss, t32_loss)
    assert_within_torch_error("grad", grad, ref_grad, t32_grad)
    return loss, grad


OPTIONS = [
    {},
    {"temperature": 2.0},
    {"temperature": 0.5, "t2_scale": True},
    {"hard_weight": 0.3},
    {"temperature": 1.7, "hard_weight": 0.5, "t2_scale": True},
]


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "plain"
)
@pytest.mark.slow  # 60 cases, 5 s of the full run's 1,025 s
def test_matches_reference(backend, kind, options):
    small = interpreted("sparse_kd_loss", backend, "cpu")
    lead, vocab = ((3,), 37) if small else ((5, 9), 401)
    s = make_logits(lead, vocab, seed=0)
    targets = make_targets(lead, vocab, kind, seed=1, temperature=options.get("temperature", 1))
    labels = make_labels(lead, vocab) if options.get("hard_weight") or not small else None
    assert_close_fp32(s, targets, backend, labels=labels, reduction="sum", **options)


@pytest.mark.parametrize(
    "backend", backend_params("sparse_kd_loss", small_ok=False, fused_only=True)
)
@pytest.mark.parametrize("vocab", [1, 7, 1271, 4099])
@pytest.mark.parametrize("kind", ["counts", "bucket"])
@pytest.mark.slow  # 8 cases, 6 s of the full run's 1,025 s
def test_odd_shapes(backend, vocab, kind):
    for lead in [(1,), (41,), (2, 3, 5)]:
        s = make_logits(lead, vocab, seed=2)
        targets = make_targets(lead, vocab, kind, k=8, seed=3)
        loss, _ = assert_close_fp32(s, targets, backend, reduction="none")
        assert torch.isfinite(loss).all()  # V <= 8: the ids cover every column


@pytest.mark.triton
@pytest.mark.parametrize("block_v,block_k", [(16, 2), (2048, 128)])
def test_triton_chunked_rows_and_slots(block_v, block_k, monkeypatch):
    """Narrow chunks run the online rescaling over vocabulary chunks and the slot loops over
    several chunks of ids (V = 37 in 3 chunks, K = 10 in 5); V = 1 and 7 take one."""
    if "triton" not in BACKENDS:
        pytest.skip("triton cannot run here")
    from fastkd.triton import sparse_kd_loss as kernel

    monkeypatch.setattr(kernel, "MAX_BLOCK_V", block_v)
    monkeypatch.setattr(kernel, "MAX_BLOCK_K", block_k)
    labels = torch.tensor([3, -100, 0, 36]) % 37
    for vocab, kind in [(37, "bucket"), (37, "importance"), (1, "bucket"), (7, "counts")]:
        s = make_logits((4,), vocab, seed=4)
        targets = make_targets((4,), vocab, kind, k=9, seed=5)
        assert_close_fp32(
            s,
            targets,
            "triton",
            labels=labels % vocab,
            hard_weight=0.2,
            temperature=1.5,
            reduction="none",
        )


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("vs,vt", [(300, 257), (257, 300)])
def test_student_and_targets_vocab_differ(backend, vs, vt):
    """V = min(V_s, targets.vocab_size); student columns from V on get zero gradient."""
    vocab = min(vs, vt)
    s = make_logits((4,), vs, seed=6)
    targets = make_targets((4,), vocab, "bucket", seed=7)
    targets = SparseTargets(
        ids=targets.ids,
        weights=targets.weights,
        tail_mass=targets.tail_mass,
        vocab_size=vt,
        method="topk",
        tail="bucket",
    )
    labels = torch.tensor([0, 5, -100, 200])
    _, grad = assert_close_fp32(s, targets, backend, labels=labels, hard_weight=0.2)
    assert torch.all(grad[:, vocab:] == 0)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("kind", ["counts", "bucket"])
def test_neg_inf_logits(backend, kind):
    """-inf student logits outside the ids are fine; a target id at one makes the loss +inf
    with a finite gradient, never NaN."""
    vocab = 53
    teacher = make_logits((6,), vocab, seed=8)
    teacher[:, :10] = -math.inf  # never a target
    targets = make_targets((6,), vocab, kind, seed=9, teacher=teacher)
    s = make_logits((6,), vocab, seed=10)
    s[:, :10] = -math.inf
    ids = targets.ids[0]
    s[0, ids[ids >= 0][0]] = -math.inf
    loss, grad = assert_close_fp32(s, targets, backend, reduction="none")
    assert loss[0] == math.inf and torch.isfinite(loss[1:]).all()
    assert torch.isfinite(grad).all() and torch.all(grad[:, :10] == 0)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s = make_logits((3, 4), 50)
    targets = make_targets((3, 4), 50, "bucket")
    labels = torch.full((3, 4), -100)
    loss, grad = run_fused(s, targets, backend, labels=labels, hard_weight=0.5, reduction=reduction)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
def test_all_padding_targets(backend):
    """A token without targets: loss 0 and zero gradient, but still a token of the mean."""
    s = make_logits((4,), 30)
    targets = make_targets((4,), 30, "counts")
    ids, weights = targets.ids.clone(), targets.weights.clone()
    ids[1], weights[1] = -1, 0.0
    empty = SparseTargets(ids=ids, weights=weights, vocab_size=30)
    loss, grad = run_fused(s, empty, backend, reduction="none")
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    mean = sparse_kd_loss(s, empty, backend=backend)
    torch.testing.assert_close(mean, loss.sum() / 4)
    assert_close_fp32(s, empty, backend)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.slow  # 3 cases, 5 s of the full run's 1,025 s
def test_reductions_and_num_items(backend):
    s = make_logits((4, 6), 64)
    targets = make_targets((4, 6), 64, "importance")
    labels = make_labels((4, 6), 64)
    for kw in [
        {"reduction": "mean"},
        {"reduction": "sum"},
        {"reduction": "none"},
        {"reduction": "mean", "num_items_in_batch": 37},
        {"reduction": "mean", "num_items_in_batch": torch.tensor(11)},
        {"reduction": "mean", "hard_weight": 0.4},
    ]:
        assert_close_fp32(s, targets, backend, labels=labels, **kw)
    none = sparse_kd_loss(s, targets, labels=labels, reduction="none", backend=backend)
    assert none.shape == (4, 6)
    assert torch.all(none[labels == -100] == 0)
    mean = sparse_kd_loss(s, targets, labels=labels, backend=backend)
    torch.testing.assert_close(mean, none.sum() / (labels != -100).sum())


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("upstream", [1.0, 3.0, 0.0])
@pytest.mark.slow  # 9 cases, 8 s of the full run's 1,025 s
def test_mean_gradient_under_upstream_scale(backend, upstream):
    s = make_logits((3, 7), 90).requires_grad_()
    targets = make_targets((3, 7), 90, "bucket")
    labels = make_labels((3, 7), 90)
    for kw in [{}, {"num_items_in_batch": 9}, {"labels": labels, "hard_weight": 0.3}]:
        s.grad = None
        (upstream * sparse_kd_loss(s, targets, backend=backend, **kw)).backward()
        s_ref = s.detach().double().requires_grad_()
        (upstream * sparse_kd_loss_reference(s_ref, targets, **kw)).backward()
        torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
def test_custom_ignore_index(backend):
    s = make_logits((8,), 40)
    targets = make_targets((8,), 40, "renorm")
    labels = torch.tensor([1, -1, 3, -1, 5, 6, -1, 8])
    assert_close_fp32(s, targets, backend, labels=labels, ignore_index=-1, hard_weight=0.25)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.slow  # 3 cases, 5 s of the full run's 1,025 s
def test_non_contiguous_and_broadcast_logits(backend):
    base = make_logits((3, 6), 130)
    s = base[:, :-1, :]  # row slice of [B, T, V]
    assert not s.is_contiguous()
    assert_close_fp32(s, make_targets((3, 5), 130, "bucket"), backend, reduction="sum")
    shared = make_logits((1, 5), 130, seed=2).expand(3, 5, 130)  # stride-0 rows
    assert_close_fp32(shared, make_targets((3, 5), 130, "counts"), backend, reduction="sum")
    strided = make_logits((3, 5), 260, seed=3)[..., ::2]  # strided columns
    assert_close_fp32(strided, make_targets((3, 5), 130, "renorm"), backend, reduction="none")


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss", small_ok=False))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kind", ["importance", "bucket"])
def test_low_precision_error_within_torch_own(backend, dtype, kind):
    """bf16/fp16 logits: fp32 math inside, so the error against the exact value of the rounded
    inputs is at most torch's own error when it computes in that dtype, and the gradient is the
    exact one rounded once."""
    s = make_logits((33,), 1031, dtype=dtype, seed=12)
    targets = make_targets((33,), 1031, kind, k=16, seed=13)
    labels = make_labels((33,), 1031)
    kw = dict(labels=labels, hard_weight=0.1, temperature=1.5, reduction="none")
    loss, grad = run_fused(s, targets, backend, **kw)
    assert grad.dtype == dtype
    ref_loss, ref_grad = run_reference(s, targets, **kw)
    low_loss, low_grad = run_reference(s, targets, dtype, **kw)
    atol = 1e-6
    err = (loss.double() - ref_loss).abs().max().item()
    low_err = (low_loss.double() - ref_loss).abs().max().item()
    assert err <= low_err + atol, (err, low_err)
    gerr = (grad.double() - ref_grad).abs().max().item()
    low_gerr = (low_grad.double() - ref_grad).abs().max().item()
    ulp = torch.finfo(dtype).eps
    assert gerr <= min(low_gerr, ulp * ref_grad.abs().max().item()) + atol, (gerr, low_gerr)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss", fused_only=True))
def test_second_backward_through_same_graph_raises(backend):
    s = make_logits((2,), 20).requires_grad_()
    loss = sparse_kd_loss(s, make_targets((2,), 20, "counts"), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("kind", ["counts", "bucket"])
def test_triton_on_cuda_matches_cpu_backend_on_large_rows(kind):
    """Compiled on a GPU: bf16 logits, many vocabulary chunks, and the id columns rewritten
    after the full-row gradient stores of all the program's threads."""
    s = make_logits((8,), 128256, dtype=torch.bfloat16, seed=24)
    targets = make_targets((8,), 128256, kind, k=64, seed=25)
    labels = make_labels((8,), 128256)
    kw = dict(hard_weight=0.1, temperature=2.0, reduction="none")
    ref_loss, ref_grad = run_fused(s, targets, "cpu", labels=labels, **kw)
    loss, grad = run_fused(s.cuda(), targets.to("cuda"), "triton", labels=labels.cuda(), **kw)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.cpu().float(), ref_grad.float(), atol=1e-8, rtol=8e-3)


# ---- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_full_distribution_equals_kd_loss_fkl(backend, temperature, tail):
    """Targets holding the teacher's whole distribution give kd_loss's forward KL; a bucket
    without columns is empty, whatever rounding its tail mass holds."""
    lead, vocab = (2, 3), 29
    s, t = make_logits(lead, vocab, seed=14), make_logits(lead, vocab, seed=15)
    full = make_targets(lead, vocab, "full", teacher=t, temperature=temperature)
    if tail == "bucket":
        full = SparseTargets(
            ids=full.ids,
            weights=full.weights,
            tail_mass=torch.full(lead, 1e-7),
            vocab_size=vocab,
            method="topk",
            tail="bucket",
        )
    labels = make_labels(lead, vocab)
    kw = dict(temperature=temperature, labels=labels, hard_weight=0.2, t2_scale=True)
    loss, grad = run_fused(s, full, backend, reduction="none", **kw)
    s_kd = s.clone().requires_grad_()
    kd = fastkd.kd_loss(s_kd, t, divergence="fkl", reduction="none", backend="torch", **kw)
    kd.sum().backward()
    torch.testing.assert_close(loss, kd.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad, s_kd.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("kind", ["counts", "renorm", "bucket"])
def test_nonnegative_and_zero_at_the_target(backend, kind):
    """Weights summing to 1 (with the tail): KL(t || q) >= 0, and 0 where the student's
    distribution is the target's (on the ids, and in the bucket, its tail mass)."""
    vocab = 41
    teacher = make_logits((5,), vocab, seed=16)
    targets = make_targets((5,), vocab, kind, seed=17, teacher=teacher)
    s = make_logits((5,), vocab, seed=18)
    loss = sparse_kd_loss(s, targets, backend=backend, reduction="none")
    assert torch.all(loss >= -1e-6), loss
    ids = targets.ids.long()
    if kind == "bucket":
        at_target = teacher.clone()  # q = p: q_k = p_k on the ids and q_b = the tail mass
    else:
        # log t on the ids, -inf elsewhere: q = t.
        at_target = torch.full_like(s, -math.inf)
        present = ids >= 0
        at_target[present.nonzero()[:, 0], ids[present]] = targets.weights[present].log()
    loss = sparse_kd_loss(at_target, targets, backend=backend, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(5), atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", ["counts", "importance"])
def test_sampled_gradient_approaches_full_kd_gradient(kind):
    """E[w_j] = p_j for sampled targets, so the gradient averaged over many draws is the full
    KL's, q - p (rows: one student row broadcast over independent draws)."""
    rows, vocab, draws = 4000, 20, 16
    z = make_logits((1,), vocab, seed=19)
    teacher = make_logits((1,), vocab, seed=20).expand(rows, vocab)
    targets = make_targets((rows,), vocab, kind, k=draws, seed=21, teacher=teacher)
    s = z.expand(rows, vocab).clone().requires_grad_()
    sparse_kd_loss(s, targets, backend=BACKENDS[0], reduction="mean").backward()
    mean_grad = s.grad.double().sum(0)
    full = (z.double().softmax(-1) - teacher[:1].double().softmax(-1))[0]
    sigma = math.sqrt(full.abs().max().item() + 0.1) / math.sqrt(rows * draws)
    torch.testing.assert_close(mean_grad, full, atol=5 * sigma, rtol=0)


# ---- registration, compile, errors ------------------------------------------------------------


def test_reference_gradcheck_float64():
    s = make_logits((3,), 7, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([1, -100, 4])
    for kind in ["importance", "bucket"]:
        targets = make_targets((3,), 7, kind, k=3, seed=22)

        def f(s):
            return sparse_kd_loss_reference(
                s,
                targets,
                temperature=1.3,
                labels=labels,
                hard_weight=0.2,
                t2_scale=True,
                reduction="sum",
            )

        assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("bucket", [True, False])
def test_opcheck(bucket):
    # grad_scale = 1: the backward rescales the op's second output in place by
    # incoming / grad_scale, which is the identity under opcheck's unit upstream gradients.
    s = make_logits((6,), 33).requires_grad_()
    targets = make_targets((6,), 33, "bucket" if bucket else "importance")
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    args = (
        s,
        targets.ids,
        targets.weights,
        targets.tail_mass,
        labels,
        33,
        1.5,
        0.5,
        0.5,
        -100,
        1.0,
        False,
        "cpu",
        True,
    )
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_loss_fused.default, args)


def test_no_gradient_buffer_when_no_gradient_is_wanted():
    s = make_logits((5,), 40)
    targets = make_targets((5,), 40, "bucket")
    with_grad = sparse_kd_loss(s.clone().requires_grad_(), targets, reduction="none", backend="cpu")
    _, grad = torch.ops.fastkd.sparse_kd_loss_fused.default(
        s,
        targets.ids,
        targets.weights,
        targets.tail_mass,
        None,
        40,
        1.0,
        1.0,
        0.0,
        -100,
        1.0,
        False,
        "cpu",
        False,
    )
    assert grad.numel() == 0
    with torch.no_grad():
        without = sparse_kd_loss(
            s.clone().requires_grad_(), targets, reduction="none", backend="cpu"
        )
    torch.testing.assert_close(without, with_grad.detach())


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss", fused_only=True))
def test_kernels_give_nan_for_an_id_past_the_vocabulary(backend):
    """Where the ids are not checked (CUDA tensors, traced graphs) an id >= V makes its token's
    loss NaN; the kernels never read or write past V."""
    s = make_logits((3,), 40, seed=26)
    targets = make_targets((3,), 40, "bucket", seed=27)
    ids = targets.ids.clone()
    ids[1, ids[1] >= 0] = torch.tensor([40, 45, 1000, 3, 4, 5], dtype=torch.int32)
    loss, grad = torch.ops.fastkd.sparse_kd_loss_fused.default(
        s,
        ids,
        targets.weights,
        targets.tail_mass,
        None,
        40,
        1.0,
        1.0,
        0.0,
        -100,
        1.0,
        False,
        backend,
        True,
    )
    ref, ref_grad = run_reference(s, targets, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert grad[1].isnan().all()
    torch.testing.assert_close(loss[[0, 2]].double(), ref[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[[0, 2]].double(), ref_grad[[0, 2]], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("kind", ["counts", "bucket"])
def test_duplicate_ids_add_their_weights(backend, kind):
    """Equal ids in a row are one target holding the sum of their weights, on every backend:
    each kept id's weight split over two slots of the same id gives the loss and gradient of
    the targets with each id once (halves are exact in float32), and an uneven three-way split
    matches the float64 reference's dense definition."""
    s = make_logits((5,), 30, seed=31)
    labels = make_labels((5,), 30)
    targets = make_targets((5,), 30, kind, seed=32)
    ids, w = targets.ids, targets.weights
    halves = replace(targets, ids=torch.cat([ids, ids], -1), weights=torch.cat([w / 2, w / 2], -1))
    loss, grad = run_fused(s, halves, backend, labels=labels, reduction="none")
    once, once_grad = run_fused(s, targets, backend, labels=labels, reduction="none")
    torch.testing.assert_close(loss, once, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, once_grad, rtol=2e-6, atol=1e-8)
    thirds = replace(
        targets,
        ids=torch.cat([ids, ids.flip(-1), ids], -1),
        weights=torch.cat([w * 0.2, w.flip(-1) * 0.5, w * 0.3], -1),
    )
    assert_close_fp32(s, thirds, backend, labels=labels, reduction="none")


SPOILINGS = ["nan_weight", "inf_weight", "nan_tail", "inf_tail"]


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("spoil", SPOILINGS)
def test_nan_or_inf_targets_give_nan_for_counted_tokens(backend, spoil):
    """The sparse ops' NaN rule: a NaN or +inf weight or tail mass makes a counted token's loss
    and gradient NaN, as kd_loss does for a row without a softmax; an ignored token stays 0,
    and a NaN on a padding slot is no target at all."""
    s = make_logits((5,), 30, seed=33)
    targets = make_targets((5,), 30, "bucket", seed=34)
    labels = make_labels((5,), 30, ignore_every=10)
    labels[3] = -100
    w, tail = targets.weights.clone(), targets.tail_mass.clone()
    bad = math.nan if spoil.startswith("nan") else math.inf
    for row in (1, 3):
        if spoil.endswith("weight"):
            w[row, (targets.ids[row] >= 0).nonzero()[0, 0]] = bad
        else:
            tail[row] = bad
    w[4, (targets.ids[4] < 0).nonzero()[0, 0]] = math.nan  # a padding slot
    spoiled = replace(targets, weights=w, tail_mass=tail)
    loss, grad = run_fused(s, spoiled, backend, labels=labels, reduction="none")
    assert loss[1].isnan() and grad[1].isnan().all()
    assert loss[3] == 0 and (grad[3] == 0).all()
    ref, ref_grad = run_reference(s, spoiled, labels=labels, reduction="none")
    assert ref[1].isnan() and ref_grad[1].isnan().all() and ref[3] == 0
    clean = [0, 2, 4]
    expected, expected_grad = run_reference(s, targets, labels=labels, reduction="none")
    torch.testing.assert_close(loss[clean].double(), expected[clean], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[clean].double(), expected_grad[clean], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("sparse_kd_loss"))
@pytest.mark.parametrize("bucket", [False, True])
def test_targets_without_slots(backend, bucket):
    """K = 0: no target ids; with a bucket the whole teacher mass is matched against the
    student's whole mass (q_b = 1): w_b log w_b, gradient 0."""
    s = make_logits((3,), 12, seed=35)
    targets = SparseTargets(
        ids=torch.zeros(3, 0, dtype=torch.int32),
        weights=torch.zeros(3, 0),
        tail_mass=torch.full((3,), 0.5) if bucket else None,
        vocab_size=12,
        method="topk" if bucket else "random",
        tail="bucket" if bucket else None,
    )
    loss, grad = run_fused(s, targets, backend, reduction="none")
    expected = torch.full((3,), 0.5 * math.log(0.5) if bucket else 0.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.zeros_like(s), atol=1e-7, rtol=0)


@pytest.mark.slow  # 5 s of the full run's 1,025 s
def test_torch_compile_of_a_model_calling_the_loss():
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 50)
    x = torch.randn(2, 5, 16)
    targets = make_targets((2, 5), 50, "bucket", seed=23)
    labels = torch.randint(0, 50, (2, 5))
    labels[0, 0] = -100

    def step(model, x):
        return sparse_kd_loss(
            model(x), targets, labels=labels, hard_weight=0.1, temperature=2.0, backend="cpu"
        )

    eager_loss = step(student, x)
    eager_loss.backward()
    eager_grad = student.weight.grad.clone()
    student.weight.grad = None
    loss = torch.compile(step, fullgraph=True)(student, x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(student.weight.grad, eager_grad)


def test_auto_backend_and_float64():
    assert BACKENDS[0] == "cpu"
    s = make_logits((4,), 30, dtype=torch.float64).requires_grad_()
    targets = make_targets((4,), 30, "counts")
    assert sparse_kd_loss(s, targets).dtype == torch.float64
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        sparse_kd_loss(s, targets, backend="cpu")


def test_empty_input():
    s = torch.zeros(0, 10, requires_grad=True)
    targets = SparseTargets(
        ids=torch.zeros(0, 3, dtype=torch.int32), weights=torch.zeros(0, 3), vocab_size=10
    )
    loss = sparse_kd_loss(s, targets, backend="cpu")
    assert loss.item() == 0
    loss.backward()
    assert s.grad.shape == (0, 10)


def _targets_with_ids(ids):
    ids = torch.tensor(ids, dtype=torch.int32)
    return SparseTargets(ids=ids, weights=(ids >= 0).float() / 2, vocab_size=10)


STUDENT = make_logits((2,), 10)
BAD_INPUTS = [
    (dict(targets=torch.zeros(2, 3)), TypeError, "SparseTargets; got Tensor"),
    (
        dict(targets=make_targets((3,), 10, "counts")),
        ValueError,
        r"leading shape \(2,\).*ids of shape \(3, 7\)",
    ),
    (
        dict(targets=make_targets((2,), 10, "counts").to("meta")),
        ValueError,
        "targets are on meta but student_logits on cpu",
    ),
    (
        dict(targets=_targets_with_ids([[0, 10], [1, -1]])),
        ValueError,
        r"ids must lie in \[0, 10\).*found \[10\]",
    ),
    (
        dict(student=make_logits((2,), 8), targets=_targets_with_ids([[0, 9], [1, -1]])),
        ValueError,
        r"min\(8, 10\).*found \[9\]",
    ),
    (dict(targets=_targets_with_ids([[0, -2], [1, -1]])), ValueError, r"found \[-2\]"),
    (dict(student=torch.zeros(2, 10, dtype=torch.long)), TypeError, "floating point"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(hard_weight=0.5), ValueError, "needs labels"),
    (dict(hard_weight=1.5, labels=torch.tensor([0, 1])), ValueError, "hard_weight"),
    (dict(reduction="avg"), ValueError, "reduction.*'avg'"),
    (dict(labels=torch.tensor([0, 12])), ValueError, r"\[0, 10\).*\[12\]"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"leading shape \(2,\)"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUTS)
def test_bad_input_raises_before_any_kernel(kwargs, exc, match):
    kwargs = dict(kwargs)
    student = kwargs.pop("student", STUDENT)
    targets = kwargs.pop("targets", make_targets((2,), 10, "counts"))
    with pytest.raises(exc, match=match):
        sparse_kd_loss(student, targets, **kwargs)
