"""Plain-PyTorch kd_loss: the readable definition and the test oracle.

Differentiable by autograd (w.r.t. both models' logits), float64-capable, written for clarity
rather than memory: it materializes log-probabilities of both models. Conventions are those of
``docs/math.md``: ``p = softmax(cap(z_t) / T)``, ``q = softmax(cap(z_s) / T)``; the per-token
loss is summed over the vocabulary; -inf logits are outside the support (0 * log 0 = 0).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "divergence_rows",
    "finish_rows",
    "kd_loss_reference",
    "mask_ignored_rows",
    "nan_rows",
    "nan_where_no_distribution",
    "reduce_rows",
    "reduce_total",
    "xlogy_ratio",
]


def xlogy_ratio(w: torch.Tensor, log_w: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """w * (log_w - log_v) with the term taken as 0 wherever w == 0."""
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    safe = torch.where(w > 0, log_w - log_v, zero)
    return torch.where(w > 0, w * safe, zero)


def _log(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _log_mixture(log_wp: float, lp: torch.Tensor, log_wq: float, lq: torch.Tensor) -> torch.Tensor:
    """log(w_p p + w_q q) by logaddexp, finite where both p and q underflow.

    Where both logs are -inf (no mass in either model) the mixture's log is set to 0: every
    term that uses it there is weighted by p = q = 0, and logaddexp(-inf, -inf) would send NaN
    into the backward pass.
    """
    terms = []
    if log_wp > -math.inf:
        terms.append(lp + log_wp)
    if log_wq > -math.inf:
        terms.append(lq + log_wq)
    if len(terms) == 1:
        return terms[0]
    neg_inf = -math.inf
    empty = (terms[0] == neg_inf) & (terms[1] == neg_inf)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.logaddexp(torch.where(empty, zero, terms[0]), torch.where(empty, zero, terms[1]))


def divergence_rows(
    lp: torch.Tensor, lq: torch.Tensor, divergence: str, *, beta: float = 0.5, alpha: float = 0.1
) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``lp`` and student log-probs ``lq``.

    ``lp``, ``lq``: ``[N, V]`` normalized log-probabilities. Returns ``[N]``.
    """
    p, q = lp.exp(), lq.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "fkl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "rkl"
    if divergence == "fkl":
        return xlogy_ratio(p, lp, lq).sum(-1)
    if divergence == "rkl":
        return xlogy_ratio(q, lq, lp).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "jsd":
        lm = _log_mixture(_log(beta), lp, _log(1.0 - beta), lq)
        return beta * xlogy_ratio(p, lp, lm).sum(-1) + (1 - beta) * xlogy_ratio(q, lq, lm).sum(-1)
    if divergence == "skl":
        lm = _log_mixture(_log(alpha), lp, _log(1.0 - alpha), lq)
        return xlogy_ratio(p, lp, lm).sum(-1)
    if divergence == "srkl":
        lm = _log_mixture(_log(1.0 - alpha), lp, _log(alpha), lq)
        return xlogy_ratio(q, lq, lm).sum(-1)
    if divergence == "hellinger":
        # 1 - sum sqrt(p q), with sqrt(p q) = exp((lp + lq) / 2): 0, and of zero gradient, where
        # either model has no mass.
        return 1.0 - ((lp + lq) / 2).exp().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def reduce_rows(
    rows: torch.Tensor,
    valid: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """Applies a kd_loss reduction to per-row losses ``rows`` (0 at ignored rows).

    ``valid`` marks the rows that count for ``"mean"`` (None: all). A mean over no valid row
    is 0, not NaN, so that a batch of padding contributes nothing.
    """
    if reduction == "none":
        return rows
    return reduce_total(rows.sum(), rows.numel(), valid, reduction, num_items_in_batch)


def reduce_total(
    total: torch.Tensor,
    n_rows: int,
    valid: torch.Tensor | None,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """``"sum"`` or ``"mean"`` of ``n_rows`` per-row losses whose sum is ``total`` (0-dim)."""
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            # A device tensor's value is not checked on the host (a sync): a count that is not
            # > 0 makes the loss NaN rather than negative or infinite.
            count = num_items_in_batch.to(device=total.device, dtype=total.dtype).reshape(())
            return total / torch.where(count > 0, count, torch.nan)
        return total / num_items_in_batch
    count = torch.tensor(n_rows, device=total.device) if valid is None else valid.sum()
    return total / count.clamp(min=1).to(total.dtype)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = False,
    softcap: float | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """kd_loss in plain PyTorch; same arguments and result as ``fastkd.kd_loss``.

    Shapes: logits ``[..., V_s]`` and ``[..., V_t]`` with equal leading shapes; ``labels`` the
    leading shape. Arithmetic runs in ``compute_dtype``, by default the wider of float32 and the
    student's dtype (tests pass the input's low-precision dtype to measure torch's own error).
    """
    lead = student_logits.shape[:-1]
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if compute_dtype is None:
        compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    compute = compute_dtype
    zs = mask_ignored_rows(
        student_logits[..., :vocab].reshape(-1, vocab).to(compute), labels, ignore_index
    )
    zt = mask_ignored_rows(
        teacher_logits[..., :vocab].reshape(-1, vocab).to(compute), labels, ignore_index
    )
    if softcap is not None:
        zs = softcap * torch.tanh(zs / softcap)
        zt = softcap * torch.tanh(zt / softcap)
    a, b = zs / temperature, zt / temperature
    lq = torch.log_softmax(a, dim=-1)
    lp = torch.log_softmax(b, dim=-1)
    soft = divergence_rows(lp, lq, divergence, beta=beta, alpha=alpha)
    rows = (1.0 - hard_weight) * (temperature**2 if t2_scale else 1.0) * soft
    rows = nan_where_no_distribution(rows, a, b)
    return finish_rows(
        rows,
        zs,
        lead,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def mask_ignored_rows(
    z: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """``z`` ``[N, V]`` with the rows of ignored tokens set to 0. Their loss is dropped anyway;
    logits without a softmax there (all -inf, say) would send 0 * NaN into the backward."""
    if labels is None:
        return z
    ignored = (labels.reshape(-1) == ignore_index)[:, None]
    return torch.where(ignored, torch.zeros((), dtype=z.dtype, device=z.device), z)


def nan_where_no_distribution(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-row losses ``rows`` ``[N]``, NaN where the scaled logits ``a`` or ``b`` ``[N, V]``
    of either model have no softmax: a log-sum-exp that is not finite (all -inf, or NaN / +inf
    among them). The formulas above would leave a finite loss there in some divergences, a
    silent wrong answer; plain PyTorch gives NaN. The NaN enters through a term whose gradient
    is NaN in those rows only, so the gradients reaching ``a`` and ``b`` are NaN there as well.
    Callers mask ignored rows first (``mask_ignored_rows``)."""
    undefined = ~(torch.logsumexp(a, -1).isfinite() & torch.logsumexp(b, -1).isfinite())
    return nan_rows(rows, undefined, a, b)


def nan_rows(rows: torch.Tensor, undefined: torch.Tensor, *logits: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[N]`` with NaN where ``undefined`` ``[N]``, entered through a term whose
    gradient with respect to each of ``logits`` ``[N, V]`` is NaN in those rows only."""
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    poison = math.nan * sum(torch.where(undefined[:, None], x, zero).sum(-1) for x in logits)
    return torch.where(undefined, poison, rows)


def finish_rows(
    rows: torch.Tensor,
    student_logits: torch.Tensor,
    lead: torch.Size,
    *,
    labels,
    ignore_index: int,
    hard_weight: float,
    reduction: str,
    num_items_in_batch,
) -> torch.Tensor:
    """Adds ``hard_weight`` CE(student_logits ``[N, V]`` at T = 1, labels) to the weighted soft
    losses ``rows`` ``[N]``, zeroes ignored rows (float32 unless computed in float64) and
    applies the reduction; ``"none"`` comes back in the leading shape ``lead``."""
    valid = None
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if hard_weight > 0:
            target = torch.where(valid, flat, torch.zeros_like(flat))
            log_q = torch.log_softmax(student_logits, dim=-1)
            rows = rows - hard_weight * log_q.gather(-1, target[:, None]).squeeze(-1)
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    rows = rows if rows.dtype == torch.float64 else rows.to(torch.float32)
    out = reduce_rows(rows, valid, reduction, num_items_in_batch)
    return out.reshape(lead) if reduction == "none" else out
