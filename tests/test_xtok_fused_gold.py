"""fastkd.xtok.fused_linear_gold_loss: GOLD from hidden states and lm_heads, values and gradients
(hidden, weight, bias) against gold_loss on explicit logits and the plain per-chunk reference;
and the memory of both GOLD losses: no tokens x vocab tensor beyond gold_loss's gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastkd.reference.xtok_losses import gold_reference
from fastkd.xtok import VocabMap, gold_loss
from fastkd.xtok.fused_gold import fused_linear_gold_loss

from helpers import op_backend_params

OP = "fused_linear_logprobs"
V_S, V_T, H_S, H_T = 13, 11, 5, 7

# Three sequences: chunks of several tokens, a token in no chunk between two chunks (row 0),
# chunks of one token (row 1), a chunk on one side only (row 0's chunk 4), and a sequence with
# no chunk on the student side (row 2).
S_IDS = [
    [0, 0, 1, -1, 2, 2, 2, 3, 4],
    [-1, 0, 1, 2, 3, 4, 4, -1, -1],
    [-1, -1, -1, -1, -1, -1, -1, -1, -1],
]
T_IDS = [
    [0, 1, 1, -1, 2, 3, -1],
    [0, 0, 1, 2, 3, 3, 4],
    [0, 1, -1, -1, -1, -1, -1],
]
VMAP = VocabMap(torch.tensor([0, 2, 5, 7, 12]), torch.tensor([3, 1, 0, 8, 10]), V_S, V_T)


def _inputs(seed: int, dtype, *, bias: bool, spread: float = 1.0):
    """Hidden states, heads (and biases), targets (-100 outside chunks) and chunk ids."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    s_ids, t_ids = torch.tensor(S_IDS), torch.tensor(T_IDS)
    s_tg = torch.randint(0, V_S, s_ids.shape, generator=gen).masked_fill(s_ids < 0, -100)
    t_tg = torch.randint(0, V_T, t_ids.shape, generator=gen).masked_fill(t_ids < 0, -100)
    return dict(
        student_hidden=randn(3, 9, H_S) * spread,
        student_weight=randn(V_S, H_S),
        student_bias=randn(V_S) if bias else None,
        teacher_hidden=randn(3, 7, H_T) * spread,
        teacher_weight=randn(V_T, H_T),
        teacher_bias=randn(V_T) if bias else None,
        student_targets=s_tg,
        teacher_targets=t_tg,
        student_chunk_id=s_ids,
        teacher_chunk_id=t_ids,
    )


def _first_tokens_only(chunk_id: torch.Tensor) -> torch.Tensor:
    """Chunk ids with every chunk cut to its first token (a loop)."""
    out = chunk_id.clone()
    for b in range(chunk_id.shape[0]):
        seen = set()
        for t in range(chunk_id.shape[1]):
            c = int(chunk_id[b, t])
            if c in seen:
                out[b, t] = -1
            seen.add(c)
    return out


def _leaves(inputs, dtype=None):
    """Copies of the student's hidden states, weight and bias as leaves (cast to ``dtype``)."""
    out = {}
    for name in ("student_hidden", "student_weight", "student_bias"):
        t = inputs[name]
        if t is not None:
            out[name] = t.detach().to(dtype or t.dtype).requires_grad_()
    return out


def _logits(hidden, weight, bias, scale):
    z = hidden @ weight.T
    return (z if bias is None else z + bias) * scale


def _explicit(inputs, leaves, merge, scales, **options):
    """gold_loss on both models' full logits from the same hidden states and heads (float64)."""
    d = torch.float64
    s_logits = _logits(
        leaves["student_hidden"], leaves["student_weight"], leaves.get("student_bias"), scales[0]
    )
    t_bias = inputs["teacher_bias"]
    t_logits = _logits(
        inputs["teacher_hidden"].to(d),
        inputs["teacher_weight"].to(d),
        None if t_bias is None else t_bias.to(d),
        scales[1],
    )
    s_ids, t_ids = inputs["student_chunk_id"], inputs["teacher_chunk_id"]
    if not merge:
        s_ids, t_ids = _first_tokens_only(s_ids), _first_tokens_only(t_ids)
    args = (inputs["student_targets"], inputs["teacher_targets"], s_ids, t_ids)
    return gold_loss(s_logits, t_logits, *args, **options)


def _fused(inputs, leaves, merge, scales, backend="torch", **options):
    kwargs = {**inputs, **leaves}
    return fused_linear_gold_loss(
        *(kwargs.pop(n) for n in ("student_hidden", "student_weight")),
        *(kwargs.pop(n) for n in ("teacher_hidden", "teacher_weight")),
        *(
            kwargs.pop(n)
            for n in ("student_targets", "teacher_targets", "student_chunk_id", "teacher_chunk_id")
        ),
        **kwargs,
        logit_scale=scales[0],
        teacher_logit_scale=scales[1],
        merge=merge,
        backend=backend,
        **options,
    )


# (hybrid, beta): beta enters the hybrid only.
KINDS = [(False, 0.5), (True, 0.0), (True, 0.5), (True, 1.0)]
# (bias, logit scales, hidden spread, options): plain; temperatures, biases, scales and one
# block per row; the teacher's temperature, a chunk mask and sharp heads whose continuation
# probabilities fall below the 1e-8 floor; blocks of 2.
SETTINGS = [
    (False, (1.0, 1.0), 1.0, dict(block_rows=64)),
    (True, (0.7, 1.3), 1.0, dict(temperature=2.0, teacher_temperature=0.5, block_rows=1)),
    (
        True,
        (6.0, 5.0),
        3.0,
        dict(
            teacher_temperature=0.7,
            block_rows=2,
            chunk_mask=torch.tensor(
                [[True, False, True, True], [False, True, True, True], [True] * 4]
            ),
        ),
    ),
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)), ids=["plain", "tempered", "sharp"])
@pytest.mark.parametrize("hybrid,beta", KINDS, ids=["uld", "jsd0", "jsd.5", "jsd1"])
@pytest.mark.parametrize("merge", [True, False], ids=["merge", "first"])
def test_against_gold_loss_on_logits_float64(merge, hybrid, beta, setting):
    bias, scales, spread, options = SETTINGS[setting]
    options = dict(options, beta=beta, vocab_map=VMAP if hybrid else None)
    inputs = _inputs(setting, torch.float64, bias=bias, spread=spread)
    for reduction in ("mean", "none"):
        leaves, ref_leaves = _leaves(inputs), _leaves(inputs)
        loss = _fused(inputs, leaves, merge, scales, reduction=reduction, **options)
        ref = _explicit(inputs, ref_leaves, merge, scales, reduction=reduction, **options)
        weights = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).view(loss.shape)
        grads = torch.autograd.grad((loss * weights).sum(), list(leaves.values()))
        ref_grads = torch.autograd.grad((ref * weights).sum(), list(ref_leaves.values()))
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-13)
        for name, g, r in zip(leaves, grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)
    if setting == 2 and merge:  # the sharp heads reach the floor on both sides
        for side in ("student", "teacher"):
            z = _logits(
                inputs[f"{side}_hidden"],
                inputs[f"{side}_weight"],
                inputs[f"{side}_bias"],
                scales[side == "teacher"],
            )
            ids, tg = inputs[f"{side}_chunk_id"], inputs[f"{side}_targets"]
            logp = z.log_softmax(-1).gather(-1, tg.clamp(min=0)[..., None])[..., 0]
            later = (ids >= 0) & (_first_tokens_only(ids) < 0)
            assert bool((logp[later] < math.log(1e-8)).any()), side


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "first"])
@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
def test_against_the_plain_per_chunk_reference(merge, hybrid):
    """The plain per-sequence, per-chunk formulation on full logits (its default mask: chunks
    present on both sides)."""
    inputs = _inputs(7, torch.float64, bias=True)
    leaves, ref_leaves = _leaves(inputs), _leaves(inputs)
    loss = _fused(inputs, leaves, merge, (1.0, 1.0), vocab_map=VMAP if hybrid else None)
    s_logits = _logits(*ref_leaves.values(), 1.0)
    t_logits = _logits(
        inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 1.0
    )
    s_ids, t_ids = inputs["student_chunk_id"], inputs["teacher_chunk_id"]
    if not merge:
        s_ids, t_ids = _first_tokens_only(s_ids), _first_tokens_only(t_ids)
    ref = gold_reference(
        s_logits,
        t_logits,
        inputs["student_targets"],
        inputs["teacher_targets"],
        s_ids,
        t_ids,
        matched=(VMAP.student_ids, VMAP.teacher_ids) if hybrid else None,
        weights=(5 / V_T, 1 - 5 / V_T),
    )
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-13)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize("merge,hybrid", [(True, False), (True, True), (False, True)])
def test_float32_backends_against_float64(device, backend, merge, hybrid):
    inputs = _inputs(3, torch.float32, bias=True)
    options = dict(temperature=1.5, vocab_map=VMAP if hybrid else None, block_rows=3)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    leaves = _leaves(on_device)
    loss = _fused(on_device, leaves, merge, (0.8, 1.2), backend=backend, **options)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_leaves = _leaves(inputs, torch.float64)
    ref = _explicit(inputs, ref_leaves, merge, (0.8, 1.2), **options)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(leaves, grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-5, msg=name)


def test_bfloat16_heads():
    """bf16 hidden states and heads: float32 logits rows, gradients in bf16, close to float64
    on the same (rounded) values."""
    inputs = _inputs(4, torch.bfloat16, bias=False)
    leaves = _leaves(inputs)
    loss = _fused(inputs, leaves, True, (1.0, 1.0), backend="cpu", vocab_map=VMAP)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    ref_leaves = _leaves(inputs, torch.float64)
    ref = _explicit(inputs, ref_leaves, True, (1.0, 1.0), vocab_map=VMAP)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2)


def test_reductions_and_no_counted_chunk():
    inputs = _inputs(5, torch.float64, bias=False)
    leaves = _leaves(inputs)
    per_chunk = _fused(inputs, leaves, True, (1.0, 1.0), reduction="none")
    counted = torch.tensor(
        [[True, True, True, True, False], [True, True, True, True, True], [False] * 5]
    )
    assert per_chunk.shape == (3, 5) and bool((per_chunk[~counted] == 0).all())
    total = _fused(inputs, leaves, True, (1.0, 1.0), reduction="sum")
    mean = _fused(inputs, leaves, True, (1.0, 1.0))
    torch.testing.assert_close(total, per_chunk.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, per_chunk.sum() / counted.sum(), rtol=1e-12, atol=0)
    # No chunk counted: 0, and a backward that reaches the leaves with zeros.
    none = torch.zeros(3, 5, dtype=torch.bool)
    for merge in (True, False):
        loss = _fused(inputs, leaves, merge, (1.0, 1.0), chunk_mask=none)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        assert loss.item() == 0.0
        assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_ignore_index_drops_its_chunk_and_num_items_divides(side, fused):
    """A target equal to ignore_index inside a chunk leaves that chunk out (as a chunk_mask
    would), on either side; num_items_in_batch replaces the mean's count."""
    inputs = _inputs(9, torch.float64, bias=False)
    ids = inputs[f"{side}_chunk_id"]
    position = int((ids[1] == 2).nonzero()[-1])  # the last token of chunk 2 of sequence 1
    masked = {**inputs, f"{side}_targets": inputs[f"{side}_targets"].clone()}
    masked[f"{side}_targets"][1, position] = -100
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = False

    def loss(data, **options):
        if fused:
            return _fused(data, _leaves(data), True, (1.0, 1.0), **options)
        return _explicit(data, _leaves(data), True, (1.0, 1.0), **options)

    torch.testing.assert_close(loss(masked), loss(inputs, chunk_mask=keep), rtol=1e-12, atol=0)
    total = loss(masked, reduction="sum")
    torch.testing.assert_close(loss(masked, num_items_in_batch=7), total / 7, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        loss(masked, num_items_in_batch=torch.tensor(2.5)), total / 2.5, rtol=1e-12, atol=0
    )


def test_same_model_on_both_sides_is_zero():
    inputs = _inputs(6, torch.float64, bias=True)
    for side in ("hidden", "weight", "bias"):
        inputs[f"teacher_{side}"] = inputs[f"student_{side}"]
    for name in ("targets", "chunk_id"):
        inputs[f"teacher_{name}"] = inputs[f"student_{name}"]
    leaves = _leaves(inputs)
    loss = _fused(inputs, leaves, True, (1.0, 1.0))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert loss.item() == 0.0 and all(g.abs().max().item() == 0.0 for g in grads)


class _LargeStorages(TorchDispatchMode):
    """Records the distinct storages of at least ``nbytes`` that any op's output lives in."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes, self.seen = nbytes, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                self.seen.add(t.untyped_storage().data_ptr())
        return out


def _long_inputs(hybrid: bool):
    """Two sequences of 24 (student) and 20 (teacher) tokens, V = 40 on both sides, chunks of 1
    to 9 tokens."""
    gen = torch.Generator().manual_seed(11)
    s_ids = torch.tensor(
        [[i // 2 for i in range(24)], [i // 3 if i < 21 else -1 for i in range(24)]]
    )
    t_ids = torch.tensor(
        [[min(i, 11) for i in range(20)], [i // 2 if i < 14 else -1 for i in range(20)]]
    )
    vmap = VocabMap(torch.arange(0, 39, 3), torch.arange(1, 40, 3), 40, 40) if hybrid else None
    return dict(
        student_hidden=torch.randn(2, 24, 6, generator=gen).requires_grad_(),
        student_weight=torch.randn(40, 6, generator=gen).requires_grad_(),
        teacher_hidden=torch.randn(2, 20, 4, generator=gen),
        teacher_weight=torch.randn(40, 4, generator=gen),
        student_targets=torch.randint(0, 40, (2, 24), generator=gen),
        teacher_targets=torch.randint(0, 40, (2, 20), generator=gen),
        student_chunk_id=s_ids,
        teacher_chunk_id=t_ids,
    ), vmap


@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
def test_no_tokens_by_vocab_tensor(hybrid):
    """fused_linear_gold_loss forms no tensor of either model's tokens x V float32 (blocks of 4
    rows); gold_loss forms one of the student's, the gradient of its logits, in its forward and
    backward together."""
    inputs, vmap = _long_inputs(hybrid)
    s_tokens = inputs["student_hidden"].shape[:2].numel()
    t_tokens = inputs["teacher_hidden"].shape[:2].numel()
    with _LargeStorages(min(s_tokens, t_tokens) * 40 * 4) as probe:
        loss = _fused(inputs, {}, True, (1.0, 1.0), backend="cpu", vocab_map=vmap, block_rows=4)
        loss.backward()
    assert not probe.seen
    s_logits = inputs["student_hidden"].detach() @ inputs["student_weight"].detach().T
    s_logits.requires_grad_()
    t_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    ids = [
        inputs[n]
        for n in ("student_targets", "teacher_targets", "student_chunk_id", "teacher_chunk_id")
    ]
    with _LargeStorages(s_tokens * 40 * 4) as probe:
        gold_loss(s_logits, t_logits, *ids, vocab_map=vmap, block_rows=4).backward()
    assert probe.seen == {s_logits.grad.untyped_storage().data_ptr()}


def _bad(**override):
    inputs = _inputs(0, torch.float32, bias=True)
    inputs.update(override)
    return inputs


BAD_INPUTS = [
    (
        dict(student_hidden=torch.zeros(27, H_S)),
        ValueError,
        r"student_hidden must have shape \[B, T, H\]",
    ),
    (
        dict(student_weight=torch.zeros(V_S, H_S + 1)),
        ValueError,
        r"student_hidden \[..., H\] and student_weight",
    ),
    (dict(teacher_bias=torch.zeros(V_T + 1)), ValueError, r"teacher_bias must have shape \[V\]"),
    (
        dict(student_weight=torch.zeros(V_S, H_S, dtype=torch.float64)),
        TypeError,
        "student_weight and student_hidden must have one dtype",
    ),
    (dict(teacher_hidden=torch.zeros(2, 7, H_T)), ValueError, "must have the same batch size"),
    (
        dict(student_targets=torch.zeros(3, 9)),
        TypeError,
        "student_targets must be an integer tensor",
    ),
    (
        dict(teacher_chunk_id=torch.zeros(3, 6, dtype=torch.int64)),
        ValueError,
        r"teacher_chunk_id must have shape \(3, 7\)",
    ),
    (
        dict(student_targets=torch.full((3, 9), V_S)),
        ValueError,
        r"student_targets must hold ids in \[0, 13\) or ignore_index=-100 at positions in a "
        r"chunk; got 13",
    ),
    (
        dict(teacher_targets=torch.full((3, 7), -5)),
        ValueError,
        r"teacher_targets must hold ids in \[0, 11\) or ignore_index=-100 .* got -5",
    ),
    (
        dict(student_chunk_id=torch.full((3, 9), -2)),
        ValueError,
        "student_chunk_id must hold ids >= 0, or -1",
    ),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (
        dict(teacher_temperature=math.inf),
        ValueError,
        "teacher_temperature must be a finite number > 0",
    ),
    (dict(beta=1.5), ValueError, r"beta must be a number in \[0, 1\]"),
    (dict(block_rows=0), ValueError, "block_rows must be an int >= 1"),
    (dict(reduction="max"), ValueError, "reduction must be 'mean', 'sum' or 'none'"),
    (dict(merge=1), TypeError, "merge must be a bool"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be a nonzero number"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    (
        dict(vocab_map=VocabMap(torch.tensor([0, 20]), torch.tensor([1, 2]), 21, V_T)),
        ValueError,
        "student ids run from 0 to 20",
    ),
    (
        dict(chunk_mask=torch.ones(2, 5, dtype=torch.bool)),
        ValueError,
        r"chunk_mask must be a bool tensor \[B, C\] with B = 3",
    ),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_inputs_raise(override, error, match):
    kwargs = _bad(**override)
    positional = [
        kwargs.pop(n)
        for n in (
            "student_hidden",
            "student_weight",
            "teacher_hidden",
            "teacher_weight",
            "student_targets",
            "teacher_targets",
            "student_chunk_id",
            "teacher_chunk_id",
        )
    ]
    with pytest.raises(error, match=match):
        fused_linear_gold_loss(*positional, **kwargs)
