"""sample_teacher in plain PyTorch: the same counter-based draws as the native kernels, with the
softmax and its cumulative sums in float64. The test oracle of ``fastkd.sample_teacher``.

Randomness: Philox4x32-10 (Salmon et al., SC 2011) keyed by the seed, with counter
(token lo, token hi, draw // 4, 0); draw j of a token takes word j % 4 and turns it into a
uniform u = ((w >> 8) + 1/2) 2^-24 in (0, 1), then E_j = -log u (log in float32, as the kernels
take it). For N draws, E_0 .. E_N give N sorted uniforms C_k / C_N (C the cumulative sums), and
draw k picks the first id whose cumulative probability exceeds C_k / C_N.

Priority sampling (``priority_sample_reference``) takes one uniform per (token, vocabulary id)
from the same generator on stream 1 (counter word 3), so a token's priorities depend only on
(seed, global token index, id).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "philox4x32_10",
    "priority_sample_reference",
    "sample_teacher_reference",
    "token_uniforms",
]

_MASK = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
# (row, id) pairs per chunk of rows of priority sampling (at least one row). On CPU the chunk's
# Philox words stay in tensors of about 64 kB, small enough for the allocator to reuse (larger
# ones are fresh mmaps whose page faults made the generator several times slower); on a GPU,
# whose caching allocator reuses blocks of any size, chunks of 2^22 pairs (32 MB per float64
# temporary) keep the number of kernel launches per row small.
_PRIORITY_CHUNK = {"cpu": 1 << 15, "cuda": 1 << 22}
_PRIORITY_STREAM = 1


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for 32-bit values held in int64: with b = b1 2^16 + b0,
    a b = m 2^16 + (a b0 mod 2^16) where m = a b1 + (a b0 >> 16) < 2^49 (no int64 overflow)."""
    low = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


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


def token_uniforms(seed: int, tokens: torch.Tensor, n_draws: int, stream: int = 0) -> torch.Tensor:
    """``[len(tokens), n_draws]`` float32 uniforms in (0, 1) of the given global token indices.

    Draw j of a token is word j % 4 of Philox at counter (token lo, token hi, j // 4, stream):
    one Philox call serves four consecutive draws. ``stream`` 0 feeds ``"random"``, 1 the
    per-id priorities of ``"priority"``, so the two methods never share uniforms.
    """
    tokens = tokens.to(torch.int64)[:, None]
    blocks = torch.arange((n_draws + 3) // 4, dtype=torch.int64, device=tokens.device)[None, :]
    zero = torch.zeros_like(tokens + blocks)
    counter = ((tokens & _MASK) + zero, (tokens >> 32) + zero, blocks + zero, zero + stream)
    words = torch.stack(philox4x32_10(counter, (seed & _MASK, (seed >> 32) & _MASK)), -1)
    word = words.reshape(tokens.shape[0], -1)[:, :n_draws]
    return ((word >> 8).to(torch.float32) + 0.5) * 2.0**-24


def sample_teacher_reference(
    teacher_logits: torch.Tensor,
    *,
    num_samples: int = 50,
    temperature: float = 1.0,
    seed: int = 0,
    token_offset: int = 0,
    return_logprobs: bool = False,
):
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
    order = torch.argsort(
        (counts == 0).to(torch.int64) * vocab + torch.arange(vocab, device=device), dim=-1
    )[:, :num_samples]
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
    return (
        ids.reshape(shape),
        weights.reshape(shape),
        None if logprobs is None else logprobs.reshape(shape),
    )


def _top_keys(key: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, keys)`` ``[rows, n]`` of the n largest keys of each row of ``key [rows, V]``, best
    first, equal keys ranked by id (smaller first) also where they straddle the cut, as the
    native kernel ranks them (``torch.topk`` leaves that choice open)."""
    cut = torch.topk(key, n, dim=-1).values[:, -1:]
    above = key > cut
    at_cut = key == cut
    room = n - above.sum(-1, keepdim=True)
    chosen = above | (at_cut & (at_cut.cumsum(-1) <= room))
    ids = chosen.nonzero()[:, 1].view(key.shape[0], n)  # ascending per row
    order = torch.sort(key.gather(1, ids), dim=-1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    return ids, key.gather(1, ids)


def priority_sample_reference(
    teacher_logits: torch.Tensor,
    *,
    k: int,
    seed: int = 0,
    token_offset: int = 0,
    return_logprobs: bool = False,
):
    """Priority-sampling targets (Duffield, Lund & Thorup, JACM 2007) of ``teacher_logits``.

    Per token, with p = softmax(z) over the V ids and uniforms u_i in (0, 1) keyed by
    (seed, token_offset + row, i): priorities q_i = p_i / u_i (ranked in float64, equal ones by
    id, smaller first), keep the k ids of largest q (never one with p_i = 0), tau = the (k+1)-th
    largest priority (0 if V = k or fewer than k+1 ids have mass) and weight
    w_i = max(p_i, tau). Then E[sum_kept w_i f(i)] = sum_i p_i f(i) for every f: the expected
    weight vector is p, with exactly k distinct ids per token.
    Rows are processed in chunks of about 2^15 (row, id) pairs on CPU, 2^22 on CUDA (one row at
    least), so the working memory is O(max(V, chunk)) whatever the batch.

    Args:
        teacher_logits: ``[..., V]`` floating logits; -inf entries have no mass.
        k: ids kept per token, 1 <= k <= V.

    Returns:
        ``(ids, weights, logprobs, bad_rows)``: ids ``[..., k]`` int32 ascending then -1
        padding (where fewer than k ids have mass), weights ``[..., k]`` float32 (0 at padding),
        logprobs ``[..., k]`` float32 log p of each kept id (0 at padding) or None, and
        bad_rows ``[...]`` bool, rows with NaN or +inf logits (they get all padding).
    """
    lead, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    z = teacher_logits.reshape(-1, vocab)
    rows, device = z.shape[0], z.device
    ids = torch.full((rows, k), -1, dtype=torch.int32, device=device)
    weights = torch.zeros(rows, k, dtype=torch.float32, device=device)
    logprobs = torch.zeros(rows, k, dtype=torch.float32, device=device)
    bad = torch.zeros(rows, dtype=torch.bool, device=device)
    step = max(1, _PRIORITY_CHUNK.get(device.type, 1 << 15) // vocab)
    # The (k+1)-th priority is the threshold; with k = V there is none (tau = 0).
    n_top = min(k + 1, vocab)
    columns = torch.arange(vocab, device=device)
    for r0 in range(0, rows, step):
        # Keys in float64, as the native kernel ranks them: float32 keys of neighbouring ids
        # tie or swap within their rounding often enough to change which ids are kept.
        zc = z[r0 : r0 + step].to(torch.float64)
        chunk_bad = (torch.isnan(zc) | (zc == math.inf)).any(-1)
        # Rows with NaN or +inf, and rows without mass (log_softmax gives NaN there): no keys.
        no_keys = chunk_bad[:, None] | (zc == -math.inf).all(-1, keepdim=True)
        log_p = torch.log_softmax(zc, -1).masked_fill(no_keys, -math.inf)
        tokens = token_offset + r0 + torch.arange(zc.shape[0], device=device)
        u = token_uniforms(seed, tokens, vocab, _PRIORITY_STREAM).to(torch.float64)
        # log q = log p - log u: no underflow of p / u for tiny p; -inf exactly where p = 0.
        key = log_p - torch.log(u)
        top, log_q = _top_keys(key, n_top)
        tau = log_q[:, k].exp() if n_top > k else torch.zeros_like(log_q[:, 0])
        log_q, top = log_q[:, :k], top[:, :k]
        has_mass = log_q > -math.inf
        # Kept ids ascending, padding last: sort by (no mass, id).
        order = torch.argsort(torch.where(has_mass, top, vocab + columns[:k]), dim=-1)
        top, has_mass = top.gather(1, order), has_mass.gather(1, order)
        lp = log_p.gather(1, top)
        w = torch.maximum(lp.exp(), tau[:, None])
        ids[r0 : r0 + step] = torch.where(has_mass, top, -1).to(torch.int32)
        weights[r0 : r0 + step] = torch.where(has_mass, w, 0.0).to(torch.float32)
        logprobs[r0 : r0 + step] = torch.where(has_mass, lp, 0.0).to(torch.float32)
        bad[r0 : r0 + step] = chunk_bad
    shape = (*lead, k)
    return (
        ids.reshape(shape),
        weights.reshape(shape),
        logprobs.reshape(shape) if return_logprobs else None,
        bad.reshape(lead),
    )
