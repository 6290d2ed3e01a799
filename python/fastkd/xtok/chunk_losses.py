"""Chunk log-likelihoods and ALM, approximate likelihood matching (Minixhofer et al., 2025).

``chunk_logprobs`` sums each model's per-token log-probabilities of its own tokens over each
chunk of ``align_spans``: with chunks holding the same bytes on both sides, a chunk's summed
log-probability is each model's log-likelihood of those bytes given the same preceding text.
It takes per-token log-probabilities ``[B, T]``, so any producer fits (``token_logprobs`` here,
from full logits; a fused lm_head kernel that never forms the logits).
``alm_loss`` compares the two chunk likelihoods as Bernoulli probabilities.
"""

from __future__ import annotations

import math

import torch

from ..ops._checks import check_num_items
from ..ops._fused_rows import reduce_total

__all__ = ["alm_loss", "chunk_logprobs", "chunk_mask", "token_logprobs"]

# Chunk log-likelihoods enter log(1 - q) no higher than this: a chunk the student is certain of
# (q = 1) would give log 0; at -1e-6, log(1 - q) = log(1e-6) = -13.8, a finite bound.
_MAX_LOG_Q = -1e-6


def _check_int(name: str, x, shape=None) -> None:
    if (
        not isinstance(x, torch.Tensor)
        or x.dtype.is_floating_point
        or x.dtype.is_complex
        or x.dtype == torch.bool
    ):
        raise TypeError(
            f"{name} must be an integer tensor; got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32 (float64 for float64 logits).

    ``logits[b, t]`` scores ``targets[b, t]``: for a causal LM pass ``logits[:, :-1]`` and
    ``input_ids[:, 1:]`` (and the chunk ids of ``input_ids[:, 1:]``). Computed as the target's
    logit minus the log-sum-exp of the row, without a ``[B, T, V]`` log-softmax copy.

    Args:
        logits: ``[..., V]`` floating point.
        targets: integer tensor of the leading shape, ids in ``[0, V)``; a negative id (e.g.
            -100) gives 0.

    Returns:
        ``[...]`` log-probabilities (nats), differentiable w.r.t. ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor [..., V]")
    _check_int("targets", targets, logits.shape[:-1])
    vocab = logits.shape[-1]
    if targets.numel() and int(targets.max()) >= vocab:
        raise ValueError(f"targets hold id {int(targets.max())} but logits have {vocab} columns")
    work = logits if logits.dtype == torch.float64 else logits.float()
    safe = targets.clamp(min=0).to(torch.int64).unsqueeze(-1)
    picked = work.gather(-1, safe).squeeze(-1) - torch.logsumexp(work, dim=-1)
    return torch.where(targets >= 0, picked, 0.0)


def chunk_mask(
    chunk_id: torch.Tensor, num_chunks: torch.Tensor | None = None, width: int | None = None
) -> torch.Tensor:
    """Bool ``[B, C]``: which chunk slots exist (``c < num_chunks[b]``; without ``num_chunks``,
    the ids present in ``chunk_id``)."""
    if width is None:
        width = int(chunk_id.max()) + 1 if chunk_id.numel() else 0
    if num_chunks is not None:
        return torch.arange(width, device=chunk_id.device) < num_chunks.to(chunk_id.device)[:, None]
    present = torch.zeros(chunk_id.shape[0], width + 1, dtype=torch.bool, device=chunk_id.device)
    present.scatter_(1, (chunk_id.to(torch.int64) + 1).clamp(min=0), True)
    return present[:, 1:]


def chunk_logprobs(
    token_logprobs: torch.Tensor, chunk_id: torch.Tensor, *, num_chunks: int | None = None
) -> torch.Tensor:
    """Per chunk, the sum of the per-token log-probabilities of the tokens in it.

    Args:
        token_logprobs: floating ``[B, T]``, each token's log-probability under its own model
            (``token_logprobs``, or a fused lm_head kernel's).
        chunk_id: integer ``[B, T]`` (``align_spans``), -1 for tokens in no chunk.
        num_chunks: width C of the output (default: the largest id + 1).

    Returns:
        ``[B, C]`` in ``token_logprobs``' dtype; 0 at slots holding no token (mask them with
        ``chunk_mask``). Differentiable (a segment sum: each token's gradient is its chunk's).
    """
    if (
        not isinstance(token_logprobs, torch.Tensor)
        or not token_logprobs.is_floating_point()
        or token_logprobs.dim() != 2
    ):
        raise TypeError(
            "token_logprobs must be a floating-point tensor [B, T]; got "
            f"{getattr(token_logprobs, 'shape', type(token_logprobs).__name__)}"
        )
    _check_int("chunk_id", chunk_id, token_logprobs.shape)
    ids = chunk_id.to(device=token_logprobs.device, dtype=torch.int64)
    # One host sync for both bounds (on a GPU each int() waits for the device).
    low, top = torch.stack(torch.aminmax(ids)).tolist() if ids.numel() else (-1, -1)
    width = top + 1 if num_chunks is None else num_chunks
    if low < -1 or top >= width:
        raise ValueError(
            f"chunk_id must lie in [-1, {width - 1}] (num_chunks={width}); got "
            f"values from {low} to {top}"
        )
    live = ids >= 0
    values = torch.where(live, token_logprobs, 0.0)
    out = token_logprobs.new_zeros(token_logprobs.shape[0], width)
    return out.scatter_add(1, ids.clamp(min=0), values)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def alm_loss(
    student_chunk_logprobs: torch.Tensor,
    teacher_chunk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    divergence: str = "bce",
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """ALM: the binarised f-divergence between teacher and student chunk likelihoods.

    Per chunk, with q = exp(s / T) and p = exp(t / T) the student's and teacher's likelihoods of
    the chunk's bytes (s, t the chunk log-probabilities):

        bce:  -(p log q + (1 - p) log(1 - q))
        kl:   p log(p / q) + (1 - p) log((1 - p) / (1 - q))  (= bce minus the binary entropy)

    At q = p the gradient is 0; ``bce`` is then the binary entropy of p. log(1 - q) is taken at
    min(s / T, -1e-6) so a chunk the student is certain of stays finite.

    Args:
        student_chunk_logprobs: ``[B, C]`` floating (``chunk_logprobs`` of the student),
            log-probabilities <= 0.
        teacher_chunk_logprobs: ``[B, C]``, the teacher's; gets no gradient here (detached).
        mask: bool ``[B, C]`` of the chunks counted (``chunk_mask``, or the completion's
            chunks); None counts every slot.
        temperature: T > 0 dividing both log-likelihoods.
        divergence: ``"bce"`` (default) or ``"kl"``.
        num_items_in_batch: the count the mean divides by instead of the counted chunks
            (gradient accumulation), a number or one-element tensor as in ``kd_loss``.
        reduction: ``"mean"`` over counted chunks (0 when none), ``"sum"`` or ``"none"``
            (``[B, C]``, 0 at uncounted chunks).
    """
    s, t = student_chunk_logprobs, teacher_chunk_logprobs
    if (
        not isinstance(s, torch.Tensor)
        or not isinstance(t, torch.Tensor)
        or not s.is_floating_point()
        or not t.is_floating_point()
    ):
        raise TypeError(
            "student_chunk_logprobs and teacher_chunk_logprobs must be floating-point tensors"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"student_chunk_logprobs {tuple(s.shape)} and teacher_chunk_logprobs "
            f"{tuple(t.shape)} must have the same shape"
        )
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if divergence not in ("bce", "kl"):
        raise ValueError(f"divergence must be 'bce' or 'kl'; got {divergence!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    check_num_items(num_items_in_batch)
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != s.shape
    ):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(s.shape)}")
    work = torch.promote_types(s.dtype, torch.float32)
    log_q = s.to(work) / temperature
    log_p = t.detach().to(work) / temperature
    p = log_p.exp()
    one_minus_p = -torch.expm1(log_p)
    log_1mq = _log1mexp(log_q.clamp(max=_MAX_LOG_Q))
    loss = -(p * log_q + one_minus_p * log_1mq)
    if divergence == "kl":
        entropy = -(p * log_p + torch.xlogy(one_minus_p, one_minus_p))
        loss = loss - entropy
    if mask is not None:
        loss = torch.where(mask, loss, 0.0)
    if reduction == "none":
        return loss
    return reduce_total(loss.sum(), loss.numel(), mask, reduction, num_items_in_batch)
