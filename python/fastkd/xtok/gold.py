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

Rows are processed in blocks under activation checkpointing, so no merged ``[rows, V]`` tensor
beyond one block is kept for the backward.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .chunk_losses import _check_int
from .vocab_map import VocabMap

__all__ = ["gold_loss", "merge_chunk_probs"]

# TRL's floor on each continuation probability in the merge and on probabilities under a log.
PROB_FLOOR = 1e-8


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


def _sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row, sum |sort(q) - sort(p)|, both descending, the narrower zero-padded."""
    qs = q.sort(dim=-1, descending=True).values
    ps = p.sort(dim=-1, descending=True).values
    width = max(qs.shape[-1], ps.shape[-1])
    qs = torch.nn.functional.pad(qs, (0, width - qs.shape[-1]))
    ps = torch.nn.functional.pad(ps, (0, width - ps.shape[-1]))
    return (qs - ps).abs().sum(-1)


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


def _rows_loss(
    s_rows, t_rows, s_scale, t_scale, temperature, teacher_temperature, split, beta, weights
):
    q = torch.softmax(s_rows / temperature, dim=-1) * s_scale.exp().unsqueeze(-1)
    p = torch.softmax(t_rows / teacher_temperature, dim=-1) * t_scale.exp().unsqueeze(-1)
    if split is None:
        return _sorted_l1(q, p)
    s_matched, t_matched, s_rest, t_rest = split
    matched = _jsd_probs(q[:, s_matched], p[:, t_matched], beta)
    # As TRL: no sorted term unless both sides have unmatched tokens.
    rest = (
        _sorted_l1(q[:, s_rest], p[:, t_rest])
        if s_rest.numel() and t_rest.numel()
        else q.new_zeros(q.shape[0])
    )
    return weights[0] * matched + weights[1] * rest


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
        block_rows: merged rows per checkpointed block (memory: a few ``block_rows x V``
            float32 tensors).
        reduction: ``"mean"`` over counted chunks (0 when none), ``"sum"``, or ``"none"``
            (``[B, C]``, 0 at uncounted chunks).
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
    for name, ids, vocab in (
        ("student_targets", student_targets, s_logits.shape[-1]),
        ("teacher_targets", teacher_targets, t_logits.shape[-1]),
    ):
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < -100):
            raise ValueError(
                f"{name} must hold ids in [0, {vocab}); got values from "
                f"{int(ids.min())} to {int(ids.max())}"
            )
    if s_logits.shape[0] != t_logits.shape[0]:
        raise ValueError(
            f"student_logits {tuple(s_logits.shape)} and teacher_logits "
            f"{tuple(t_logits.shape)} must have the same batch size"
        )
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
    width = max(_width(student_chunk_id, None), _width(teacher_chunk_id, None))
    s_first = _first_positions(student_chunk_id, width)
    t_first = _first_positions(teacher_chunk_id, width)
    counted = (s_first >= 0) & (t_first >= 0)
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
    split, weights = None, (1.0, 1.0)
    if vocab_map is not None:
        vocab_map.check(s_logits.shape[-1], t_logits.shape[-1])
        split, weights = _hybrid_split(
            vocab_map, s_logits, t_logits, matched_weight, unmatched_weight
        )
    s_cont = _continuation_logprob(
        s_logits, student_targets, student_chunk_id, s_first, temperature, width
    )
    t_cont = _continuation_logprob(
        t_logits, teacher_targets, teacher_chunk_id, t_first, t_temp, width
    )
    b_idx, c_idx = counted.nonzero(as_tuple=True)
    s_pos, t_pos = s_first[b_idx, c_idx], t_first[b_idx, c_idx]
    per_row = []
    for lo in range(0, b_idx.numel(), block_rows):
        hi = min(lo + block_rows, b_idx.numel())
        s_rows = s_logits[b_idx[lo:hi], s_pos[lo:hi]].to(s_cont.dtype)
        t_rows = t_logits[b_idx[lo:hi], t_pos[lo:hi]].to(t_cont.dtype)
        args = (
            s_rows,
            t_rows,
            s_cont[b_idx[lo:hi], c_idx[lo:hi]],
            t_cont[b_idx[lo:hi], c_idx[lo:hi]],
            temperature,
            t_temp,
            split,
            beta,
            weights,
        )
        if torch.is_grad_enabled() and s_rows.requires_grad:
            per_row.append(checkpoint(_rows_loss, *args, use_reentrant=False))
        else:
            per_row.append(_rows_loss(*args))
    rows = torch.cat(per_row) if per_row else s_cont.new_zeros(0)
    if reduction == "none":
        out = s_cont.new_zeros(counted.shape)
        return out.index_put((b_idx, c_idx), rows)
    total = rows.sum()
    return total if reduction == "sum" else total / max(rows.numel(), 1)


def _hybrid_split(vmap: VocabMap, s_logits, t_logits, matched_weight, unmatched_weight):
    device = s_logits.device
    s_matched = vmap.student_ids.to(device)
    t_matched = vmap.teacher_ids.to(device)
    s_rest = torch.ones(s_logits.shape[-1], dtype=torch.bool, device=device)
    s_rest[s_matched] = False
    t_rest = torch.ones(t_logits.shape[-1], dtype=torch.bool, device=device)
    t_rest[t_matched] = False
    if matched_weight is None:
        matched_weight = s_matched.numel() / max(1, t_logits.shape[-1])
    if unmatched_weight is None:
        unmatched_weight = 1.0 - matched_weight
    split = (s_matched, t_matched, s_rest.nonzero().squeeze(1), t_rest.nonzero().squeeze(1))
    return split, (matched_weight, unmatched_weight)
