"""Sampled-token reverse-KL estimators of on-policy distillation, as losses.

Tokens x are sampled from the student q; the teacher p scores them. With the log ratio
r = log p(x) - log q(x) (Schulman, "Approximating KL Divergence", 2020):

    k1 = -r                 unbiased for KL(q || p)
    k2 = r^2 / 2            biased, low variance (exact to second order in r)
    k3 = (e^r - 1) - r      unbiased (E_q[e^r] = 1), never negative

As losses (gradient through log q(x), the sample held fixed, no score-function term):

    grad k1 = grad log q                  E_q[.] = 0: a k1 loss trains nothing
    grad k2 = -r grad log q               E_q[.] = grad KL(q || p), the reverse-KL gradient
    grad k3 = (1 - e^r) grad log q        E_q[.] = -E_p[grad log q] = grad KL(p || q)

``"reward"`` is the policy-gradient form: its value is k1 and its gradient -r grad log q
(r the per-token reward, held constant), the same expectation as k2's.

Plain PyTorch (elementwise on ``[...]`` tensors, any device): no custom op is needed.
"""

from __future__ import annotations

import torch

__all__ = ["ESTIMATORS", "sampled_reverse_kl", "sampled_reverse_kl_reward"]

ESTIMATORS = ("k1", "k2", "k3", "reward")
_REDUCTIONS = ("mean", "sum", "none")


def _check(student_logprobs, teacher_logprobs, mask, estimator, reduction) -> None:
    for name, t in (("student_logprobs", student_logprobs), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor; got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must have the shape "
            f"of student_logprobs {tuple(student_logprobs.shape)}"
        )
    if teacher_logprobs.device != student_logprobs.device:
        raise ValueError(
            f"teacher_logprobs are on {teacher_logprobs.device} but "
            f"student_logprobs on {student_logprobs.device}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor or None; got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != student_logprobs.shape or mask.device != student_logprobs.device:
            raise ValueError(
                f"mask {tuple(mask.shape)} on {mask.device} must match "
                f"student_logprobs {tuple(student_logprobs.shape)} on "
                f"{student_logprobs.device}"
            )
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sampled_reverse_kl_reward(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """The per-token reward r = log p(x) - log q(x) of sampled tokens, detached (float32, or
    float64 for float64 inputs). -r is the k1 estimate of the token's reverse KL."""
    _check(student_logprobs, teacher_logprobs, None, "k1", "none")
    dtype = _compute_dtype(student_logprobs)
    return teacher_logprobs.detach().to(dtype) - student_logprobs.detach().to(dtype)


def sampled_reverse_kl(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    estimator: str = "k3",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """A Monte-Carlo estimate of KL(q || p) from tokens sampled from the student q, as a loss.

    Args:
        student_logprobs: ``[...]`` log q(x) of the sampled tokens, with gradient (e.g. from
            :func:`fastkd.fused_linear_logprobs`).
        teacher_logprobs: ``[...]`` log p(x) of the same tokens (its gradient flows too unless
            detached; ``"reward"`` holds r constant).
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"reward"`` (module docstring: the value
            and the gradient each one gives).
        mask: ``[...]`` bool, True for tokens that count (e.g. completion tokens), or None.
        reduction: ``"mean"`` over counted tokens (0 when none), ``"sum"``, or ``"none"``
            (per token, 0 where masked).

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or ``[...]`` for ``"none"``.
    """
    _check(student_logprobs, teacher_logprobs, mask, estimator, reduction)
    dtype = _compute_dtype(student_logprobs)
    log_q = student_logprobs.to(dtype)
    r = teacher_logprobs.to(dtype) - log_q
    if estimator == "k1":
        per_token = -r
    elif estimator == "k2":
        per_token = 0.5 * r * r
    elif estimator == "k3":
        per_token = torch.expm1(r) - r
    else:  # value -r, gradient -r grad log q
        reward = r.detach()
        per_token = -reward - reward * (log_q - log_q.detach())
    if mask is not None:
        per_token = torch.where(
            mask, per_token, torch.zeros((), dtype=dtype, device=per_token.device)
        )
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = per_token.numel() if mask is None else mask.sum()
    return total / torch.clamp(torch.as_tensor(count, dtype=dtype, device=total.device), min=1)
