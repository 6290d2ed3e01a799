"""The native CUDA sampler (sample_teacher, method="random", backend="cuda") against the reference
and the Triton kernel on the same CUDA inputs. Needs a GPU and fastkd built with its CUDA kernels.

All samplers derive the same sorted thresholds from the same counter-based uniforms, so a row's
draws agree exactly unless a threshold falls within float rounding of a cumulative-mass boundary
(the kernels round the exponentials in fp32, the reference keeps float64): most rows, not all,
must agree, and over long rows or many draws the share of differing draws is what is bounded.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.reference.sample_teacher import sample_teacher_reference

from helpers import (
    HAS_CUDA,
    SAMPLE_TEACHER_CASES,
    check_well_formed,
    chi2_sf,
    column_major,
    long_tailed_logits,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        HAS_CUDA and "cuda" not in fastkd.available_backends("sample_teacher", "cuda"),
        reason="fastkd was built without its CUDA kernels",
    ),
]
TRITON = HAS_CUDA and "triton" in fastkd.available_backends("sample_teacher", "cuda")

# (dtype, V, N, temperature): rows of a Llama-3-sized vocabulary (many chunks per row), and many
# draws per row (several tiles of the threshold and slot scans).
LARGE_VOCAB = [
    (torch.bfloat16, 128256, 50, 1.0),
    (torch.bfloat16, 128256, 50, 2.0),
    (torch.float32, 128256, 300, 1.0),
]
MANY_DRAWS = [
    (torch.float32, 5000, 1000, 1.0),
    (torch.bfloat16, 5000, 4097, 1.0),
    (torch.float16, 300, 4097, 2.0),
    (torch.float32, 7, 2000, 1.0),
]


def sample(logits, backend="cuda", **kwargs):
    return fastkd.sample_teacher(logits.cuda(), backend=backend, **kwargs).to("cpu")


def draw_counts(ids, weights, logits, num_samples, temperature):
    """``[rows, V]`` float64 draw counts behind targets whose weights are (count / N) p / r."""
    z = logits.reshape(-1, logits.shape[-1]).double().cpu()
    r_over_p = (torch.log_softmax(z / temperature, -1) - torch.log_softmax(z, -1)).exp()
    ids = ids.reshape(z.shape[0], -1).long().cpu()
    kept = ids >= 0
    columns = ids.clamp_min(0)
    counts = weights.reshape(ids.shape).double().cpu() * num_samples * r_over_p.gather(1, columns)
    dense = torch.zeros_like(z)
    dense.scatter_add_(1, columns, torch.where(kept, counts.round(), 0.0))
    return dense


def differing_draws(a, b, logits, num_samples, temperature):
    """The share of draws on which two targets of the same logits differ."""
    ca = draw_counts(a[0], a[1], logits, num_samples, temperature)
    cb = draw_counts(b[0], b[1], logits, num_samples, temperature)
    return float((ca - cb).abs().sum() / 2) / (ca.shape[0] * num_samples)


def compare_rows(targets, other, *, min_same, rtol, atol):
    """At least `min_same` of the rows hold the same ids; their weights and log-probabilities
    agree to (rtol, atol)."""
    ids, weights, logprobs = other
    same = (targets.ids == ids).all(-1)
    assert same.float().mean() >= min_same, f"{int((~same).sum())} of {len(same)} rows differ"
    torch.testing.assert_close(targets.weights[same], weights[same], rtol=rtol, atol=0)
    torch.testing.assert_close(targets.logprobs[same], logprobs[same], rtol=rtol, atol=atol)


# (dtype, V, N, temperature, rows, sampler seed, token offset, share of rows identical to the
# reference, share of draws allowed to differ or None): the shared SAMPLE_TEACHER_CASES, and many
# draws per row.
REFERENCE_CASES = [(*case, 41, 11, 5, 0.95, None) for case in SAMPLE_TEACHER_CASES] + [
    (*case, 16, 4, 9, 0.8, 1e-3) for case in MANY_DRAWS
]


@pytest.mark.parametrize(
    "dtype,vocab,num_samples,temperature,rows,seed,token_offset,min_same,max_differing",
    REFERENCE_CASES,
)
def test_matches_reference(
    dtype, vocab, num_samples, temperature, rows, seed, token_offset, min_same, max_differing
):
    logits = long_tailed_logits(rows, vocab, seed=vocab).to(dtype)
    kwargs = dict(
        num_samples=num_samples,
        temperature=temperature,
        seed=seed,
        token_offset=token_offset,
        return_logprobs=True,
    )
    targets = sample(logits, **kwargs)
    check_well_formed(targets, num_samples, vocab, temperature)
    reference = sample_teacher_reference(logits, **kwargs)
    compare_rows(targets, reference, min_same=min_same, rtol=1e-5, atol=1e-5)
    assert targets.method == "random" and targets.num_samples == num_samples
    if max_differing is not None:
        assert (
            differing_draws(
                (targets.ids, targets.weights), reference, logits, num_samples, temperature
            )
            <= max_differing
        )


@pytest.mark.skipif(not TRITON, reason="the Triton backend cannot run here")
@pytest.mark.parametrize("dtype,vocab,num_samples,temperature", SAMPLE_TEACHER_CASES)
def test_matches_triton(dtype, vocab, num_samples, temperature):
    logits = long_tailed_logits(41, vocab, seed=vocab + 1).to(dtype)
    kwargs = dict(
        num_samples=num_samples,
        temperature=temperature,
        seed=3,
        token_offset=2**33,
        return_logprobs=True,
    )
    targets = sample(logits, **kwargs)
    triton = sample(logits, backend="triton", **kwargs)
    compare_rows(
        targets, (triton.ids, triton.weights, triton.logprobs), min_same=0.95, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype,vocab,num_samples,temperature", LARGE_VOCAB)
def test_large_vocabulary(dtype, vocab, num_samples, temperature):
    """Long rows against the reference and the Triton kernel: nearly all rows identical, and
    few draws differing (each a draw within rounding of a column boundary)."""
    logits = long_tailed_logits(64, vocab, seed=7).to(dtype)
    kwargs = dict(num_samples=num_samples, temperature=temperature, seed=1, return_logprobs=True)
    targets = sample(logits, **kwargs)
    check_well_formed(targets, num_samples, vocab, temperature)
    reference = sample_teacher_reference(logits, **kwargs)
    compare_rows(targets, reference, min_same=0.9, rtol=5e-5, atol=5e-5)
    assert (
        differing_draws((targets.ids, targets.weights), reference, logits, num_samples, temperature)
        <= 2e-3
    )
    if TRITON:
        triton = sample(logits, backend="triton", **kwargs)
        assert (
            differing_draws(
                (targets.ids, targets.weights),
                (triton.ids, triton.weights),
                logits,
                num_samples,
                temperature,
            )
            <= 1e-2
        )


def test_same_draws_whatever_the_batch_split_or_layout():
    logits = long_tailed_logits(4 * 9, 2001, seed=3).reshape(4, 9, 2001).cuda()
    whole = sample(logits, seed=5, return_logprobs=True)
    for begin, end in [(0, 1), (1, 3), (3, 4)]:
        part = sample(logits[begin:end], seed=5, token_offset=begin * 9, return_logprobs=True)
        assert torch.equal(part.ids, whole.ids[begin:end])
        assert torch.equal(part.weights, whole.weights[begin:end])
        assert torch.equal(part.logprobs, whole.logprobs[begin:end])
    # A non-contiguous copy of the same values samples the same.
    strided = column_major(logits)
    assert not strided.is_contiguous()
    again = sample(strided, seed=5)
    assert torch.equal(again.ids, whole.ids) and torch.equal(again.weights, whole.weights)
    # Rows that start off 16-byte boundaries (read element by element) sample the same.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = logits.reshape(36, 2001).to(dtype)
        wide = torch.zeros(36, 2011, dtype=dtype, device="cuda")
        wide[:, 3:2004] = rows
        shifted, aligned = sample(wide[:, 3:2004], seed=5), sample(rows.contiguous(), seed=5)
        assert torch.equal(shifted.ids, aligned.ids)
        assert torch.equal(shifted.weights, aligned.weights)
    assert not torch.equal(sample(logits, seed=6).ids, whole.ids)


def test_runs_on_the_current_stream():
    logits = long_tailed_logits(64, 3000, seed=8).cuda()
    expected = sample(logits, seed=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        targets = fastkd.sample_teacher(logits, seed=2, backend="cuda")
        ids, weights = targets.ids.cpu(), targets.weights.cpu()
    assert torch.equal(ids, expected.ids) and torch.equal(weights, expected.weights)


def test_support_and_degenerate_rows():
    logits = torch.randn(5, 1100)
    logits[0, :] = -math.inf  # no mass: no draws
    logits[1, :1099] = -math.inf  # one id left: all draws on it
    logits[2, ::2] = -math.inf  # never an id of zero probability
    logits[3, :] = -math.inf  # one id, in the row's second chunk of columns
    logits[3, 600] = 3.0
    logits[4, :] = -1e4  # ids whose mass underflows are never drawn
    logits[4, 5] = 0.0
    targets = sample(logits, num_samples=16, return_logprobs=True)
    ids, weights, logprobs = targets.ids, targets.weights, targets.logprobs
    assert torch.all(ids[0] == -1) and torch.all(weights[0] == 0) and torch.all(logprobs[0] == 0)
    for row, column in [(1, 1099), (3, 600), (4, 5)]:
        assert ids[row, 0] == column and weights[row, 0] == 1.0 and logprobs[row, 0] == 0.0
        assert torch.all(ids[row, 1:] == -1) and torch.all(weights[row, 1:] == 0)
    kept = ids[2][ids[2] >= 0]
    assert len(kept) > 0 and torch.all(kept % 2 == 1)


@pytest.mark.parametrize("bad,temperature", [(float("nan"), 1.0), (math.inf, 1.0), (3e38, 0.5)])
def test_nan_or_positive_inf_raises(bad, temperature):
    """NaN or +inf in z / T (3e38 / 0.5 overflows) flags the row; rows without mass do not."""
    logits = torch.randn(4, 700)
    logits[2, 650] = bad
    logits[3, :] = -math.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf.*rows \[2\]"):
        sample(logits, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_empirical_distribution_matches_softmax(temperature):
    """Pearson's chi-square test of 4000 x 50 draws from one distribution over 30 ids (with
    a -inf id that must never be drawn), at a fixed seed."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, generator=g) * 1.5
    logits[7] = -math.inf
    rows, n = 4000, 50
    targets = sample(logits.expand(rows, 30), num_samples=n, temperature=temperature, seed=123)
    counts = draw_counts(targets.ids, targets.weights, logits.expand(rows, 30), n, temperature).sum(
        0
    )
    assert counts[7] == 0 and counts.sum() == rows * n
    expected = torch.softmax(logits.double() / temperature, -1) * rows * n
    live = expected > 0
    stat = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2_sf(stat, int(live.sum()) - 1) > 1e-3, stat


def test_too_many_draws_for_shared_memory_raise():
    """16 bytes of shared memory per draw: 10^6 draws exceed every GPU's, and the error says how
    many fit."""
    with pytest.raises(
        RuntimeError,
        match=r"num_samples=1000000 .*shared memory.*at most \d+ "
        r"draws per token",
    ):
        sample(torch.randn(2, 100), num_samples=10**6)
