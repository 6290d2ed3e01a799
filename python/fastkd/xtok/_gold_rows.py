"""GOLD's loss on blocks of merged rows, which ``gold_loss`` and ``fused_linear_gold_loss``
share: the merge of a block of first-position rows by their continuation log-probabilities,
ULD's sorted L1 (``_SortedL1``), the hybrid's JSD over the matched vocabulary (``_jsd_probs``)
with its column split and weights (``_hybrid_rule``), and the forward and backward over blocks
of counted chunks (``_row_losses``, ``_row_loss_grads``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .vocab_map import VocabMap

# TRL's floor on each continuation probability in the merge and on probabilities under a log.
PROB_FLOOR = 1e-8
LOG_PROB_FLOOR = math.log(PROB_FLOOR)


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
