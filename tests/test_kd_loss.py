"""fastkd.kd_loss on every fused backend available here, against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.ops._registry import interpreted
from fastkd.reference import kd_loss_reference

from helpers import (
    assert_relative_within_torch_error,
    assert_within_torch_error,
    device_backend_params,
    divergence_case_id,
    divergence_cases,
    fused_backends,
    make_labels,
    make_logits,
)

# (divergence, extra kwargs): every divergence, and the mixture weights at their edges.
DIVERGENCES = divergence_cases()
DIV_IDS = [divergence_case_id(c) for c in DIVERGENCES]

OPTIONS = [
    {},
    {"temperature": 2.0},
    {"temperature": 0.5, "t2_scale": True},
    {"softcap": 4.0},
    {"hard_weight": 0.3},
    {"temperature": 1.7, "softcap": 3.0, "hard_weight": 0.5, "t2_scale": True},
]

# (device, backend) params of the fused backends; Triton on CPU runs in its interpreter, so
# COMPILED_BACKENDS leave it out of the larger cases.
BACKENDS = device_backend_params("kd_loss")
COMPILED_BACKENDS = device_backend_params("kd_loss", small_ok=False)


def run_fused(student, teacher, backend, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fastkd.kd_loss(s, teacher, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def run_reference(student, teacher, **kw):
    s = student.detach().to(torch.float64).requires_grad_()
    loss = kd_loss_reference(s, teacher.detach().to(torch.float64), **kw)
    if not loss.requires_grad:  # e.g. skl with alpha = 1: KL(p || p), constant in the student
        return loss, torch.zeros_like(s)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def run_reference_fp32(student, teacher, **kw):
    s = student.detach().float().requires_grad_()
    loss = kd_loss_reference(s, teacher.detach().float(), compute_dtype=torch.float32, **kw)
    if not loss.requires_grad:
        return loss, torch.zeros_like(s)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), s.grad


def assert_close_fp32(student, teacher, backend, **kw):
    loss, grad = run_fused(student, teacher, backend, **kw)
    ref_loss, ref_grad = run_reference(student, teacher, **kw)
    t32_loss, t32_grad = run_reference_fp32(student, teacher, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_within_torch_error("loss", loss, ref_loss, t32_loss)
    assert_within_torch_error("grad", grad, ref_grad, t32_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,dkw", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "plain"
)
def test_matches_reference(device, backend, divergence, dkw, options):
    small = interpreted("kd_loss", backend, device)
    rows, vocab = ((3,), 37) if small else ((5, 9), 401)
    s = make_logits(rows, vocab, device=device, seed=0)
    t = make_logits(rows, vocab, device=device, seed=1)
    labels = (
        make_labels(rows, vocab, device=device) if options.get("hard_weight") or not small else None
    )
    assert_close_fp32(
        s, t, backend, divergence=divergence, labels=labels, reduction="sum", **dkw, **options
    )


# Mixture weights near 0 and 1. Near 1, 1 - w formed in float32 from a float32 w would carry w's
# rounding (a relative 1.3e-5 in 1 - beta at beta = 0.999, 1.7e-4 at 0.9999), scaling the whole
# gradient; near either edge some gradients are small differences of nearly equal terms.
WEIGHT_EDGES = [
    (name, {param: w})
    for name, div in fastkd.DIVERGENCES.items()
    if div.mixture_weights is not None
    for param in div.parameters
    for w in (0.999, 0.9999, 1e-4, 1e-3)
]
WEIGHT_EDGE_IDS = [divergence_case_id(c) for c in WEIGHT_EDGES]


@pytest.mark.parametrize(
    "device,backend", BACKENDS + [pytest.param("cpu", "torch", id="cpu-torch")]
)
@pytest.mark.parametrize("divergence,dkw", WEIGHT_EDGES, ids=WEIGHT_EDGE_IDS)
def test_mixture_weight_edges(device, backend, divergence, dkw):
    # Few elements: the largest of torch's own errors grows with their number, and at
    # (5, 9) x 401 it would admit the gradient scaled by 1 - 1.3e-5 (beta = 0.999).
    s = make_logits((3,), 37, device=device, seed=14)
    t = make_logits((3,), 37, device=device, seed=15)
    kw = dict(divergence=divergence, reduction="none", **dkw)
    loss, grad = run_fused(s, t, backend, **kw)
    ref_loss, ref_grad = run_reference(s, t, **kw)
    t32_loss, t32_grad = run_reference_fp32(s, t, **kw)
    assert_relative_within_torch_error("loss", loss, ref_loss, t32_loss)
    assert_relative_within_torch_error("grad", grad, ref_grad, t32_grad)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 4099, 1271])
@pytest.mark.parametrize("divergence", ["fkl", "jsd", "srkl"])
def test_odd_shapes(device, backend, vocab, divergence):
    for rows in [(1,), (41,), (2, 3, 5)]:
        s = make_logits(rows, vocab, device=device, seed=2)
        t = make_logits(rows, vocab, device=device, seed=3)
        assert_close_fp32(s, t, backend, divergence=divergence, reduction="none")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("vs,vt", [(300, 257), (257, 300)])
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "tvd"])
def test_vocab_mismatch_cuts_to_common_prefix(device, backend, vs, vt, divergence):
    s = make_logits((4,), vs, device=device, seed=4)
    t = make_logits((4,), vt, device=device, seed=5)
    labels = torch.tensor([0, 5, -100, 200], device=device)
    assert_close_fp32(s, t, backend, divergence=divergence, labels=labels, hard_weight=0.2)
    _, grad = run_fused(s, t, backend, divergence=divergence)
    assert torch.all(grad[:, min(vs, vt) :] == 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence,dkw", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.slow  # 26 cases, 6 s of the full run's 1,025 s
def test_neg_inf_logits(device, backend, divergence, dkw):
    """-inf marks tokens outside the support: 0 * log 0 = 0, never NaN, zero gradient there."""
    vocab = 97
    s = make_logits((6,), vocab, device=device, seed=6)
    t = make_logits((6,), vocab, device=device, seed=7)
    s[:, :10] = -math.inf  # shared -inf columns
    t[:, :10] = -math.inf
    mode = fastkd.DIVERGENCES[divergence].resolve(**dkw).name
    if mode != "rkl":  # teacher-only -inf (KL(q||p) would be infinite)
        t[0, 20:30] = -math.inf
    if mode != "fkl":  # student-only -inf (KL(p||q) would be infinite)
        s[1, 40:50] = -math.inf
    loss, grad = run_fused(s, t, backend, divergence=divergence, reduction="none", **dkw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, :10] == 0)
    assert_close_fp32(s, t, backend, divergence=divergence, reduction="none", **dkw)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_infinite_divergence_is_inf_not_nan(device, backend, divergence):
    """Teacher mass where the student has none: fkl is +inf (and so on), never NaN."""
    s = make_logits((2,), 33, device=device, seed=8)
    t = make_logits((2,), 33, device=device, seed=9)
    if divergence == "rkl":
        t[:, 3] = -math.inf
    else:
        s[:, 3] = -math.inf
    loss = fastkd.kd_loss(s, t, divergence=divergence, backend=backend, reduction="none")
    if divergence in ("fkl", "rkl"):
        assert torch.all(loss == math.inf)
    else:
        assert torch.isfinite(loss).all()


# (which model's row is spoiled, the value written into the compared logits of row 1).
NO_DISTRIBUTION = [
    ("student", -math.inf),
    ("teacher", -math.inf),
    ("both", -math.inf),
    ("student", math.nan),
    ("teacher", math.inf),
]


@pytest.mark.parametrize(
    "device,backend", BACKENDS + [pytest.param("cpu", "torch", id="cpu-torch")]
)
@pytest.mark.parametrize("divergence,dkw", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("side,value", NO_DISTRIBUTION, ids=lambda x: str(x))
@pytest.mark.slow  # 195 cases, 47 s of the full run's 1,025 s
def test_row_without_distribution_is_nan(device, backend, divergence, dkw, side, value):
    """A row where either model has no softmax (all -inf, or NaN / +inf logits) has loss NaN and
    gradient NaN within the common vocabulary, as plain PyTorch gives; other rows are untouched,
    columns past the common vocabulary get 0 and an ignored such row stays 0."""
    s = make_logits((4,), 41, device=device, seed=10)
    t = make_logits((4,), 37, device=device, seed=11)
    for row in (1, 3):
        if side in ("student", "both"):
            s[row, :37] = -math.inf if value == -math.inf else s[row, :37]
            s[row, 5] = value
        if side in ("teacher", "both"):
            t[row, :] = -math.inf if value == -math.inf else t[row]
            t[row, 5] = value
    labels = torch.tensor([2, 3, 4, -100], device=device)
    kw = dict(divergence=divergence, labels=labels, reduction="none", hard_weight=0.25, **dkw)
    loss, grad = run_fused(s, t, backend, **kw)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1, :37]).all(), (loss, grad[1])
    assert torch.all(grad[1, 37:] == 0)
    assert loss[3] == 0 and torch.all(grad[3] == 0)
    ok = torch.tensor([0, 2])
    assert_close_fp32(s[ok], t[ok], backend, **{**kw, "labels": labels[ok]})


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("scale,offset", [(1e4, 0.0), (1e-3, 0.0), (3.0, 1e4), (30.0, -5e3)])
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_extreme_logits(device, backend, scale, offset, divergence):
    s = make_logits((7,), 513, scale=scale, device=device, seed=10) + offset
    t = make_logits((7,), 513, scale=scale, device=device, seed=11) + offset
    loss, grad = run_fused(s, t, backend, divergence=divergence, reduction="none")
    ref_loss, ref_grad = run_reference(s, t, divergence=divergence, reduction="none")
    # Logits of magnitude ~1e4 carry fp32 rounding of ~1e-3 in every logit difference.
    atol = 1e-5 + 4e-7 * (scale + abs(offset))
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), atol=atol * 10, rtol=1e-4)
    grad, ref_grad, rtol = grad.double().cpu(), ref_grad.cpu(), 1e-3
    if divergence == "tvd":
        # tvd's gradient holds sign(q - p), which fp32 cannot resolve where |q - p| / q is below
        # ~1e-6 (nearly equal logits at scale 1e-3): compare where the sign is well defined; the
        # few ambiguous signs shift the row's <q, sign> term by ~q, hence the looser rtol.
        lq = torch.log_softmax(s.double(), -1).cpu()
        lp = torch.log_softmax(t.double(), -1).cpu()
        clear = (lq - lp).abs() > 1e-4
        grad, ref_grad, rtol = grad[clear], ref_grad[clear], 1e-2
    torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, backend, reduction):
    s = make_logits((3, 4), 50, device=device)
    t = make_logits((3, 4), 50, device=device, seed=1)
    labels = torch.full((3, 4), -100, device=device)
    loss, grad = run_fused(s, t, backend, labels=labels, hard_weight=0.5, reduction=reduction)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.slow  # 2 cases, 5 s of the full run's 1,025 s
def test_reductions_and_num_items(device, backend):
    s = make_logits((4, 6), 64, device=device)
    t = make_logits((4, 6), 64, device=device, seed=1)
    labels = make_labels((4, 6), 64, device=device)
    for kw in [
        {"reduction": "mean"},
        {"reduction": "sum"},
        {"reduction": "none"},
        {"reduction": "mean", "num_items_in_batch": 37},
        {"reduction": "mean", "num_items_in_batch": torch.tensor(11)},
    ]:
        assert_close_fp32(s, t, backend, labels=labels, ignore_index=-100, **kw)
    none = fastkd.kd_loss(s, t, labels=labels, reduction="none", backend=backend)
    assert none.shape == (4, 6)
    assert torch.all(none[labels == -100] == 0)
    mean = fastkd.kd_loss(s, t, labels=labels, backend=backend)
    torch.testing.assert_close(mean, none.sum() / (labels != -100).sum())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("upstream", [1.0, 3.0, 0.0])
@pytest.mark.slow  # 6 cases, 5 s of the full run's 1,025 s
def test_mean_gradient_under_upstream_scale(device, backend, upstream):
    """The forward stores the mean's 1/#tokens in the gradient where it can; the backward then
    rescales by upstream / that weight (and leaves rows alone when the ratio is 1)."""
    s = make_logits((3, 7), 90, device=device).requires_grad_()
    t = make_logits((3, 7), 90, device=device, seed=1)
    labels = make_labels((3, 7), 90, device=device)
    for kw in [{}, {"num_items_in_batch": 9}, {"labels": labels, "hard_weight": 0.3}]:
        s.grad = None
        (upstream * fastkd.kd_loss(s, t, backend=backend, **kw)).backward()
        s_ref = s.detach().double().requires_grad_()
        (upstream * kd_loss_reference(s_ref, t.double(), **kw)).backward()
        torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_custom_ignore_index(device, backend):
    s = make_logits((8,), 40, device=device)
    t = make_logits((8,), 40, device=device, seed=1)
    labels = torch.tensor([1, -1, 3, -1, 5, 6, -1, 8], device=device)
    assert_close_fp32(s, t, backend, labels=labels, ignore_index=-1, hard_weight=0.25)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_and_broadcast_inputs(device, backend):
    base_s = make_logits((3, 6), 130, device=device)
    base_t = make_logits((6, 3), 130, device=device, seed=1)
    s = base_s[:, :-1, :]  # row slice of [B, T, V]: two-level row layout
    t = base_t.transpose(0, 1)[:, :-1, :]  # permuted rows
    assert not s.is_contiguous() and not t.is_contiguous()
    assert_close_fp32(s, t, backend, divergence="jsd", reduction="sum")
    shared = make_logits((1, 5), 130, device=device, seed=2).expand(3, 5, 130)  # stride-0 rows
    assert_close_fp32(s, shared, backend, divergence="fkl", reduction="sum")
    strided = make_logits((3, 5), 260, device=device, seed=3)[..., ::2]  # strided columns
    assert_close_fp32(strided, shared, backend, divergence="rkl", reduction="sum")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_stride_zero_grad_output(device, backend):
    """reduction="none" then .sum() sends an expanded (stride-0) gradient into the backward."""
    s = make_logits((4, 5), 70, device=device).requires_grad_()
    t = make_logits((4, 5), 70, device=device, seed=1)
    fastkd.kd_loss(s, t, reduction="none", backend=backend).sum().backward()
    s_ref = s.detach().double().requires_grad_()
    kd_loss_reference(s_ref, t.double(), reduction="none").sum().backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-4)
    # A non-uniform upstream gradient scales each row.
    s.grad = None
    w = torch.linspace(0, 2, 20, device=device).reshape(4, 5)
    (fastkd.kd_loss(s, t, reduction="none", backend=backend) * w).sum().backward()
    s_ref.grad = None
    (kd_loss_reference(s_ref, t.double(), reduction="none") * w.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-4)


LOW_PRECISION = [(torch.bfloat16, 1e-6), (torch.float16, 1e-6)]


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype,atol", LOW_PRECISION)
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
@pytest.mark.slow  # 12 cases, 4 s of the full run's 1,025 s
def test_low_precision_error_within_torch_own(device, backend, dtype, atol, divergence):
    """bf16/fp16 inputs: fp32 math inside, so the error against the exact value of the rounded
    inputs is at most torch's own error when it computes in that dtype."""
    s = make_logits((33,), 1031, dtype=dtype, device=device, seed=12)
    t = make_logits((33,), 1031, dtype=dtype, device=device, seed=13)
    labels = make_labels((33,), 1031, device=device)
    kw = dict(
        divergence=divergence, labels=labels, hard_weight=0.1, temperature=1.5, reduction="none"
    )
    loss, grad = run_fused(s, t, backend, **kw)
    assert grad.dtype == dtype
    ref_loss, ref_grad = run_reference(s, t, **kw)
    s_low = s.detach().clone().requires_grad_()
    low_loss = kd_loss_reference(s_low, t, compute_dtype=dtype, **kw)
    low_loss.sum().backward()
    err = (loss.double() - ref_loss).abs().max().item()
    low_err = (low_loss.double() - ref_loss).abs().max().item()
    assert err <= low_err + atol, (err, low_err)
    gerr = (grad.double() - ref_grad).abs().max().item()
    low_gerr = (s_low.grad.double() - ref_grad).abs().max().item()
    # The stored gradient is the exact one rounded once to the input dtype.
    ulp = torch.finfo(dtype).eps
    assert gerr <= min(low_gerr, ulp * ref_grad.abs().max().item()) + atol, (gerr, low_gerr)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_mixed_dtypes(device, backend):
    s = make_logits((9,), 300, device=device)
    t = make_logits((9,), 300, dtype=torch.bfloat16, device=device, seed=1)
    assert_close_fp32(s, t, backend, divergence="jsd")
    s16 = s.to(torch.float16)
    loss, grad = run_fused(s16, t, backend, divergence="fkl", reduction="none")
    ref_loss, _ = run_reference(s16, t, divergence="fkl", reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), atol=1e-5, rtol=1e-4)
    assert grad.dtype == torch.float16


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_second_backward_through_same_graph_raises(device, backend):
    s = make_logits((2,), 20, device=device).requires_grad_()
    t = make_logits((2,), 20, device=device, seed=1)
    loss = fastkd.kd_loss(s, t, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_backend_picks_fused_on_cpu_and_torch_for_float64():
    assert fastkd.available_backends("kd_loss", "cpu")[0] == "cpu"
    s = make_logits((4,), 30, dtype=torch.float64).requires_grad_()
    t = make_logits((4,), 30, dtype=torch.float64, seed=1)
    loss = fastkd.kd_loss(s, t)
    assert loss.dtype == torch.float64
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        fastkd.kd_loss(s, t, backend="cpu")


def test_teacher_requiring_grad():
    s = make_logits((4,), 30).requires_grad_()
    t = make_logits((4,), 30, seed=1).requires_grad_()
    fastkd.kd_loss(s, t).backward()  # auto: the reference, which differentiates both
    assert t.grad is not None and s.grad is not None
    with pytest.raises(ValueError, match="detach the teacher"):
        fastkd.kd_loss(s, t, backend="cpu")
    with torch.no_grad():
        fastkd.kd_loss(s, t, backend="cpu")


def test_empty_input():
    s = torch.zeros(0, 10, requires_grad=True)
    t = torch.zeros(0, 10)
    loss = fastkd.kd_loss(s, t, backend="cpu")
    assert loss.item() == 0
    loss.backward()
    assert s.grad.shape == (0, 10)


def test_kdloss_module_matches_function():
    s = make_logits((2, 3), 50)
    t = make_logits((2, 3), 50, seed=1)
    labels = make_labels((2, 3), 50)
    mod = fastkd.KDLoss(divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.2)
    assert "jsd" in repr(mod)
    torch.testing.assert_close(
        mod(s, t, labels),
        fastkd.kd_loss(
            s, t, labels=labels, divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.2
        ),
    )
    with pytest.raises(ValueError, match="divergence"):
        fastkd.KDLoss(divergence="kl")


@pytest.mark.gpu
def test_cuda_matches_cpu_backend_on_a_large_row():
    s = make_logits((4,), 128256, dtype=torch.bfloat16, device="cuda")
    t = make_logits((4,), 128256, dtype=torch.bfloat16, device="cuda", seed=1)
    for backend in fused_backends("cuda"):
        loss, grad = run_fused(s, t, backend, divergence="jsd", reduction="none")
        ref_loss, ref_grad = run_fused(s.cpu(), t.cpu(), "cpu", divergence="jsd", reduction="none")
        torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad.cpu().float(), ref_grad.float(), atol=1e-8, rtol=8e-3)


SQRT_S = (1 + math.sqrt(3)) / (2 * math.sqrt(2))  # sum sqrt(p q) of p = (1/2, 1/2), q = (1/4, 3/4)
# (student logits, teacher logits, H^2 = 1 - S, dH^2/dz_s = -(sqrt(p q) - q S) / 2), by hand.
HELLINGER_CASES = [
    (
        [0.0, math.log(3.0)],
        [0.0, 0.0],
        1 - SQRT_S,
        [-(math.sqrt(1 / 8) - SQRT_S / 4) / 2, -(math.sqrt(3 / 8) - 3 * SQRT_S / 4) / 2],
    ),
    # Disjoint supports: S = 0, H^2 = 1, and no gradient (q_i S = 0 = sqrt(p_i q_i)).
    ([0.0, -math.inf], [-math.inf, 0.0], 1.0, [0.0, 0.0]),
    # p = (0, 1/2, 1/2), q = (1/2, 1/2, 0): S = 1/2; the student-only column has q S / 2 = 1/8.
    ([0.0, 0.0, -math.inf], [-math.inf, 0.0, 0.0], 0.5, [1 / 8, -1 / 8, 0.0]),
]


@pytest.mark.parametrize(
    "device,backend", BACKENDS + [pytest.param("cpu", "torch", id="cpu-torch")]
)
@pytest.mark.parametrize("case", range(len(HELLINGER_CASES)))
def test_hellinger_closed_form(device, backend, case):
    zs, zt, loss, grad = HELLINGER_CASES[case]
    s = torch.tensor([zs], device=device).requires_grad_()
    t = torch.tensor([zt], device=device)
    got = fastkd.kd_loss(s, t, divergence="hellinger", backend=backend, reduction="sum")
    got.backward()
    assert got.item() == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(
        s.grad.cpu().double(), torch.tensor([grad], dtype=torch.float64), atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize(
    "device,backend", BACKENDS + [pytest.param("cpu", "torch", id="cpu-torch")]
)
def test_hellinger_is_zero_at_equal_distributions(device, backend):
    s = make_logits((4,), 50, device=device, seed=16)
    s[:, :5] = -math.inf
    student = s.clone().requires_grad_()
    loss = fastkd.kd_loss(student, s, divergence="hellinger", backend=backend, reduction="none")
    loss.sum().backward()
    # Zero up to float32 rounding: 1 - S, or the gradient's q (S - 1) / 2, is a few eps.
    eps = torch.finfo(torch.float32).eps
    assert torch.all(loss.abs() <= 8 * eps), loss
    assert torch.all(student.grad.abs() <= 8 * eps), student.grad.abs().max()
    module = fastkd.KDLoss(divergence="hellinger", backend=backend)
    assert module(s, s.clone()).abs().item() <= 8 * eps
