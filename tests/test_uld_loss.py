"""fastkd.uld_loss (Universal Logit Distillation's sorted-probability L1): the fused kernels (cpu;
triton in its interpreter, and on a GPU) against the float64 reference, closed forms, properties,
odd and adversarial inputs, the custom op's registration, torch.compile and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd.ops._registry import backend_spec, interpreted
from fastkd.reference import uld_loss_reference

import helpers
from helpers import backend_params


def make_logits(lead, vocab, **kw):
    """``helpers.make_logits`` drawn in float64 (then cast to ``dtype``)."""
    return helpers.make_logits(lead, vocab, draw_dtype=torch.float64, **kw)


# Backends run against the float64 reference: the fused kernels, and the reference itself in
# float32 (what backend="torch" runs). Triton runs here in its interpreter: small fp32 cases only
# (the GPU test at the end covers the rest).
_AVAILABLE = fastkd.available_backends("uld_loss", "cpu")
BACKENDS = backend_params("uld_loss")

# (dtype, atol, rtol) of the gradient as rounded to the input dtype: atol is that dtype's
# absolute floor (fp16 gradients of 1e-7 are subnormal, spaced 2^-24). On top, every dtype gets
# COMPUTE_EPS q_j (times the reduction's scale / T): in q_j (h_j - <q, h>) the fp32 errors of q_j
# and of <q, h> (a few ulps of 1) stay absolute where h_j - <q, h> cancels. The loss is held to
# 2e-6 + 1e-5 relative whatever the input dtype: it is computed in fp32 from logits converted
# exactly. Probabilities below 2^-126 flush to 0 in the kernels (as kd_math.h kLogMinProb), a
# gradient error of up to 2 * 2^-126 (times scale / T) where the reference keeps them.
DTYPES = [(torch.float32, 0.0, 1e-5), (torch.bfloat16, 0.0, 8e-3), (torch.float16, 2.0**-24, 1e-3)]
COMPUTE_EPS = 8 * 2.0**-23
FLUSHED_PROBABILITY = 2.0**-126

# (leading shape, V_s, V_t): equal, smaller and larger student vocabularies, V = 1, odd sizes.
SHAPES = [
    ((1,), 1, 1),
    ((3,), 1, 9),
    ((4,), 7, 5),
    ((2, 3), 5, 7),
    ((3, 7), 401, 1271),
    ((5,), 1271, 401),
    ((2,), 4099, 4099),
]


def run(student, teacher, backend, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fastkd.uld_loss(s, teacher, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def reference64(student, teacher, **kw):
    s = student.detach().double().requires_grad_()
    loss = uld_loss_reference(s, teacher.detach().double(), **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def tie_allowance(student, teacher, *, temperature=1.0, teacher_temperature=None, scale=1.0):
    """Per element of the gradient, the change one flipped sign can make. The gradient jumps
    where q_(i) = p_(i) (the sign h of the pair flips, changing the element by 2 q_j / T and
    <q, h> by 2 q_j); pairs within fp32 rounding of equality may be ranked either way by an fp32
    kernel, so each such pair's jump is allowed, on its own element and through <q, h>."""
    t_t = temperature if teacher_temperature is None else teacher_temperature
    q = torch.softmax(student.double().reshape(-1, student.shape[-1]) / temperature, -1)
    p = torch.softmax(teacher.double().reshape(-1, teacher.shape[-1]) / t_t, -1)
    sq, order = q.sort(dim=-1, descending=True, stable=True)
    sp = p.sort(dim=-1, descending=True, stable=True).values
    width = max(sq.shape[-1], sp.shape[-1])
    sq_pad = torch.nn.functional.pad(sq, (0, width - sq.shape[-1]))
    sp_pad = torch.nn.functional.pad(sp, (0, width - sp.shape[-1]))
    near = (sq_pad - sp_pad).abs() <= 1e-6 * torch.maximum(sq_pad, sp_pad) + 1e-30
    near_cols = torch.zeros_like(q, dtype=torch.bool).scatter(-1, order, near[:, : q.shape[-1]])
    flipped_mass = (q * near_cols).sum(-1, keepdim=True)
    allow = 2 * q * near_cols + 2 * q * flipped_mass
    return (scale * allow / temperature).reshape(student.shape)


def assert_matches_reference(student, teacher, backend, atol, rtol, **kw):
    loss, grad = run(student, teacher, backend, **kw)
    ref_loss, ref_grad = reference64(student, teacher, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-6, rtol=1e-5, equal_nan=True)
    scale = 1.0  # the reduction's weight of each row's gradient
    if kw.get("reduction", "mean") == "mean":
        labels = kw.get("labels")
        count = student[..., 0].numel() if labels is None else int((labels != -100).sum())
        scale = 1.0 / (kw.get("num_items_in_batch") or max(count, 1))
    allow = tie_allowance(
        student,
        teacher,
        temperature=kw.get("temperature", 1.0),
        teacher_temperature=kw.get("teacher_temperature"),
        scale=scale,
    )
    err = (grad.double() - ref_grad).abs()
    temperature = kw.get("temperature", 1.0)
    q_ref = torch.softmax(student.double() / temperature, dim=-1)
    # dL/dz = dL/da / T: the fp32 floor of dL/da is divided by T as well.
    bound = (
        atol
        + (COMPUTE_EPS * q_ref + 2 * FLUSHED_PROBABILITY) * scale / temperature
        + rtol * ref_grad.abs()
        + allow
    )
    worst = torch.argmax(err - bound).item()
    assert torch.all(err <= bound), (
        f"grad: error {err.flatten()[worst].item():.3g} > bound "
        f"{bound.flatten()[worst].item():.3g} at flat index {worst}"
    )


def _table_params():
    out = []
    for backend in _AVAILABLE:
        for dtype, atol, rtol in DTYPES:
            for lead, vs, vt in SHAPES:
                rows = math.prod(lead)
                if interpreted("uld_loss", backend, "cpu") and (
                    dtype != torch.float32 or rows * (vs + vt) > 20000
                ):
                    continue
                triton = backend_spec("uld_loss", backend).needs_triton
                marks = [pytest.mark.triton] if triton else []
                name = f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, lead))}-{vs}-{vt}"
                out.append(
                    pytest.param(backend, dtype, atol, rtol, lead, vs, vt, marks=marks, id=name)
                )
    return out


@pytest.mark.parametrize("backend,dtype,atol,rtol,lead,vs,vt", _table_params())
@pytest.mark.slow  # 47 cases, 4 s of the full run's 1,025 s
def test_matches_float64_reference(backend, dtype, atol, rtol, lead, vs, vt):
    s = make_logits(lead, vs, dtype=dtype, seed=1)
    t = make_logits(lead, vt, dtype=dtype, seed=2)
    assert_matches_reference(s, t, backend, atol, rtol)


# Temperatures, reductions and labels.
OPTIONS = [
    {"temperature": 2.0},
    {"temperature": 0.5, "teacher_temperature": 3.0},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"reduction": "mean", "num_items_in_batch": 7},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items())
)
@pytest.mark.slow  # 15 cases, 3 s of the full run's 1,025 s
def test_options_match_reference(backend, options):
    s = make_logits((2, 9), 300, seed=3)
    t = make_logits((2, 9), 257, seed=4)
    labels = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    labels[0, ::3] = -100
    kw = dict(options, labels=labels)
    assert_matches_reference(s, t, backend, 0.0, 1e-5, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_values(backend):
    """q = (1/3, 2/3), p = (3/5, 1/5, 1/5): sorted, |2/3 - 3/5| + |1/3 - 1/5| + |0 - 1/5| = 0.4;
    both student ranks are above the teacher's, h = (1, 1), <q, h> = 1: gradient 0. And
    q = (1/2, 1/2) against p = (0.9, 0.1): 0.8, the tie ranked by column, so that h = (-1, +1),
    <q, h> = 0, and the gradient is (-1/2, +1/2)."""
    s = torch.tensor([[0.0, math.log(2.0)]])
    t = torch.tensor([[math.log(3.0), 0.0, 0.0]])
    loss, grad = run(s, t, backend)
    assert loss.item() == pytest.approx(0.4, abs=1e-6)
    assert torch.allclose(grad, torch.zeros(1, 2), atol=1e-7)
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(9.0), 0.0]])
    loss, grad = run(s, t, backend)
    assert loss.item() == pytest.approx(0.8, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([[-0.5, 0.5]]), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vs,vt", [(7, 13), (13, 7), (1, 50), (64, 64)])
def test_uniform_distributions_closed_form(backend, vs, vt):
    """Uniform q over V_s against uniform p over V_t: 2 (1 - min(V)/max(V))."""
    loss, _ = run(torch.zeros(3, vs), torch.zeros(3, vt), backend, reduction="none")
    expected = 2.0 * (1.0 - min(vs, vt) / max(vs, vt))
    assert torch.allclose(loss, torch.full((3,), expected), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_identity_is_ignored(backend):
    """A teacher whose logits are a permutation of the student's, padded with -inf columns
    (zero probability, as the zero padding), is matched exactly; so is a teacher as peaked as
    the student on another token."""
    s = make_logits((4,), 97, seed=6)
    perm = torch.randperm(97, generator=torch.Generator().manual_seed(7))
    t = torch.cat([s[:, perm], torch.full((4, 31), -math.inf)], dim=-1)
    loss, _ = run(s, t, backend, reduction="none")
    assert torch.all(loss.abs() < 2e-6), loss
    peaked_s = torch.full((1, 50), -30.0)
    peaked_s[0, 3] = 30.0
    peaked_t = torch.full((1, 80), -30.0)
    peaked_t[0, 71] = 30.0
    loss, _ = run(peaked_s, peaked_t, backend)
    assert loss.abs().item() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    """0 <= L <= 2; invariant to a constant added to a row's logits and to permuting the
    teacher's columns; permuting the student's columns permutes its gradient."""
    s = make_logits((6,), 211, seed=8)
    t = make_logits((6,), 173, seed=9)
    loss, grad = run(s, t, backend, reduction="none")
    assert torch.all(loss >= 0) and torch.all(loss <= 2)
    shifted, shifted_grad = run(
        s + torch.linspace(-50, 50, 6)[:, None], t, backend, reduction="none"
    )
    torch.testing.assert_close(shifted, loss, atol=2e-6, rtol=0)
    torch.testing.assert_close(shifted_grad, grad, atol=1e-6, rtol=1e-4)
    perm_t = torch.randperm(173, generator=torch.Generator().manual_seed(10))
    loss_t, grad_t = run(s, t[:, perm_t], backend, reduction="none")
    torch.testing.assert_close(loss_t, loss, atol=2e-6, rtol=0)
    torch.testing.assert_close(grad_t, grad, atol=1e-6, rtol=1e-4)
    perm_s = torch.randperm(211, generator=torch.Generator().manual_seed(11))
    loss_s, grad_s = run(s[:, perm_s], t, backend, reduction="none")
    torch.testing.assert_close(loss_s, loss, atol=2e-6, rtol=0)
    torch.testing.assert_close(grad_s, grad[:, perm_s], atol=1e-6, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 300),
    st.integers(1, 300),
    st.integers(0, 10_000),
    st.floats(0.25, 4.0),
    st.floats(-50.0, 50.0),
)
@pytest.mark.slow  # 4 s of the full run's 1,025 s
def test_properties_on_random_cases(rows, vs, vt, seed, temperature, shift):
    """On the CPU kernel: 0 <= L <= 2, L = 0 against itself, invariance to a constant added to
    the student's rows, and agreement with the float64 reference."""
    s = make_logits((rows,), vs, seed=seed, scale=4.0)
    t = make_logits((rows,), vt, seed=seed + 1, scale=4.0)
    kw = dict(temperature=temperature, reduction="none")
    loss, grad = run(s, t, "cpu", **kw)
    assert torch.all(loss >= 0) and torch.all(loss <= 2 + 1e-6)
    self_loss, _ = run(s, s, "cpu", **kw)
    assert torch.all(self_loss <= 1e-6)
    # s + shift rounds each logit by up to half an ulp of |s| + |shift|: q moves by about that
    # much / T, relative, and L by up to twice it.
    shifted, _ = run(s + shift, t, "cpu", **kw)
    input_rounding = 2.0**-24 * (s.abs().max().item() + abs(shift)) / temperature
    torch.testing.assert_close(shifted, loss, atol=2e-6 + 4 * input_rounding, rtol=0)
    assert_matches_reference(s, t, "cpu", 0.0, 1e-5, **kw)


def test_reference_gradcheck_float64():
    s = make_logits((3,), 9, seed=12).double().requires_grad_()
    t = make_logits((3,), 6, seed=13).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: uld_loss_reference(a, b, temperature=1.5, reduction="none"), (s, t)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_and_rows_without_distribution(backend):
    """-inf columns have probability 0 and gradient 0; a counted row where either model has
    no softmax (all -inf, or a NaN or +inf logit) gets loss and gradient NaN; an ignored one
    stays 0."""
    s = make_logits((5,), 40, seed=14)
    t = make_logits((5,), 30, seed=15)
    s[:, :6] = -math.inf
    t[:, 10:20] = -math.inf
    s[1] = -math.inf
    t[2, 4] = math.nan
    s[3] = -math.inf
    s[4, 7] = math.inf
    labels = torch.tensor([1, 2, 3, -100, 5, 6])
    s = torch.cat([s, make_logits((1,), 40, seed=44)])
    t = torch.cat([t, make_logits((1,), 30, seed=45)])
    s[5, :6] = -math.inf
    t[5, 10:20] = -math.inf
    loss, grad = run(s, t, backend, labels=labels, reduction="none")
    for row in (1, 2, 4):
        assert torch.isnan(loss[row]) and torch.isnan(grad[row]).all()
    assert loss[3] == 0 and torch.all(grad[3] == 0)
    ok = [0, 5]
    assert torch.all(grad[ok, :6] == 0)
    assert_matches_reference(s[ok], t[ok], backend, 0.0, 1e-5, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    for scale, offset in [(1e4, 0.0), (1e-3, 0.0), (3.0, 1e4), (30.0, -5e3)]:
        s = make_logits((4,), 333, scale=scale, seed=16) + offset
        t = make_logits((4,), 222, scale=scale, seed=17) - offset
        assert_matches_reference(s, t, backend, 0.0, 1e-5, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s = make_logits((2, 3), 20, seed=18).requires_grad_()
    t = make_logits((2, 3), 25, seed=19)
    labels = torch.full((2, 3), -100)
    loss = fastkd.uld_loss(s, t, labels=labels, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(s.grad == 0)


def run_through_view(base, view, teacher, backend, **kw):
    """The op on ``view(leaf)`` (so that it sees the view's strides) for a leaf copy of ``base``:
    (loss, gradient reaching the leaf), and the same from the float64 reference."""
    leaf = base.detach().clone().requires_grad_()
    loss = fastkd.uld_loss(view(leaf), teacher, backend=backend, **kw)
    loss.sum().backward()
    leaf64 = base.detach().double().requires_grad_()
    ref = uld_loss_reference(view(leaf64), teacher.double(), **kw)
    ref.sum().backward()
    return loss.detach(), leaf.grad, ref.detach(), leaf64.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_broadcast_inputs(backend):
    """Row and column slices of [B, T, V] tensors, and stride-0 student and teacher rows, reach
    the op as views; gradients land in the viewed elements only (summed over broadcast rows)."""
    cases = [
        (
            make_logits((2, 6), 70, seed=20),
            lambda x: x[:, 1:5, 3:60],
            make_logits((2, 6), 90, seed=21)[:, 1:5, 5:85],
        ),
        (make_logits((1,), 40, seed=24), lambda x: x.expand(5, 40), make_logits((5,), 33, seed=25)),
        (make_logits((5,), 40, seed=23), lambda x: x, make_logits((1,), 33, seed=22).expand(5, 33)),
    ]
    for base, view, teacher in cases:
        assert not view(base).is_contiguous() or not teacher.is_contiguous()
        loss, grad, ref_loss, ref_grad = run_through_view(
            base, view, teacher, backend, reduction="none"
        )
        torch.testing.assert_close(loss.double(), ref_loss, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_mixed_dtypes(backend, student_dtype, teacher_dtype):
    if interpreted("uld_loss", backend, "cpu") and torch.float32 not in (
        student_dtype,
        teacher_dtype,
    ):
        pytest.skip("the Triton interpreter runs fp32 cases only")
    s = make_logits((3,), 90, dtype=student_dtype, seed=40)
    t = make_logits((3,), 70, dtype=teacher_dtype, seed=41)
    loss, grad = run(s, t, backend, reduction="none")
    ref_loss, ref_grad = reference64(s, t, reduction="none")
    assert grad.dtype == student_dtype
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-2)


@pytest.mark.triton
def test_triton_rows_in_several_chunks(monkeypatch):
    """The Triton path sorts a few rows at a time; chunk offsets into labels, grad and loss."""
    if "triton" not in _AVAILABLE:
        pytest.skip("Triton cannot run here")
    import fastkd.triton.uld_loss as triton_uld

    monkeypatch.setattr(triton_uld, "CHUNK_ELEMENTS", 3 * (50 + 37))  # 3 rows per chunk
    s = make_logits((2, 4), 50, seed=42)
    t = make_logits((2, 4), 37, seed=43)
    labels = torch.tensor([[1, -100, 2, 3], [4, 5, -100, 6]])
    assert_matches_reference(s, t, "triton", 0.0, 1e-5, labels=labels, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_grad_output_and_upstream_scale(backend):
    """``reduction="none"`` then ``.sum()`` sends a stride-0 gradient; a scaled mean too."""
    s = make_logits((3, 4), 50, seed=26)
    t = make_logits((3, 4), 60, seed=27)
    _, grad_sum = run(s, t, backend, reduction="sum")
    x = s.clone().requires_grad_()
    fastkd.uld_loss(x, t, reduction="none", backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, grad_sum)
    y = s.clone().requires_grad_()
    (3.0 * fastkd.uld_loss(y, t, backend=backend)).backward()
    torch.testing.assert_close(y.grad, grad_sum * 3.0 / 12, atol=1e-7, rtol=1e-5)


def test_teacher_requiring_grad():
    """A teacher that requires grad: ``auto`` runs the differentiable reference, a fused backend
    raises (it would give the teacher no gradient)."""
    s = make_logits((3,), 20, seed=28).requires_grad_()
    t = make_logits((3,), 30, seed=29).requires_grad_()
    fastkd.uld_loss(s, t).backward()
    assert s.grad is not None and t.grad is not None and torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match="requires_grad=True"):
        fastkd.uld_loss(s, t, backend="cpu")
    with torch.no_grad():
        assert torch.isfinite(fastkd.uld_loss(s, t, backend="cpu"))


def test_uld_loss_module_matches_function():
    s = make_logits((2, 3), 40, seed=38)
    t = make_logits((2, 3), 29, seed=39)
    labels = torch.tensor([[1, -100, 3], [4, 5, 6]])
    module = fastkd.ULDLoss(temperature=1.5, teacher_temperature=2.0, reduction="sum")
    assert "teacher_temperature=2.0" in repr(module)
    torch.testing.assert_close(
        module(s, t, labels=labels),
        fastkd.uld_loss(
            s, t, labels=labels, temperature=1.5, teacher_temperature=2.0, reduction="sum"
        ),
    )
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.ULDLoss(teacher_temperature=0.0)


def test_auto_backend():
    assert fastkd.available_backends("uld_loss", "cpu")[0] == "cpu"
    s = make_logits((3,), 20, seed=30).double()
    t = make_logits((3,), 25, seed=31).double()
    loss = fastkd.uld_loss(s, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, uld_loss_reference(s, t))


def test_empty_input():
    s = torch.zeros(0, 5, requires_grad=True)
    loss = fastkd.uld_loss(s, torch.zeros(0, 7), backend="cpu")
    loss.backward()
    assert loss.item() == 0 and s.grad.shape == (0, 5)


def test_opcheck():
    # grad_scale = 1: the backward rescales the op's second output in place by
    # incoming / grad_scale, which is the identity under opcheck's unit upstream gradients.
    s = make_logits((6,), 33, seed=32).requires_grad_()
    t = make_logits((6,), 21, seed=33)
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    args = (s, t, labels, 1.5, 0.7, -100, 1.0, "cpu", True)
    torch.library.opcheck(torch.ops.fastkd.uld_loss_fused.default, args)


def test_no_gradient_buffer_when_no_gradient_is_wanted():
    s = make_logits((5,), 40, seed=34)
    t = make_logits((5,), 30, seed=35)
    _, grad = torch.ops.fastkd.uld_loss_fused.default(s, t, None, 1.0, 1.0, -100, 1.0, "cpu", False)
    assert grad.numel() == 0
    with torch.no_grad():
        loss = fastkd.uld_loss(s.requires_grad_(), t, reduction="none", backend="cpu")
    torch.testing.assert_close(loss, run(s, t, "cpu", reduction="none")[0])


@pytest.mark.slow  # torch.compile: 4 s
def test_torch_compile_of_a_model_calling_the_loss():
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 50)
    x = torch.randn(2, 5, 16)
    teacher_logits = torch.randn(2, 5, 70)
    labels = torch.randint(0, 50, (2, 5))
    labels[0, 0] = -100

    def step(model, x):
        return fastkd.uld_loss(
            model(x), teacher_logits, labels=labels, temperature=2.0, backend="cpu"
        )

    eager_loss = step(student, x)
    eager_loss.backward()
    eager_grad = student.weight.grad.clone()
    student.weight.grad = None
    loss = torch.compile(step, fullgraph=True)(student, x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(student.weight.grad, eager_grad)


@pytest.mark.slow  # 6 s of the full run's 1,025 s
def test_torch_compile_of_the_reference_backend_with_nan_rows():
    """The torch backend (float64 here) traces whole, the NaN rule for rows without a softmax
    included, and gives what eager gives."""
    s = make_logits((4,), 30, seed=46).double()
    s[1] = -math.inf
    t = make_logits((4,), 20, seed=47).double()
    labels = torch.tensor([1, 2, -100, 3])

    def step(x):
        return fastkd.uld_loss(x, t, labels=labels, reduction="none")

    eager_s = s.clone().requires_grad_()
    eager = step(eager_s)
    eager.sum().backward()
    compiled_s = s.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)(compiled_s)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, equal_nan=True)
    torch.testing.assert_close(compiled_s.grad, eager_s.grad, equal_nan=True)
    assert torch.isnan(compiled[1]) and torch.isnan(compiled_s.grad[1]).all()


BAD_INPUTS = [
    (
        lambda s, t: fastkd.uld_loss(s, t[:2]),
        ValueError,
        r"\(3, 10\) and teacher_logits \(2, 12\).*same leading shape",
    ),
    (lambda s, t: fastkd.uld_loss(s.long(), t), TypeError, "floating point"),
    (lambda s, t: fastkd.uld_loss(s, t, temperature=0.0), ValueError, "temperature"),
    (
        lambda s, t: fastkd.uld_loss(s, t, teacher_temperature=-1.0),
        ValueError,
        "teacher_temperature",
    ),
    (
        lambda s, t: fastkd.uld_loss(s, t, labels=torch.zeros(2, dtype=torch.long)),
        ValueError,
        r"leading shape \(3,\)",
    ),
    (
        lambda s, t: fastkd.uld_loss(s, t, labels=torch.tensor([0, 1, 10])),
        ValueError,
        r"\[0, 10\).*student's vocabulary.*\[10\]",
    ),
    (lambda s, t: fastkd.uld_loss(s, t, reduction="avg"), ValueError, "reduction"),
    (
        lambda s, t: fastkd.uld_loss(s.double(), t, backend="cpu"),
        ValueError,
        "float32/bfloat16/float16 logits.*student torch.float64",
    ),
    (lambda s, t: fastkd.uld_loss(s, t, backend="cuda"), RuntimeError, "cuda"),
    (lambda s, t: fastkd.uld_loss(s, t, backend="fast"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("call,error,match", BAD_INPUTS)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call(make_logits((3,), 10), make_logits((3,), 12))


@pytest.mark.slow  # 16 s of the full run's 1,025 s
def test_bench_uld_loss_writes_a_table_and_json(tmp_path, capsys):
    import json

    from fastkd.cli import main

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert (
        main(
            [
                "bench",
                "uld_loss",
                "--device",
                "cpu",
                "--rows",
                "32",
                "--vocab",
                "300",
                "--teacher-vocab",
                "457",
                "--warmup",
                "0",
                "--reps",
                "1",
                "--out",
                str(out),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert md.read_text().startswith("### uld_loss rows=32 V_s=300 V_t=457 float32 on cpu")
    [case] = json.loads(out.read_text())["cases"]
    results = {r["impl"]: r for r in case["results"]}
    for impl in ("fastkd[cpu]", "torch eager", "torch.compile"):
        assert impl in table
        assert results[impl]["error"] is None and results[impl]["time_ms"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,vs,vt", [(torch.float32, 1271, 4099), (torch.bfloat16, 151936, 128256)]
)
def test_cuda_matches_the_cpu_kernel(dtype, vs, vt):
    """On a GPU, backend="auto" runs torch.sort and the Triton kernel; it agrees with the CPU
    kernel, ties and sign flips within rounding of equality allowed for as in the tables."""
    assert fastkd.available_backends("uld_loss", "cuda")[0] == "triton"
    s = make_logits((3, 2), vs, dtype=dtype, seed=36)
    t = make_logits((3, 2), vt, dtype=dtype, seed=37)
    labels = torch.tensor([[1, -100], [2, 3], [4, 5]])
    cpu_loss, cpu_grad = run(s, t, "cpu", temperature=1.5, labels=labels)
    x = s.cuda().requires_grad_()
    loss = fastkd.uld_loss(x, t.cuda(), temperature=1.5, labels=labels.cuda())
    loss.backward()
    torch.testing.assert_close(loss.cpu(), cpu_loss, atol=2e-6, rtol=1e-5)
    allow = tie_allowance(s, t, temperature=1.5, scale=1 / 5)
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    q = torch.softmax(s.double() / 1.5, dim=-1)
    err = (x.grad.cpu().double() - cpu_grad.double()).abs()
    assert torch.all(err <= 2 * COMPUTE_EPS * q / 5 / 1.5 + rtol * cpu_grad.double().abs() + allow)
