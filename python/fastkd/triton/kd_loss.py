"""Fused softmax-divergence loss (kd_loss forward): the Triton kernel.

The semantic twin of ``csrc/cpu/kd_loss_cpu.cpp`` (formulas from ``csrc/common/kd_math.h``).
Notation: a = cap(z_s)/T, b = cap(z_t)/T, q = softmax(a), p = softmax(b), lq = a - la,
lp = b - lb with la, lb the log-sum-exps. One program per row, in up to three passes over the
vocabulary in BLOCK_V chunks:
  stats : online max and sum-of-exp of a and b (and of T*a for the hard CE), plus the fkl/rkl
          loss in the shifted online form;
  terms : (loss, dot) sums of the divergences other than fkl/rkl, which need the final LSEs;
  grad  : dLoss_row/dz_s written once in the student's dtype, zeros past the common vocabulary.
All arithmetic is fp32. Guards are tl.where selects whose guarded expressions also read masked
inputs, so that legal -inf logits form no inf - inf or 0 * inf: the interpreter (numpy) computes
what compiled code does, without floating-point warnings.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..divergences import DIVERGENCES
from ._common import (
    MAX_BLOCK_V,
    NEG_INF,
    POS_INF,
    fp32,
    inverse_temperature,
    loss_grad_weights,
    quiet_nan,
    row_pointer,
    row_warps,
    vocab_block,
    write_zero_row,
)

__all__ = ["kd_loss_forward"]

# Divergence codes, from fastkd.DIVERGENCES.
FKL = tl.constexpr(DIVERGENCES["fkl"].code)
RKL = tl.constexpr(DIVERGENCES["rkl"].code)
JSD = tl.constexpr(DIVERGENCES["jsd"].code)
TVD = tl.constexpr(DIVERGENCES["tvd"].code)
SKL = tl.constexpr(DIVERGENCES["skl"].code)
SRKL = tl.constexpr(DIVERGENCES["srkl"].code)
HELLINGER = tl.constexpr(DIVERGENCES["hellinger"].code)

# Probabilities below 2^-126 count as exactly 0 (kd_math.h kLogMinProb): every guard tests a
# log-probability against this, never the probability, so that results do not depend on how exp
# rounds near underflow (CPU polynomial, GPU ex2.approx, numpy).
LOG_MIN_PROB = tl.constexpr(-87.33654)


@triton.jit
def _load_row(ptr, cols, mask, inv_t, cap, CAP: tl.constexpr, DCAP: tl.constexpr):
    # cols, mask: any shape. Returns a = cap(z)/T (-inf where masked), and with DCAP also
    # d cap(z)/dz = 1 - (cap(z)/c)^2; cap(z) = c tanh(z/c) as in kd_math.h softcap: for
    # |x| >= 1/8, tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), exact at +-inf; below,
    # the series x - x^3/3 + 2x^5/15 - 17x^7/315.
    z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    v = z
    dcap = 1.0
    if CAP:
        x = z / cap
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        t = (1.0 - e) / (1.0 + e)
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        v = cap * tl.where(ax < 0.125, series, tl.where(x < 0.0, -t, t))
        r = v / cap
        dcap = 1.0 - r * r
    a = tl.where(mask, v * inv_t, NEG_INF)
    if DCAP:
        return a, dcap
    else:
        return a


@triton.jit
def _shifted_kl_block(acc, s_inc, bad, x, y, ex, xs, ys, rx, dm):
    # One chunk of the fkl (x = b, y = a) or rkl (x = a, y = b) accumulator
    #   acc = sum_i e_x,i ((x_i - mx) - (y_i - my)),  e_x,i = exp(x_i - mx), x_i - mx > LOG_MIN_PROB
    # over the elements with y_i > -inf, per lane ([BLOCK_V]). When the running maxima move,
    # acc_new = rx * (acc + s_inc * dm) with rx = exp(mx_old - mx_new),
    # dm = (mx_old - mx_new) - (my_old - my_new) and s_inc = sum of e_x over those elements.
    # Elements with y = -inf make the loss +inf where x - mx > LOG_MIN_PROB with the final
    # maximum (the CPU kernel's e_x * (+inf)); `bad` keeps the largest such x to decide that.
    inc = y > NEG_INF
    keep = inc & (xs > LOG_MIN_PROB)
    term = ex * (tl.where(keep, xs, 0.0) - tl.where(keep, ys, 0.0))
    acc = rx * (acc + s_inc * dm) + term
    s_inc = s_inc * rx + tl.where(inc, ex, 0.0)
    bad = tl.maximum(bad, tl.where(inc, NEG_INF, x))
    return acc, s_inc, bad


@triton.jit
def _log1p_unit(t):
    # log(1 + t) for t in [0, 1], within 1.4 ulp also for small t (kd_math.h log1p_unit): the
    # Cephes logf polynomial, by Estrin's scheme, in f = t, or in f = (t - 1) / 2 plus ln 2
    # above sqrt(2) - 1.
    high = t > 0.41421356
    f = tl.where(high, 0.5 * (t - 1.0), t)
    e = tl.where(high, 1.0, 0.0)
    z = f * f
    p01 = -2.4999993993e-1 * f + 3.3333331174e-1
    p23 = -1.6668057665e-1 * f + 2.0000714765e-1
    p45 = -1.2420140846e-1 * f + 1.4249322787e-1
    p67 = -1.1514610310e-1 * f + 1.1676998740e-1
    p4567 = (7.0376836292e-2 * z + p67) * z + p45
    poly = (p23 * z + p01) + p4567 * (z * z)
    y = f * z * poly + e * -2.12194440e-4 - 0.5 * z
    return f + y + e * 0.693359375


@triton.jit
def _mixture(lp, lq, log_wp, log_wq):
    # The mixture m = w_p p + w_q q of [BLOCK_V] elements (kd_math.h mixture): from
    # lam = log(w_p p / (w_q q)) and tau = exp(-|lam|), the lesser weighted term over the greater,
    # returns (lq - lm, lp - lm, w_p p / m, w_q q / m, g = log(m / (w_q q)) - w_p p / m). -inf
    # log-probabilities read as -1e30 (the same tau, 0, and no inf - inf: the elements where
    # they matter are discarded by the callers).
    lp = tl.maximum(lp, -1e30)
    lq = tl.maximum(lq, -1e30)
    d = lp - lq
    lam = d + (log_wp - log_wq)
    p_leads = lam > 0.0
    t = tl.exp(-tl.abs(lam))
    l1 = _log1p_unit(t)
    lead_share = 1.0 / (1.0 + t)
    minor_share = t * lead_share
    dq = tl.where(p_leads, -(d + log_wp), -log_wq) - l1
    dp = tl.where(p_leads, -log_wp, d - log_wq) - l1
    p_share = tl.where(p_leads, lead_share, minor_share)
    q_share = tl.where(p_leads, minor_share, lead_share)
    # Where q's term leads, g = -log(1 - u) - u, u = minor_share: below u = 1/8 the series
    # sum_{k>=2} u^k / k to k = 9, which keeps the digits that l1 - u loses as u -> 0.
    u = minor_share
    series = (
        u
        * u
        * (
            0.5
            + u
            * (
                1.0 / 3.0
                + u * (0.25 + u * (0.2 + u * (1.0 / 6.0 + u * (1.0 / 7.0 + u * (0.125 + u / 9.0)))))
            )
        )
    )
    g = tl.where(p_leads, lam + l1 - lead_share, tl.where(u < 0.125, series, l1 - u))
    return dq, dp, p_share, q_share, g


@triton.jit
def _mixture_keep(dq, p_share, q_share, g, w_p, w_q, DIV: tl.constexpr):
    # What the gradient of a mixture element needs besides q (kd_math.h mixture_keep): jsd:
    # lq - lm; skl: the share of the lighter-weighted model in m; srkl: g.
    if DIV == JSD:
        keep = dq
    elif DIV == SKL:
        if w_p < w_q:
            keep = p_share
        else:
            keep = q_share
    else:
        keep = g
    return keep


@triton.jit
def _sign_of_difference(lq, lp):
    # sign(q - p) from the log-probabilities (exp is monotone).
    return tl.where(lq > lp, 1.0, tl.where(lq < lp, -1.0, 0.0))


@triton.jit
def _sqrt_prob(log_prob):
    # sqrt of a probability from its log, 0 where it counts as 0 (kd_math.h sqrt_prob).
    keep = log_prob > LOG_MIN_PROB
    return tl.where(keep, tl.exp(0.5 * tl.where(keep, log_prob, 0.0)), 0.0)


@triton.jit
def _divergence_terms(lp, lq, log_wp, log_wq, w_p, w_q, DIV: tl.constexpr):
    # Terms-pass contribution (loss, dot) of [BLOCK_V] elements (kd_math.h divergence_terms);
    # the mixtures' dot is the sum of q times _mixture_keep; hellinger's terms are
    # (sqrt p - sqrt q)^2 / 2 (no cancellation against 1) and its dot S = sum sqrt(p q).
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == TVD:
        loss = 0.5 * tl.abs(q - p)
        dot = q * _sign_of_difference(lq, lp)
    elif DIV == HELLINGER:
        rp = _sqrt_prob(lp)
        rq = _sqrt_prob(lq)
        loss = 0.5 * (rp - rq) * (rp - rq)
        dot = rp * rq
    else:
        dq, dp, p_share, q_share, g = _mixture(lp, lq, log_wp, log_wq)
        has_p = lp > LOG_MIN_PROB
        has_q = lq > LOG_MIN_PROB
        dot = tl.where(has_q, q * _mixture_keep(dq, p_share, q_share, g, w_p, w_q, DIV), 0.0)
        if DIV == JSD:
            loss = w_p * tl.where(has_p, p * dp, 0.0) + w_q * dot
        elif DIV == SKL:
            loss = tl.where(has_p, p * dp, 0.0)
        else:
            loss = tl.where(has_q, q * dq, 0.0)
    return loss, dot


@triton.jit
def _divergence_grad(lp, lq, loss, dot, log_wp, log_wq, w_p, w_q, DIV: tl.constexpr):
    # dL_soft/da of [BLOCK_V] elements (kd_math.h plain_grad, mixture_grad):
    #   fkl : q - p                       rkl : q (lq - lp - L)
    #   jsd : wq q (lq - lm - dot)        tvd : q (sign(q-p) - dot) / 2
    #   skl : -(wq/wp) q (p_share - dot) = (wq/wp) q (q_share - dot)      srkl: q (dot - g)
    #   hellinger : q (S - sqrt(p / q)) / 2, sqrt(p / q) = 0 where p counts as 0
    # 0 where q counts as 0; logs read there as 0 so that no inf - inf is formed.
    q = tl.exp(lq)
    if DIV == FKL:
        g = q - tl.exp(lp)
    else:
        pos = lq > LOG_MIN_PROB
        lq_in = tl.where(pos, lq, 0.0)
        if DIV == RKL:
            h = lq_in - tl.where(pos, lp, 0.0) - loss
        elif DIV == TVD:
            h = 0.5 * (_sign_of_difference(lq, lp) - dot)
        elif DIV == HELLINGER:
            has_p = lp > LOG_MIN_PROB
            sqrt_ratio = tl.where(has_p, tl.exp(0.5 * (tl.where(has_p, lp, 0.0) - lq_in)), 0.0)
            h = 0.5 * (dot - sqrt_ratio)
        else:
            dq, dp, p_share, q_share, gm = _mixture(lp, lq, log_wp, log_wq)
            keep = _mixture_keep(dq, p_share, q_share, gm, w_p, w_q, DIV)
            if DIV == JSD:
                h = w_q * (keep - dot)
            elif DIV == SKL:
                k = w_q / w_p
                if w_p < w_q:
                    k = -k
                h = k * (keep - dot)
            else:
                h = dot - keep
        g = tl.where(pos, q * h, 0.0)
    return g


@triton.jit
def _kd_loss_fwd_kernel(
    student_ptr,  # logits, row r at (r // inner_rows) * s_outer + (r % inner_rows) * s_inner
    teacher_ptr,  # logits, row r at (r // inner_rows) * t_outer + (r % inner_rows) * t_inner
    labels_ptr,  # [n_rows] int64, or None
    grad_ptr,  # [n_rows, grad_vocab] contiguous, student dtype
    loss_ptr,  # [n_rows] fp32
    s_outer,
    s_inner,
    t_outer,
    t_inner,
    inner_rows,
    vocab,  # min(V_s, V_t): the columns the loss sees
    grad_vocab,  # V_s
    temperature,
    inv_t,
    cap,
    soft_weight,
    soft_grad_scale,
    hard_weight,
    hard_grad_weight,
    ignore_index,
    log_wp,
    log_wq,
    w_p,
    w_q,  # m = w_p p + w_q q (jsd, skl, srkl)
    DIV: tl.constexpr,
    CAP: tl.constexpr,  # softcap > 0
    HAS_LABELS: tl.constexpr,
    CE: tl.constexpr,  # labels given and hard_weight > 0
    TEMPERED: tl.constexpr,  # CE with T != 1: the CE softmax needs its own sum of exp(T a)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_ptr = row_pointer(student_ptr, row, inner_rows, s_outer, s_inner)
    zt_ptr = row_pointer(teacher_ptr, row, inner_rows, t_outer, t_inner)
    g_ptr = grad_ptr + row * grad_vocab
    offs = tl.arange(0, BLOCK_V)

    ignored = False
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        write_zero_row(g_ptr, grad_vocab, BLOCK_V)
    else:
        # Stats pass. Scalars: running maxima ma, mb, and the shifts fa, fb: the maxima with -inf
        # read as 0, so that x - shift is -inf, never NaN, while a row prefix is all -inf.
        # [BLOCK_V] lanes: sums of exp(x - shift).
        ma = tl.full([], NEG_INF, tl.float32)
        mb = tl.full([], NEG_INF, tl.float32)
        fa = tl.zeros([], tl.float32)
        fb = tl.zeros([], tl.float32)
        sa = tl.zeros([BLOCK_V], tl.float32)
        sb = tl.zeros([BLOCK_V], tl.float32)
        sz = tl.zeros([BLOCK_V], tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)
        s_inc = tl.zeros([BLOCK_V], tl.float32)
        bad = tl.full([BLOCK_V], NEG_INF, tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            a = _load_row(zs_ptr, cols, mask, inv_t, cap, CAP, False)
            b = _load_row(zt_ptr, cols, mask, inv_t, cap, CAP, False)
            ma_new = tl.maximum(ma, tl.max(a, axis=0))
            mb_new = tl.maximum(mb, tl.max(b, axis=0))
            fa_new = tl.where(ma_new == NEG_INF, 0.0, ma_new)
            fb_new = tl.where(mb_new == NEG_INF, 0.0, mb_new)
            # Rescale factors exp(m_old - m_new): 0 while the old maximum is -inf (sums still 0).
            ra = tl.exp(ma - fa_new)
            rb = tl.exp(mb - fb_new)
            xa = a - fa_new
            xb = b - fb_new
            ea = tl.exp(xa)
            eb = tl.exp(xb)
            sa = sa * ra + ea
            sb = sb * rb + eb
            if TEMPERED:
                sz = sz * tl.exp(temperature * (ma - fa_new)) + tl.exp(temperature * xa)
            if DIV == FKL:
                dm = (fb - fb_new) - (fa - fa_new)
                acc, s_inc, bad = _shifted_kl_block(acc, s_inc, bad, b, a, eb, xb, xa, rb, dm)
            elif DIV == RKL:
                dm = (fa - fa_new) - (fb - fb_new)
                acc, s_inc, bad = _shifted_kl_block(acc, s_inc, bad, a, b, ea, xa, xb, ra, dm)
            ma, mb, fa, fb = ma_new, mb_new, fa_new, fb_new
        sum_a = tl.sum(sa, axis=0)
        sum_b = tl.sum(sb, axis=0)
        la = ma + tl.log(sum_a)
        lb = mb + tl.log(sum_b)

        # Soft loss: fkl = acc / sb - log sb + log sa (rkl swaps a and b); the rest by a terms pass.
        dot = 0.0
        if DIV == FKL:
            soft = tl.sum(acc, axis=0) / sum_b - tl.log(sum_b) + tl.log(sum_a)
            soft = tl.where(tl.max(bad, axis=0) - fb > LOG_MIN_PROB, POS_INF, soft)
        elif DIV == RKL:
            soft = tl.sum(acc, axis=0) / sum_a - tl.log(sum_a) + tl.log(sum_b)
            soft = tl.where(tl.max(bad, axis=0) - fa > LOG_MIN_PROB, POS_INF, soft)
        else:
            loss_acc = tl.zeros([BLOCK_V], tl.float32)
            dot_acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offs
                mask = cols < vocab
                a = _load_row(zs_ptr, cols, mask, inv_t, cap, CAP, False)
                b = _load_row(zt_ptr, cols, mask, inv_t, cap, CAP, False)
                t_loss, t_dot = _divergence_terms(b - lb, a - la, log_wp, log_wq, w_p, w_q, DIV)
                loss_acc += t_loss
                dot_acc += t_dot
            soft = tl.sum(loss_acc, axis=0)
            dot = tl.sum(dot_acc, axis=0)

        # NaN, added to the loss and to every gradient element, where the row has no softmax
        # (LSE not finite: all -inf, or NaN / +inf logits), as kd_math.h row_has_distribution.
        nan = quiet_nan()
        defined = (la > NEG_INF) & (la < POS_INF) & (lb > NEG_INF) & (lb < POS_INF)
        row_nan = tl.where(defined, 0.0, nan)
        loss = soft_weight * soft + row_nan
        lz = 0.0
        if CE:
            # Hard CE at T = 1 on z' = T a: lz = LSE(z') = T ma + log sum exp(T (a - ma)).
            if TEMPERED:
                lz = temperature * ma + tl.log(tl.sum(sz, axis=0))
            else:
                lz = temperature * ma + tl.log(sum_a)
            label_ok = (label >= 0) & (label < vocab)
            a_label = _load_row(
                zs_ptr, tl.where(label_ok, label, 0), label_ok, inv_t, cap, CAP, False
            )
            loss += tl.where(label_ok, hard_weight * (lz - temperature * a_label), nan)
        tl.store(loss_ptr + row, loss)

        # Grad pass: soft_grad_scale * dL_soft/da (+ hard_grad_weight (softmax(z') - onehot))
        # * dcap; both weights carry the call's grad_scale.
        for start in range(0, grad_vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            a, dcap = _load_row(zs_ptr, cols, mask, inv_t, cap, CAP, True)
            b = _load_row(zt_ptr, cols, mask, inv_t, cap, CAP, False)
            g = (
                soft_grad_scale
                * _divergence_grad(b - lb, a - la, soft, dot, log_wp, log_wq, w_p, w_q, DIV)
                + row_nan
            )
            if CE:
                g += hard_grad_weight * tl.exp(temperature * a - lz)
                g = tl.where(cols == label, g - hard_grad_weight, g)
            if CAP:
                g *= dcap
            g = tl.where(mask, g, 0.0)
            tl.store(g_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < grad_vocab)


def kd_loss_forward(
    student,
    teacher,
    labels,
    grad,
    loss,
    *,
    n_rows,
    inner_rows,
    student_layout,
    teacher_layout,
    vocab,
    grad_vocab,
    cfg,
) -> None:
    """Writes ``loss[r]`` and ``grad[r, :]`` (``cfg.grad_scale`` dLoss_r/dz_s) for every row
    ``r < n_rows``.

    ``student``/``teacher`` are addressed through ``student_layout``/``teacher_layout`` (see
    ``fastkd.ops._layout``); ``labels`` is ``None`` or int64 ``[n_rows]``; ``cfg`` a ``KdConfig``.
    """
    if n_rows == 0:
        return
    block_v = vocab_block(vocab, MAX_BLOCK_V)
    has_labels = labels is not None
    ce = has_labels and cfg.hard_weight > 0.0
    # 1/T and the gradient weights rounded as the native binding computes them (in fp32), and
    # the mixture's weights and logs rounded to fp32 as a GPU takes them (the interpreter would
    # compute with Python's doubles).
    w_p, w_q = (fp32(w) for w in cfg.mixture_weights)
    log_wp, log_wq = fp32(cfg.log_wp), fp32(cfg.log_wq)
    inv_t = inverse_temperature(cfg.temperature)
    soft_grad_scale, hard_grad_weight = loss_grad_weights(
        cfg.grad_scale, cfg.soft_weight, cfg.hard_weight, cfg.temperature
    )
    _kd_loss_fwd_kernel[(n_rows,)](
        student,
        teacher,
        labels,
        grad,
        loss,
        student_layout.outer_stride,
        student_layout.inner_stride,
        teacher_layout.outer_stride,
        teacher_layout.inner_stride,
        inner_rows,
        vocab,
        grad_vocab,
        cfg.temperature,
        inv_t,
        cfg.softcap,
        cfg.soft_weight,
        soft_grad_scale,
        cfg.hard_weight,
        hard_grad_weight,
        cfg.ignore_index,
        log_wp,
        log_wq,
        w_p,
        w_q,
        DIV=cfg.divergence,
        CAP=cfg.softcap > 0.0,
        HAS_LABELS=has_labels,
        CE=ce,
        TEMPERED=ce and cfg.temperature != 1.0,
        BLOCK_V=block_v,
        num_warps=row_warps(block_v, 4),
    )
