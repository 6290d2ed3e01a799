"""sample_teacher in plain PyTorch: the same counter-based draws as the native kernels, with the
softmax and its cumulative sums in float64. The test oracle of ``fastkd.sample_teacher``.

Randomness: Philox4x32-10 (Salmon et al., SC 2011) keyed by the seed, with counter
(token lo, token hi, draw // 4, 0); draw j of a token takes word j % 4 and turns it into a
uniform u = ((w >> 8) + 1/2) 2^-24 in (0, 1), then E_j = -log u (log in float32, as the kernels
take it). For N draws, E_0 .. E_N give N sorted uniforms C_k / C_N (C the cumulative sums), and
draw k picks the first id whose cumulative probability exceeds C_k / C_N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["philox4x32_10", "sample_teacher_reference", "token_uniforms"]

_MASK = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for 32-bit values held in int64 (16-bit limbs keep
    every partial product below 2^63)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (lo_lo >> 16)  # < 2^34
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = a_hi * b_hi + (mid >> 16)
    return hi & _MASK, lo & _MASK


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of four int64 tensors of 32-bit counter words under a 64-bit key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], c0)
        hi1, lo1 = _mulhilo(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK, (k1 + _WEYL[1]) & _MASK
    return [c0, c1, c2, c3]


def token_uniforms(seed: int, tokens: torch.Tensor, n_draws: int) -> torch.Tensor:
    """``[len(tokens), n_draws]`` float32 uniforms in (0, 1) of the given global token indices."""
    tokens = tokens.to(torch.int64)[:, None]
    draws = torch.arange(n_draws, dtype=torch.int64, device=tokens.device)[None, :]
    zero = torch.zeros_like(tokens + draws)
    counter = ((tokens & _MASK) + zero, (tokens >> 32) + zero, (draws >> 2) + zero, zero)
    words = torch.stack(philox4x32_10(counter, (seed & _MASK, (seed >> 32) & _MASK)), -1)
    word = words.gather(-1, (draws & 3).expand_as(zero)[..., None])[..., 0]
    return ((word >> 8).to(torch.float32) + 0.5) * 2.0**-24


def sample_teacher_reference(teacher_logits: torch.Tensor, *, num_samples: int = 50,
                             temperature: float = 1.0, seed: int = 0, token_offset: int = 0,
                             return_logprobs: bool = False):
    """Random-sampling targets of ``teacher_logits [..., V]``: ``(ids, weights, logprobs)``, each
    ``[..., N]`` (ids int32 ascending then -1; weights float32; logprobs float32 or None)."""
    lead, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    z = teacher_logits.reshape(-1, vocab).to(torch.float64)
    rows, device = z.shape[0], z.device
    log_r = torch.log_softmax(z / temperature, -1)
    log_p = torch.log_softmax(z, -1)
    valid = torch.isfinite(log_r).any(-1)
    tokens = token_offset + torch.arange(rows, device=device)
    exps = -torch.log(token_uniforms(seed, tokens, num_samples + 1)).to(torch.float64)
    cumulative = exps.cumsum(-1)
    sorted_uniforms = cumulative[:, :num_samples] / cumulative[:, num_samples:]
    cdf = log_r.exp().cumsum(-1)
    picks = torch.searchsorted(cdf, sorted_uniforms * cdf[:, -1:], right=True).clamp_max(vocab - 1)
    counts = torch.zeros(rows, vocab, dtype=torch.int64, device=device)
    counts.scatter_add_(1, picks, torch.ones_like(picks))
    counts[~valid] = 0
    # Distinct ids ascending: sort the columns by (no count, id).
    order = torch.argsort((counts == 0).to(torch.int64) * vocab
                          + torch.arange(vocab, device=device), dim=-1)[:, :num_samples]
    kept = counts.gather(1, order)
    ids = torch.where(kept > 0, order, -1).to(torch.int32)
    weights = kept.to(torch.float32) / num_samples
    lp = log_p.gather(1, order)
    if temperature != 1.0:
        weights = (weights.double() * (lp - log_r.gather(1, order)).exp()).to(torch.float32)
    weights = torch.where(kept > 0, weights, 0.0)
    logprobs = torch.where(kept > 0, lp, 0.0).to(torch.float32) if return_logprobs else None
    # Fewer ids than draws (V < N): pad the slots up to N.
    pad = (0, num_samples - ids.shape[1])
    ids, weights = F.pad(ids, pad, value=-1), F.pad(weights, pad)
    logprobs = None if logprobs is None else F.pad(logprobs, pad)
    shape = (*lead, num_samples)
    return (ids.reshape(shape), weights.reshape(shape),
            None if logprobs is None else logprobs.reshape(shape))
