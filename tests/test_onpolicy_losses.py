"""fastkd.sampled_reverse_kl: values and gradients of the k1/k2/k3/reward estimators by their
formulas, and their expectations over many student samples against the exact divergences,
within the Monte-Carlo standard error (seeded, so the draws are the same on every run)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd

# Per estimator: the token's value and d value / d log q, from r = log p - log q.
FORMULAS = {
    "k1": (lambda r: -r, lambda r: torch.ones_like(r)),
    "k2": (lambda r: r * r / 2, lambda r: -r),
    "k3": (lambda r: torch.expm1(r) - r, lambda r: 1 - r.exp()),
    "reward": (lambda r: -r, lambda r: -r),
}


def logprob_pair(shape=(5, 7), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(*shape, generator=g, dtype=torch.float64) * 4
    teacher = -torch.rand(*shape, generator=g, dtype=torch.float64) * 4
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("estimator", list(FORMULAS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_value_and_gradient_per_token(estimator, dtype):
    student, teacher = logprob_pair(dtype=dtype)
    student = student.requires_grad_()
    loss = fastkd.sampled_reverse_kl(student, teacher, estimator=estimator, reduction="none")
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.sum().backward()
    r = teacher.double() - student.detach().double()
    value, grad = FORMULAS[estimator]
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), value(r), **tol)
    torch.testing.assert_close(student.grad.double(), grad(r).to(dtype).double(), **tol)


@pytest.mark.parametrize("estimator", list(FORMULAS))
def test_mask_and_reductions(estimator):
    student, teacher = logprob_pair(seed=1)
    mask = torch.rand(student.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    per_token = fastkd.sampled_reverse_kl(
        student, teacher, estimator=estimator, mask=mask, reduction="none"
    )
    assert (per_token[~mask] == 0).all()
    total = fastkd.sampled_reverse_kl(
        student, teacher, estimator=estimator, mask=mask, reduction="sum"
    )
    mean = fastkd.sampled_reverse_kl(student, teacher, estimator=estimator, mask=mask)
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(mean, per_token.sum() / mask.sum())
    none_counted = fastkd.sampled_reverse_kl(
        student, teacher, estimator=estimator, mask=torch.zeros_like(mask)
    )
    assert none_counted.item() == 0.0


def test_reward_is_detached_log_ratio():
    student, teacher = logprob_pair(seed=3)
    reward = fastkd.sampled_reverse_kl_reward(student.requires_grad_(), teacher)
    assert not reward.requires_grad
    torch.testing.assert_close(reward, teacher - student.detach())


# A student q and teacher p over 40 tokens, and M samples from q.
VOCAB, SAMPLES = 40, 200_000


def monte_carlo_problem():
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    log_p = F.log_softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64) * 1.5, -1)
    log_q = F.log_softmax(theta, -1)
    draws = torch.multinomial(log_q.exp(), SAMPLES, replacement=True, generator=g)
    return theta, log_q, log_p, draws


def assert_mean_within_se(samples: torch.Tensor, exact: torch.Tensor, n_se: float = 5.0):
    """The sample mean over dim 0 equals ``exact`` within ``n_se`` standard errors (per
    component), and the bound is tight enough to mean something (SE < 5 % of |exact|'s max)."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mean - exact).abs() <= n_se * se + 1e-12).all(), (mean, exact, se)
    assert se.max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("estimator", ["k1", "k3", "reward"])
def test_unbiased_estimators_expectation_is_reverse_kl(estimator):
    _, log_q, log_p, draws = monte_carlo_problem()
    exact = (log_q.exp() * (log_q - log_p)).sum()
    per_token = fastkd.sampled_reverse_kl(
        log_q[draws], log_p[draws], estimator=estimator, reduction="none"
    )
    assert_mean_within_se(per_token[:, None], exact[None])


def test_k2_expectation_is_half_second_moment_not_kl():
    """E_q[k2] = E_q[r^2] / 2, which differs from KL(q || p) at this KL of about 1 nat by far
    more than the standard error: k2 is biased."""
    _, log_q, log_p, draws = monte_carlo_problem()
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum()
    half_second_moment = (q * (log_p - log_q) ** 2).sum() / 2
    per_token = fastkd.sampled_reverse_kl(
        log_q[draws], log_p[draws], estimator="k2", reduction="none"
    )
    assert_mean_within_se(per_token[:, None], half_second_moment[None])
    se = per_token.std() / math.sqrt(SAMPLES)
    assert (per_token.mean() - kl).abs() > 20 * se


def _per_sample_grads(estimator):
    """Per-sample gradients of the estimator's loss w.r.t. the student's logits theta:
    d loss / d log q(x) times d log q(x) / d theta = onehot(x) - q."""
    theta, log_q, log_p, draws = monte_carlo_problem()
    r = log_p[draws] - log_q[draws]
    _, dlogq = FORMULAS[estimator]
    score = F.one_hot(draws, VOCAB).double() - log_q.exp()
    return theta, log_p, dlogq(r)[:, None] * score


@pytest.mark.parametrize(
    "estimator,target",
    [("k2", "reverse"), ("reward", "reverse"), ("k3", "forward"), ("k1", "zero")],
)
def test_gradient_expectations(estimator, target):
    """k2 and the reward form: grad KL(q || p); k3: grad KL(p || q) = q - p; k1: 0."""
    theta, log_p, grads = _per_sample_grads(estimator)
    th = theta.clone().requires_grad_()
    log_q = F.log_softmax(th, -1)
    if target == "reverse":
        (log_q.exp() * (log_q - log_p)).sum().backward()
        exact = th.grad
    elif target == "forward":
        exact = log_q.exp().detach() - log_p.exp()
    else:
        exact = torch.zeros(VOCAB, dtype=torch.float64)
    if target == "zero":  # the SE bound is all there is to compare with
        mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
        assert ((mean - exact).abs() <= 5 * se).all()
        return
    assert_mean_within_se(grads, exact)


def test_loss_gradients_through_autograd_match_formulas():
    """The per-sample gradients used above are the ones autograd gives the losses."""
    theta, log_p, _ = _per_sample_grads("k2")
    draws = monte_carlo_problem()[3][:50]
    for estimator in FORMULAS:
        th = theta.clone().requires_grad_()
        log_q = F.log_softmax(th, -1)
        fastkd.sampled_reverse_kl(
            log_q[draws], log_p[draws], estimator=estimator, reduction="sum"
        ).backward()
        r = log_p[draws] - log_q.detach()[draws]
        score = F.one_hot(draws, VOCAB).double() - log_q.detach().exp()
        expected = (FORMULAS[estimator][1](r)[:, None] * score).sum(0)
        torch.testing.assert_close(th.grad, expected)


def test_with_fused_linear_logprobs():
    """The on-policy loss step: student log-probs of sampled tokens from its lm_head, the
    teacher's from its own, k3 reverse KL; gradients reach the student's head only."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    tokens = torch.randint(0, 11, (6,), generator=g)
    student = fastkd.fused_linear_logprobs(hidden, weight, tokens).logprob
    with torch.no_grad():
        teacher = fastkd.fused_linear_logprobs(t_hidden, t_weight, tokens).logprob
    fastkd.sampled_reverse_kl(student, teacher, estimator="k3").backward()
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lq = F.log_softmax(h @ w.T, -1).gather(1, tokens[:, None])[:, 0]
    lp = F.log_softmax(t_hidden.double() @ t_weight.double().T, -1).gather(1, tokens[:, None])[:, 0]
    (torch.expm1(lp - lq) - (lp - lq)).mean().backward()
    torch.testing.assert_close(hidden.grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


BAD = [
    ({"estimator": "k4"}, ValueError, "estimator must be one of"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"teacher_logprobs": torch.zeros(3)}, ValueError, "must have the shape"),
    ({"teacher_logprobs": torch.zeros(5, 7, dtype=torch.long)}, TypeError, "floating"),
    ({"mask": torch.ones(5, 7)}, TypeError, "mask must be a bool tensor"),
    ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "must match"),
]


@pytest.mark.parametrize("override,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise(override, error, match):
    student, teacher = logprob_pair()
    kw = {"teacher_logprobs": teacher, **override}
    with pytest.raises(error, match=match):
        fastkd.sampled_reverse_kl(student, kw.pop("teacher_logprobs"), **kw)
