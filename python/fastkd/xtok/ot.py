"""Optimal transport across tokenizations: per text, the student's positions (one tokenization)
transported onto the teacher's (another) by entropic OT, with the chunk alignment of the two
tokenizations as a prior (MultiLevelOT, Cui et al. 2025, arXiv:2412.14528; CoT2Align).

Per sequence b, with chunk ids c_i (student position i) and c_j (teacher position j) from
``align_spans`` and the counted positions those with a positive marginal weight:

    C_ij = cost(x_i, y_j) + prior_weight * |c_i - c_j| / span_b
    span_b = max(1, largest counted chunk id - smallest), over both sides of sequence b

so positions of the same chunk pay no prior, and the prior is in [0, prior_weight] whatever
the length of the text. The feature cost is bounded so that eps means the same on every
input: ``cosine`` is 1 - cos in [0, 2]; ``sorted_l1`` compares probability rows, in [0, 2];
``l1`` and ``sqeuclidean`` are divided by their largest value over the sequence's counted pairs
(held constant in the gradient), into [0, 1]. ``band`` keeps the transport between chunks at
most ``band`` apart: the solve adds ``BAND_PENALTY_EPS * eps`` plus the in-band cost's bound to
the other pairs, so that each of them costs at least 100 eps more than any pair inside the band
(see ``BAND_PENALTY_EPS``). The loss is <P, C>, P the converged plan (``fastkd.sinkhorn``),
differentiated with P held fixed (dC = P, the envelope gradient of ``sinkhorn_loss``'s
transport value), through the cost into both sides' features and a projection's parameters.
The plain-PyTorch statement is ``reference/xtok_ot.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops._checks import REDUCTIONS, check_num_items
from ..ops._fused_rows import reduce_total
from ..ot.features import pairwise_cost
from ..ot.losses import l1_cost
from ..ot.problem import check_options
from ..ot.solver import sinkhorn
from .chunk_losses import _check_int

__all__ = ["BAND_PENALTY_EPS", "MARGINALS", "XTOK_COSTS", "sorted_topk_probs", "xtok_ot_loss"]

XTOK_COSTS = ("cosine", "sqeuclidean", "l1", "sorted_l1")
MARGINALS = ("positions", "chunks")

# The largest value of each cost on its inputs, the bound the band penalty is added to: 1 - cos
# lies in [0, 2]; the L1 distance of two rows of non-negative entries summing to at most 1 in
# [0, 2]; l1 and sqeuclidean are divided by their largest counted value.
COST_BOUND = {"cosine": 2.0, "sorted_l1": 2.0, "l1": 1.0, "sqeuclidean": 1.0}

# Pairs outside the band cost COST_BOUND + prior_weight + BAND_PENALTY_EPS * eps more in the
# solve, so each costs at least 100 eps more than any pair inside it: at equal potentials its
# plan entry is e^-100 = 3.7e-44 times an in-band one, below float32's smallest normal number.
# Not infinite: the solver's plan and <P, C> need finite costs. Measured on random banded
# problems of 60-130 positions per side (cosine + prior, eps = 0.1, bands 0-20): where the band
# can hold the marginals, under 1e-19 of the mass left it (with 10 eps instead of 100, 2 % did:
# the potentials drift along a band, so a penalty of a few eps is no barrier); where the
# marginals force mass out of it (uniform marginals, a stretch of text with more tokens on one
# side), Sinkhorn lifts the potentials toward the penalty by about eps log(marginal ratio) per
# iteration: with 100 eps the row-marginal error fell to 4e-5 or less within 5000 iterations,
# with a penalty of 3 (N + M) (about 550) it stayed as high as 0.3.
BAND_PENALTY_EPS = 100.0


class _Transport(NamedTuple):
    per_seq: torch.Tensor  # [B] <P, C>, 0 for sequences without counted positions on a side
    plan: torch.Tensor  # [B, N, M] the solved plan (no gradient), 0 where not nonempty
    nonempty: torch.Tensor  # [B] bool: counted positions on both sides


def _check_k(name: str, k) -> None:
    if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1):
        raise ValueError(f"{name} must be None or an int >= 1; got {k!r}")


def sorted_topk_probs(probs: torch.Tensor, k: int | None) -> torch.Tensor:
    """Each row sorted in descending order and cut to its ``k`` largest entries: MultiLevelOT's
    token-level features, which compare distributions over vocabularies of different sizes.

    Args:
        probs: ``[..., V]`` float, e.g. probabilities (``merge_chunk_probs`` rows or softmaxes).
        k: the width of the output; None keeps all ``V``. ``k > V`` pads each row with zeros.

    Returns:
        ``[..., k]`` (``[..., V]`` for None) in ``probs``' dtype, descending along the last
        dimension; differentiable (each kept entry's gradient goes to the entry it came from).
    """
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() < 1:
        raise TypeError(
            f"probs must be a floating-point tensor [..., V]; got "
            f"{getattr(probs, 'dtype', type(probs).__name__)}"
        )
    _check_k("k", k)
    vocab = probs.shape[-1]
    if k is None:
        return probs.sort(dim=-1, descending=True).values
    top = probs.topk(min(k, vocab), dim=-1, largest=True, sorted=True).values
    return F.pad(top, (0, k - top.shape[-1]))


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point; got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, positions, width]; got {tuple(x.shape)}")


def _check_options(cost, projection, topk, prior_weight, band, eps, max_iters, tol, reduction):
    if cost not in XTOK_COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose from {XTOK_COSTS}")
    if projection is not None and not callable(projection):
        raise TypeError(
            f"projection must be callable (e.g. an nn.Linear) or None; got "
            f"{type(projection).__name__}"
        )
    if projection is not None and cost == "sorted_l1":
        raise ValueError(
            "cost='sorted_l1' compares sorted probability rows of any vocabulary sizes and "
            "takes no projection; pass projection=None"
        )
    _check_k("topk", topk)
    if (
        not isinstance(prior_weight, numbers.Real)
        or isinstance(prior_weight, bool)
        or not (0.0 <= float(prior_weight) < math.inf)
    ):
        raise ValueError(f"prior_weight must be a finite number >= 0; got {prior_weight!r}")
    if band is not None and (
        not isinstance(band, numbers.Integral) or isinstance(band, bool) or band < 0
    ):
        raise ValueError(f"band must be None or an int >= 0 (chunks); got {band!r}")
    check_options(eps, max_iters, tol, 1, None)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _marginal_weights(ids, counted, other_ids, other_counted, marginals, dtype):
    """Unnormalized weights ``[B, T]`` of one side and their per-sequence totals ``[B]``:
    1 per counted position ("positions"), or, for "chunks", 1 / (the side's counted positions
    in the chunk) per counted position whose chunk the other side also counts (total: the
    number of shared chunks), so that every shared chunk carries the same mass on both sides.
    Sorted ids and searchsorted count the chunks without a host synchronization."""
    if marginals == "positions":
        w = counted.to(dtype)
        return w, w.sum(1)
    own = torch.where(counted, ids, -1)
    other = torch.where(other_counted, other_ids, -1)
    own_sorted = own.sort(1).values
    other_sorted = other.sort(1).values
    in_chunk = torch.searchsorted(own_sorted, own, right=True) - torch.searchsorted(own_sorted, own)
    at = torch.searchsorted(other_sorted, own).clamp(max=other.shape[1] - 1)
    shared = counted & (other_sorted.gather(1, at) == own)
    w = torch.where(shared, 1.0 / in_chunk.clamp_min(1).to(dtype), 0.0)
    # n copies of 1/n add up to the chunk count up to rounding, which round() removes.
    return w, w.sum(1).round()


def _normalized(w, total, nonempty):
    """w / total, or uniform dummy weights for a problem without counted positions on a side
    (its value is zeroed; an all-zero marginal has no plan)."""
    width = w.shape[1]
    return torch.where(nonempty[:, None], w / total.clamp_min(1)[:, None], 1.0 / width)


def _transport(
    student,
    teacher,
    student_chunk_id,
    teacher_chunk_id,
    *,
    cost,
    projection,
    topk,
    prior_weight,
    band,
    eps,
    max_iters,
    tol,
    marginals,
    backend,
) -> _Transport:
    """The checked inputs' plan and per-sequence value (shapes non-empty)."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s_ids = student_chunk_id.to(torch.int64)
    t_ids = teacher_chunk_id.to(torch.int64)
    s_counted, t_counted = s_ids >= 0, t_ids >= 0
    w_s, total_s = _marginal_weights(s_ids, s_counted, t_ids, t_counted, marginals, dtype)
    w_t, total_t = _marginal_weights(t_ids, t_counted, s_ids, s_counted, marginals, dtype)
    nonempty = (total_s > 0) & (total_t > 0)
    live_s, live_t = w_s > 0, w_t > 0
    inside = live_s[:, :, None] & live_t[:, None, :]

    # Vectors at positions without weight are zeroed before any arithmetic (a projection
    # included): NaN there never leaks, and torch.where sends them an exact zero gradient.
    xs = torch.where(live_s[..., None], student, 0.0)
    xt = torch.where(live_t[..., None], teacher, 0.0).to(dtype)
    if projection is not None:
        xs = projection(xs)
        if not isinstance(xs, torch.Tensor) or tuple(xs.shape) != (*student.shape[:2], xt.shape[2]):
            raise ValueError(
                f"projection must map student [B, N, D_s] = {tuple(student.shape)} to "
                f"[B, N, D_t] = {(*student.shape[:2], xt.shape[2])}; got "
                f"{tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__}"
            )
    xs = xs.to(dtype)
    if cost == "sorted_l1":
        width = topk if topk is not None else max(xs.shape[2], xt.shape[2])
        xs, xt = sorted_topk_probs(xs, width), sorted_topk_probs(xt, width)
    c = l1_cost(xs, xt) if cost in ("l1", "sorted_l1") else pairwise_cost(cost, xs, xt)
    if cost in ("l1", "sqeuclidean"):
        # Held constant in the gradient: through the maximum, the loss would fall by pushing
        # one position far away, which shrinks every other pair's share.
        top = torch.where(inside, c.detach(), 0.0).amax((1, 2))
        c = c / torch.where(top > 0, top, 1.0)[:, None, None]

    solve_cost = c.detach()
    if prior_weight > 0 or band is not None:
        # Ids relative to the sequence's smallest counted one: exact differences in float32
        # below 2^24 chunks.
        big = torch.iinfo(torch.int64).max
        lo = torch.minimum(
            torch.where(live_s, s_ids, big).amin(1), torch.where(live_t, t_ids, big).amin(1)
        )
        lo = torch.where(nonempty, lo, 0)[:, None]
        rs = torch.where(live_s, s_ids - lo, 0).to(dtype)
        rt = torch.where(live_t, t_ids - lo, 0).to(dtype)
        gap = (rs[:, :, None] - rt[:, None, :]).abs()  # [B, N, M] chunks apart
        if prior_weight > 0:
            span = torch.maximum(rs.amax(1), rt.amax(1)).clamp_min(1.0)
            prior = (float(prior_weight) / span)[:, None, None] * gap
            c = c + prior
            solve_cost = solve_cost + prior
        if band is not None:
            penalty = COST_BOUND[cost] + float(prior_weight) + BAND_PENALTY_EPS * float(eps)
            solve_cost = torch.where(inside & (gap > band), solve_cost + penalty, solve_cost)

    plan = sinkhorn(
        solve_cost,
        _normalized(w_s, total_s, nonempty),
        _normalized(w_t, total_t, nonempty),
        eps=eps,
        max_iters=max_iters,
        tol=tol,
        return_plan=True,
        validate=False,
        backend=backend,
    ).plan.to(dtype)
    plan = torch.where(nonempty[:, None, None], plan, 0.0)  # no dummy plans
    per_seq = (plan * c).sum((1, 2))
    return _Transport(per_seq, plan, nonempty)


def xtok_ot_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_chunk_id: torch.Tensor,
    teacher_chunk_id: torch.Tensor,
    *,
    cost: str = "cosine",
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    topk: int | None = 50,
    prior_weight: float = 1.0,
    band: int | None = None,
    eps: float = 0.1,
    max_iters: int = 1000,
    tol: float = 1e-6,
    reduction: str = "mean",
    marginals: str = "positions",
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Optimal transport between the student's and the teacher's positions of each text, which
    the two models tokenize differently, with the chunk alignment as a prior.

    Per sequence b the cost between student position i and teacher position j is

        C_ij = cost(x_i, y_j) + prior_weight * |c_i - c_j| / span_b

    c the chunk ids, span_b = max(1, largest - smallest counted chunk id of sequence b, both
    sides); the loss is <P, C> for the entropic OT plan P between the two sides' marginals
    (converged log-domain Sinkhorn, ``fastkd.sinkhorn``), differentiated with P held fixed
    (dC = P): gradients reach the student, a projection's parameters, and the teacher when it
    requires grad. The ``[B, N, M]`` cost and plan are formed: memory a few B N M floats.
    No host synchronization beyond the solver's.

    Args:
        student: ``[B, N, D_s]`` float: per-position features of the student (hidden states,
            or probability rows for ``sorted_l1``).
        teacher: ``[B, M, D_t]`` float. Detach it unless it should get a gradient.
        student_chunk_id, teacher_chunk_id: integer ``[B, N]``, ``[B, M]``: ``align_spans``'
            chunk ids of those positions; negative (-1) marks a position not counted (zero
            weight; its features are never read, so NaN there does not leak, and get zero
            gradient). To count only a completion, set the others to -1.
        cost: on the features, after the projection: ``"cosine"`` (1 - cos, in [0, 2]),
            ``"sqeuclidean"`` or ``"l1"`` (divided per sequence by their largest value over
            the counted pairs, held constant in the gradient, into [0, 1]); or
            ``"sorted_l1"``: the inputs are probability rows (non-negative, summing to at
            most 1; vocabularies D_s != D_t allowed), each sorted in descending order and cut
            to ``topk`` (MultiLevelOT's token level), then L1 between them, in [0, 2].
        projection: applied to the student's features before a feature cost, mapping D_s to
            D_t (e.g. ``nn.Linear(D_s, D_t)``); required when D_s != D_t. Not with
            ``sorted_l1``.
        topk: ``sorted_l1`` only: the kept width k of every sorted row (rows narrower than k
            are zero-padded); None keeps them whole, zero-padded to max(D_s, D_t).
        prior_weight: >= 0, the weight of the chunk prior, in the units of the cost: pairs in
            the same chunk pay 0, the sequence's two farthest chunks pay ``prior_weight``.
        band: None, or an int >= 0: pairs whose chunk ids differ by more than ``band`` get no
            transport. The solve adds ``2 + prior_weight + 100 eps`` to them (1 instead of 2
            for ``l1``/``sqeuclidean``: the bound of the cost), finite, so the plan leaves the
            band only where the marginals force it; such mass is counted in the loss at its
            ordinary cost C (the penalty is left out of the value). With ``marginals=
            "positions"`` that happens wherever a stretch of text has more tokens on one side
            than the band can match on the other; ``marginals="chunks"`` always fits. A narrow
            band slows the solver, which moves mass along it a few chunks per iteration: on 4
            sequences of 512 x 448 positions over 400 chunks (cosine, eps 0.1, 2-core CPU),
            band 8 ran to max_iters = 1000 (row error 1e-4, 11 s), band 32 converged to tol
            1e-6 in 4 s, band 64 in 1.6 s, no band in 0.2 s.
        eps: entropic regularization > 0, in the units of the cost.
        max_iters, tol: the solver's iteration cap and stopping threshold on the L1 error of
            its row marginal (see ``fastkd.sinkhorn``).
        reduction: ``"mean"`` over the sequences with counted positions on both sides (0 when
            none; divided by ``num_items_in_batch`` instead when given), ``"sum"``, or
            ``"none"`` (``[B]``, 0 for a sequence without them).
        num_items_in_batch: the count the mean divides by (gradient accumulation: the
            sequences of the whole step), a number or one-element tensor as in ``kd_loss``.
        marginals: ``"positions"`` (default): uniform weights over the counted positions of
            each side (``sequence_ot_loss``'s). ``"chunks"``: every chunk counted on both
            sides gets the same mass, split evenly over its counted positions on each side;
            positions of a chunk the other side does not count get no weight. Every band is
            then feasible (same-chunk pairs alone can carry all the mass).
        backend: the solver's backend (see ``fastkd.sinkhorn``; float64 runs on ``torch``).

    Returns:
        A scalar (``[B]`` for ``"none"``): float32 (float64 when an input is float64), in the
        units of the cost times transported mass (1 per sequence).
    """
    _check_features("student", student)
    _check_features("teacher", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have "
            f"the same batch size B"
        )
    if teacher.device != student.device:
        raise ValueError(f"student is on {student.device} but teacher on {teacher.device}")
    for name, ids, x in (
        ("student_chunk_id", student_chunk_id, student),
        ("teacher_chunk_id", teacher_chunk_id, teacher),
    ):
        _check_int(name, ids, x.shape[:2])
        if ids.device != x.device:
            raise ValueError(f"{name} is on {ids.device} but its features on {x.device}")
    _check_options(cost, projection, topk, prior_weight, band, eps, max_iters, tol, reduction)
    check_num_items(num_items_in_batch)
    if marginals not in MARGINALS:
        raise ValueError(f"marginals must be one of {MARGINALS}; got {marginals!r}")
    d_s, d_t = student.shape[2], teacher.shape[2]
    if cost != "sorted_l1" and projection is None and d_s != d_t:
        raise ValueError(
            f"student width D_s = {d_s} and teacher width D_t = {d_t} differ: a feature cost "
            f"compares vectors of one width; pass projection (e.g. nn.Linear({d_s}, {d_t}))"
        )
    batch, n, m = student.shape[0], student.shape[1], teacher.shape[1]
    if batch == 0 or n == 0 or m == 0:
        # Zero with a graph to both sides, their uncounted vectors masked so NaN gives no NaN.
        dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        per_seq = sum(
            torch.where((ids >= 0)[..., None], x, 0.0).to(dtype).sum((1, 2)) * 0.0
            for ids, x in ((student_chunk_id, student), (teacher_chunk_id, teacher))
        )
        nonempty = torch.zeros(batch, dtype=torch.bool, device=student.device)
    else:
        per_seq, _, nonempty = _transport(
            student,
            teacher,
            student_chunk_id,
            teacher_chunk_id,
            cost=cost,
            projection=projection,
            topk=topk,
            prior_weight=prior_weight,
            band=band,
            eps=eps,
            max_iters=max_iters,
            tol=tol,
            marginals=marginals,
            backend=backend,
        )
    if reduction == "none":
        return per_seq
    return reduce_total(per_seq.sum(), per_seq.numel(), nonempty, reduction, num_items_in_batch)
