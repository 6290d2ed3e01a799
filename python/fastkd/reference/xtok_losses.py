"""The cross-tokenizer chunk losses in plain PyTorch, written for reading: one sequence and one
chunk at a time, full probability rows, autograd for the gradients. The tests' oracle for
``fastkd.xtok``'s losses and the benchmark's plain-PyTorch formulation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["alm_reference", "chunk_logprobs_reference", "gold_reference"]


def chunk_logprobs_reference(
    token_logprobs: torch.Tensor, chunk_id: torch.Tensor, width: int
) -> torch.Tensor:
    """``[B, width]``: per chunk, the sum of its tokens' log-probabilities (a loop)."""
    rows = []
    for b in range(token_logprobs.shape[0]):
        rows.append(
            torch.stack([token_logprobs[b][chunk_id[b] == c].sum() for c in range(width)])
            if width
            else token_logprobs.new_zeros(0)
        )
    return torch.stack(rows)


def alm_reference(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float, divergence: str
) -> torch.Tensor:
    """Mean over masked chunks of the binary cross-entropy (or binary KL) of Bernoulli(p)
    against Bernoulli(q), p = exp(t / T), q = exp(s / T), from the probabilities themselves."""
    q = torch.exp(s / temperature)
    p = torch.exp(t / temperature)
    bce = -(p * torch.log(q) + (1 - p) * torch.log(1 - q))
    if divergence == "kl":
        bce = bce + (p * torch.log(p) + torch.xlogy(1 - p, 1 - p))
    return bce[mask].sum() / max(int(mask.sum()), 1)


def _merged_rows(logits, targets, chunk_id, temperature):
    """{chunk: merged probability row} of one sequence, by the chain rule."""
    probs = F.softmax(logits / temperature, dim=-1)
    rows = {}
    for c in sorted(set(chunk_id.tolist()) - {-1}):
        positions = (chunk_id == c).nonzero().squeeze(1).tolist()
        row = probs[positions[0]]
        for k in positions[1:]:
            row = row * probs[k, targets[k]].clamp_min(1e-8)
        rows[c] = row
    return rows


def _sorted_l1(q, p):
    qs, ps = q.sort(descending=True).values, p.sort(descending=True).values
    width = max(len(qs), len(ps))
    return (F.pad(qs, (0, width - len(qs))) - F.pad(ps, (0, width - len(ps)))).abs().sum()


def _jsd(q, p, beta):
    lq, lp = q.clamp_min(1e-8).log(), p.clamp_min(1e-8).log()
    if beta == 0:
        return F.kl_div(lq, lp, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(lp, lq, reduction="sum", log_target=True)
    lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
    return beta * F.kl_div(lm, lp, reduction="sum", log_target=True) + (1 - beta) * F.kl_div(
        lm, lq, reduction="sum", log_target=True
    )


def gold_reference(
    student_logits,
    teacher_logits,
    student_targets,
    teacher_targets,
    student_chunk_id,
    teacher_chunk_id,
    *,
    temperature=1.0,
    teacher_temperature=None,
    matched=None,
    beta=0.5,
    weights=None,
):
    """Mean over chunks present on both sides of GOLD's loss between the merged rows: sorted L1,
    or with ``matched = (student_ids, teacher_ids)`` the hybrid ``weights[0] * JSD_beta`` over
    the matched columns plus ``weights[1] *`` sorted L1 over the others."""
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    losses = []
    for b in range(student_logits.shape[0]):
        s_rows = _merged_rows(
            student_logits[b], student_targets[b], student_chunk_id[b], temperature
        )
        t_rows = _merged_rows(teacher_logits[b], teacher_targets[b], teacher_chunk_id[b], t_temp)
        for c in sorted(set(s_rows) & set(t_rows)):
            q, p = s_rows[c], t_rows[c]
            if matched is None:
                losses.append(_sorted_l1(q, p))
                continue
            s_ids, t_ids = matched
            s_rest = torch.ones(len(q), dtype=torch.bool)
            s_rest[s_ids] = False
            t_rest = torch.ones(len(p), dtype=torch.bool)
            t_rest[t_ids] = False
            loss = weights[0] * _jsd(q[s_ids], p[t_ids], beta)
            if s_rest.any() and t_rest.any():
                loss = loss + weights[1] * _sorted_l1(q[s_rest], p[t_rest])
            losses.append(loss)
    return torch.stack(losses).mean() if losses else student_logits.sum() * 0
