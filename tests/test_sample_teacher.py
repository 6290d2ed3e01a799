"""fastkd.sample_teacher: the counter-based sampler (native and reference), top-k targets."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.reference.sample_teacher import philox4x32_10, sample_teacher_reference

from helpers import (
    SAMPLE_TEACHER_CASES,
    check_well_formed,
    chi2_sf,
    column_major,
    compiled_backends,
    long_tailed_logits,
)

# Triton runs in its interpreter here, too slowly for these sizes: test_sample_teacher_triton.py
# covers it on small cases.
BACKENDS = compiled_backends("sample_teacher")


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    """Random123's known-answer vectors of Philox4x32-10."""
    words = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,vocab,num_samples,temperature", SAMPLE_TEACHER_CASES)
def test_matches_reference(backend, dtype, vocab, num_samples, temperature):
    """The native sampler makes the reference's draws: the same ids (a draw may only differ
    where a uniform falls within float rounding of a cumulative-probability boundary) and
    weights count / N (importance weights for T != 1, to fp32 rounding)."""
    logits = long_tailed_logits(41, vocab, seed=vocab).to(dtype)
    targets = fastkd.sample_teacher(
        logits,
        num_samples=num_samples,
        temperature=temperature,
        seed=11,
        token_offset=5,
        backend=backend,
        return_logprobs=True,
    )
    check_well_formed(targets, num_samples, vocab, temperature)
    ids, weights, logprobs = sample_teacher_reference(
        logits,
        num_samples=num_samples,
        temperature=temperature,
        seed=11,
        token_offset=5,
        return_logprobs=True,
    )
    same = (targets.ids == ids).all(-1)
    assert same.float().mean() >= 0.95, f"{int((~same).sum())} of 41 rows differ"
    torch.testing.assert_close(targets.weights[same], weights[same], rtol=1e-5, atol=0)
    torch.testing.assert_close(targets.logprobs[same], logprobs[same], rtol=1e-5, atol=1e-5)
    assert targets.method == "random" and targets.num_samples == num_samples
    assert targets.vocab_size == vocab and targets.seed == 11


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_draws_whatever_the_batch_split_or_layout(backend):
    logits = long_tailed_logits(4 * 9, 2000, seed=3).reshape(4, 9, 2000)
    whole = fastkd.sample_teacher(logits, seed=5, backend=backend)
    for begin, end in [(0, 1), (1, 3), (3, 4)]:
        part = fastkd.sample_teacher(
            logits[begin:end], seed=5, token_offset=begin * 9, backend=backend
        )
        assert torch.equal(part.ids, whole.ids[begin:end])
        assert torch.equal(part.weights, whole.weights[begin:end])
    # A non-contiguous copy of the same values samples the same.
    strided = column_major(logits)
    assert not strided.is_contiguous()
    again = fastkd.sample_teacher(strided, seed=5, backend=backend)
    assert torch.equal(again.ids, whole.ids) and torch.equal(again.weights, whole.weights)
    other_seed = fastkd.sample_teacher(logits, seed=6, backend=backend)
    assert not torch.equal(other_seed.ids, whole.ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_empirical_distribution_matches_softmax(backend, temperature):
    """Pearson's chi-square test of 4000 x 50 draws from one distribution over 30 ids (with
    a -inf id that must never be drawn), at a fixed seed."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, generator=g) * 1.5
    logits[7] = -math.inf
    rows, n = 4000, 50
    targets = fastkd.sample_teacher(
        logits.expand(rows, 30), num_samples=n, temperature=temperature, seed=123, backend=backend
    )
    counts = torch.zeros(30, dtype=torch.float64)
    kept = targets.ids >= 0
    draws = (targets.weights * n).round() if temperature == 1.0 else None
    if draws is None:  # importance weights: recover counts from w = (c / N) p / r
        p = torch.softmax(logits.double(), -1)
        r = torch.softmax(logits.double() / temperature, -1)
        ratio = (p / r)[targets.ids.clamp_min(0).long()]
        draws = (targets.weights.double() * n / ratio).round()
    counts.index_add_(0, targets.ids[kept].long(), draws[kept].double())
    assert counts[7] == 0 and counts.sum() == rows * n
    expected = torch.softmax(logits.double() / temperature, -1) * rows * n
    live = expected > 0
    stat = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2_sf(stat, int(live.sum()) - 1) > 1e-3, stat


@pytest.mark.parametrize(
    "device,backend",
    [("cpu", b) for b in BACKENDS] + [pytest.param("cuda", "cuda", marks=pytest.mark.gpu)],
)
def test_importance_weights_are_unbiased(device, backend):
    """With a proposal at T = 2, the mean target over many tokens approaches p = softmax(z)."""
    if backend not in fastkd.available_backends("sample_teacher", device):
        pytest.skip(f"fastkd was built without its {backend} kernels")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=g) * 2
    targets = fastkd.sample_teacher(
        logits.expand(20000, 40).to(device),
        num_samples=20,
        temperature=2.0,
        seed=9,
        backend=backend,
    ).to("cpu")
    dense = torch.zeros(20000, 40, dtype=torch.float64)
    kept = targets.ids >= 0
    dense[kept.nonzero()[:, 0], targets.ids[kept].long()] = targets.weights[kept].double()
    mean = dense.mean(0)
    p = torch.softmax(logits.double(), -1)
    assert (mean - p).abs().max() < 0.01, (mean - p).abs().max()
    assert abs(float(mean.sum()) - 1.0) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_support_and_degenerate_rows(backend):
    logits = torch.randn(3, 50)
    logits[0, :] = -math.inf  # no mass: no draws
    logits[1, :49] = -math.inf  # one id left: all draws on it
    logits[2, ::2] = -math.inf  # never an id of zero probability
    targets = fastkd.sample_teacher(logits, num_samples=16, backend=backend)
    assert torch.all(targets.ids[0] == -1) and torch.all(targets.weights[0] == 0)
    assert targets.ids[1, 0] == 49 and targets.weights[1, 0] == 1.0
    assert torch.all(targets.ids[1, 1:] == -1)
    kept = targets.ids[2][targets.ids[2] >= 0]
    assert torch.all(kept % 2 == 1)


SAMPLERS = (
    [dict(backend=b) for b in BACKENDS]
    + [dict(method="priority", k=3, num_samples=None, backend=b) for b in ("cpu", "torch")]
    + [dict(method="topk", k=3, tail=tail) for tail in ("renorm", "bucket", "label")]
)


@pytest.mark.parametrize("kwargs", SAMPLERS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_positive_inf_raises_with_every_method(kwargs, bad):
    """One rule for every sampler: NaN and +inf logits cannot be sampled."""
    logits = torch.randn(4, 10)
    logits[2, 3] = bad
    labels = torch.tensor([1, 2, 3, -100]) if kwargs.get("tail") == "label" else None
    with pytest.raises(ValueError, match=r"NaN or \+inf.*rows \[2\]"):
        fastkd.sample_teacher(logits, labels=labels, **kwargs)


@pytest.mark.parametrize("kwargs", SAMPLERS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_a_row_without_mass_keeps_no_id(kwargs):
    """A row of -inf logits has no distribution: no id, weight 0 and (bucket) tail mass 0,
    never NaN; the other rows are untouched."""
    logits = torch.randn(3, 10)
    logits[1] = -math.inf
    labels = torch.tensor([1, 2, 3]) if kwargs.get("tail") == "label" else None
    targets = fastkd.sample_teacher(logits, labels=labels, **kwargs)
    assert (targets.ids[1] == -1).all() and (targets.weights[1] == 0).all()
    if targets.tail_mass is not None:
        assert targets.tail_mass[1] == 0 and targets.tail_mass.isfinite().all()
    assert targets.weights.isfinite().all() and (targets.ids[[0, 2]] >= 0).any(-1).all()


def test_token_offset_up_to_the_end_of_the_counter():
    """The last token's global index may reach 2^63 - 1 and no further; there, every backend
    still draws the same ids."""
    logits = long_tailed_logits(4, 300)
    last = 2**63 - 4
    for kwargs in (dict(), dict(method="priority", k=5, num_samples=None)):
        a = fastkd.sample_teacher(logits, token_offset=last, backend="cpu", **kwargs)
        b = fastkd.sample_teacher(logits, token_offset=last, backend="torch", **kwargs)
        assert torch.equal(a.ids, b.ids) and (a.ids >= 0).sum() > 4 * 2
        # Random weights are count / N in both; priority weights max(p, tau) to float32
        # rounding, as in the priority sampler's own tests.
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=0)
        with pytest.raises(ValueError, match=r"token_offset.*\[0, 9223372036854775804\]"):
            fastkd.sample_teacher(logits, token_offset=last + 1, **kwargs)


def test_topk_tails():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 30, generator=g) * 2
    p = torch.softmax(logits.double(), -1)
    top = torch.topk(p, 4, -1)
    labels = torch.tensor([int(top.indices[0, 1]), 0, 29, -100, 5])
    renorm = fastkd.sample_teacher(logits, method="topk", k=4, tail="renorm")
    torch.testing.assert_close(renorm.weights.double(), top.values / top.values.sum(-1, True))
    assert torch.equal(renorm.ids.long(), top.indices)
    bucket = fastkd.sample_teacher(logits, method="topk", k=4, tail="bucket", return_logprobs=True)
    torch.testing.assert_close(bucket.weights.double(), top.values)
    torch.testing.assert_close(bucket.tail_mass.double(), 1 - top.values.sum(-1))
    torch.testing.assert_close(bucket.logprobs.double(), top.values.log())
    label = fastkd.sample_teacher(logits, method="topk", k=4, tail="label", labels=labels)
    assert label.num_slots == 5 and label.tail == "label"
    dense = torch.zeros(5, 30, dtype=torch.float64)
    kept = label.ids >= 0
    dense[kept.nonzero()[:, 0], label.ids[kept].long()] = label.weights[kept].double()
    for row in range(5):
        want = torch.zeros(30, dtype=torch.float64)
        want[top.indices[row]] = top.values[row]
        if labels[row] != -100:
            want[labels[row]] += 1 - top.values[row].sum()
        torch.testing.assert_close(dense[row], want)
    assert label.ids[0, 4] == -1  # the label is in the top 4: no extra slot


def test_float64_and_other_devices_use_the_reference():
    logits = long_tailed_logits(6, 300).double()
    targets = fastkd.sample_teacher(logits, seed=4)
    ids, weights, _ = sample_teacher_reference(logits, seed=4)
    assert torch.equal(targets.ids, ids) and torch.equal(targets.weights, weights)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(method="topp"), ValueError, "method"),
        (dict(method="topk"), ValueError, r"k in \[1, V=10\]"),
        (dict(method="topk", k=11, tail="renorm"), ValueError, r"k in \[1, V=10\]"),
        (dict(method="topk", k=3), ValueError, "tail"),
        (dict(method="topk", k=3, tail="renorm", temperature=2.0), ValueError, "temperature"),
        (dict(method="topk", k=3, tail="label"), TypeError, "labels"),
        (
            dict(method="topk", k=3, tail="label", labels=torch.tensor([1, 2])),
            ValueError,
            r"leading shape \(4,\)",
        ),
        (
            dict(method="topk", k=3, tail="label", labels=torch.tensor([1, 2, 3, 10])),
            ValueError,
            r"\[10\]",
        ),
        (dict(k=3), ValueError, "method='topk'"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(token_offset=-2), ValueError, "token_offset"),
        (dict(token_offset=2**63), ValueError, r"token_offset must be an int in \[0, "),
        (dict(token_offset=1.5), ValueError, "token_offset"),
        (dict(num_samples=2**31), ValueError, r"num_samples must be an int in \[1, 2147483647\]"),
        (dict(num_samples=True), ValueError, "num_samples"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(temperature=1e-50), ValueError, "temperature"),
        (
            dict(
                method="topk",
                k=3,
                tail="label",
                labels=torch.tensor([1, 2, 3, 4], dtype=torch.uint8),
            ),
            ValueError,
            "cannot equal ignore_index=-100",
        ),
        (dict(backend="cuda"), RuntimeError, "backend 'cuda' runs on cuda tensors"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.sample_teacher(torch.randn(4, 10), **kwargs)


def test_integer_logits_raise():
    with pytest.raises(TypeError, match="floating point"):
        fastkd.sample_teacher(torch.ones(2, 3, dtype=torch.long))
