"""The Triton sampler (sample_teacher, method="random") against the native kernel and the reference.

Runs under TRITON_INTERPRET=1 on CPU (small fp32 shapes: the interpreter runs one row at a time)
and compiled on a GPU, where bf16/fp16 run as well. Draws are compared row by row: a draw may
land on a neighbouring id where its uniform falls within float rounding of a cumulative-mass
boundary (the kernels round the exponentials in fp32, the reference keeps float64), so most
rows, not all, must agree exactly.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastkd
from fastkd.reference.sample_teacher import philox4x32_10, sample_teacher_reference, token_uniforms

from helpers import check_well_formed, make_logits

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        "triton" not in fastkd.available_backends("sample_teacher", DEVICE),
        reason="the Triton backend cannot run here",
    ),
]
CPU_BACKEND = "cpu" in fastkd.available_backends("sample_teacher", "cpu")


def sample(logits, **kwargs):
    return fastkd.sample_teacher(logits.to(DEVICE), backend="triton", **kwargs)


if INTERPRET:
    import triton
    import triton.language as tl

    from fastkd.triton.sample_teacher import _draw_uniforms, _int32_bits, _philox4x32_10

    @triton.jit
    def _philox_probe(counter_ptr, key_ptr, out_ptr):
        # The four words of one counter under one key, as [4] lanes of equal counters.
        lane = tl.arange(0, 4)
        c = tl.load(counter_ptr + lane)
        zero = tl.zeros([4], tl.uint32)
        x0, x1, x2, x3 = _philox4x32_10(
            zero + tl.sum(tl.where(lane == 0, c, 0), axis=0),
            zero + tl.sum(tl.where(lane == 1, c, 0), axis=0),
            zero + tl.sum(tl.where(lane == 2, c, 0), axis=0),
            zero + tl.sum(tl.where(lane == 3, c, 0), axis=0),
            zero + tl.load(key_ptr),
            zero + tl.load(key_ptr + 1),
        )
        word = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
        tl.store(out_ptr + lane, word)

    @triton.jit
    def _uniform_probe(out_ptr, seed_lo, seed_hi, token, BLOCK_N: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK_N), _draw_uniforms(seed_lo, seed_hi, token, BLOCK_N))


def _uint32_tensor(words):
    return torch.tensor(
        [w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32
    ).view(torch.uint32)


@pytest.mark.skipif(not INTERPRET, reason="the probes take CPU tensors (the interpreter)")
@pytest.mark.parametrize(
    "counter,key",
    [
        ((0, 0, 0, 0), (0, 0)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)),
    ],
)
def test_philox_matches_reference(counter, key):
    """The kernel's Philox4x32-10 against the reference's (which holds Random123's answers)."""
    out = torch.zeros(4, dtype=torch.int32).view(torch.uint32)
    _philox_probe[(1,)](_uint32_tensor(counter), _uint32_tensor(key), out)
    expected = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) & 0xFFFFFFFF for w in out.view(torch.int32).tolist()] == [
        int(w) for w in expected
    ]


@pytest.mark.skipif(not INTERPRET, reason="the probes take CPU tensors (the interpreter)")
@pytest.mark.parametrize("seed,token", [(0, 0), (11, 5), (2**63 + 12345, 2**33 + 7)])
def test_uniforms_match_reference(seed, token):
    out = torch.zeros(16)
    _uniform_probe[(1,)](
        out, _int32_bits(seed & 0xFFFFFFFF), _int32_bits(seed >> 32), token, BLOCK_N=16
    )
    assert torch.equal(out, token_uniforms(seed, torch.tensor([token]), 16)[0])


# (V, N, temperature, small_chunks): small_chunks cuts the row into chunks of 64 columns for
# the stats and LSE passes and 16 for the merge, the paths a single chunk never takes.
CASES = [
    (1, 5, 1.0, False),
    (7, 20, 1.0, False),
    (300, 20, 1.0, False),
    (300, 20, 2.0, False),
    (300, 9, 0.7, False),
    (300, 20, 1.0, True),
    (300, 20, 2.0, True),
]


@pytest.mark.parametrize("vocab,num_samples,temperature,small_chunks", CASES)
@pytest.mark.slow  # 7 cases, 8 s of the full run's 1,025 s
def test_matches_cpu_and_reference(monkeypatch, vocab, num_samples, temperature, small_chunks):
    if small_chunks:
        import fastkd.triton.sample_teacher as kernel

        monkeypatch.setattr(kernel, "MAX_BLOCK_V", 64)
        monkeypatch.setattr(kernel, "MAX_BLOCK_S", 16)
    logits = make_logits(8, vocab, seed=vocab + num_samples)
    if vocab > 1:
        logits[:, ::7] = -math.inf  # ids without mass, never drawn
    kwargs = dict(
        num_samples=num_samples,
        temperature=temperature,
        seed=2**40 + 11,
        token_offset=2**32 - 3,
        return_logprobs=True,
    )
    targets = sample(logits, **kwargs)
    check_well_formed(targets, num_samples, vocab, temperature)
    ids, weights, logprobs = (x.cpu() for x in (targets.ids, targets.weights, targets.logprobs))
    others = [sample_teacher_reference(logits, **kwargs)]
    if CPU_BACKEND:
        cpu = fastkd.sample_teacher(logits, backend="cpu", **kwargs)
        others.append((cpu.ids, cpu.weights, cpu.logprobs))
    assert not torch.any((ids >= 0) & (ids % 7 == 0)) or vocab == 1
    for other_ids, other_weights, other_logprobs in others:
        same = (ids == other_ids).all(-1)
        assert same.float().mean() >= 0.9, f"{int((~same).sum())} of 8 rows differ"
        torch.testing.assert_close(weights[same], other_weights[same], rtol=1e-5, atol=0)
        torch.testing.assert_close(logprobs[same], other_logprobs[same], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRET, reason="half precision runs compiled only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    logits = make_logits(64, 5000, seed=1).to(dtype)
    targets = sample(logits, num_samples=50, seed=3)
    check_well_formed(targets, 50, 5000, 1.0)
    ids, _, _ = sample_teacher_reference(logits, num_samples=50, seed=3)
    assert (targets.ids.cpu() == ids).all(-1).float().mean() >= 0.9


@pytest.mark.slow  # 3 s of the full run's 1,025 s
def test_same_draws_whatever_the_batch_split_or_layout():
    logits = make_logits(2 * 4, 50, seed=3).reshape(2, 4, 50).to(DEVICE)
    whole = sample(logits, num_samples=8, seed=5)
    part = sample(logits[1:], num_samples=8, seed=5, token_offset=4)
    assert torch.equal(part.ids, whole.ids[1:]) and torch.equal(part.weights, whole.weights[1:])
    # Rows of a sliced [B, T, V] tensor, addressed in place: the tokens of the slice.
    sliced = sample(logits[:, 1:], num_samples=8, seed=5)
    again = sample(logits[:, 1:].contiguous(), num_samples=8, seed=5)
    assert torch.equal(sliced.ids, again.ids) and torch.equal(sliced.weights, again.weights)
    assert not torch.equal(sample(logits, num_samples=8, seed=6).ids, whole.ids)


def test_support_and_degenerate_rows():
    logits = make_logits(3, 50, seed=4)
    logits[0, :] = -math.inf  # no mass: no draws
    logits[1, :49] = -math.inf  # one id left: all draws on it
    logits[2, ::2] = -math.inf  # never an id of zero probability
    targets = sample(logits, num_samples=16, return_logprobs=True)
    ids, weights, logprobs = (x.cpu() for x in (targets.ids, targets.weights, targets.logprobs))
    assert torch.all(ids[0] == -1) and torch.all(weights[0] == 0) and torch.all(logprobs[0] == 0)
    assert ids[1, 0] == 49 and weights[1, 0] == 1.0 and logprobs[1, 0] == 0.0
    assert torch.all(ids[1, 1:] == -1)
    kept = ids[2][ids[2] >= 0]
    assert len(kept) > 0 and torch.all(kept % 2 == 1)


@pytest.mark.parametrize("bad", [float("nan"), math.inf])
def test_nan_or_positive_inf_raises(bad):
    logits = make_logits(4, 10, seed=5)
    logits[2, 3] = bad
    logits[3, :] = -math.inf
    with pytest.raises(ValueError, match=r"NaN or \+inf.*rows \[2\]"):
        sample(logits)


@pytest.mark.slow  # 6 s of the full run's 1,025 s
def test_empirical_distribution_matches_softmax():
    """Pearson's chi-square test of 64 x 20 draws from one distribution over 6 ids (one of them
    -inf, never drawn), at a fixed seed."""
    logits = torch.tensor([0.5, -1.0, -math.inf, 1.0, 0.0, -0.5])
    rows, n = 64, 20
    targets = sample(logits.expand(rows, 6), num_samples=n, seed=123)
    ids, weights = targets.ids.cpu(), targets.weights.cpu()
    kept = ids >= 0
    counts = torch.zeros(6, dtype=torch.float64)
    counts.index_add_(0, ids[kept].long(), (weights[kept] * n).round().double())
    assert counts[2] == 0 and counts.sum() == rows * n
    expected = torch.softmax(logits.double(), -1) * rows * n
    live = expected > 0
    stat = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    p_value = float(
        torch.special.gammaincc(
            torch.tensor(2.0, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )
    assert p_value > 1e-3, stat  # 4 degrees of freedom
