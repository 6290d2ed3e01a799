"""Every numeric claim of docs/migration.md: the peers' losses (torchtune, DistiLLM, torch's
kl_div as Liger's KLDiv reproduces it) against fastkd's, in float64. torchtune and DistiLLM are
not installed: their losses are transcribed in plain torch from their own code, named at each
function. TRL's and Liger's claims are checked against their installed code in
test_integrations_trl.py and test_compat_liger.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd

ROWS, VOCAB = 11, 23


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64) * 3).requires_grad_()
    zt = torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[::3] = -100
    return zs, zt, labels


def _masked_mean(x, labels):
    mask = (labels != -100).to(x.dtype)
    return (x * mask).sum() / mask.sum()


def teacher_entropy(zt, labels):
    p = zt.softmax(-1)
    return _masked_mean(-(p * zt.log_softmax(-1)).sum(-1), labels)


def torchtune_forward_kl(zs, zt, labels):
    """torchtune/modules/loss/kd_losses.py, ForwardKLLoss.forward (normalize=True): the
    teacher-weighted cross-entropy -sum p log q, mean over labels != -100. DistiLLM's
    distillm/losses.py forward_kl computes the same."""
    prod = (zt.softmax(-1) * zs.log_softmax(-1)).masked_fill(torch.isinf(zs), 0)
    return -_masked_mean(prod.sum(-1), labels)


def distillm_reverse_kl(zs, zt, labels):
    """distillm/losses.py reverse_kl: sum q (log q - log p)."""
    q = zs.softmax(-1)
    return -_masked_mean((q * zt.log_softmax(-1) - q * zs.log_softmax(-1)).sum(-1), labels)


def distillm_js_distance(zs, zt, labels, lam):
    """distillm/losses.py js_distance: m = (1 - lam) p + lam q;
    lam KL(q || m) + (1 - lam) KL(p || m)."""
    p, q = zt.softmax(-1), zs.softmax(-1)
    log_m = ((1 - lam) * p + lam * q).log()
    student = -_masked_mean((q * log_m - q * zs.log_softmax(-1)).sum(-1), labels)
    teacher = -_masked_mean((p * log_m - p * zt.log_softmax(-1)).sum(-1), labels)
    return lam * student + (1 - lam) * teacher


def distillm_tv_distance(zs, zt, labels):
    """distillm/losses.py tv_distance: 1/2 sum |p - q|."""
    return _masked_mean(0.5 * (zt.softmax(-1) - zs.softmax(-1)).abs().sum(-1), labels)


def distillm_skewed_forward_kl(zs, zt, labels, lam):
    """distillm/losses.py skewed_forward_kl: -sum p log m, m = lam p + (1 - lam) q (a
    cross-entropy, as forward_kl)."""
    p, q = zt.softmax(-1), zs.softmax(-1)
    return -_masked_mean((p * (lam * p + (1 - lam) * q).log()).sum(-1), labels)


def distillm_skewed_reverse_kl(zs, zt, labels, lam):
    """distillm/losses.py skewed_reverse_kl: KL(q || m), m = (1 - lam) p + lam q."""
    p, q = zt.softmax(-1), zs.softmax(-1)
    log_m = ((1 - lam) * p + lam * q).log()
    return -_masked_mean((q * log_m - q * zs.log_softmax(-1)).sum(-1), labels)


def _fastkd(zs, zt, labels, **kw):
    return fastkd.kd_loss(zs, zt, labels=labels, backend="torch", **kw)


# (name, peer(zs, zt, labels), fastkd kwargs, whether the peer adds the teacher's entropy)
CLAIMS = [
    ("torchtune ForwardKLLoss = fkl + H(p)", torchtune_forward_kl, dict(divergence="fkl"), True),
    ("DistiLLM reverse_kl = rkl", distillm_reverse_kl, dict(divergence="rkl"), False),
    (
        "DistiLLM js_distance(lam=0.9) = jsd(beta=0.1)",
        lambda *a: distillm_js_distance(*a, lam=0.9),
        dict(divergence="jsd", beta=0.1),
        False,
    ),
    (
        "DistiLLM js_distance(lam=0.25) = jsd(beta=0.75)",
        lambda *a: distillm_js_distance(*a, lam=0.25),
        dict(divergence="jsd", beta=0.75),
        False,
    ),
    ("DistiLLM tv_distance = tvd", distillm_tv_distance, dict(divergence="tvd"), False),
    (
        "DistiLLM skewed_forward_kl(lam=0.1) = skl(alpha=0.1) + H(p)",
        lambda *a: distillm_skewed_forward_kl(*a, lam=0.1),
        dict(divergence="skl", alpha=0.1),
        True,
    ),
    (
        "DistiLLM skewed_reverse_kl(lam=0.1) = srkl(alpha=0.1)",
        lambda *a: distillm_skewed_reverse_kl(*a, lam=0.1),
        dict(divergence="srkl", alpha=0.1),
        False,
    ),
]


@pytest.mark.parametrize("name,peer,kwargs,plus_entropy", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_peer_loss_is_fastkd_s_up_to_the_stated_constant(name, peer, kwargs, plus_entropy):
    zs, zt, labels = _inputs()
    theirs = peer(zs, zt, labels)
    ours = _fastkd(zs, zt, labels, **kwargs)
    offset = teacher_entropy(zt, labels) if plus_entropy else 0.0
    torch.testing.assert_close(theirs, ours + offset, rtol=1e-12, atol=1e-12)
    # The teacher's entropy does not depend on the student: the gradients are equal.
    torch.testing.assert_close(
        torch.autograd.grad(theirs, zs)[0], torch.autograd.grad(ours, zs)[0], rtol=1e-10, atol=1e-12
    )


# torch warns that kl_div's "mean" is not the KL's mean, the very difference checked here.
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
def test_kl_div_mean_divides_by_every_element_fastkd_s_mean_by_tokens():
    """torch's kl_div(reduction="mean"), which Liger's KLDiv reproduces, divides the sum by
    rows x V; fastkd's "mean" (and kl_div's "batchmean") by the rows."""
    zs, zt, _ = _inputs()
    log_q, p = zs.log_softmax(-1), zt.softmax(-1)
    ours = _fastkd(zs, zt, None, divergence="fkl")
    torch.testing.assert_close(F.kl_div(log_q, p, reduction="mean") * VOCAB, ours)
    torch.testing.assert_close(F.kl_div(log_q, p, reduction="batchmean"), ours)
    torch.testing.assert_close(
        F.kl_div(log_q, p, reduction="sum"),
        _fastkd(zs, zt, None, divergence="fkl", reduction="sum"),
    )


def test_t2_scale_multiplies_by_the_squared_temperature():
    """Hinton-style recipes multiply the soft loss by T^2; fastkd does with t2_scale=True."""
    zs, zt, labels = _inputs()
    plain = _fastkd(zs, zt, labels, divergence="fkl", temperature=2.0)
    torch.testing.assert_close(
        _fastkd(zs, zt, labels, divergence="fkl", temperature=2.0, t2_scale=True), 4.0 * plain
    )
