"""fastkd.fused_linear_sparse_kd_loss against the plain path (F.linear, then the sparse loss
reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.reference import sparse_kd_loss_reference

from helpers import assert_within_torch_error

N, H, V = 37, 24, 101
STUDENT = ("hidden", "weight", "bias")


def make_problem(lead=(N,), *, method="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (4 / math.sqrt(H))
    bias = torch.randn(V, generator=g) * 0.5
    teacher = torch.randn(*lead, V - 6, generator=g) * 3
    if method == "random":
        targets = fastkd.sample_teacher(teacher, num_samples=20, seed=1)
    else:
        targets = fastkd.sample_teacher(teacher, method="topk", k=8, tail="bucket")
    labels = torch.randint(0, V - 6, lead, generator=g)
    labels.view(-1)[::5] = -100
    return {"hidden": hidden, "weight": weight, "bias": bias}, targets, labels


def plain(hidden, weight, bias, targets, logit_scale=1.0, **kw):
    return sparse_kd_loss_reference(F.linear(hidden, weight, bias) * logit_scale, targets, **kw)


def run(fn, student, targets, *, dtype=None, grad_output=None, **kw):
    args = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in student.items()}
    loss = (
        fn(args["hidden"], args["weight"], student_bias=args["bias"], targets=targets, **kw)
        if fn is not plain
        else plain(args["hidden"], args["weight"], args["bias"], targets, **kw)
    )
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss))
    return loss.detach(), [args[k].grad for k in STUDENT]


OPTIONS = [
    {},
    {"temperature": 2.0, "t2_scale": True},
    {"hard_weight": 0.3},
    {"logit_scale": 0.7, "reduction": "sum"},
    {"reduction": "none"},
    {"num_items_in_batch": 40, "hard_weight": 0.1},
]


@pytest.mark.parametrize("method", ["random", "bucket"])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=["-".join(f"{k}{v}" for k, v in o.items()) or "plain" for o in OPTIONS]
)
def test_matches_plain_path(method, options):
    student, targets, labels = make_problem(method=method)
    kw = dict(options, labels=labels)
    go = torch.rand(N) if options.get("reduction") == "none" else None
    loss, grads = run(
        fastkd.fused_linear_sparse_kd_loss, student, targets, grad_output=go, chunk_size=8, **kw
    )
    exact, exact_grads = run(plain, student, targets, dtype=torch.float64, grad_output=go, **kw)
    fp32, fp32_grads = run(plain, student, targets, grad_output=go, **kw)
    assert_within_torch_error("loss", loss, exact, fp32)
    for name, g, e, p in zip(STUDENT, grads, exact_grads, fp32_grads):
        assert g.dtype == torch.float32 and g.shape == student[name].shape
        assert_within_torch_error(name, g, e, p)


def test_leading_shape_chunks_and_budget():
    student, targets, labels = make_problem(lead=(3, 11))
    reference, ref_grads = run(plain, student, targets, dtype=torch.float64, labels=labels)
    for kw in ({"chunk_size": 1}, {"chunk_size": 100}, {"memory_budget": 4 * V * 5}):
        loss, grads = run(fastkd.fused_linear_sparse_kd_loss, student, targets, labels=labels, **kw)
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def test_bf16_keeps_fp32_logits():
    student, targets, _ = make_problem()
    low = {k: v.to(torch.bfloat16) for k, v in student.items()}
    loss, grads = run(fastkd.fused_linear_sparse_kd_loss, low, targets, chunk_size=16)
    exact, exact_grads = run(plain, low, targets, dtype=torch.float64)
    bf16_plain, plain_grads = run(plain, low, targets)
    assert abs(loss.item() - exact.item()) < 0.25 * abs(bf16_plain.item() - exact.item())
    eps = torch.finfo(torch.bfloat16).eps
    for g, e, p in zip(grads, exact_grads, plain_grads):
        assert g.dtype == torch.bfloat16
        err, plain_err = (g.double() - e).abs().max(), (p.double() - e).abs().max()
        assert err <= plain_err + eps * e.abs().max()


@pytest.mark.triton
def test_triton_row_kernel():
    if "triton" not in fastkd.available_backends("sparse_kd_loss", "cpu"):
        pytest.skip("triton cannot run here")
    student, targets, labels = make_problem(lead=(5,))
    loss, grads = run(
        fastkd.fused_linear_sparse_kd_loss,
        student,
        targets,
        chunk_size=2,
        backend="triton",
        labels=labels,
        hard_weight=0.2,
    )
    ref, ref_grads = run(
        plain, student, targets, dtype=torch.float64, labels=labels, hard_weight=0.2
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def test_bad_input_raises():
    student, targets, labels = make_problem()
    with pytest.raises(ValueError, match=r"leading shape \(36,\) of student_hidden"):
        fastkd.fused_linear_sparse_kd_loss(student["hidden"][:-1], student["weight"], targets)
    with pytest.raises(TypeError, match="SparseTargets"):
        fastkd.fused_linear_sparse_kd_loss(student["hidden"], student["weight"], targets.ids)
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 50\)"):
        fastkd.fused_linear_sparse_kd_loss(student["hidden"], student["weight"][:50], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        fastkd.fused_linear_sparse_kd_loss(
            student["hidden"], student["weight"], targets, chunk_size=0
        )
