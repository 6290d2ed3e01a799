"""fastkd.sample_teacher(method="priority"): priority sampling (Duffield, Lund & Thorup, JACM
2007) keeps exactly k distinct ids per token with weights whose expectation is p."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fastkd
from fastkd.sparse import TeacherCache

from fastkd.reference.sample_teacher import priority_sample_reference, token_uniforms
from helpers import compiled_backends, long_tailed_logits

BACKENDS = fastkd.available_backends("priority_sample", "cpu")


def priority(logits, k, **kw):
    return fastkd.sample_teacher(logits, method="priority", k=k, **kw)


def test_native_kernel_is_available():
    assert BACKENDS[0] == "cpu" and "torch" in BACKENDS


# (dtype, V, k): odd sizes, k = V, k = 1, half precision, a 32k vocabulary
CASES = [
    (torch.float32, 1, 1),
    (torch.float32, 7, 3),
    (torch.float32, 7, 7),
    (torch.float32, 1271, 12),
    (torch.float32, 1271, 1),
    (torch.bfloat16, 4099, 50),
    (torch.float16, 1271, 12),
    (torch.float32, 32000, 64),
]


@pytest.mark.parametrize("dtype,vocab,k", CASES)
def test_native_matches_reference(dtype, vocab, k):
    """Same ids on every row (both rank float64 keys, equal keys by id), weights and log p to
    fp32 rounding; rows with -inf entries and a row without mass included."""
    logits = long_tailed_logits(41, vocab, seed=vocab).to(dtype)
    logits[:4, vocab // 2 :] = -math.inf
    logits[4] = -math.inf
    got = priority(logits, k, seed=3, token_offset=7, backend="cpu", return_logprobs=True)
    ids, weights, logprobs, bad = priority_sample_reference(
        logits, k=k, seed=3, token_offset=7, return_logprobs=True
    )
    assert not bad.any() and torch.equal(got.ids, ids)
    assert torch.all(got.ids[4] == -1)
    torch.testing.assert_close(got.weights, weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.logprobs, logprobs, rtol=0, atol=2e-6)


def test_equal_keys_rank_by_id():
    """Ids 13342 and 60287 of token 7 under seed 3 draw the same uniform, so with equal logits
    their priorities are equal: k = 1 keeps the smaller id, and the other sets tau = p / u."""
    u = token_uniforms(3, torch.tensor([7]), 1 << 16, 1)[0]
    assert u[13342] == u[60287]
    logits = torch.full((1, 1 << 16), -math.inf)
    logits[0, [13342, 60287]] = 0.0
    logits[0, 5] = -3.0
    expected_tau = 0.5 / float(u[13342]) / (1 + math.exp(-3.0) / 2)
    for backend in BACKENDS:
        t = priority(logits, 1, seed=3, token_offset=7, backend=backend)
        assert t.ids.tolist() == [[13342]], backend
        torch.testing.assert_close(t.weights, torch.tensor([[expected_tau]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spread", ["far_below", "huge"])
def test_extreme_logits_match_reference(spread):
    """A few ids near the top and the rest 100 below (once the heap is full its worst key is
    still far below the max, the kernel's screen is off), and logits spanning +-1e4."""
    g = torch.Generator().manual_seed(0)
    if spread == "far_below":
        logits = torch.full((9, 3001), -100.0) + torch.rand(9, 3001, generator=g)
        logits[:, :3] = torch.randn(9, 3, generator=g)
    else:
        logits = (torch.rand(9, 3001, generator=g) * 2 - 1) * 1e4
    got = priority(logits, 5, seed=1, backend="cpu")
    ids, weights, _, _ = priority_sample_reference(logits, k=5, seed=1)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.weights, weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_rows_are_distinct_tokens(backend):
    """A row broadcast over a batch (stride 0) samples each position as its own token."""
    row = long_tailed_logits(1, 500, seed=6)
    broadcast = row.expand(6, 500)
    t = priority(broadcast, 9, seed=4, backend=backend)
    assert torch.equal(t.ids, priority(broadcast.contiguous(), 9, seed=4, backend=backend).ids)
    assert len({tuple(r) for r in t.ids.tolist()}) > 1


def dense(targets, vocab):
    """``[rows, V]`` float64 weights of flattened targets (0 off the ids)."""
    t = targets.reshape(-1)
    out = torch.zeros(t.ids.shape[0], vocab + 1, dtype=torch.float64)
    out.scatter_(1, torch.where(t.ids >= 0, t.ids.long(), vocab), t.weights.double())
    return out[:, :vocab]


def test_k_distinct_sorted_ids_with_padding():
    logits = long_tailed_logits(64, 300, seed=1)
    logits[:8, 3:] = -math.inf  # 3 ids with mass < k: padded, weights exactly p
    t = priority(logits, 10, seed=5, return_logprobs=True)
    ids, w = t.ids, t.weights
    kept = ids >= 0
    assert t.method == "priority" and t.num_samples == 10 and ids.shape == (64, 10)
    assert torch.all(kept.sum(-1) == torch.where(torch.arange(64) < 8, 3, 10))
    assert torch.all(kept[:, :-1] | ~kept[:, 1:])
    assert torch.all((ids[:, 1:] > ids[:, :-1]) | ~(kept[:, 1:] & kept[:, :-1]))
    p = torch.softmax(logits.double(), -1)
    p_kept = p.gather(1, ids.long().clamp_min(0))
    assert torch.all(p_kept[kept] > 0) and torch.all(w[~kept] == 0)
    # w = max(p, tau) >= p, and logprobs are log p
    assert torch.all(w[kept] >= (p_kept[kept] * (1 - 1e-6)).float())
    torch.testing.assert_close(t.logprobs[kept].double(), p_kept[kept].log(), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[:8].sum(-1), torch.ones(8))
    # k = V keeps everything with weights p
    full = priority(logits[8:10, :20], 20, seed=5)
    torch.testing.assert_close(dense(full, 20), torch.softmax(logits[8:10, :20].double(), -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_independent_of_batch_layout(backend):
    logits = long_tailed_logits(12, 97, seed=2).reshape(3, 4, 97)
    sample = functools.partial(priority, backend=backend)
    batch = sample(logits, 7, seed=11, token_offset=40)
    flat = logits.reshape(12, 97)
    for i in range(12):
        alone = sample(flat[i], 7, seed=11, token_offset=40 + i)
        assert torch.equal(alone.ids, batch.ids.reshape(12, 7)[i])
        assert torch.equal(alone.weights, batch.weights.reshape(12, 7)[i])
    # a transposed (non-contiguous) view is read in its own row-major order
    swapped = sample(logits.transpose(0, 1), 7, seed=11, token_offset=40)
    again = sample(logits.transpose(0, 1).contiguous(), 7, seed=11, token_offset=40)
    assert torch.equal(swapped.ids, again.ids)
    assert not torch.equal(sample(logits, 7, seed=12, token_offset=40).ids, batch.ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expected_weights_are_p_and_topk_is_not(backend):
    """2000 independent draws (tokens) of the same long-tailed p over V = 50, k = 5: the mean
    dense weight vector is p within 5 empirical standard errors per entry, and so is the mean
    sum of weights around 1; renormalized top-5 misses p by far more."""
    draws, vocab, k = 2000, 50, 5
    p_logits = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) * 1.5
    logits = p_logits.expand(draws, vocab).contiguous()
    p = torch.softmax(p_logits.double(), -1)
    w = dense(priority(logits, k, seed=3, backend=backend), vocab)
    mean, se = w.mean(0), w.std(0) / math.sqrt(draws)
    # 1e-7 for the entries that are always kept with weight p (no variance, float32 rounding)
    bound = 5 * se + 1e-7
    assert torch.all((mean - p).abs() <= bound), ((mean - p).abs() / bound).max()
    total = w.sum(-1)
    assert abs(float(total.mean()) - 1) <= 5 * float(total.std()) / math.sqrt(draws)
    assert float(total.std()) > 0.01  # the sum is 1 only in expectation
    top = dense(fastkd.sample_teacher(logits[:1], method="topk", k=k, tail="renorm"), vocab)[0]
    assert ((top - p).abs() / bound).max() > 50


def test_sparse_kd_loss_backends_agree():
    teacher = long_tailed_logits(40, 500, seed=3)
    student = torch.randn(40, 500)
    targets = priority(teacher, 16, seed=1)
    losses = [
        fastkd.sparse_kd_loss(student, targets, backend=b, reduction="none")
        for b in compiled_backends("sparse_kd_loss")
    ]
    assert len(losses) >= 2
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-5)


def test_teacher_cache_round_trip(tmp_path):
    targets = priority(
        long_tailed_logits(2 * 9, 300, seed=4).reshape(2, 9, 300), 8, seed=2, return_logprobs=True
    )
    with TeacherCache.create(
        tmp_path / "c", vocab_size=300, num_samples=8, method="priority", seed=2
    ) as writer:
        writer.extend(targets)
    read, lengths = TeacherCache.open(tmp_path / "c").batch([0, 1])
    assert lengths.tolist() == [9, 9] and read.method == "priority"
    k = read.num_slots
    assert torch.equal(read.ids, targets.ids[..., :k])
    assert torch.equal(read.weights.view(torch.int32), targets.weights[..., :k].view(torch.int32))
    assert torch.equal(read.logprobs.view(torch.int32), targets.logprobs[..., :k].view(torch.int32))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(k=4, temperature=2.0), "temperature must be 1"),
        (dict(), "needs k in"),
        (dict(k=0), "needs k in"),
        (dict(k=11), "needs k in"),
        (dict(k=4, num_samples=4), "neither num_samples nor tail"),
        (dict(k=4, tail="renorm"), "neither num_samples nor tail"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        fastkd.sample_teacher(torch.randn(3, 10), method="priority", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_positive_inf_logits_raise(backend, bad):
    logits = torch.randn(3, 10)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf entries \(flat rows \[1\]\)"):
        priority(logits, 4, backend=backend)
