"""Distillation against sparse teacher targets (sparse_kd_loss forward): the Triton kernel.

The semantic twin of ``csrc/cpu/sparse_kd_loss_cpu.cpp``. Notation: a = z/T over the first V
columns, q = softmax(a), target weights w_k at ids s_k (W = sum_k w_k), and for tail="bucket" the
teacher's tail mass w_b against q_b = sum_{j not in ids} q_j (w_b = 0 where the ids cover all V
columns):

    L       = sum_k w_k (log w_k - log q_{s_k})  +  w_b (log w_b - log q_b)
    dL/da_j = c_in q_j - w_j   at the ids,   (c_in - w_b / q_b) q_j   elsewhere,   c_in = W + w_b

One program per row:
  stats : online max m and sum S of exp(a - m) over BLOCK_V chunks (and of exp(T (a - m)) for
          the hard CE at T != 1);
  slots : a at the K ids: the loss terms, W, and S_in = sum_k exp(a_{s_k} - m); the bucket's
          mass is S_out = S - S_in, clamped at 0 (no column is known to lie outside the ids
          without a search of the K ids, so S_out carries the rounding of S: a q_b = S_out / S
          of a few 1e-7 is inexact and may read as 0, where the CPU kernel sums S_out exactly);
  grad  : every column written as a column outside the ids, e_j (c_in / S - w_b / S_out) (+ CE),
          zeros past V; then, after a barrier, the K id columns overwritten with c_in q - w_k
          (+ CE). The same program writes both, so no column is written concurrently, and each
          value is computed in fp32 and rounded once.
REVERSE (the targets' log p_k in place of their weights, p_b = tail mass) computes the reverse KL
over the ids and the bucket, with the same passes and the same S_out:

    L = sum_k q_k (log q_k - log p_k) + q_b (log q_b - log p_b),   dL/da_j = q_j (c_j - L)

c_j = log q_j - log p_j at the ids and log q_b - log p_b elsewhere; terms and gradients are 0
where q counts as 0 (log q <= LOG_MIN_PROB, kd_math.h's kLogMinProb), as kd_loss's rkl elements.
All arithmetic is fp32. Guards are tl.where selects on the inputs of guarded expressions, so that
-inf logits and zero weights form no inf - inf, 0 * inf or log 0 (as in triton/kd_loss.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    MAX_BLOCK_V,
    NEG_INF,
    POS_INF,
    inverse_temperature,
    loss_grad_weights,
    quiet_nan,
    row_pointer,
    row_warps,
    vocab_block,
    write_zero_row,
)

__all__ = ["sparse_kd_loss_forward"]

# Widest chunk of target slots (the vocabulary's is _common.MAX_BLOCK_V).
MAX_BLOCK_K = 128

# Probabilities below 2^-126 count as 0: kd_math.h's kLogMinProb.
LOG_MIN_PROB = tl.constexpr(-87.33654)


@triton.jit
def _load_scaled(ptr, cols, mask, inv_t):
    # cols, mask: any shape. a = z / T, -inf where masked.
    z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, z * inv_t, NEG_INF)


@triton.jit
def _log_or_neg_inf(x):
    # log x for x >= 0, with log 0 = -inf selected rather than computed.
    return tl.where(x > 0.0, tl.log(tl.where(x > 0.0, x, 1.0)), NEG_INF)


@triton.jit
def _sparse_kd_loss_fwd_kernel(
    student_ptr,  # logits, row r at (r // inner_rows) * s_outer + (r % inner_rows) * s_inner
    ids_ptr,  # [n_rows, num_slots] int32, < 0: padding
    weights_ptr,  # [n_rows, num_slots] fp32: w_k, or with REVERSE log p_k
    tail_ptr,  # [n_rows] fp32 (BUCKET), or None
    labels_ptr,  # [n_rows] int64, or None
    grad_ptr,  # [n_rows, grad_vocab] contiguous, student dtype
    loss_ptr,  # [n_rows] fp32
    s_outer,
    s_inner,
    inner_rows,
    vocab,  # V = min(V_s, targets.vocab_size)
    grad_vocab,  # V_s
    num_slots,  # K
    temperature,
    inv_t,
    soft_weight,
    soft_grad_scale,
    hard_weight,
    hard_grad_weight,
    ignore_index,
    BUCKET: tl.constexpr,  # tail="bucket" targets
    REVERSE: tl.constexpr,  # the reverse direction (BUCKET too)
    HAS_LABELS: tl.constexpr,
    CE: tl.constexpr,  # labels given and hard_weight > 0
    TEMPERED: tl.constexpr,  # CE with T != 1: the CE softmax needs its own sum of exp(T a)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_ptr = row_pointer(student_ptr, row, inner_rows, s_outer, s_inner)
    g_ptr = grad_ptr + row * grad_vocab
    ids_row = ids_ptr + row * num_slots
    w_row = weights_ptr + row * num_slots
    offs = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)

    ignored = False
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        write_zero_row(g_ptr, grad_vocab, BLOCK_V)
    else:
        # Stats pass. m: running maximum; f: m with -inf read as 0, so that a - f is -inf, never
        # NaN, while a row prefix is all -inf. [BLOCK_V] lanes: sums of exp(a - f).
        m = tl.full([], NEG_INF, tl.float32)
        f = tl.zeros([], tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        sz = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            a = _load_scaled(zs_ptr, cols, cols < vocab, inv_t)
            m_new = tl.maximum(m, tl.max(a, axis=0))
            f_new = tl.where(m_new == NEG_INF, 0.0, m_new)
            # Rescale factor exp(m_old - m_new): 0 while the old maximum is -inf (sums still 0).
            s = s * tl.exp(m - f_new) + tl.exp(a - f_new)
            if TEMPERED:
                sz = sz * tl.exp(temperature * (m - f_new)) + tl.exp(temperature * (a - f_new))
            m, f = m_new, f_new
        sum_all = tl.sum(s, axis=0)
        log_sum = tl.log(sum_all)

        # Slots pass: sum_k w_k (log w_k - log q_k) with log q_k = (a_k - f) - log S, over the
        # slots with w_k > 0; W; S_in. An id >= V makes the loss NaN and is skipped.
        nan = quiet_nan()
        soft = tl.zeros([], tl.float32)
        total_w = tl.zeros([], tl.float32)
        sum_in = tl.zeros([], tl.float32)
        n_ids = tl.zeros([], tl.int32)
        n_bad = tl.zeros([], tl.int32)
        for kstart in range(0, num_slots, BLOCK_K):
            ks = kstart + offs_k
            kmask = ks < num_slots
            ids = tl.load(ids_row + ks, mask=kmask, other=-1)
            w = tl.load(w_row + ks, mask=kmask, other=0.0)
            valid = (ids >= 0) & (ids < vocab)
            n_ids += tl.sum(valid.to(tl.int32), axis=0)
            n_bad += tl.sum((ids >= vocab).to(tl.int32), axis=0)
            a_k = _load_scaled(zs_ptr, tl.where(valid, ids, 0), valid, inv_t)
            sum_in += tl.sum(tl.exp(a_k - f), axis=0)
            if REVERSE:
                # q_k (log q_k - log p_k), 0 where q_k counts as 0; a NaN or +inf log p_k makes
                # the row NaN (counted in n_bad).
                n_bad += tl.sum((valid & ~(w < POS_INF)).to(tl.int32), axis=0)
                lq_k = (a_k - f) - log_sum
                keep = valid & (lq_k > LOG_MIN_PROB)
                lq_in = tl.where(keep, lq_k, 0.0)
                lp_in = tl.where(keep, w, 0.0)
                soft += tl.sum(tl.where(keep, tl.exp(lq_in) * (lq_in - lp_in), 0.0), axis=0)
            else:
                # Weights <= 0 count as 0; NaN and +inf ones make the row NaN (the NaN rule).
                w = tl.where(w < POS_INF, w, nan)
                pos = valid & ~(w <= 0.0)
                w_in = tl.where(pos, w, 1.0)
                lq_in = tl.where(pos, (a_k - f) - log_sum, 0.0)
                soft += tl.sum(tl.where(pos, w_in * (tl.log(w_in) - lq_in), 0.0), axis=0)
                total_w += tl.sum(tl.where(pos, w, 0.0), axis=0)
        w_b = 0.0
        k_bucket = 0.0
        k_rev = 0.0
        if REVERSE:
            # The bucket q_b = S_out / S against p_b (<= 0: 0), empty where the ids cover all V
            # columns; c_b = log q_b - log p_b where q_b > 0 (elsewhere every e_j outside is 0).
            tail = tl.load(tail_ptr + row)
            has_b = n_ids < vocab
            n_bad += (has_b & ~(tail < POS_INF)).to(tl.int32)
            sum_out = tl.maximum(sum_all - sum_in, 0.0)
            lq_b = _log_or_neg_inf(sum_out) - log_sum
            lp_b = _log_or_neg_inf(tl.where(tail > 0.0, tail, 0.0))
            keep_b = has_b & (lq_b > LOG_MIN_PROB)
            lq_b_in = tl.where(keep_b, lq_b, 0.0)
            soft += tl.where(keep_b, tl.exp(lq_b_in) * (lq_b_in - lp_b), 0.0)
            soft = tl.where(n_bad > 0, nan, soft)
            # Where q_b counts as 0 (below 2^-126) its columns' gradient is 0 as its term is, so
            # that a p_b of 0 (c_b = +inf) never meets such a q_b.
            c_b = tl.where(keep_b, lq_b_in - lp_b, 0.0)
            # dL/da_j = e_j (c_b - L) / S outside the ids; NaN everywhere in a NaN row.
            k_rev = tl.where(keep_b | (n_bad > 0), c_b - soft, 0.0)
        elif BUCKET:
            # q_b = S_out / S, S_out = S - S_in clamped at 0; q_j / q_b = e_j / S_out. Where the
            # (distinct) ids cover all V columns the bucket is empty and w_b is dropped.
            tail = tl.load(tail_ptr + row)
            tail = tl.where(tail < POS_INF, tail, nan)
            w_b = tl.where((n_ids < vocab) & ~(tail <= 0.0), tail, 0.0)
            sum_out = tl.maximum(sum_all - sum_in, 0.0)
            has_b = ~(w_b <= 0.0)
            w_b_in = tl.where(has_b, w_b, 1.0)
            log_qb = tl.where(has_b, _log_or_neg_inf(sum_out) - log_sum, 0.0)
            soft += tl.where(has_b, w_b_in * (tl.log(w_b_in) - log_qb), 0.0)
            k_bucket = tl.where(
                has_b & (sum_out > 0.0), w_b / tl.where(sum_out > 0.0, sum_out, 1.0), 0.0
            )
        # An id >= V makes every gradient entry NaN through c_in, as it makes the loss NaN.
        c_in = tl.where(n_bad > 0, nan, total_w + w_b)
        inv_sum = 1.0 / sum_all

        loss = soft_weight * soft
        lz = 0.0
        if CE:
            # Hard CE at T = 1 on z = T a: lz = LSE(z) = T f + log sum exp(T (a - f)).
            if TEMPERED:
                lz = temperature * f + tl.log(tl.sum(sz, axis=0))
            else:
                lz = f + log_sum
            label_ok = (label >= 0) & (label < vocab)
            a_label = _load_scaled(zs_ptr, tl.where(label_ok, label, 0), label_ok, inv_t)
            loss += tl.where(label_ok, hard_weight * (lz - temperature * a_label), nan)
        tl.store(loss_ptr + row, tl.where(n_bad > 0, nan, loss))

        # Grad pass, every column as one outside the ids: soft_grad_scale (c_in / S - w_b / S_out)
        # e_j (+ hard_grad_weight (softmax(z)_j - [j == label])); zeros past V.
        if REVERSE:
            k_off = soft_grad_scale * k_rev * inv_sum
        else:
            k_off = soft_grad_scale * (c_in * inv_sum - k_bucket)
        for start in range(0, grad_vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            a = _load_scaled(zs_ptr, cols, mask, inv_t)
            g = k_off * tl.exp(a - f)
            if CE:
                g += hard_grad_weight * tl.exp(temperature * a - lz)
                g = tl.where(cols == label, g - hard_grad_weight, g)
            g = tl.where(mask, g, 0.0)
            tl.store(g_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < grad_vocab)

        # The id columns, after every thread's stores above: soft_grad_scale (c_in q_k - w_k)
        # (+ the CE term).
        tl.debug_barrier()
        for kstart in range(0, num_slots, BLOCK_K):
            ks = kstart + offs_k
            kmask = ks < num_slots
            ids = tl.load(ids_row + ks, mask=kmask, other=-1)
            w = tl.load(w_row + ks, mask=kmask, other=0.0)
            valid = (ids >= 0) & (ids < vocab)
            a_k = _load_scaled(zs_ptr, tl.where(valid, ids, 0), valid, inv_t)
            q_k = tl.exp(a_k - f) * inv_sum
            if REVERSE:
                # q_k (log q_k - log p_k - L), 0 where q_k counts as 0; NaN in a NaN row.
                lq_k = (a_k - f) - log_sum
                keep = valid & (lq_k > LOG_MIN_PROB)
                c_k = tl.where(keep, lq_k - w, 0.0) - soft
                g = tl.where(n_bad > 0, nan, soft_grad_scale * tl.where(keep, q_k * c_k, 0.0))
            else:
                g = soft_grad_scale * (c_in * q_k - tl.where(valid & (w > 0.0), w, 0.0))
            if CE:
                g += hard_grad_weight * tl.exp(temperature * a_k - lz)
                g = tl.where(ids == label, g - hard_grad_weight, g)
            tl.store(g_ptr + tl.where(valid, ids, 0), g.to(grad_ptr.dtype.element_ty), mask=valid)


def sparse_kd_loss_forward(
    student,
    ids,
    weights,
    tail_mass,
    labels,
    grad,
    loss,
    *,
    n_rows,
    inner_rows,
    layout,
    vocab,
    grad_vocab,
    temperature,
    soft_weight,
    hard_weight,
    ignore_index,
    grad_scale,
    logprobs=None,
) -> None:
    """Writes ``loss[r]`` and ``grad[r, :]`` (``grad_scale`` dLoss_r/dz) for every row
    ``r < n_rows``; with ``logprobs`` (contiguous ``[n_rows, K]`` fp32 log p_k, ``weights``
    None, ``tail_mass`` given) in the reverse direction.

    ``student`` is addressed through ``layout`` (see ``fastkd.ops._layout``); ``ids``/``weights``
    are contiguous ``[n_rows, K]`` int32/fp32, ``tail_mass`` ``[n_rows]`` fp32 or None,
    ``labels`` None or int64 ``[n_rows]``.
    """
    if n_rows == 0:
        return
    num_slots = ids.shape[-1]
    block_v = vocab_block(vocab, MAX_BLOCK_V)
    block_k = min(triton.next_power_of_2(max(num_slots, 1)), MAX_BLOCK_K)
    has_labels = labels is not None
    ce = has_labels and hard_weight > 0.0
    # 1/T and the gradient weights rounded as the native binding computes them (in fp32).
    inv_t = inverse_temperature(temperature)
    soft_grad_scale, hard_grad_weight = loss_grad_weights(
        grad_scale, soft_weight, hard_weight, temperature
    )
    _sparse_kd_loss_fwd_kernel[(n_rows,)](
        student,
        ids,
        weights if logprobs is None else logprobs,
        tail_mass,
        labels,
        grad,
        loss,
        layout.outer_stride,
        layout.inner_stride,
        inner_rows,
        vocab,
        grad_vocab,
        num_slots,
        temperature,
        inv_t,
        soft_weight,
        soft_grad_scale,
        hard_weight,
        hard_grad_weight,
        ignore_index,
        BUCKET=tail_mass is not None,
        REVERSE=logprobs is not None,
        HAS_LABELS=has_labels,
        CE=ce,
        TEMPERED=ce and temperature != 1.0,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=row_warps(block_v, 4),
    )
