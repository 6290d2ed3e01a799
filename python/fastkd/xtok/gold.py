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

This module holds ``merge_chunk_probs`` and ``gold_loss`` with its autograd function; the
counted chunks and their positions are laid out in ``_gold_chunks.py``, and the loss of a block
of merged rows, forward and backward, is computed in ``_gold_rows.py``.
"""

from __future__ import annotations

import math

import torch

from ..ops._checks import INT64_MAX, check_int, check_num_items
from ..ops._fused_rows import reduce_total
from ._gold_chunks import _first_positions, _gold_layout, _Layout, _Side, _width
from ._gold_rows import (
    LOG_PROB_FLOOR,
    PROB_FLOOR,
    _blocks,
    _chunk_sums,
    _hybrid_rule,
    _row_loss_grads,
    _row_losses,
    _RowRule,
)
from .chunk_losses import _check_int
from .vocab_map import VocabMap

__all__ = ["gold_loss", "merge_chunk_probs"]


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
