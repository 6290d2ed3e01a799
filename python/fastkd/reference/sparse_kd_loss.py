"""Plain-PyTorch sparse_kd_loss: the readable definition and the test oracle.

Differentiable by autograd, float64-capable. With a = z/T over the first V = min(V_s,
targets.vocab_size) columns, log q = log_softmax(a), target weights w_k at ids s_k (padding
slots skipped) and, for ``tail="bucket"`` targets, the teacher's tail mass w_b against the
student's mass outside the ids q_b = sum_{j not in ids} q_j, the soft loss of a token is

    L = sum_k w_k (log w_k - log q_{s_k})  [+ w_b (log w_b - log q_b)],

terms with a zero weight being 0. Equal ids in a row add up: the targets are the distribution
t_j = sum_{k: s_k = j} w_k, and the sum above runs over the distinct ids. log q_b is the
log-sum-exp of log q over the columns outside the ids, so that it stays exact where the ids
hold nearly all of q (1 - sum_k q_k would cancel); where the ids cover all V columns the bucket
term is 0.

``direction="reverse"`` is the reverse KL over the support S = the ids plus the bucket, with the
targets' log-probabilities log p_k (``targets.logprobs``) and tail mass p_b = w_b:

    L = sum_k q_{s_k} (log q_{s_k} - log p_k) + q_b (log q_b - log p_b),

terms with q = 0 being 0 (a term with p = 0 < q is +inf). Equal ids in a row are one id, with the
log-probability of its first slot.

NaN rule (every sparse op follows it): weights and tail masses <= 0 count as 0; a counted token
with a NaN or +inf weight (reverse: log-probability) or tail mass, or an id >= V, gets loss NaN
and gradient NaN; an ignored token stays 0.
"""

from __future__ import annotations

import math

import torch

from ..sparse.targets import SparseTargets
from .kd_loss import finish_rows, mask_ignored_rows, nan_rows, xlogy_ratio

__all__ = ["sparse_kd_loss_reference"]


def _id_columns(ids: torch.Tensor, present: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] bool: the columns named by the non-padding slots (``present``) of ``ids``."""
    # Column V collects the padding slots, so that no scatter writes twice into a real column.
    in_ids = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    in_ids.scatter_(1, torch.where(present, ids, vocab), True)
    return in_ids[:, :vocab]


def _log_outside(lq: torch.Tensor, in_ids: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """log sum_{j not in ids} q_j from log-probs ``lq`` [N, V], -inf where no column outside the
    ids has mass. Rows not in ``use`` (a bucket weight of 0) get 0."""
    has_mass = (~in_ids & (lq > -math.inf)).any(-1)
    live = use & has_mass
    # Other rows take the log-sum-exp of zeros: one over only -inf entries has a NaN gradient.
    zero = torch.zeros((), dtype=lq.dtype, device=lq.device)
    lse = torch.logsumexp(torch.where(live[:, None], lq.masked_fill(in_ids, -math.inf), zero), -1)
    return torch.where(live, lse, torch.where(has_mass, zero, -math.inf))


def _forward_soft(lq, targets, ids, inside, vocab):
    """(soft loss [N], undefined [N]) of the forward direction from log q ``lq`` [N, V]."""
    n, k = ids.shape
    compute = lq.dtype
    zero = torch.zeros((), dtype=compute, device=lq.device)
    nan = torch.full((), math.nan, dtype=compute, device=lq.device)
    w = targets.weights.reshape(n, k).to(compute)
    w = torch.where(inside & (w > 0), w, torch.where(inside & w.isnan(), nan, zero))
    # The target distribution over the V columns: the weights of equal ids add up.
    t = torch.zeros(n, vocab + 1, dtype=compute, device=lq.device).scatter_add_(
        1, torch.where(inside, ids, vocab), w
    )[:, :vocab]
    soft = xlogy_ratio(t, t.log(), lq).sum(-1)
    undefined = (t.isnan() | (t == math.inf)).any(-1)
    if targets.tail_mass is not None:
        in_ids = _id_columns(ids, inside, vocab)
        # Where the ids cover all V columns the bucket is empty and its mass (rounding of
        # 1 - sum_k w_k, or teacher mass past V) is dropped, as kd_loss drops columns past V.
        w_b = targets.tail_mass.reshape(-1).to(compute)
        w_b = torch.where(in_ids.all(-1) | (w_b <= 0), zero, w_b)
        undefined = undefined | w_b.isnan() | (w_b == math.inf)
        w_b = torch.where(w_b.isfinite(), w_b, zero)
        soft = soft + xlogy_ratio(w_b, w_b.log(), _log_outside(lq, in_ids, w_b > 0))
    return soft, undefined


def _first_slots(ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[N, K] bool: the present slots whose id no earlier slot of the row holds."""
    k = ids.shape[1]
    same = (ids[:, :, None] == ids[:, None, :]) & present[:, None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    return present & ~(same & earlier).any(-1)


def _reverse_soft(lq, targets, ids, inside, in_ids):
    """(soft loss [N], undefined [N]) of the reverse direction from log q ``lq`` [N, V]."""
    n, k = ids.shape
    compute = lq.dtype
    zero = torch.zeros((), dtype=compute, device=lq.device)
    first = _first_slots(ids, inside)
    lp = targets.logprobs.reshape(n, k).to(compute)
    lq_ids = lq.gather(1, torch.where(first, ids, 0))
    # q log(q / p) with q = 0 terms 0 and p = 0 < q terms +inf; NaN or +inf log p: undefined.
    lp_ok = torch.where(first & (lp < math.inf), lp, zero)
    q_ids = torch.where(first, lq_ids.exp(), zero)
    soft = xlogy_ratio(q_ids, lq_ids, lp_ok).sum(-1)
    undefined = (first & ~(lp < math.inf)).any(-1)
    # The bucket: q_b = sum over the columns outside the ids against p_b = tail mass (<= 0: 0),
    # empty (and its mass dropped) where the ids cover all V columns.
    p_b = targets.tail_mass.reshape(-1).to(compute)
    empty = in_ids.all(-1)
    undefined = undefined | (~empty & ~(p_b < math.inf))
    p_b = torch.where(empty | ~(p_b > 0) | ~(p_b < math.inf), zero, p_b)
    lq_b = _log_outside(lq, in_ids, ~empty)
    q_b = torch.where(empty, zero, lq_b.exp())
    log_p_b = torch.where(p_b > 0, p_b.log(), -math.inf)
    soft = soft + xlogy_ratio(q_b, lq_b, log_p_b)
    return soft, undefined


def sparse_kd_loss_reference(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    direction: str = "forward",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sparse_kd_loss in plain PyTorch; same arguments and result as ``fastkd.sparse_kd_loss``.

    Shapes: logits ``[..., V_s]``; ``targets`` of the same leading shape; ``labels`` the leading
    shape. Arithmetic runs in ``compute_dtype``, by default the wider of float32 and the
    student's dtype (tests pass the input's low-precision dtype to measure torch's own error).
    ``direction="reverse"`` needs ``targets.logprobs`` and ``tail="bucket"`` targets.
    """
    lead = student_logits.shape[:-1]
    vocab = min(student_logits.shape[-1], targets.vocab_size)
    compute = compute_dtype or (
        torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    )
    z = mask_ignored_rows(
        student_logits[..., :vocab].reshape(-1, vocab).to(compute), labels, ignore_index
    )
    a = z / temperature
    lq = torch.log_softmax(a, dim=-1)
    n, k = z.shape[0], targets.num_slots
    ids = targets.ids.reshape(n, k).to(torch.int64)
    present = ids >= 0
    inside = present & (ids < vocab)
    undefined = (present & (ids >= vocab)).any(-1)
    if direction == "reverse":
        in_ids = _id_columns(ids, inside, vocab)
        soft, bad_targets = _reverse_soft(lq, targets, ids, inside, in_ids)
        undefined = undefined | bad_targets
    else:
        soft, bad_targets = _forward_soft(lq, targets, ids, inside, vocab)
        undefined = undefined | bad_targets
    if labels is not None:
        undefined = undefined & (labels.reshape(-1) != ignore_index)
    rows = (1.0 - hard_weight) * (temperature**2 if t2_scale else 1.0) * soft
    rows = nan_rows(rows, undefined, a)
    return finish_rows(
        rows,
        z,
        lead,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )
