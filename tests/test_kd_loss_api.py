"""kd_loss: the public contract around the kernels — input errors, properties, custom-op
registration, torch.compile, and the reference checked against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.reference import kd_loss_reference

from helpers import make_logits

DIVERGENCES = list(fastkd.DIVERGENCES)


# ---- bad input ------------------------------------------------------------------------------

BAD_INPUTS = [
    (
        dict(student=make_logits(4, 10), teacher=make_logits(5, 10)),
        ValueError,
        r"same leading shape.*\(4, 10\).*\(5, 10\)",
    ),
    (
        dict(student=torch.zeros(4, 10, dtype=torch.long), teacher=make_logits(4, 10)),
        TypeError,
        "floating point",
    ),
    (dict(student=torch.zeros(4, 0), teacher=torch.zeros(4, 0)), ValueError, r"V >= 1.*\(4, 0\)"),
    (dict(divergence="kl"), ValueError, "unknown divergence 'kl'"),
    (dict(temperature=0.0), ValueError, "temperature.*0.0"),
    (dict(temperature=-1.0), ValueError, "temperature.*-1.0"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(beta=1.5), ValueError, r"beta.*\[0, 1\].*1.5"),
    (dict(alpha=-0.1), ValueError, r"alpha.*\[0, 1\].*-0.1"),
    (dict(hard_weight=2.0), ValueError, "hard_weight"),
    (dict(hard_weight=0.5), ValueError, "needs labels"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(reduction="avg"), ValueError, "reduction.*'avg'"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"leading shape \(4,\).*\(3,\)"),
    (dict(labels=torch.zeros(4)), TypeError, "integer"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"\[0, 10\).*\[10\]"),
    (dict(labels=torch.tensor([0, -5, 1, 2])), ValueError, r"found \[-5\]"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor(-4.0)), ValueError, r"num_items_in_batch.*-4"),
    (dict(num_items_in_batch=torch.tensor(0)), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=math.inf), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor([2, 3])), ValueError, r"scalar.*\(2,\)"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError, "num_items_in_batch"),
    (dict(softcap=1e-50), ValueError, r"softcap.*2\*\*-126.*1e-50"),
    (dict(temperature=1e-50), ValueError, r"temperature.*1e-50"),
    (dict(temperature=1e50), ValueError, r"temperature.*1e\+50"),
    (dict(ignore_index=2**63), ValueError, r"ignore_index.*9223372036854775808"),
    (dict(ignore_index=1.5), ValueError, "ignore_index"),
    (
        dict(labels=torch.tensor([0, 1, 2, 3], dtype=torch.uint8)),
        ValueError,
        r"torch.uint8 hold \[0, 255\].*ignore_index=-100",
    ),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (
        dict(vocab_mismatch="truncate"),
        ValueError,
        r"vocab_mismatch must be one of \('cut', 'pad'\); got 'truncate'",
    ),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUTS)
def test_bad_input_raises_before_any_kernel(kwargs, exc, match):
    kwargs = dict(kwargs)
    s = kwargs.pop("student", make_logits(4, 10))
    t = kwargs.pop("teacher", make_logits(4, 10, seed=1))
    with pytest.raises(exc, match=match):
        fastkd.kd_loss(s, t, **kwargs)


def test_unavailable_backend_says_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        fastkd.kd_loss(make_logits(2, 5), make_logits(2, 5), backend="cuda")


def test_build_info_and_available_backends():
    info = fastkd.build_info()
    assert info["cpu_kernels"] is True and info["extension_error"] is None
    assert info["cpu_isa"] in info["cpu_isa_builds"]
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cuda_compiler"]
    backends = fastkd.available_backends("kd_loss", "cpu")
    assert backends[0] == "cpu" and "torch" in backends
    with pytest.raises(ValueError, match="unknown op"):
        fastkd.available_backends("nope", "cpu")


# ---- properties (hypothesis) ----------------------------------------------------------------


def _row_pairs():
    return st.tuples(
        st.integers(1, 4),
        st.integers(1, 67),
        st.integers(0, 2**31 - 1),
        st.floats(0.25, 4.0),
        st.sampled_from(DIVERGENCES),
        st.floats(0.0, 1.0),
    )


@settings(max_examples=60, deadline=None)
@given(_row_pairs())
def test_nonnegative_and_zero_at_equal_distributions(case):
    rows, vocab, seed, temperature, divergence, w = case
    s = make_logits(rows, vocab, seed=seed, scale=4.0)
    t = make_logits(rows, vocab, seed=seed + 1, scale=4.0)
    kw = dict(
        divergence=divergence,
        temperature=temperature,
        beta=w,
        alpha=w,
        reduction="none",
        backend="cpu",
    )
    loss = fastkd.kd_loss(s, t, **kw)
    assert torch.all(loss >= -1e-5), loss.min()
    same = fastkd.kd_loss(s, s.clone(), **kw)
    assert torch.all(same.abs() <= 1e-5), same.abs().max()


@settings(max_examples=60, deadline=None)
@given(_row_pairs(), st.floats(-50.0, 50.0), st.floats(-50.0, 50.0))
def test_invariant_to_a_constant_added_to_a_row(case, shift_s, shift_t):
    rows, vocab, seed, temperature, divergence, w = case
    s, t = make_logits(rows, vocab, seed=seed), make_logits(rows, vocab, seed=seed + 1)
    kw = dict(
        divergence=divergence,
        temperature=temperature,
        beta=w,
        alpha=w,
        reduction="none",
        backend="cpu",
    )
    base = fastkd.kd_loss(s, t, **kw)
    shifted = fastkd.kd_loss(s + shift_s, t + shift_t, **kw)
    # Shifts of up to 50 cost the logits up to 50 * eps32 of their precision.
    torch.testing.assert_close(
        shifted, base, atol=2e-5 * (1 + abs(shift_s) + abs(shift_t)), rtol=1e-4
    )


# ---- gradcheck of the reference, opcheck and torch.compile of the fused op ---------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.slow  # 6 cases, 9 s of the full run's 1,025 s
def test_reference_gradcheck_float64(divergence):
    s = make_logits(3, 7, seed=0, dtype=torch.float64).requires_grad_()
    t = make_logits(3, 7, seed=1, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([1, -100, 4])

    def f(s, t):
        return kd_loss_reference(
            s,
            t,
            divergence=divergence,
            temperature=1.3,
            softcap=5.0,
            labels=labels,
            hard_weight=0.2,
            reduction="sum",
        )

    assert torch.autograd.gradcheck(f, (s, t))


def _op_args(labels=True, dtype=torch.float32):
    # grad_scale = 1: the op's second output is the gradient buffer that its backward rescales in
    # place (by incoming / grad_scale), which opcheck would see as an output changing after the
    # fact; with unit upstream gradients and grad_scale = 1 that rescaling is the identity.
    s = make_logits(6, 33, seed=0, dtype=dtype).requires_grad_()
    t = make_logits(6, 33, seed=1, dtype=dtype)
    lab = torch.tensor([1, 2, -100, 4, 5, 6]) if labels else None
    return (
        s,
        t,
        lab,
        2,
        1.5,
        0.0,
        0.5,
        0.5,
        -100,
        math.log(0.5),
        math.log(0.5),
        0.5,
        1.0,
        "cpu",
        True,
    )


@pytest.mark.parametrize("labels", [True, False])
def test_opcheck(labels):
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fused.default, _op_args(labels))


def test_no_gradient_buffer_when_no_gradient_is_wanted():
    s, t = make_logits(5, 40, seed=0), make_logits(5, 40, seed=1)
    args = list(_op_args())
    args[0], args[1], args[-1] = s, t, False
    loss, grad = torch.ops.fastkd.kd_loss_fused.default(*args)
    assert grad.numel() == 0
    with_grad = fastkd.kd_loss(s.clone().requires_grad_(), t, divergence="jsd", reduction="none")
    with torch.no_grad():
        without = fastkd.kd_loss(s.clone().requires_grad_(), t, divergence="jsd", reduction="none")
    torch.testing.assert_close(without, with_grad.detach())


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
@pytest.mark.slow  # 2 cases, 4 s of the full run's 1,025 s
def test_torch_compile_of_a_model_calling_the_loss(divergence):
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 50)
    x = torch.randn(2, 5, 16)
    teacher_logits = torch.randn(2, 5, 50)
    labels = torch.randint(0, 50, (2, 5))
    labels[0, 0] = -100

    def step(model, x):
        return fastkd.kd_loss(
            model(x),
            teacher_logits,
            divergence=divergence,
            labels=labels,
            hard_weight=0.1,
            temperature=2.0,
            backend="cpu",
        )

    eager_loss = step(student, x)
    eager_loss.backward()
    eager_grad = student.weight.grad.clone()
    student.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(student, x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(student.weight.grad, eager_grad)


# ---- the reference against independent formulas and known values ------------------------------


def test_reference_fkl_equals_torch_kl_div():
    s = make_logits(5, 40, seed=0, dtype=torch.float64)
    t = make_logits(5, 40, seed=1, dtype=torch.float64)
    T = 2.0
    expected = (
        F.kl_div(
            F.log_softmax(s / T, -1),
            F.log_softmax(t / T, -1),
            log_target=True,
            reduction="batchmean",
        )
        * T
        * T
    )
    got = kd_loss_reference(s, t, temperature=T, t2_scale=True)
    torch.testing.assert_close(got, expected)


def test_reference_jsd_matches_trl_generalized_jsd_form():
    """TRL's generalized_jsd_loss: beta * KL(p || m) + (1 - beta) * KL(q || m) with the mixture
    built by logsumexp of the log-probs plus log weights, summed over the vocab."""
    s = make_logits(4, 30, seed=2, dtype=torch.float64)
    t = make_logits(4, 30, seed=3, dtype=torch.float64)
    beta = 0.3
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
    kl_t = F.kl_div(lm, lp, reduction="none", log_target=True)
    kl_s = F.kl_div(lm, lq, reduction="none", log_target=True)
    expected = (beta * kl_t + (1 - beta) * kl_s).sum() / 4
    torch.testing.assert_close(kd_loss_reference(s, t, divergence="jsd", beta=beta), expected)


def test_reference_known_values():
    # Disjoint supports: JSD(beta=1/2) = log 2, TVD = 1.
    s = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    t = torch.tensor([[-math.inf, 0.0]], dtype=torch.float64)
    assert kd_loss_reference(s, t, divergence="jsd").item() == pytest.approx(math.log(2))
    assert kd_loss_reference(s, t, divergence="tvd").item() == pytest.approx(1.0)
    assert kd_loss_reference(s, t, divergence="fkl").item() == math.inf
    # Bernoulli(0.5) vs Bernoulli(0.25): KL = 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75).
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    got = kd_loss_reference(q.log().double(), p.log().double(), divergence="fkl")
    assert got.item() == pytest.approx(kl)
    # skl(alpha) = KL(p || alpha p + (1 - alpha) q), srkl(alpha) = KL(q || (1 - alpha) p + alpha q)
    a = 0.1
    m = a * p + (1 - a) * q
    skl = (p * (p / m).log()).sum().item()
    assert kd_loss_reference(q.log(), p.log(), divergence="skl", alpha=a).item() == pytest.approx(
        skl, rel=1e-6
    )
    m2 = (1 - a) * p + a * q
    srkl = (q * (q / m2).log()).sum().item()
    assert kd_loss_reference(q.log(), p.log(), divergence="srkl", alpha=a).item() == pytest.approx(
        srkl, rel=1e-6
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_jsd_edge_betas_are_exactly_fkl_and_rkl(backend):
    s, t = make_logits(6, 50, seed=4), make_logits(6, 50, seed=5)
    fkl = fastkd.kd_loss(s, t, divergence="fkl", backend=backend, reduction="none")
    rkl = fastkd.kd_loss(s, t, divergence="rkl", backend=backend, reduction="none")
    assert torch.equal(
        fastkd.kd_loss(s, t, divergence="jsd", beta=0.0, backend=backend, reduction="none"), fkl
    )
    assert torch.equal(
        fastkd.kd_loss(s, t, divergence="jsd", beta=1.0, backend=backend, reduction="none"), rkl
    )


# ---- the divergence registry ----------------------------------------------------------------


def test_divergence_codes_match_the_extension():
    native = pytest.importorskip("fastkd._C")
    assert native.divergence_codes() == {d.name: d.code for d in fastkd.DIVERGENCES.values()}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_edge_cases_equal_their_target(divergence):
    """Where a divergence's parameter hits an edge case, the reference (which evaluates the
    divergence itself, not its target) gives the target's loss."""
    s = make_logits(3, 20, seed=6, dtype=torch.float64)
    t = make_logits(3, 20, seed=7, dtype=torch.float64)
    for edge in fastkd.DIVERGENCES[divergence].edge_cases:
        got = kd_loss_reference(s, t, divergence=divergence, **{edge.parameter: edge.value})
        torch.testing.assert_close(got, kd_loss_reference(s, t, divergence=edge.same_as))


@pytest.mark.parametrize("codes", [{"fkl": 0, "rkl": 1}, None])
def test_a_stale_extension_is_refused_not_used(monkeypatch, codes):
    """An extension built with other divergence codes (or before they were exported) would
    compute another divergence: its backends are refused with the reason, and import goes on."""
    from fastkd import divergences
    from fastkd.ops import _native

    class StaleBuild:
        kd_loss_forward_cpu = None

    if codes is not None:
        StaleBuild.divergence_codes = staticmethod(lambda: codes)
    monkeypatch.setattr(_native, "_refused", None)
    monkeypatch.setattr(divergences, "native", lambda: StaleBuild)
    with pytest.warns(RuntimeWarning, match="rebuild the extension"):
        divergences._check_against_extension()
    assert _native.native() is None and "rebuild the extension" in _native.native_error()
    assert "cpu" not in fastkd.available_backends("kd_loss", "cpu")
    with pytest.raises((ValueError, RuntimeError), match="rebuild the extension"):
        fastkd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), backend="cpu")


# ---- the modules check their options when built ---------------------------------------------

_MODULE_BAD_OPTIONS = [
    (fastkd.KDLoss, {"divergence": "kl"}, "divergence"),
    (fastkd.KDLoss, {"temperature": 0.0}, "temperature"),
    (fastkd.KDLoss, {"temperature": 2.0**127}, "temperature"),
    (fastkd.KDLoss, {"beta": 1.5}, "beta"),
    (fastkd.KDLoss, {"alpha": -0.1}, "alpha"),
    (fastkd.KDLoss, {"hard_weight": 2.0}, "hard_weight"),
    (fastkd.KDLoss, {"softcap": 1e-50}, "softcap"),
    (fastkd.KDLoss, {"reduction": "avg"}, "reduction"),
    (fastkd.KDLoss, {"ignore_index": 2**63}, "ignore_index"),
    (fastkd.KDLoss, {"backend": "gpu"}, "backend"),
    (fastkd.KDLoss, {"vocab_mismatch": "truncate"}, "vocab_mismatch"),
    (fastkd.KDLoss, {"vocab_mismatch": None}, "vocab_mismatch"),
    (fastkd.FusedLinearKDLoss, {"temperature": 0}, "temperature"),
    (fastkd.FusedLinearKDLoss, {"chunk_size": 0}, "chunk_size"),
    (fastkd.FusedLinearKDLoss, {"memory_budget": -1}, "memory_budget"),
    (fastkd.FusedLinearKDLoss, {"accum_dtype": torch.float16}, "accum_dtype"),
    (fastkd.FusedLinearKDLoss, {"logit_scale": 0.0}, "logit_scale"),
    (fastkd.FusedLinearKDLoss, {"teacher_logit_scale": float("nan")}, "teacher_logit_scale"),
    (fastkd.FusedLinearKDLoss, {"backend": "gpu"}, "backend"),
    (fastkd.FusedLinearKDLoss, {"vocab_mismatch": "zero"}, "vocab_mismatch"),
    (fastkd.ULDLoss, {"temperature": -1.0}, "temperature"),
    (fastkd.ULDLoss, {"teacher_temperature": 0.0}, "teacher_temperature"),
    (fastkd.ULDLoss, {"reduction": "avg"}, "reduction"),
    (fastkd.ULDLoss, {"backend": "gpu"}, "backend"),
]


@pytest.mark.parametrize(
    "module,options,name",
    _MODULE_BAD_OPTIONS,
    ids=[f"{m.__name__}-{n}" for m, _, n in _MODULE_BAD_OPTIONS],
)
def test_modules_refuse_bad_options_when_built(module, options, name):
    """A module refuses a bad option at construction, with the message its functional op gives
    for it at the first call."""
    with pytest.raises(ValueError, match=name) as built:
        module(**options)
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError) as called:
        if module is fastkd.KDLoss:
            fastkd.kd_loss(s, t, **options)
        elif module is fastkd.ULDLoss:
            fastkd.uld_loss(s, t, **options)
        else:
            fastkd.fused_linear_kd_loss(s, torch.randn(8, 8), s, torch.randn(8, 8), **options)
    assert str(built.value) == str(called.value)


def test_modules_build_with_valid_options_at_the_edges():
    fastkd.KDLoss(
        divergence="jsd",
        beta=0.0,
        alpha=1.0,
        hard_weight=1.0,
        softcap=2.0**-126,
        temperature=2.0**126,
        ignore_index=-(2**63),
        backend="torch",
    )
    fastkd.FusedLinearKDLoss(
        chunk_size=1,
        memory_budget=1,
        accum_dtype=torch.float32,
        logit_scale=-(2.0**-126),
        teacher_logit_scale=2.0**126,
    )
    fastkd.ULDLoss(temperature=2.0**-126, teacher_temperature=2.0**126, reduction="none")
