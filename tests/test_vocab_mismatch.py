"""vocab_mismatch="cut" | "pad" of kd_loss, fused_linear_kd_loss and their modules, against the
float64 reference applied to explicitly cut or zero-padded logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from helpers import assert_within_torch_error, divergence_case_id, fused_backends
from fastkd.reference import kd_loss_reference

V_S, V_T, ROWS, H = 29, 41, 9, 6
# Triton's interpreter spends about 2.8 s per case here: those cases run with the slow tests.
BACKENDS = [
    pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b
    for b in ("torch", *fused_backends("cpu"))
]
CASES = [("fkl", {}), ("jsd", {"beta": 0.3}), ("rkl", {}), ("tvd", {})]
OPTIONS = [
    dict(),
    dict(temperature=2.0, softcap=3.0),
    dict(hard_weight=0.25, reduction="sum"),
    dict(reduction="none"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(vocab):
    labels = torch.randint(0, vocab, (ROWS,), generator=_gen(9))
    labels[::4] = -100
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=divergence_case_id)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_kd_loss_pad_is_the_loss_of_zero_padded_student_logits(backend, case, options):
    divergence, params = case
    zs = (torch.randn(ROWS, V_S, generator=_gen(0)) * 3).requires_grad_()
    zt = torch.randn(ROWS, V_T, generator=_gen(1)) * 3
    kw = dict(divergence=divergence, labels=_labels(V_S), **params, **options)
    loss = fastkd.kd_loss(zs, zt, vocab_mismatch="pad", backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), zs)

    def padded_reference(dtype):
        z = zs.detach().to(dtype).requires_grad_()
        value = kd_loss_reference(F.pad(z, (0, V_T - V_S)), zt.to(dtype), **kw)
        return value, torch.autograd.grad(value.sum(), z)[0]

    exact, exact_grad = padded_reference(torch.float64)
    plain, plain_grad = padded_reference(torch.float32)
    assert_within_torch_error("loss", loss, exact, plain)
    assert_within_torch_error("grad", grad, exact_grad, plain_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_cut_is_the_default_and_equal_vocabularies_ignore_the_option(backend):
    zs, zt = torch.randn(ROWS, V_S, generator=_gen(0)), torch.randn(ROWS, V_T, generator=_gen(1))
    cut = fastkd.kd_loss(zs, zt, backend=backend)
    torch.testing.assert_close(cut, kd_loss_reference(zs, zt[:, :V_S]))
    assert not torch.allclose(cut, fastkd.kd_loss(zs, zt, vocab_mismatch="pad", backend=backend))
    same = zt[:, :V_S]
    torch.testing.assert_close(
        fastkd.kd_loss(zs, same, vocab_mismatch="pad", backend=backend),
        fastkd.kd_loss(zs, same, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher,bias", [("online", True), ("logits", False)])
def test_fused_linear_pad_appends_zero_rows_to_the_student_head(backend, teacher, bias):
    xs = torch.randn(2, ROWS, H, generator=_gen(2), requires_grad=True)
    ws = torch.randn(V_S, H, generator=_gen(3), requires_grad=True)
    bs = torch.randn(V_S, generator=_gen(4), requires_grad=True) if bias else None
    xt, wt = (
        torch.randn(2, ROWS, H + 2, generator=_gen(5)),
        torch.randn(V_T, H + 2, generator=_gen(6)),
    )
    labels = torch.stack([_labels(V_S), _labels(V_S).flip(0)])
    zt = xt @ wt.t()
    teacher_args = ((xt, wt), {}) if teacher == "online" else ((), {"teacher_logits": zt})
    kw = dict(divergence="jsd", beta=0.7, temperature=1.5, labels=labels, hard_weight=0.1)
    leaves = [t for t in (xs, ws, bs) if t is not None]
    loss = fastkd.fused_linear_kd_loss(
        xs,
        ws,
        *teacher_args[0],
        student_bias=bs,
        vocab_mismatch="pad",
        backend=backend,
        chunk_size=5,
        logit_scale=1.3,
        **teacher_args[1],
        **kw,
    )
    grads = torch.autograd.grad(loss, leaves)

    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    zs = exact_leaves[0] @ exact_leaves[1].t()
    if bias:
        zs = zs + exact_leaves[2]
    exact = kd_loss_reference(F.pad(zs * 1.3, (0, V_T - V_S)), zt.double(), **kw)
    exact_grads = torch.autograd.grad(exact, exact_leaves)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, exact_grads):
        assert g.shape == e.shape  # the padded rows' gradients are dropped
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_pad_refuses_a_smaller_teacher_vocabulary():
    zs, zt = torch.randn(3, 10), torch.randn(3, 7)
    with pytest.raises(
        ValueError, match=r"vocab_mismatch='pad'.*student_logits with V_s=10.*V_t=7"
    ):
        fastkd.kd_loss(zs, zt, vocab_mismatch="pad")
    with pytest.raises(ValueError, match=r"vocab_mismatch='pad'.*student_weight with V_s=10"):
        fastkd.fused_linear_kd_loss(
            torch.randn(3, 4), torch.randn(10, 4), teacher_logits=zt, vocab_mismatch="pad"
        )


def test_pad_keeps_labels_within_the_student_vocabulary():
    zs, zt = torch.randn(3, 10), torch.randn(3, 14)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fastkd.kd_loss(zs, zt, labels=torch.tensor([0, 11, 2]), vocab_mismatch="pad")


def test_modules_take_the_option():
    zs, zt = torch.randn(3, 10), torch.randn(3, 14)
    torch.testing.assert_close(
        fastkd.KDLoss(vocab_mismatch="pad")(zs, zt), fastkd.kd_loss(zs, zt, vocab_mismatch="pad")
    )
    xs, ws, wt = torch.randn(3, 4), torch.randn(10, 4), torch.randn(14, 4)
    torch.testing.assert_close(
        fastkd.FusedLinearKDLoss(vocab_mismatch="pad")(xs, ws, xs, wt),
        fastkd.fused_linear_kd_loss(xs, ws, xs, wt, vocab_mismatch="pad"),
    )
