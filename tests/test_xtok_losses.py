"""fastkd.xtok losses: chunk_logprobs, ALM and GOLD against closed forms and the plain-PyTorch
float64 references of fastkd.reference.xtok_losses, values and gradients."""

import math

import pytest
import torch

from fastkd.reference.xtok_losses import alm_reference, chunk_logprobs_reference, gold_reference
from fastkd.xtok import (
    VocabMap,
    alm_loss,
    chunk_logprobs,
    chunk_mask,
    gold_loss,
    merge_chunk_probs,
    token_logprobs,
)


def _logp(p):
    return torch.tensor([[math.log(p)]], dtype=torch.float64)


def test_alm_closed_form():
    s = _logp(0.25).requires_grad_()
    assert alm_loss(s, _logp(0.5)).item() == pytest.approx(0.836988, abs=1e-6)
    # At equality: the binary entropy, gradient 0; the binary KL is 0.
    s = _logp(0.5).requires_grad_()
    loss = alm_loss(s, _logp(0.5))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(s.grad.item()) < 1e-12
    assert alm_loss(_logp(0.3), _logp(0.3), divergence="kl").item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("divergence", ["bce", "kl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_alm_against_reference(temperature, divergence, dtype):
    gen = torch.Generator().manual_seed(0)
    s64 = -torch.rand(3, 7, generator=gen, dtype=torch.float64) * 6 - 1e-3
    t64 = -torch.rand(3, 7, generator=gen, dtype=torch.float64) * 6
    t64[0, 0] = 0.0  # a chunk the teacher is certain of
    t64[1, 1] = -80.0  # and one it rules out
    mask = torch.rand(3, 7, generator=gen) > 0.3
    s = s64.to(dtype).requires_grad_()
    loss = alm_loss(s, t64.to(dtype), mask, temperature=temperature, divergence=divergence)
    loss.backward()
    ref_s = s.detach().double().requires_grad_()
    ref = alm_reference(ref_s, t64.to(dtype).double(), mask, temperature, divergence)
    ref.backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert loss.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
    assert torch.allclose(
        s.grad.double(), ref_s.grad, rtol=1e-2 if dtype == torch.bfloat16 else tol, atol=tol
    )
    assert s.grad[~mask].eq(0).all()


def test_alm_reductions_and_errors():
    s, t = -torch.rand(2, 3), -torch.rand(2, 3)
    none = alm_loss(s, t, reduction="none")
    assert none.shape == (2, 3)
    assert alm_loss(s, t, reduction="sum").item() == pytest.approx(none.sum().item(), rel=1e-6)
    assert alm_loss(s, t, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    mask = torch.tensor([[True, False, True], [False, False, True]])
    expected = none[mask].sum() / 4
    assert alm_loss(s, t, mask, num_items_in_batch=4).item() == pytest.approx(expected.item())
    assert alm_loss(s, t, mask).item() == pytest.approx((none[mask].sum() / 3).item())
    for kwargs, match in [
        ({"temperature": 0.0}, "temperature"),
        ({"divergence": "js"}, "bce"),
        ({"reduction": "avg"}, "reduction"),
        ({"num_items_in_batch": -1}, "num_items_in_batch"),
    ]:
        with pytest.raises(ValueError, match=match):
            alm_loss(s, t, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        alm_loss(s, t[:, :2])


def test_chunk_logprobs_against_loop_and_identity():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6), generator=gen)
    lp = token_logprobs(logits, targets)
    ref_lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(lp, ref_lp)
    ids = torch.tensor([[-1, 0, 0, 1, 2, 2], [0, 1, 1, 1, -1, -1]], dtype=torch.int32)
    out = chunk_logprobs(lp, ids, num_chunks=4)
    ref = chunk_logprobs_reference(ref_lp, ids, 4)
    assert torch.allclose(out, ref)
    weights = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(grad, ref_grad)
    assert chunk_mask(ids).tolist() == [[True, True, True], [True, True, False]]
    # The same model and tokenizer on both sides: chunks are tokens, chunk log-probs are the
    # token log-probs and the ALM gradient is 0.
    same = torch.arange(6, dtype=torch.int32).expand(2, 6)
    s = lp.detach().clone().requires_grad_()
    chunks = chunk_logprobs(s, same)
    assert torch.equal(chunks, s.detach())
    alm_loss(chunks, chunk_logprobs(lp.detach(), same)).backward()
    assert s.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[0, 5]]), r"chunk_id must lie in \[-1, 2\]"),
        (torch.tensor([[-2, 0]]), r"chunk_id must lie"),
    ],
)
def test_chunk_logprobs_bad_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        chunk_logprobs(torch.zeros(1, 2), bad, num_chunks=3)


def test_merge_hand_example():
    # Chunk of positions 0-1: the first distribution [.6, .3, .1] times p_1(x_1) = 0.9.
    probs0 = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    probs1 = torch.tensor([0.05, 0.9, 0.05], dtype=torch.float64)
    logits = torch.stack([probs0.log(), probs1.log()])[None]
    merged = merge_chunk_probs(logits, torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert torch.allclose(merged[0, 0], torch.tensor([0.54, 0.27, 0.09], dtype=torch.float64))


def _gold_case(seed, vs=13, vt=9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s_ids = torch.tensor([[0, 0, 1, 2, 2, 2, -1], [-1, 0, 1, 1, 2, -1, -1]])
    t_ids = torch.tensor([[0, 1, 1, 2, -1], [0, 0, 1, 2, 2]])
    s_logits = (torch.randn(2, 7, vs, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t_logits = (torch.randn(2, 5, vt, generator=gen, dtype=torch.float64) * 3).to(dtype)
    s_logits[0, 1, 4] = -float("inf")  # a token the student rules out
    s_targets = torch.randint(0, vs, (2, 7), generator=gen)
    t_targets = torch.randint(0, vt, (2, 5), generator=gen)
    return s_logits.requires_grad_(), t_logits, s_targets, t_targets, s_ids, t_ids


# (hybrid, beta): beta enters the hybrid only.
GOLD_KINDS = [(False, 0.5), (True, 0.0), (True, 0.5), (True, 1.0)]


@pytest.mark.parametrize("hybrid,beta", GOLD_KINDS)
@pytest.mark.parametrize("temps", [(1.0, None), (2.0, 0.5)])
@pytest.mark.parametrize("block_rows", [1, 64])
def test_gold_against_reference(hybrid, beta, temps, block_rows):
    s_logits, t_logits, s_tg, t_tg, s_ids, t_ids = _gold_case(0)
    vmap = (
        VocabMap(torch.tensor([0, 2, 5, 7]), torch.tensor([3, 1, 0, 8]), 13, 9) if hybrid else None
    )
    loss = gold_loss(
        s_logits,
        t_logits,
        s_tg,
        t_tg,
        s_ids,
        t_ids,
        temperature=temps[0],
        teacher_temperature=temps[1],
        vocab_map=vmap,
        beta=beta,
        block_rows=block_rows,
    )
    (grad,) = torch.autograd.grad(loss, s_logits)
    weights = (4 / 9, 5 / 9)
    ref = gold_reference(
        s_logits,
        t_logits,
        s_tg,
        t_tg,
        s_ids,
        t_ids,
        temperature=temps[0],
        teacher_temperature=temps[1],
        beta=beta,
        weights=weights,
        matched=(vmap.student_ids, vmap.teacher_ids) if hybrid else None,
    )
    (ref_grad,) = torch.autograd.grad(ref, s_logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_gold_float32_and_mask():
    s64, t64, s_tg, t_tg, s_ids, t_ids = _gold_case(1)
    s32 = s64.detach().float().requires_grad_()
    loss = gold_loss(s32, t64.float(), s_tg, t_tg, s_ids, t_ids, reduction="none")
    ref = gold_loss(s64, t64, s_tg, t_tg, s_ids, t_ids, reduction="none")
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6)
    only_first = torch.tensor([[True, False, False], [True, False, False]])
    masked = gold_loss(s64, t64, s_tg, t_tg, s_ids, t_ids, chunk_mask=only_first)
    assert masked.item() == pytest.approx(ref[:, 0].mean().item(), rel=1e-12)


def test_gold_same_model_is_zero():
    s_logits, _, s_tg, _, s_ids, _ = _gold_case(2)
    loss = gold_loss(s_logits, s_logits.detach(), s_tg, s_tg, s_ids, s_ids)
    (grad,) = torch.autograd.grad(loss, s_logits)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


def test_gold_bad_vocab_map():
    s_logits, t_logits, s_tg, t_tg, s_ids, t_ids = _gold_case(0)
    bad = VocabMap(torch.tensor([0, 20]), torch.tensor([1, 2]), 21, 9)
    with pytest.raises(ValueError, match="student ids run from 0 to 20"):
        gold_loss(s_logits, t_logits, s_tg, t_tg, s_ids, t_ids, vocab_map=bad)
    with pytest.raises(ValueError, match="teacher_targets must hold ids"):
        gold_loss(s_logits, t_logits, s_tg, t_tg + 100, s_ids, t_ids)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_chunk_logprobs_from_the_fused_lm_head_equal_those_from_logits(backend):
    """The per-token log-probs of ``fastkd.fused_linear_logprobs`` (no [B, T, V] logits) give the
    chunk log-likelihoods and their gradients that full logits give."""
    import fastkd

    if backend not in fastkd.available_backends("fused_linear_logprobs", "cpu"):
        pytest.skip(f"{backend} is not available")
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 9, 6, generator=g)
    weight = torch.randn(23, 6, generator=g) / 2
    ids = torch.randint(0, 23, (2, 9), generator=g)
    targets = ids[:, 1:].clone()
    targets[1, -2:] = -100  # padding
    chunk_id = torch.tensor(
        [[0, 0, 1, 2, 2, 2, 3, 4], [0, 1, 1, 2, 3, 3, -1, -1]], dtype=torch.int32
    )
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    fused = chunk_logprobs(
        fastkd.fused_linear_logprobs(
            leaves[0][:, :-1], leaves[1], targets, backend=backend
        ).logprob,
        chunk_id,
    )
    fused.sum().backward()
    plain_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    logits = plain_leaves[0][:, :-1] @ plain_leaves[1].T
    plain = chunk_logprobs(token_logprobs(logits, targets), chunk_id)
    plain.sum().backward()
    # Both in fp32 (the fused kernel against autograd on full logits): fp32 rounding apart.
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, plain_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
