"""Plain-PyTorch statements of fused_linear_logprobs and fused_linear_topk on whole logits.

Both read the tempered logits a = logit_scale * (x W^T + b) / T of a row.

- log-prob at the target t: ``a_t - lse(a)``; log-sum-exp ``lse(a)``; entropy
  ``H = -sum_j p_j log p_j`` with p = softmax(a) (terms with p_j = 0 are 0). A target equal to
  ``ignore_index`` gives 0 for all three.
- top-k: the k largest a_j in decreasing order, their log-probs ``a_j - lse(a)``, and the log of
  the mass outside them, ``lse(a over the other columns) - lse(a)`` (-inf where k = V).
"""

from __future__ import annotations

import math

import torch

from .fused_linear_kd_loss import linear_logits

__all__ = [
    "fused_linear_logprobs_reference",
    "fused_linear_topk_reference",
    "token_logprobs_reference",
    "topk_tail_reference",
]


def _compute(logits: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision logits (the fused ops' accuracy), float64 kept as it is."""
    return logits if logits.dtype == torch.float64 else logits.float()


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
):
    """``(logprob, lse, entropy or None)``, each of the leading shape ``[...]`` of ``logits``
    ``[..., V]``; ``targets`` ``[...]`` integer ids in [0, V) or ``ignore_index``."""
    a = _compute(logits) / temperature
    lse = torch.logsumexp(a, -1)
    ignored = targets == ignore_index
    index = torch.where(ignored, 0, targets).to(torch.int64)[..., None]
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    logprob = torch.where(ignored, zero, a.gather(-1, index)[..., 0] - lse)
    lse_out = torch.where(ignored, zero, lse)
    entropy = None
    if with_entropy:
        log_p = a - lse[..., None]
        p = log_p.exp()
        # p log p = 0 where p = 0; log p is replaced there (not the product), so that the
        # gradient through the unselected -inf is 0, not 0 * -inf.
        plogp = p * torch.where(p == 0, zero, log_p)
        entropy = torch.where(ignored, zero, -plogp.sum(-1))
    return logprob, lse_out, entropy


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    **kwargs,
):
    """``token_logprobs_reference`` of the whole logits ``logit_scale * (hidden W^T + bias)``
    computed in ``compute_dtype`` (default: the inputs' dtype)."""
    logits = linear_logits(hidden, weight, bias, logit_scale, compute_dtype)
    return token_logprobs_reference(logits, targets, **kwargs)


def topk_tail_reference(logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """``(ids [..., k] int64, logprobs [..., k], log_tail [...], lse [...])`` of logits
    ``[..., V]``: the tail as a log-sum-exp over the columns outside the top k."""
    a = _compute(logits) / temperature
    lse = torch.logsumexp(a, -1)
    values, ids = torch.topk(a, k, dim=-1)
    rest = a.scatter(-1, ids, -math.inf)
    log_tail = torch.logsumexp(rest, -1) - lse
    return ids, values - lse[..., None], log_tail, lse


def fused_linear_topk_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
):
    """``topk_tail_reference`` of the whole logits ``logit_scale * (hidden W^T + bias)``."""
    logits = linear_logits(hidden, weight, bias, logit_scale, compute_dtype)
    return topk_tail_reference(logits, k, temperature=temperature)
