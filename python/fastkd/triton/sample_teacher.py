"""Random-sampling sparse teacher targets (sample_teacher, method="random"): the Triton kernel.

The semantic twin of ``csrc/cpu/sample_teacher_cpu.cpp``: per row, N draws with replacement from
r = softmax(a), a = z/T, kept as distinct (id, count). One program per row:
  stats   : online max m of a and S = sum exp(a - m) over BLOCK_V chunks; rows with NaN or +inf
            in a are flagged `invalid` (the caller raises), rows without a finite max get no draws;
  draws   : E_0 .. E_N = -log u (u from Philox4x32-10 keyed by (seed, token, draw), as
            csrc/common/philox.h), C their cumulative sums, thresholds t_k = S C_k / C_N for
            k < N: the order statistics of N uniforms, scaled to the row's mass;
  merge   : the running mass c over BLOCK_S chunks; a chunk of mass [c, c_end) that holds some
            thresholds gives each of them its column, the number of columns whose inclusive
            running mass c + cumsum(e) is <= t (a [BLOCK_S, BLOCK_N] comparison), and the
            columns with a nonzero count go, ascending, to the next free slots (count in the
            weights slot); thresholds past the chunk's last cumulative sum (the sum and the scan
            round differently) go to its last column of nonzero mass, those past the row's
            final mass to the row's last column of nonzero mass;
  weights : the slots re-read: w = count / N, times p / r = exp(log p - log r) for T != 1, and
            log p = z - LSE(z) (LSE(z) by one more pass when T != 1).
The exponentials and the sums within a chunk are fp32; S, the thresholds and the running mass are
fp64 (as the CPU kernel's sums), since fp32 rounding of the mass accumulated over a long row
exceeds the mass of tail ids. A draw may still land on a neighbouring column where a threshold
lies within rounding of a column boundary.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import MAX_BLOCK_V, NEG_INF, POS_INF, inverse_temperature, row_pointer, vocab_block

__all__ = ["sample_teacher_forward"]

# Philox4x32-10 multipliers and key increments (csrc/common/philox.h).
PHILOX_MUL0 = tl.constexpr(0xD2511F53)
PHILOX_MUL1 = tl.constexpr(0xCD9E8D57)
PHILOX_WEYL0 = tl.constexpr(0x9E3779B9)
PHILOX_WEYL1 = tl.constexpr(0xBB67AE85)
# 2^-24: u = ((w >> 8) + 1/2) 2^-24 lies in (0, 1), exact in fp32.
UNIFORM_SCALE = tl.constexpr(5.9604644775390625e-08)

# Elements of the merge's [BLOCK_S, BLOCK_N] comparison: the chunk shrinks as N grows.
MERGE_ELEMENTS = 8192
MIN_BLOCK_S = 16
MAX_BLOCK_S = 256


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # Ten rounds of the Philox-4x32 bijection of the uint32 counter (c0, c1, c2, c3) under the
    # uint32 key (k0, k1); products wrap, hi halves by umulhi.
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_MUL0)
        lo0 = c0 * PHILOX_MUL0
        hi1 = tl.umulhi(c2, PHILOX_MUL1)
        lo1 = c2 * PHILOX_MUL1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_WEYL0
        k1 = k1 + PHILOX_WEYL1
    return c0, c1, c2, c3


@triton.jit
def _draw_uniforms(seed_lo, seed_hi, token, BLOCK_N: tl.constexpr):
    # [BLOCK_N] uniforms of draws j = 0 .. BLOCK_N - 1 of `token`: counter
    # (token lo, token hi, j >> 2, 0) under key (seed lo, seed hi), word j & 3.
    token = token.to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    zero = tl.zeros([BLOCK_N], tl.uint32)
    c0 = zero + (token & 0xFFFFFFFF).to(tl.uint32)
    c1 = zero + (token >> 32).to(tl.uint32)
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    x0, x1, x2, x3 = _philox4x32_10(c0, c1, (j >> 2).to(tl.uint32), zero, k0, k1)
    lane = j & 3
    word = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
    return ((word >> 8).to(tl.float32) + 0.5) * UNIFORM_SCALE


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "token_offset"])
def _sample_teacher_kernel(
    logits_ptr,  # row r at (r // inner_rows) * outer + (r % inner_rows) * inner
    ids_ptr,  # [n_rows, num_samples] int32
    weights_ptr,  # [n_rows, num_samples] fp32 (holds the counts until the weights pass)
    logprobs_ptr,  # [n_rows, num_samples] fp32, or None
    invalid_ptr,  # [n_rows] uint8
    outer,
    inner,
    inner_rows,
    vocab,
    num_samples,
    inv_t,
    seed_lo,
    seed_hi,  # the seed's 32-bit words as int32 bit patterns
    token_offset,
    TEMPERED: tl.constexpr,  # T != 1: importance weights, LSE(z) by its own pass
    HAS_LOGPROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= num_samples + 1
):
    row = tl.program_id(0).to(tl.int64)
    z_ptr = row_pointer(logits_ptr, row, inner_rows, outer, inner)
    out = row * num_samples
    offs_v = tl.arange(0, BLOCK_V)
    offs_s = tl.arange(0, BLOCK_S)
    j = tl.arange(0, BLOCK_N)

    # Stats pass over the finite a (NaN and +inf read as -inf there, flagged in `bad`); the
    # shift f is m with -inf read as 0, so that no -inf - -inf is formed. S in fp64.
    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float64)
    bad = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs_v
        mask = cols < vocab
        z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.where(mask, z * inv_t, NEG_INF)
        bad = tl.maximum(bad, tl.max(tl.where(a < POS_INF, 0, 1), axis=0))
        a = tl.where(a < POS_INF, a, NEG_INF)
        m_new = tl.maximum(m, tl.max(a, axis=0))
        f = tl.where(m_new > NEG_INF, m_new, 0.0)
        s = s * tl.exp(m - f).to(tl.float64) + tl.sum(tl.exp(a - f), axis=0).to(tl.float64)
        m = m_new
    tl.store(invalid_ptr + row, bad.to(tl.uint8))
    valid = (bad == 0) & (m > NEG_INF)

    # Sorted thresholds t_k = S C_k / C_N, k < N (fp64); +inf on the lanes past N - 1.
    e_draw = -tl.log(_draw_uniforms(seed_lo, seed_hi, token_offset + row, BLOCK_N))
    cumulative = tl.cumsum(tl.where(j <= num_samples, e_draw, 0.0).to(tl.float64), axis=0)
    c_n = tl.sum(tl.where(j == num_samples, cumulative, 0.0), axis=0)
    t = tl.where(j < num_samples, cumulative * (s / c_n), POS_INF)

    kept = tl.zeros([], tl.int32)
    c = tl.zeros([], tl.float64)
    row_last = tl.full([], -1, tl.int32)
    lse_a = tl.zeros([], tl.float32)
    lse_z = tl.zeros([], tl.float32)
    if valid:
        # Merge pass: c is the running mass (fp64), each chunk covers [c, c_end); t_next is the
        # smallest threshold >= c, so that a chunk without thresholds costs one comparison.
        t_next = tl.min(t, axis=0)
        last_col = tl.full([BLOCK_S], -1, tl.int32)
        for start in range(0, vocab, BLOCK_S):
            cols = start + offs_s
            mask = cols < vocab
            z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            e = tl.where(mask, tl.exp(tl.where(mask, z * inv_t, m) - m), 0.0)
            c_end = c + tl.sum(e, axis=0).to(tl.float64)
            last_col = tl.maximum(last_col, tl.where(e > 0.0, cols, -1))
            if t_next < c_end:
                inside = (t >= c) & (t < c_end)
                # Column of threshold k: #(i: c + cumsum(e)_i <= t_k), BLOCK_S past the scan.
                last = tl.max(tl.where(e > 0.0, offs_s, -1), axis=0)
                scan = c + tl.cumsum(e, axis=0).to(tl.float64)
                col = tl.sum((scan[:, None] <= t[None, :]).to(tl.int32), axis=0)
                col = tl.where(col < BLOCK_S, col, last)
                count = tl.sum(
                    ((col[None, :] == offs_s[:, None]) & inside[None, :]).to(tl.int32), axis=1
                )
                # Slot of a drawn column: kept + its exclusive prefix count of drawn columns.
                drawn = (count > 0).to(tl.int32)
                slot = kept + tl.cumsum(drawn, axis=0) - drawn
                tl.store(ids_ptr + out + slot, cols.to(tl.int32), mask=drawn > 0)
                tl.store(weights_ptr + out + slot, count.to(tl.float32), mask=drawn > 0)
                kept += tl.sum(drawn, axis=0)
                t_next = tl.min(tl.where(t >= c_end, t, POS_INF), axis=0)
            c = c_end
        row_last = tl.max(last_col, axis=0)
        # log r = a - LSE(a), log p = z - LSE(z); with T = 1, a is z.
        lse_a = m + tl.log(s.to(tl.float32))
        lse_z = lse_a
        if TEMPERED:
            # max z = T m up to rounding: a safe shift for the sum of exp(z).
            shift = m / inv_t
            acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs_v
                mask = cols < vocab
                z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                acc += tl.where(mask, tl.exp(tl.where(mask, z, shift) - shift), 0.0)
            lse_z = shift + tl.log(tl.sum(acc, axis=0))
    # The merge pass's slots are re-read by other threads of this program.
    tl.debug_barrier()

    # Weights pass over the N slots, all rows: -1 / 0 past the kept ones. Thresholds past the
    # row's final mass (S and the running mass round differently; rows without draws have none)
    # join the last slot if it holds the row's last column of mass, else take a new slot.
    slots = j < num_samples
    held = j < kept
    ids = tl.load(ids_ptr + out + j, mask=held, other=-1)
    count = tl.load(weights_ptr + out + j, mask=held, other=0.0)
    rest = tl.sum((slots & (t >= c) & valid).to(tl.int32), axis=0)
    merge = (j == kept - 1) & (ids == row_last)
    joins = tl.sum(merge.to(tl.int32), axis=0) > 0
    fresh = (j == kept) & (rest > 0) & ~joins
    count = tl.where(merge, count + rest.to(tl.float32), count)
    count = tl.where(fresh, rest.to(tl.float32), count)
    ids = tl.where(fresh, row_last, ids)
    has = ids >= 0
    zj = tl.load(z_ptr + tl.where(has, ids, 0), mask=has, other=0.0).to(tl.float32)
    log_p = tl.where(has, zj - lse_z, 0.0)
    w = count / num_samples
    if TEMPERED:
        w *= tl.exp(tl.where(has, log_p - (zj * inv_t - lse_a), 0.0))
    tl.store(ids_ptr + out + j, ids, mask=slots)
    tl.store(weights_ptr + out + j, w, mask=slots)
    if HAS_LOGPROBS:
        tl.store(logprobs_ptr + out + j, log_p, mask=slots)


def _int32_bits(word: int) -> int:
    """A 32-bit word as the int32 of the same bits."""
    return word - (1 << 32) if word >= 1 << 31 else word


def sample_teacher_forward(
    logits,
    ids,
    weights,
    logprobs,
    invalid,
    *,
    n_rows,
    inner_rows,
    layout,
    vocab,
    temperature,
    num_samples,
    seed,
    token_offset,
) -> None:
    """Writes, for every row ``r < n_rows``, the ``num_samples`` slots ``ids[r]`` (int32,
    ascending, then -1), ``weights[r]`` (fp32) and ``logprobs[r]`` (fp32; ``logprobs`` may be
    None), and ``invalid[r]`` (uint8: 1 where the row has NaN or +inf logits, its slots empty).

    ``logits`` (fp32/bf16/fp16) is addressed through ``layout`` (see ``fastkd.ops._layout``); the
    outputs are contiguous ``[n_rows, num_samples]`` / ``[n_rows]`` on the logits' device. Row
    ``r`` draws as global token ``token_offset + r`` under the 64-bit ``seed``.
    """
    if n_rows == 0:
        return
    block_v = vocab_block(vocab, MAX_BLOCK_V)
    block_n = triton.next_power_of_2(num_samples + 1)
    block_s = min(
        max(MERGE_ELEMENTS // block_n, MIN_BLOCK_S),
        MAX_BLOCK_S,
        triton.next_power_of_2(max(vocab, 1)),
    )
    # 1/T rounded as the native binding computes it (in fp32).
    inv_t = inverse_temperature(temperature)
    _sample_teacher_kernel[(n_rows,)](
        logits,
        ids,
        weights,
        logprobs,
        invalid,
        layout.outer_stride,
        layout.inner_stride,
        inner_rows,
        vocab,
        num_samples,
        inv_t,
        _int32_bits(seed & 0xFFFFFFFF),
        _int32_bits(seed >> 32),
        token_offset,
        TEMPERED=temperature != 1.0,
        HAS_LOGPROBS=logprobs is not None,
        BLOCK_V=block_v,
        BLOCK_S=block_s,
        BLOCK_N=block_n,
        num_warps=4,
    )
