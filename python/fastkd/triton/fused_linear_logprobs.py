"""fused_linear_logprobs row kernel in Triton: the semantic twin of
``csrc/cpu/fused_linear_logprobs_cpu.cpp``.

Per row of fp32 chunk logits z, with a = z / T, p = softmax(a), lse = LSE(a):

    logprob = a_t - lse,   lse,   H = -sum_j p_j log p_j
    dz_j    = scale [ (g_lse - g_lp) p_j - g_H p_j (log p_j + H) + g_lp [j = t] ],  scale = s / T

One program per row:
  stats   : online max m and lane sums S of exp(a - m) over BLOCK_V chunks;
  entropy : sum_j e_j (a_j - m) with the final m (0 for e_j = 0), H = log S - that / S;
  grad    : with the incoming gradients, dz written over the row's logits (each element read
            before it is written, by the same program).
A target equal to ignore_index gives 0 outputs and a zero gradient row. A row of all -inf
logits gives lse = -inf and NaN for the rest, as on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["logprob_rows"]

NEG_INF = tl.constexpr(float("-inf"))
MAX_BLOCK_V = 2048  # widest vocabulary chunk, as triton/kd_loss.py


@triton.jit
def _logprob_rows_kernel(
    z_ptr,  # [n_rows, row_stride] fp32; gradient written over it (GRAD)
    targets_ptr,  # [n_rows] int64
    row_grads_ptr,  # [n_rows, 3] fp32 (GRAD)
    logprob_ptr,
    lse_ptr,
    entropy_ptr,  # [n_rows] fp32 (entropy: ENTROPY)
    row_stride,
    vocab,
    inv_t,
    grad_scale,
    ignore_index,
    ENTROPY: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                tl.store(z_row + cols, tl.zeros([BLOCK_V], tl.float32), mask=cols < vocab)
    else:
        # m: running maximum; f: m with -inf read as 0, so that a - f is never NaN while a row
        # prefix is all -inf.
        m = tl.full([], NEG_INF, tl.float32)
        f = tl.zeros([], tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            a = tl.where(
                cols < vocab, tl.load(z_row + cols, mask=cols < vocab, other=0.0) * inv_t, NEG_INF
            )
            m_new = tl.maximum(m, tl.max(a, axis=0))
            f_new = tl.where(m_new == NEG_INF, 0.0, m_new)
            s = s * tl.exp(m - f_new) + tl.exp(a - f_new)
            m, f = m_new, f_new
        total = tl.sum(s, axis=0)
        log_sum = tl.log(total)
        lse = f + log_sum
        a_t = tl.load(z_row + target) * inv_t
        tl.store(logprob_ptr + row, a_t - lse)
        tl.store(lse_ptr + row, lse)
        h = 0.0
        if ENTROPY:
            t = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                a = tl.where(
                    cols < vocab,
                    tl.load(z_row + cols, mask=cols < vocab, other=0.0) * inv_t,
                    NEG_INF,
                )
                e = tl.exp(a - f)
                t += tl.where(e > 0.0, e * (a - f), 0.0)
            h = log_sum - tl.sum(t, axis=0) / total
            tl.store(entropy_ptr + row, h)
        if GRAD:
            g_lp = tl.load(row_grads_ptr + 3 * row)
            g_lse = tl.load(row_grads_ptr + 3 * row + 1)
            g_h = 0.0
            if ENTROPY:
                g_h = tl.load(row_grads_ptr + 3 * row + 2)
            scale = grad_scale * inv_t
            c_p = g_lse - g_lp
            inv_sum = 1.0 / total
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                mask = cols < vocab
                a = tl.where(mask, tl.load(z_row + cols, mask=mask, other=0.0) * inv_t, NEG_INF)
                p = tl.exp(a - f) * inv_sum
                plogp = tl.where(p == 0.0, 0.0, p * ((a - f) - log_sum))
                g = scale * (c_p * p - g_h * (plogp + p * h))
                g = tl.where(cols == target, g + scale * g_lp, g)
                tl.store(z_row + cols, g, mask=mask)


def logprob_rows(
    z,
    targets,
    row_grads,
    logprob,
    lse,
    entropy,
    *,
    temperature: float,
    ignore_index: int,
    grad_scale: float,
) -> None:
    """Runs the kernel on fp32 logits ``z`` ``[C, V]`` (unit column stride), ``targets``
    ``[C]`` int64, ``row_grads`` ``[C, 3]`` fp32 or None, outputs ``[C]`` fp32 (``entropy``
    None: not computed, its incoming gradient taken as 0)."""
    n_rows, vocab = z.shape
    if n_rows == 0:
        return
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    _logprob_rows_kernel[(n_rows,)](
        z,
        targets,
        row_grads,
        logprob,
        lse,
        entropy,
        z.stride(0),
        vocab,
        1.0 / temperature,
        grad_scale,
        ignore_index,
        ENTROPY=entropy is not None,
        GRAD=row_grads is not None,
        BLOCK_V=block,
    )
