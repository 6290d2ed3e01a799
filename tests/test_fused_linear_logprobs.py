"""fastkd.fused_linear_logprobs against the whole-logits float64 reference, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.ops._registry import interpreted
from fastkd.reference.fused_linear_logprobs import fused_linear_logprobs_reference

from helpers import assert_within_torch_error, op_backend_params

OP = "fused_linear_logprobs"
N, H, V = 29, 16, 53
HEAD = ("hidden", "weight", "bias")
OUTPUTS = ("logprob", "lse", "entropy")


def make_problem(lead=(N,), *, vocab=V, seed=0, neg_inf=False, device="cpu", backend=None):
    """Head, targets (every 7th ignored) and incoming gradients of the three outputs; an
    interpreted backend (Triton on CPU) gets the first 9 tokens only."""
    if backend is not None and interpreted(OP, backend, device) and lead == (N,):
        lead = (9,)
    g = torch.Generator().manual_seed(seed)
    head = {
        "hidden": torch.randn(*lead, H, generator=g),
        "weight": torch.randn(vocab, H, generator=g) * (4 / math.sqrt(H)),
        "bias": torch.randn(vocab, generator=g) * 0.5,
    }
    targets = torch.randint(0, vocab, lead, generator=g)
    targets.view(-1)[::7] = -100
    if neg_inf:
        head["bias"][::5] = -math.inf  # columns no token can take
        targets.view(-1)[1::6] = 0  # log-prob -inf there
    grads = torch.randn(3, *lead, generator=g)
    return ({k: v.to(device) for k, v in head.items()}, targets.to(device), grads.to(device))


def run(fn, head, targets, grads, *, dtype=None, with_entropy=True, **kw):
    """Outputs (None for an entropy not asked for) and the head's gradients of
    sum(g_lp logprob + g_lse lse + g_H H)."""
    args = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in head.items()}
    if fn is fused_linear_logprobs_reference:
        outs = fn(
            args["hidden"], args["weight"], targets, args["bias"], with_entropy=with_entropy, **kw
        )
    else:
        outs = fn(
            args["hidden"],
            args["weight"],
            targets,
            bias=args["bias"],
            with_entropy=with_entropy,
            **kw,
        )
    total = sum((g.to(o) * o).sum() for g, o in zip(grads, outs) if o is not None)
    total.backward()
    return [None if o is None else o.detach() for o in outs], [args[k].grad for k in HEAD]


def assert_matches(head, targets, grads, backend, *, dtype=torch.float32, **kw):
    outs, g = run(
        fastkd.fused_linear_logprobs, head, targets, grads, dtype=dtype, backend=backend, **kw
    )
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "memory_budget")}
    exact, exact_g = run(
        fused_linear_logprobs_reference,
        {k: v.to(dtype) for k, v in head.items()},
        targets,
        grads,
        dtype=torch.float64,
        **ref_kw,
    )
    plain, plain_g = run(
        fused_linear_logprobs_reference, head, targets, grads, dtype=dtype, **ref_kw
    )
    for name, o, e, p in zip(OUTPUTS, outs, exact, plain):
        if e is None:
            assert o is None
            continue
        assert o.dtype == torch.float32 and o.shape == targets.shape
        assert_within_torch_error(name, o, e, p)
    for name, a, e, p in zip(HEAD, g, exact_g, plain_g):
        assert a.dtype == dtype and a.shape == head[name].shape
        assert_within_torch_error(f"grad {name}", a, e, p)


OPTIONS = [
    {},
    {"with_entropy": False},
    {"temperature": 0.5},
    {"temperature": 3.0, "logit_scale": 0.7},
    {"temperature": 1e-3},
    {"temperature": 100.0, "chunk_size": 1},
]


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "plain"
)
def test_matches_reference(device, backend, options):
    head, targets, grads = make_problem(device=device, backend=backend)
    assert_matches(head, targets, grads, backend, **{"chunk_size": 8, **options})


@pytest.mark.parametrize("device,backend", op_backend_params(OP, small_ok=False))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_error(device, backend, dtype):
    head, targets, grads = make_problem(device=device, seed=1)
    assert_matches(head, targets, grads, backend, dtype=dtype, chunk_size=8)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
def test_neg_inf_logits(device, backend):
    head, targets, grads = make_problem(device=device, neg_inf=True, seed=2, backend=backend)
    outs, _ = run(fastkd.fused_linear_logprobs, head, targets, grads, backend=backend, chunk_size=8)
    hit = ((targets >= 0) & (targets % 5 == 0)).cpu()
    assert torch.isneginf(outs[0].cpu()[hit]).all()
    assert torch.isfinite(outs[0].cpu()[~hit]).all()
    assert_matches(head, targets, grads, backend, chunk_size=8)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
def test_ignored_rows_give_zero_and_no_gradient(device, backend):
    head, targets, grads = make_problem(device=device, seed=3, backend=backend)
    ignored = torch.full_like(targets, -100)
    outs, g = run(fastkd.fused_linear_logprobs, head, ignored, grads, backend=backend)
    for o in outs:
        assert torch.equal(o, torch.zeros_like(o))
    for a in g:
        assert torch.equal(a, torch.zeros_like(a))
    # A custom ignore_index, and an id in range used as one.
    assert_matches(head, targets.where(targets != -100, 5), grads, backend, ignore_index=5)


# The row kernels read the chunk logits the engine's GEMM wrote, whatever the hidden states'
# layout: the interpreted Triton kernel is left out of this table.
@pytest.mark.parametrize("device,backend", op_backend_params(OP, small_ok=False))
@pytest.mark.parametrize("layout", ["transposed", "stride0", "sliced", "lead3d"])
def test_layouts_and_leading_shapes(device, backend, layout):
    head, targets, grads = make_problem(device=device, seed=4)
    hidden = head["hidden"]
    if layout == "transposed":
        hidden = hidden.t().contiguous().t()
        head["weight"] = head["weight"].t().contiguous().t()
    elif layout == "stride0":
        hidden = hidden[:1].expand(N, H)
    elif layout == "sliced":
        hidden = torch.cat([hidden, hidden], 1)[:, ::2]
    else:
        hidden, targets = hidden[:27].reshape(3, 9, H), targets[:27].reshape(3, 9)
        grads = grads[:, :27].reshape(3, 3, 9)
    head["hidden"] = hidden
    assert_matches(head, targets, grads, backend, chunk_size=5)


@pytest.mark.parametrize("device,backend", op_backend_params(OP, small_ok=False))
@pytest.mark.parametrize("vocab", [1, 2, 17, pytest.param(2053, marks=pytest.mark.slow)])
def test_odd_vocabularies_and_budget(device, backend, vocab):
    head, targets, grads = make_problem(device=device, vocab=vocab, seed=5)
    assert_matches(head, targets, grads, backend, memory_budget=4 * vocab * 3)


def test_float64_on_torch_backend():
    head, targets, grads = make_problem(seed=6)
    outs, g = run(
        fastkd.fused_linear_logprobs, head, targets, grads, dtype=torch.float64, backend="torch"
    )
    exact, exact_g = run(fused_linear_logprobs_reference, head, targets, grads, dtype=torch.float64)
    for a, b in zip(outs + g, exact + exact_g):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", op_backend_params(OP, small_ok=False, reference=False))
def test_matches_torch_backend_without_bias(device, backend):
    head, targets, _ = make_problem(device=device, seed=7)
    a = fastkd.fused_linear_logprobs(
        head["hidden"], head["weight"], targets, backend=backend, with_entropy=True
    )
    b = fastkd.fused_linear_logprobs(
        head["hidden"], head["weight"], targets, backend="torch", with_entropy=True
    )
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # 7 s: the compile
def test_compiles_with_backward():
    head, targets, grads = make_problem(seed=8)

    def step(hidden, weight):
        out = fastkd.fused_linear_logprobs(hidden, weight, targets, with_entropy=True)
        return (out.logprob * grads[0] + out.entropy * grads[2]).sum()

    eager_args = [head[k].clone().requires_grad_() for k in ("hidden", "weight")]
    compiled_args = [head[k].clone().requires_grad_() for k in ("hidden", "weight")]
    eager = step(*eager_args)
    eager.backward()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_args)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


BAD_INPUTS = [
    ({"targets": torch.full((N,), V)}, ValueError, r"targets must lie in \[0, 53\)"),
    ({"targets": torch.zeros(N)}, TypeError, "targets must be an integer tensor"),
    ({"targets": torch.zeros(N + 1, dtype=torch.long)}, ValueError, "leading shape"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": math.nan}, ValueError, "temperature"),
    ({"with_entropy": 1}, TypeError, "with_entropy must be a bool"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"logit_scale": 0.0}, ValueError, "logit_scale"),
    ({"backend": "nope"}, ValueError, "unknown backend"),
    ({"weight": torch.zeros(V, H + 1)}, ValueError, "must agree on H"),
    ({"bias": torch.zeros(V + 1)}, ValueError, "bias must have shape"),
    (
        {
            "hidden": torch.zeros(N, H, dtype=torch.float64),
            "backend": "cpu",
            "weight": torch.zeros(V, H, dtype=torch.float64),
        },
        ValueError,
        "use backend='torch'",
    ),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_raise(override, error, match):
    head, targets, _ = make_problem()
    kw = {"hidden": head["hidden"], "weight": head["weight"], "targets": targets, **override}
    if kw.get("backend") == "cpu" and "cpu" not in fastkd.available_backends(OP, "cpu"):
        pytest.skip("no CPU kernel in this build")
    with pytest.raises(error, match=match):
        fastkd.fused_linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_vocab(dtype):
    head, targets, grads = make_problem((257,), vocab=32003, seed=9, device="cuda")
    for backend in fastkd.available_backends(OP, "cuda"):
        if interpreted(OP, backend, "cuda"):
            continue
        assert_matches(head, targets, grads, backend, dtype=dtype)
