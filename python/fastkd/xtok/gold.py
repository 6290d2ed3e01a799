"""GOLD's cross-tokenizer losses on aligned chunks: the chain-rule merge of each side's
next-token distributions inside a chunk, then ULD's sorted L1, or the hybrid of a JSD over the
exactly matched vocabulary and the sorted L1 over the rest.

The rules follow TRL's GOLD trainer (``trl.experimental.gold``, ``ULDLoss``):

* merge ("observed"): a chunk covering positions i..j becomes ``softmax(z_i / T) * prod_{k in
  (i, j]} p_k(x_k)``, the first position's distribution scaled by the probabilities of the
  chunk's actual continuation tokens, each at least 1e-8; the row is left unnormalized (its mass
  is the probability of the continuation);
* ULD on merged rows: the L1 distance between the rows sorted in descending order, the shorter
  zero-padded;
* hybrid: over the tokens both vocabularies hold, a generalized JSD_beta of the merged rows'
  entries (their logs taken at >= 1e-8, as probabilities, no renormalization); over the others,
  the sorted L1; weighted by ``matched_weight`` and ``unmatched_weight``, by default the share
  of the teacher's vocabulary that is matched and the rest (TRL's ``uld_hybrid_matched_weight``
  and ``uld_hybrid_unmatched_weight`` left at None).

Memory: ``gold_loss`` is one autograd function over blocks of rows. The forward computes the
continuation log-probabilities (blocks of positions) and the per-chunk losses (blocks of merged
rows) and keeps only per-token and per-chunk vectors; the backward recomputes each block and
writes the gradient into one ``[B, T, V]`` buffer, the gradient itself. Beyond it and the inputs,
a few ``block_rows x V`` tensors are alive at a time. The same blocks serve
``fused_linear_gold_loss``, which forms each block's rows from hidden states and the lm_head.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..ops._checks import INT64_MAX, check_int, check_num_items
from ..ops._fused_rows import reduce_total
from .chunk_losses import _check_int
from .vocab_map import VocabMap

__all__ = ["gold_loss", "merge_chunk_probs"]

# TRL's floor on each continuation probability in the merge and on probabilities under a log.
PROB_FLOOR = 1e-8
LOG_PROB_FLOOR = math.log(PROB_FLOOR)


def _first_positions(chunk_id: torch.Tensor, width: int) -> torch.Tensor:
    """int64 ``[B, width]``: the first position of each chunk, -1 where the chunk is absent."""
    batch, length = chunk_id.shape
    ids = chunk_id.to(torch.int64)
    pos = torch.arange(length, device=ids.device).expand(batch, length)
    out = torch.full((batch, width + 1), length, dtype=torch.int64, device=ids.device)
    out.scatter_reduce_(1, ids + 1, pos, reduce="amin")
    out = out[:, 1:]
    return torch.where(out == length, -1, out)


def _continuation_logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_id: torch.Tensor,
    first: torch.Tensor,
    temperature: float,
    width: int,
) -> torch.Tensor:
    """``[B, width]``: sum over each chunk's tokens after its first of log max(p_k(x_k), 1e-8)
    at temperature T."""
    work = logits.float() if logits.dtype != torch.float64 else logits
    # At T = 1 the logits themselves: no [B, T, V] copy for autograd to keep.
    scaled = work if temperature == 1.0 else work / temperature
    picked = scaled.gather(-1, targets.clamp(min=0).to(torch.int64).unsqueeze(-1)).squeeze(-1)
    logp = (picked - torch.logsumexp(scaled, dim=-1)).clamp(min=math.log(PROB_FLOOR))
    ids = chunk_id.to(torch.int64)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    is_first = pos == first.gather(1, ids.clamp(min=0))
    keep = (ids >= 0) & ~is_first
    out = logp.new_zeros(ids.shape[0], width)
    return out.scatter_add(1, ids.clamp(min=0), torch.where(keep, logp, 0.0))


def merge_chunk_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_id: torch.Tensor,
    *,
    num_chunks: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GOLD's chain-rule ("observed") merge: one row per chunk.

    Args:
        logits: ``[B, T, V]``; ``logits[b, t]`` is the distribution that scores ``targets[b, t]``.
        targets: integer ``[B, T]``, the tokens (ids in ``[0, V)``).
        chunk_id: integer ``[B, T]`` from ``align_spans`` (of ``targets``' positions), -1 for
            tokens in no chunk.
        num_chunks: width C of the output (default: largest id + 1).
        temperature: T > 0 of the softmax.

    Returns:
        ``[B, C, V]`` float32 (float64 for float64 logits): ``softmax(logits[b, i] / T) *
        prod_{k > i in chunk c} max(p_k(targets[b, k]), 1e-8)``, i the chunk's first position;
        rows of absent chunks are 0. Differentiable.
    """
    width = _width(chunk_id, num_chunks)
    first = _first_positions(chunk_id, width)
    cont = _continuation_logprob(logits, targets, chunk_id, first, temperature, width)
    work = logits.float() if logits.dtype != torch.float64 else logits
    rows = work.gather(1, first.clamp(min=0).unsqueeze(-1).expand(-1, -1, work.shape[-1]))
    merged = torch.softmax(rows / temperature, dim=-1) * cont.exp().unsqueeze(-1)
    return torch.where((first >= 0).unsqueeze(-1), merged, 0.0)


def _width(chunk_id: torch.Tensor, num_chunks: int | None) -> int:
    top = int(chunk_id.max()) + 1 if chunk_id.numel() else 0
    return top if num_chunks is None else max(num_chunks, top)


def _sort_desc(p: torch.Tensor) -> torch.Tensor:
    return p.sort(dim=-1, descending=True).values


class _SortedL1(torch.autograd.Function):
    """Per row, sum |sort(q) - p_sorted|, ``p_sorted`` a row sorted in descending order (no
    gradient; overwritten), the narrower zero-padded. The gradient over q is the sign of each
    sorted difference, put back at q's unsorted positions: it is kept as int8 (a quarter of a
    float32 row) in place of the sort's int64 indices and the differences that autograd would
    keep."""

    @staticmethod
    def forward(ctx, q, p_sorted):
        common = torch.promote_types(q.dtype, p_sorted.dtype)
        need_grad = ctx.needs_input_grad[0]
        # q's sort indices (int64, twice a float32 row) are kept only for the gradient.
        if need_grad:
            qs, order = q.sort(dim=-1, descending=True)
        else:
            qs, order = _sort_desc(q), None
        qs, ps = qs.to(common), p_sorted.to(common)
        # The difference is formed in place in the wider of the two sorted rows: its columns past
        # the narrower width are the difference with zero padding as they stand.
        if qs.shape[-1] >= ps.shape[-1]:
            diff, flip = qs, False
            diff[:, : ps.shape[-1]].sub_(ps)
        else:
            diff, flip = ps, True  # holds sort(p) - sort(q), the negated difference
            diff[:, : qs.shape[-1]].sub_(qs)
        if need_grad:
            head = diff[:, : q.shape[-1]]
            sign = (head > 0).to(torch.int8) - (head < 0).to(torch.int8)
            unsorted = torch.zeros(q.shape, dtype=torch.int8, device=q.device)
            ctx.save_for_backward(unsorted.scatter_(-1, order, sign.neg_() if flip else sign))
            del order, head, sign
        return diff.abs_().sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (sign,) = ctx.saved_tensors
        return sign.to(grad.dtype) * grad.unsqueeze(-1), None


def _jsd_probs(q: torch.Tensor, p: torch.Tensor, beta: float) -> torch.Tensor:
    """Per row, TRL's generalized JSD_beta of probability rows (logs at >= 1e-8): beta = 0 is
    KL(p || q), beta = 1 is KL(q || p), between them beta KL(p || m) + (1 - beta) KL(q || m)
    with log m = logsumexp(log q + log(1 - beta), log p + log beta)."""
    log_q = q.clamp(min=PROB_FLOOR).log()
    log_p = p.clamp(min=PROB_FLOOR).log()

    def kl(log_a, log_b):  # sum exp(log_a) (log_a - log_b), F.kl_div's pointwise rule
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(
        torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0
    )
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def _merged(rows: torch.Tensor, log_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(rows / T) * exp(log_scale)`` per row, no gradient: the merged rows of a block,
    the scale applied in place."""
    probs = torch.softmax(rows if temperature == 1.0 else rows / temperature, dim=-1)
    return probs.mul_(log_scale.exp().unsqueeze(-1))


def _teacher_terms(p: torch.Tensor, split) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the loss reads of the teacher's merged rows, formed before the student's block:
    (the matched columns, or None for ULD; the other columns sorted in descending order, or
    None when the hybrid has no sorted term)."""
    if split is None:
        return None, _sort_desc(p)
    _, t_matched, s_rest, t_rest = split
    # As TRL: no sorted term unless both sides have unmatched tokens.
    rest = _sort_desc(p[:, t_rest]) if s_rest.numel() and t_rest.numel() else None
    return p[:, t_matched], rest


def _rows_loss(q, teacher_terms, split, beta, weights):
    """Per row, GOLD's loss between the student's merged rows ``q`` and the teacher's
    (``_teacher_terms``, no gradient; the sorted part is overwritten): ULD's sorted L1, or the
    hybrid with ``split``."""
    p_matched, p_sorted = teacher_terms
    if split is None:
        return _SortedL1.apply(q, p_sorted)
    s_matched, _, s_rest, _ = split
    matched = _jsd_probs(q[:, s_matched], p_matched, beta)
    rest = q.new_zeros(q.shape[0]) if p_sorted is None else _SortedL1.apply(q[:, s_rest], p_sorted)
    return weights[0] * matched + weights[1] * rest


class _RowRule(NamedTuple):
    """What the loss of a block of merged rows needs besides the rows (``_rows_loss``)."""

    temperature: float
    teacher_temperature: float
    split: tuple | None  # the hybrid's (s_matched, t_matched, s_rest, t_rest) ids, or None: ULD
    beta: float
    weights: tuple[float, float]


class _Side(NamedTuple):
    """One side's positions: each counted chunk's first position, and the counted chunks' later
    positions (their continuation tokens), all int64 on the model's device."""

    first_batch: torch.Tensor  # [R]
    first_pos: torch.Tensor  # [R]
    cont_batch: torch.Tensor  # [M]
    cont_pos: torch.Tensor  # [M]
    cont_row: torch.Tensor  # [M], the counted chunk (row 0..R-1) each belongs to
    cont_targets: torch.Tensor  # [M], the token each predicts


class _Layout(NamedTuple):
    """The counted chunks, in (batch, chunk) order: row r is chunk ``chunk[r]`` of sequence
    ``batch[r]``; ``shape`` is (B, C) of the per-chunk output."""

    batch: torch.Tensor
    chunk: torch.Tensor
    shape: tuple[int, int]
    student: _Side
    teacher: _Side


def _check_options(temperature, teacher_temperature, beta, block_rows, reduction) -> float:
    """Validates the options shared by the GOLD losses; returns the teacher's temperature."""
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    for name, value in (("temperature", temperature), ("teacher_temperature", t_temp)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")
    if not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be an int >= 1; got {block_rows!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    return t_temp


def _check_chunk_ids(name: str, ids: torch.Tensor) -> None:
    if ids.numel() and int(ids.min()) < -1:
        raise ValueError(f"{name} must hold ids >= 0, or -1 outside chunks; got {int(ids.min())}")


def _side(chunk_id, targets, first, row_of, device) -> _Side:
    ids = chunk_id.to(torch.int64)
    slot = ids.clamp(min=0)
    row = torch.where(ids >= 0, row_of.gather(1, slot), -1)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    is_first = pos == first.gather(1, slot)
    first_batch, first_chunk = (row_of >= 0).nonzero(as_tuple=True)
    cont_batch, cont_pos = ((row >= 0) & ~is_first).nonzero(as_tuple=True)
    # Negative ids (-100) read as token 0, as merge_chunk_probs reads them.
    cont_targets = targets.to(device=ids.device, dtype=torch.int64)[cont_batch, cont_pos]
    parts = (
        first_batch,
        first[first_batch, first_chunk],
        cont_batch,
        cont_pos,
        row[cont_batch, cont_pos],
        cont_targets.clamp(min=0),
    )
    return _Side(*(t.to(device) for t in parts))


def _ignored_chunks(chunk_id, targets, ignore_index, shape) -> torch.Tensor:
    """Bool ``shape`` [B, C]: the chunks holding a position whose target is ``ignore_index``."""
    ids = chunk_id.to(torch.int64)
    hit = (targets.to(ids.device) == ignore_index) & (ids >= 0)
    out = torch.zeros(shape[0], shape[1] + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, torch.where(hit, ids + 1, 0), True)
    return out[:, 1:]


def _gold_layout(
    student_chunk_id,
    teacher_chunk_id,
    student_targets,
    teacher_targets,
    chunk_mask,
    device,
    ignore_index: int = -100,
) -> _Layout:
    """The counted chunks (present on both sides, in ``chunk_mask``, and holding no target
    equal to ``ignore_index`` on either side) and their positions."""
    _check_chunk_ids("student_chunk_id", student_chunk_id)
    _check_chunk_ids("teacher_chunk_id", teacher_chunk_id)
    width = max(_width(student_chunk_id, None), _width(teacher_chunk_id, None))
    s_first = _first_positions(student_chunk_id, width)
    t_first = _first_positions(teacher_chunk_id.to(s_first.device), width)
    counted = (s_first >= 0) & (t_first >= 0)
    counted &= ~_ignored_chunks(student_chunk_id, student_targets, ignore_index, counted.shape)
    counted &= ~_ignored_chunks(
        teacher_chunk_id.to(counted.device), teacher_targets, ignore_index, counted.shape
    )
    if chunk_mask is not None:
        if (
            not isinstance(chunk_mask, torch.Tensor)
            or chunk_mask.dtype != torch.bool
            or chunk_mask.dim() != 2
            or chunk_mask.shape[0] != counted.shape[0]
        ):
            raise ValueError(f"chunk_mask must be a bool tensor [B, C] with B = {counted.shape[0]}")
        mask = torch.zeros_like(counted)
        cols = min(width, chunk_mask.shape[1])
        mask[:, :cols] = chunk_mask[:, :cols].to(counted.device)
        counted &= mask
    batch, chunk = counted.nonzero(as_tuple=True)
    row_of = torch.full(counted.shape, -1, dtype=torch.int64, device=counted.device)
    row_of[batch, chunk] = torch.arange(batch.numel(), device=counted.device)
    return _Layout(
        batch.to(device),
        chunk.to(device),
        tuple(counted.shape),
        _side(student_chunk_id, student_targets, s_first, row_of, device),
        _side(teacher_chunk_id.to(s_first.device), teacher_targets, t_first, row_of, device),
    )


def _hybrid_rule(vmap: VocabMap | None, vocab_s: int, vocab_t: int, device, mw, uw):
    """(split, weights) of ``_RowRule``: the hybrid's column sets and weights, or ULD's."""
    if vmap is None:
        return None, (1.0, 1.0)
    vmap.check(vocab_s, vocab_t)
    s_matched = vmap.student_ids.to(device)
    t_matched = vmap.teacher_ids.to(device)
    s_rest = torch.ones(vocab_s, dtype=torch.bool, device=device)
    s_rest[s_matched] = False
    t_rest = torch.ones(vocab_t, dtype=torch.bool, device=device)
    t_rest[t_matched] = False
    if mw is None:
        mw = s_matched.numel() / max(1, vocab_t)
    if uw is None:
        uw = 1.0 - mw
    split = (s_matched, t_matched, s_rest.nonzero().squeeze(1), t_rest.nonzero().squeeze(1))
    return split, (mw, uw)


def _blocks(n: int, block_rows: int):
    return ((lo, min(lo + block_rows, n)) for lo in range(0, n, block_rows))


def _chunk_sums(token_logprob: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``[R]``: per counted chunk, the sum of its continuation log-probabilities, each taken at
    >= log 1e-8 (TRL's floor on each probability)."""
    floored = token_logprob.clamp(min=LOG_PROB_FLOOR)
    return floored.new_zeros(n_rows).index_add(0, row, floored)


_RowsFn = Callable[[int, int], torch.Tensor]


def _row_losses(
    rule: _RowRule, block_rows, student_rows: _RowsFn, teacher_rows: _RowsFn, s_cont, t_cont
):
    """``[R]`` losses of the counted chunks, ``block_rows`` merged rows at a time.
    ``student_rows(lo, hi)`` / ``teacher_rows(lo, hi)``: the logits rows ``[hi - lo, V]`` of
    chunks lo..hi at their first positions; ``s_cont``, ``t_cont``: ``[R]`` continuation
    log-probabilities."""
    out = []
    for lo, hi in _blocks(s_cont.numel(), block_rows):
        # Each side's logits rows are dropped as soon as what the loss reads of them is formed.
        p = _merged(teacher_rows(lo, hi), t_cont[lo:hi], rule.teacher_temperature)
        teacher = _teacher_terms(p, rule.split)
        del p
        q = _merged(student_rows(lo, hi), s_cont[lo:hi], rule.temperature)
        out.append(_rows_loss(q, teacher, rule.split, rule.beta, rule.weights))
    if out:
        return torch.cat(out)
    return s_cont.new_zeros(0, dtype=torch.promote_types(s_cont.dtype, t_cont.dtype))


def _row_loss_grads(
    rule: _RowRule,
    block_rows,
    student_rows: _RowsFn,
    teacher_rows: _RowsFn,
    s_cont,
    t_cont,
    grad_rows,
    put_row_grad: Callable[[int, int, torch.Tensor], None],
) -> torch.Tensor:
    """The backward of ``_row_losses`` block by block: each block's rows are formed again and
    ``put_row_grad(lo, hi, g)`` receives the gradient ``[hi - lo, V]`` over its student rows;
    returns the gradient ``[R]`` over ``s_cont``."""
    grad_cont = torch.empty_like(s_cont)
    temperature = rule.temperature
    for lo, hi in _blocks(s_cont.numel(), block_rows):
        with torch.no_grad():
            p = _merged(teacher_rows(lo, hi), t_cont[lo:hi], rule.teacher_temperature)
            teacher = _teacher_terms(p, rule.split)
            del p
            rows = student_rows(lo, hi)
            probs = torch.softmax(rows if temperature == 1.0 else rows / temperature, dim=-1)
            del rows
        # Autograd from the softmax on: the logits rows need not be kept for it, and the
        # softmax's backward below is the kernel autograd would run.
        probs.requires_grad_()
        cont = s_cont[lo:hi].detach().requires_grad_()
        with torch.enable_grad():
            q = probs * cont.exp().unsqueeze(-1)
            loss = _rows_loss(q, teacher, rule.split, rule.beta, rule.weights)
            del q, teacher
            g_probs, g_cont = torch.autograd.grad(
                loss, (probs, cont), grad_rows[lo:hi].to(loss.dtype)
            )
        del loss
        g_rows = torch._softmax_backward_data(g_probs, probs.detach(), -1, probs.dtype)
        del g_probs, probs
        put_row_grad(lo, hi, g_rows if temperature == 1.0 else g_rows.div_(temperature))
        grad_cont[lo:hi] = g_cont
    return grad_cont


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logit_rows(logits, batch, pos, work, temperature=1.0):
    """``logits[batch, pos]`` as ``work`` (a copy), divided by ``temperature``."""
    rows = logits[batch, pos].to(work)
    return rows if temperature == 1.0 else rows.div_(temperature)


def _target_logprobs(logits, side: _Side, temperature, work, block_rows):
    """(log-prob, log-sum-exp) ``[M]`` of each continuation token at temperature T, from blocks
    of ``block_rows`` rows (no ``[B, T, V]`` temporary)."""
    n = side.cont_batch.numel()
    logprob = torch.empty(n, dtype=work, device=logits.device)
    lse = torch.empty(n, dtype=work, device=logits.device)
    for lo, hi in _blocks(n, block_rows):
        a = _logit_rows(logits, side.cont_batch[lo:hi], side.cont_pos[lo:hi], work, temperature)
        lse[lo:hi] = torch.logsumexp(a, dim=-1)
        logprob[lo:hi] = a.gather(1, side.cont_targets[lo:hi, None])[:, 0] - lse[lo:hi]
    return logprob, lse


def _target_logprob_grads(
    logits, side: _Side, lse, grad_logprob, temperature, work, block_rows, grad
):
    """Writes into ``grad`` ``[B, T, V]`` the gradient of sum(grad_logprob * log-prob) over the
    continuation rows: ``g (onehot(x) - softmax(z / T)) / T``."""
    for lo, hi in _blocks(side.cont_batch.numel(), block_rows):
        batch, pos = side.cont_batch[lo:hi], side.cont_pos[lo:hi]
        g = grad_logprob[lo:hi, None]
        probs = _logit_rows(logits, batch, pos, work, temperature).sub_(lse[lo:hi, None]).exp_()
        rows = probs.mul_(-g).scatter_add_(1, side.cont_targets[lo:hi, None], g)
        if temperature != 1.0:
            rows.div_(temperature)
        grad.index_put_((batch, pos), rows.to(grad.dtype))


class _GoldFromLogits(torch.autograd.Function):
    """``[R]`` GOLD losses of the counted chunks from both models' logits; the gradient reaches
    the student's logits through one ``[B, T, V]`` buffer (see the module's note on memory)."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, layout: _Layout, rule: _RowRule, block_rows: int):
        s_work, t_work = _work_dtype(s_logits.dtype), _work_dtype(t_logits.dtype)
        n_rows = layout.batch.numel()
        s_logprob, s_lse = _target_logprobs(
            s_logits, layout.student, rule.temperature, s_work, block_rows
        )
        t_logprob, _ = _target_logprobs(
            t_logits, layout.teacher, rule.teacher_temperature, t_work, block_rows
        )
        s_cont = _chunk_sums(s_logprob, layout.student.cont_row, n_rows)
        t_cont = _chunk_sums(t_logprob, layout.teacher.cont_row, n_rows)
        losses = _row_losses(
            rule, block_rows, *_logits_row_fns(s_logits, t_logits, layout), s_cont, t_cont
        )
        ctx.layout, ctx.rule, ctx.block_rows = layout, rule, block_rows
        ctx.save_for_backward(s_logits, t_logits, s_logprob, s_lse, s_cont, t_cont)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        s_logits, t_logits, s_logprob, s_lse, s_cont, t_cont = ctx.saved_tensors
        layout, rule, side = ctx.layout, ctx.rule, ctx.layout.student
        # Allocated at the first block's gradient, after that block's temporaries are freed.
        grad = None

        def put_row_grad(lo, hi, g):
            nonlocal grad
            if grad is None:
                grad = s_logits.new_zeros(s_logits.shape)
            grad.index_put_((side.first_batch[lo:hi], side.first_pos[lo:hi]), g.to(grad.dtype))

        grad_cont = _row_loss_grads(
            rule,
            ctx.block_rows,
            *_logits_row_fns(s_logits, t_logits, layout),
            s_cont,
            t_cont,
            grad_rows,
            put_row_grad,
        )
        if grad is None:  # no counted chunk
            grad = s_logits.new_zeros(s_logits.shape)
        # The floor's clamp passes the gradient where log p >= log 1e-8 (torch.clamp's rule).
        grad_logprob = torch.where(s_logprob >= LOG_PROB_FLOOR, grad_cont[side.cont_row], 0.0)
        _target_logprob_grads(
            s_logits,
            side,
            s_lse,
            grad_logprob,
            rule.temperature,
            s_lse.dtype,
            ctx.block_rows,
            grad,
        )
        return grad, None, None, None, None


def _logits_row_fns(s_logits, t_logits, layout: _Layout):
    s_work, t_work = _work_dtype(s_logits.dtype), _work_dtype(t_logits.dtype)
    s, t = layout.student, layout.teacher
    return (
        lambda lo, hi: _logit_rows(s_logits, s.first_batch[lo:hi], s.first_pos[lo:hi], s_work),
        lambda lo, hi: _logit_rows(t_logits, t.first_batch[lo:hi], t.first_pos[lo:hi], t_work),
    )


def _reduce(rows: torch.Tensor, layout: _Layout, reduction: str, num_items_in_batch=None):
    if reduction == "none":
        return rows.new_zeros(layout.shape).index_put((layout.batch, layout.chunk), rows)
    return reduce_total(rows.sum(), rows.numel(), None, reduction, num_items_in_batch)


def check_targets(name: str, targets, chunk_id, vocab: int, ignore_index: int) -> None:
    """Ids in [0, vocab) or equal to ``ignore_index`` wherever the position is in a chunk (any
    value elsewhere)."""
    inside = targets[chunk_id.to(targets.device) >= 0]
    bad = (inside != ignore_index) & ((inside < 0) | (inside >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold ids in [0, {vocab}) or ignore_index={ignore_index} at positions "
            f"in a chunk; got {int(inside[bad][0])} there"
        )


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_targets: torch.Tensor,
    teacher_targets: torch.Tensor,
    student_chunk_id: torch.Tensor,
    teacher_chunk_id: torch.Tensor,
    *,
    chunk_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    vocab_map: VocabMap | None = None,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    block_rows: int = 64,
    reduction: str = "mean",
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """GOLD's cross-tokenizer distillation loss on chunks: each side's distributions merged per
    chunk by the chain rule (``merge_chunk_probs``), then ULD's sorted L1 between the merged
    rows, or with ``vocab_map`` the hybrid: ``matched_weight`` x JSD_beta over the matched
    vocabulary plus ``unmatched_weight`` x sorted L1 over the rest.

    Args:
        student_logits: ``[B, T_s, V_s]``; ``student_logits[b, t]`` scores
            ``student_targets[b, t]``.
        teacher_logits: ``[B, T_t, V_t]``; gets no gradient.
        student_targets, teacher_targets: integer ``[B, T_s]``, ``[B, T_t]``, each side's tokens.
        student_chunk_id, teacher_chunk_id: integer ``[B, T_s]``, ``[B, T_t]`` (``align_spans``
            of the targets' spans), -1 outside chunks.
        chunk_mask: bool ``[B, C]`` of the chunks counted (e.g. the completion's); default:
            every chunk present on both sides.
        temperature: T > 0 of the student's softmax (and the teacher's unless
            ``teacher_temperature``).
        vocab_map: ``vocab_map(student_tokenizer, teacher_tokenizer)``: selects the hybrid.
        beta: the JSD's beta in [0, 1] (hybrid; TRL's GOLD ``beta``, default 0.5).
        matched_weight, unmatched_weight: the hybrid's weights; None: the share of the
            teacher's vocabulary that is matched, and one minus it (TRL's default).
        block_rows: rows per block, merged rows and continuation positions alike (memory: the
            student's gradient ``[B, T_s, V_s]`` plus a few ``block_rows x V`` float32
            tensors; the backward forms each block's rows again).
        reduction: ``"mean"`` over counted chunks (0 when none; divided by
            ``num_items_in_batch`` instead when given), ``"sum"``, or ``"none"`` (``[B, C]``, 0
            at uncounted chunks).
        ignore_index: a target equal to it (labels' -100) leaves its chunk uncounted (a
            prompt's, say); on either side.
        num_items_in_batch: the count the mean divides by (gradient accumulation: the counted
            chunks of the whole step), a number or one-element tensor as in ``kd_loss``.
    """
    s_logits, t_logits = student_logits, teacher_logits.detach()
    for name, x in (("student_logits", s_logits), ("teacher_logits", t_logits)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
            raise TypeError(f"{name} must be a floating-point tensor [B, T, V]")
    for name, ids, like in (
        ("student_targets", student_targets, s_logits),
        ("teacher_targets", teacher_targets, t_logits),
        ("student_chunk_id", student_chunk_id, s_logits),
        ("teacher_chunk_id", teacher_chunk_id, t_logits),
    ):
        _check_int(name, ids, like.shape[:2])
    check_int("ignore_index", ignore_index, -INT64_MAX - 1, INT64_MAX)
    check_num_items(num_items_in_batch)
    check_targets(
        "student_targets", student_targets, student_chunk_id, s_logits.shape[-1], ignore_index
    )
    check_targets(
        "teacher_targets", teacher_targets, teacher_chunk_id, t_logits.shape[-1], ignore_index
    )
    if s_logits.shape[0] != t_logits.shape[0]:
        raise ValueError(
            f"student_logits {tuple(s_logits.shape)} and teacher_logits "
            f"{tuple(t_logits.shape)} must have the same batch size"
        )
    t_temp = _check_options(temperature, teacher_temperature, beta, block_rows, reduction)
    split, weights = _hybrid_rule(
        vocab_map,
        s_logits.shape[-1],
        t_logits.shape[-1],
        s_logits.device,
        matched_weight,
        unmatched_weight,
    )
    layout = _gold_layout(
        student_chunk_id,
        teacher_chunk_id,
        student_targets,
        teacher_targets,
        chunk_mask,
        s_logits.device,
        ignore_index,
    )
    rule = _RowRule(float(temperature), float(t_temp), split, float(beta), weights)
    rows = _GoldFromLogits.apply(s_logits, t_logits, layout, rule, block_rows)
    return _reduce(rows, layout, reduction, num_items_in_batch)
