"""Batched log-domain Sinkhorn (sinkhorn forward): the Triton kernel.

The semantic twin of the loop in ``csrc/common/sinkhorn_args.h`` (plain PyTorch:
``fastkd/reference/sinkhorn.py``). Problem b transports a = exp(log_a[b, :n_b]) to
b = exp(log_b[b, :m_b]) at cost C[b, :n_b, :m_b]; with potentials f, g in the units of C at
regularization e:
  F: f_i = -e LSE_j ((g_j - C_ij) / e + log b_j)
  G: g_j = -e LSE_i ((f_i - C_ij) / e + log a_i)
  E: err = sum_i a_i |exp((f_i - F(g)_i) / e) - 1|
  P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j)
The exponentials are base 2: with s = 1 / (e ln 2) and log2 weights, F is
f_i = -LSE2_j ((g_j - C_ij) s + log2 b_j) / s (G likewise), E sums a_i |2^((f_i - F(g)_i) s) - 1|
and P_ij = 2^((f_i + g_j - C_ij) s + log2 a_i + log2 b_j). All arithmetic is fp32, e included
(e = max(e kappa, eps) as the header's loop), whatever the cost's dtype.

One program per problem runs the header's loop, F then G per iteration, with the error check fused
into the next F: a check after iteration k needs F(g_k) at e_k; when the problem does not stop
there it has left the eps schedule (checks happen at the final eps, or at max_iters, which
stops), so the next iteration runs at e_k as well and that F(g_k) is its F. Each iteration is
thus one G and one F (at the next e when unchecked), plus the first F before the loop; on a stop
f keeps the F that preceded the last G. Two kernels:
  resident : next_pow2(n) x next_pow2(m) <= RESIDENT_ELEMENTS: C is loaded once as an fp32
             register tile (0 outside the sizes), f and g stay in registers;
  streamed : C is re-read in STREAM_BLOCK_N x STREAM_BLOCK_M tiles every half-iteration, F by
             row blocks with an online log-sum-exp over column tiles, G by column blocks over
             row tiles; f and g live in their output rows (a barrier between passes, since the
             threads that read them are not those that wrote them), and a checked F goes to a
             scratch row, copied to f only when the problem goes on.
Then <P, C>, sum P and the plan (when asked for) at the final (f, g, e), that e as eps_final.
Costs, log weights and a warm g are read only within the sizes (masked loads), so that whatever
lies beyond them (NaN, inf) never enters; potentials beyond the sizes and the plan outside
[n_b, m_b] are written as 0, as is everything of an empty problem (n_b == 0 or m_b == 0) but its
eps_final, eps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NEG_INF, fp32, warps_for

__all__ = ["sinkhorn_forward"]

LOG2E = tl.constexpr(1.4426950408889634)  # log2(exp(1)): s = LOG2E / e = 1 / (e ln 2)

# Largest next_pow2(n) * next_pow2(m) solved from registers (tests set 0 to force streaming).
RESIDENT_ELEMENTS = 128 * 128
# Tile of the streamed kernel (capped at next_pow2 of the problem's n and m).
STREAM_BLOCK_N = 64
STREAM_BLOCK_M = 64
# Tile values per warp (16 a thread resident, 8 streamed) for choosing num_warps, at most
# MAX_WARPS. ptxas for sm_90 then fits the resident kernel in registers up to 128 x 64 (16
# warps, 128 registers a thread); 128 x 128 (32 warps, 64 registers) spills about 90 bytes a
# thread. The streamed kernel's 64 x 64 tile takes 128 registers at 16 warps, no spills (at 16
# values a thread it needs 248).
ELEMENTS_PER_WARP = 512
STREAM_ELEMENTS_PER_WARP = 256
MAX_WARPS = 32


@triton.jit
def _problem(
    b,
    n_sizes_ptr,
    m_sizes_ptr,
    eps_start_ptr,
    n,
    m,
    eps,
    HAS_N_SIZES: tl.constexpr,
    HAS_M_SIZES: tl.constexpr,
    SCALING: tl.constexpr,
):
    # Sizes (n_b, m_b) of problem b, clamped to (n, m), and its first e:
    # eps_start[b] when scaling from above eps, else eps.
    n_b = tl.zeros([], tl.int32) + n
    m_b = tl.zeros([], tl.int32) + m
    if HAS_N_SIZES:
        n_b = tl.minimum(tl.load(n_sizes_ptr + b), n)
    if HAS_M_SIZES:
        m_b = tl.minimum(tl.load(m_sizes_ptr + b), m)
    e = tl.zeros([], tl.float32) + eps
    if SCALING:
        start = tl.load(eps_start_ptr + b)
        e = tl.where(start > eps, start, e)
    return n_b, m_b, e


@triton.jit
def _step(e, it, eps, kappa, max_iters, check_every):
    # After iteration `it` (run at e): whether E is checked, and the e of the next F. A checked
    # problem keeps e: it either stops or is at the final eps already.
    stage = e > eps
    last = it >= max_iters
    check = (~stage | last) & ((it % check_every == 0) | last)
    e_next = tl.where(stage & ~check, tl.maximum(e * kappa, eps), e)
    return check, e_next


@triton.jit
def _resident_update(c, p, w2, s, AXIS: tl.constexpr):
    # F (AXIS 1: p = g [BLOCK_M], w2 = log2 b) or G (AXIS 0: p = f [BLOCK_N], w2 = log2 a) of the
    # [BLOCK_N, BLOCK_M] tile c: -LSE2_k ((p_k - C) s + w2_k) / s along AXIS. The shift is the
    # maximum with -inf read as 0, so that an all -inf line forms no -inf - -inf.
    x = (tl.expand_dims(p, 1 - AXIS) - c) * s + tl.expand_dims(w2, 1 - AXIS)
    mx = tl.max(x, axis=AXIS)
    shift = tl.where(mx == NEG_INF, 0.0, mx)
    return -(shift + tl.log2(tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), axis=AXIS))) / s


@triton.jit
def _plan_tile(f, g, c, la2, lb2, s):
    # P = 2^((f_i + g_j - C_ij) s + log2 a_i + log2 b_j), 0 where a weight is 0 (log2 -inf).
    keep = (la2[:, None] > NEG_INF) & (lb2[None, :] > NEG_INF)
    logit = (f[:, None] + g[None, :] - c) * s + la2[:, None] + lb2[None, :]
    return tl.exp2(tl.where(keep, logit, NEG_INF))


@triton.jit
def _cost_tile(c_base, rows, cols, row_in, col_in, stride_i, stride_j):
    # C[rows, cols] as fp32, 0 outside (row_in, col_in): never read there.
    return tl.load(
        c_base + rows.to(tl.int64)[:, None] * stride_i + cols.to(tl.int64)[None, :] * stride_j,
        mask=row_in[:, None] & col_in[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _sinkhorn_resident_kernel(
    cost_ptr,  # C[b, i, j] at b * stride_b + i * stride_i + j * stride_j, fp32/bf16/fp16
    log_a_ptr,  # [B, n] fp32
    log_b_ptr,  # [B, m] fp32
    n_sizes_ptr,  # [B] int32, or None
    m_sizes_ptr,  # [B] int32, or None
    eps_start_ptr,  # [B] fp32, or None
    f_ptr,  # [B, n] fp32 out
    g_ptr,  # [B, m] fp32 out (in: the initial g with WARM_START)
    iters_ptr,  # [B] int32 out
    err_ptr,  # [B] fp32 out
    transport_ptr,  # [B] fp32 out
    mass_ptr,  # [B] fp32 out
    eps_final_ptr,  # [B] fp32 out
    plan_ptr,  # [B, n, m] fp32 out, or None
    stride_b,
    stride_i,
    stride_j,
    n,
    m,
    eps,
    kappa,
    max_iters,
    check_every,
    tol,
    HAS_N_SIZES: tl.constexpr,
    HAS_M_SIZES: tl.constexpr,
    SCALING: tl.constexpr,
    WARM_START: tl.constexpr,
    HAS_PLAN: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next_pow2(n)
    BLOCK_M: tl.constexpr,  # next_pow2(m)
):
    b = tl.program_id(0).to(tl.int64)
    n_b, m_b, e = _problem(
        b, n_sizes_ptr, m_sizes_ptr, eps_start_ptr, n, m, eps, HAS_N_SIZES, HAS_M_SIZES, SCALING
    )
    nonempty = (n_b > 0) & (m_b > 0)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_in = rows < n_b
    col_in = cols < m_b
    inside = row_in[:, None] & col_in[None, :]
    c_ptrs = (
        cost_ptr
        + b * stride_b
        + rows.to(tl.int64)[:, None] * stride_i
        + cols.to(tl.int64)[None, :] * stride_j
    )
    c = tl.load(c_ptrs, mask=inside, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_M]
    la2 = tl.load(log_a_ptr + b * n + rows, mask=row_in, other=NEG_INF) * LOG2E  # [BLOCK_N]
    lb2 = tl.load(log_b_ptr + b * m + cols, mask=col_in, other=NEG_INF) * LOG2E  # [BLOCK_M]
    a = tl.exp2(la2)
    g = tl.zeros([BLOCK_M], tl.float32)
    if WARM_START:
        g = tl.load(g_ptr + b * m + cols, mask=col_in, other=0.0)

    # The first F; an empty problem's (unused: it runs no iteration) sees weights 1, as the
    # reference's dummy problem, so that it forms no -inf - -inf.
    s = LOG2E / e
    f = _resident_update(c, g, tl.where(nonempty, lb2, 0.0), s, 1)  # [BLOCK_N]
    it = tl.zeros([], tl.int32)
    err = tl.zeros([], tl.float32)
    run = nonempty
    while run:
        g = _resident_update(c, f, la2, s, 0)
        it += 1
        check, e_next = _step(e, it, eps, kappa, max_iters, check_every)
        s_next = LOG2E / e_next
        f_new = _resident_update(c, g, lb2, s_next, 1)
        # E = sum_i a_i |2^((f_i - F(g)_i) s) - 1| over the rows of nonzero weight.
        if check:
            err = tl.sum(
                tl.where(a > 0.0, a * tl.abs(tl.exp2((f - f_new) * s_next) - 1.0), 0.0), axis=0
            )
        stop = check & ((err < tol) | (it >= max_iters))
        f = tl.where(stop, f, f_new)
        e = e_next
        s = s_next
        run = ~stop

    # P at the final (f, g, e); 0 where a weight is 0, and so outside the sizes.
    p = _plan_tile(f, g, c, la2, lb2, s)
    n_keep = tl.where(nonempty, n_b, 0)
    m_keep = tl.where(nonempty, m_b, 0)
    tl.store(f_ptr + b * n + rows, tl.where(rows < n_keep, f, 0.0), mask=rows < n)
    tl.store(g_ptr + b * m + cols, tl.where(cols < m_keep, g, 0.0), mask=cols < m)
    tl.store(iters_ptr + b, it)
    tl.store(err_ptr + b, err)
    tl.store(eps_final_ptr + b, tl.where(nonempty, e, eps))
    tl.store(transport_ptr + b, tl.sum(tl.sum(p * c, axis=1), axis=0))
    tl.store(mass_ptr + b, tl.sum(tl.sum(p, axis=1), axis=0))
    if HAS_PLAN:
        plan_ptrs = plan_ptr + b * n * m + rows.to(tl.int64)[:, None] * m + cols[None, :]
        tl.store(plan_ptrs, p, mask=(rows < n)[:, None] & (cols < m)[None, :])


@triton.jit
def _online_lse2(mx, sm, x, AXIS: tl.constexpr):
    # One tile of LSE2 along AXIS: running maximum mx and sum sm = sum 2^(x - shift), the shift
    # being the maximum with -inf read as 0 (sums stay 0 while a line is all -inf).
    mx_new = tl.maximum(mx, tl.max(x, axis=AXIS))
    shift = tl.where(mx_new == NEG_INF, 0.0, mx_new)
    sm = sm * tl.exp2(mx - shift) + tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return mx_new, sm


@triton.jit
def _stream_f(
    c_base,
    stride_i,
    stride_j,
    la_row,
    lb_row,
    f_row,
    g_row,
    t_row,
    n_b,
    m_b,
    s,
    check,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # F(g) at s by row blocks. Unchecked, it overwrites f; checked, it goes to the scratch row
    # t_row and the returned E compares it with f (which the problem keeps if it stops).
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # Rows below f_end go to f, below t_end to the scratch (bounds rather than a scalar bool
    # broadcast into the masks, which the interpreter mistypes).
    f_end = tl.where(check, 0, n_b)
    t_end = n_b - f_end
    err = tl.zeros([], tl.float32)
    for i0 in range(0, n_b, BLOCK_N):
        rows = i0 + offs_n
        row_in = rows < n_b
        mx = tl.full([BLOCK_N], NEG_INF, tl.float32)
        sm = tl.zeros([BLOCK_N], tl.float32)
        for j0 in range(0, m_b, BLOCK_M):
            cols = j0 + offs_m
            col_in = cols < m_b
            c = _cost_tile(c_base, rows, cols, row_in, col_in, stride_i, stride_j)
            g = tl.load(g_row + cols, mask=col_in, other=0.0)
            lb2 = tl.load(lb_row + cols, mask=col_in, other=NEG_INF) * LOG2E
            mx, sm = _online_lse2(mx, sm, (g[None, :] - c) * s + lb2[None, :], 1)
        f_new = -(tl.where(mx == NEG_INF, 0.0, mx) + tl.log2(sm)) / s
        tl.store(f_row + rows, f_new, mask=rows < f_end)
        tl.store(t_row + rows, f_new, mask=rows < t_end)
        if check:
            # E = sum_i a_i |2^((f_i - F(g)_i) s) - 1| over the rows of nonzero weight.
            f = tl.load(f_row + rows, mask=row_in, other=0.0)
            a = tl.exp2(tl.load(la_row + rows, mask=row_in, other=NEG_INF) * LOG2E)
            err += tl.sum(
                tl.where(a > 0.0, a * tl.abs(tl.exp2((f - f_new) * s) - 1.0), 0.0), axis=0
            )
    return err


@triton.jit
def _stream_g(
    c_base,
    stride_i,
    stride_j,
    la_row,
    f_row,
    g_row,
    n_b,
    m_b,
    s,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # G(f) at s by column blocks, written to g.
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    for j0 in range(0, m_b, BLOCK_M):
        cols = j0 + offs_m
        col_in = cols < m_b
        mx = tl.full([BLOCK_M], NEG_INF, tl.float32)
        sm = tl.zeros([BLOCK_M], tl.float32)
        for i0 in range(0, n_b, BLOCK_N):
            rows = i0 + offs_n
            row_in = rows < n_b
            c = _cost_tile(c_base, rows, cols, row_in, col_in, stride_i, stride_j)
            f = tl.load(f_row + rows, mask=row_in, other=0.0)
            la2 = tl.load(la_row + rows, mask=row_in, other=NEG_INF) * LOG2E
            mx, sm = _online_lse2(mx, sm, (f[:, None] - c) * s + la2[:, None], 0)
        tl.store(g_row + cols, -(tl.where(mx == NEG_INF, 0.0, mx) + tl.log2(sm)) / s, mask=col_in)


@triton.jit
def _sinkhorn_streamed_kernel(
    cost_ptr,  # C[b, i, j] at b * stride_b + i * stride_i + j * stride_j, fp32/bf16/fp16
    log_a_ptr,  # [B, n] fp32
    log_b_ptr,  # [B, m] fp32
    n_sizes_ptr,  # [B] int32, or None
    m_sizes_ptr,  # [B] int32, or None
    eps_start_ptr,  # [B] fp32, or None
    f_ptr,  # [B, n] fp32 out
    g_ptr,  # [B, m] fp32 out (in: the initial g with WARM_START)
    iters_ptr,  # [B] int32 out
    err_ptr,  # [B] fp32 out
    transport_ptr,  # [B] fp32 out
    mass_ptr,  # [B] fp32 out
    eps_final_ptr,  # [B] fp32 out
    plan_ptr,  # [B, n, m] fp32 out, or None
    scratch_ptr,  # [B, n] fp32: the checked F
    stride_b,
    stride_i,
    stride_j,
    n,
    m,
    eps,
    kappa,
    max_iters,
    check_every,
    tol,
    HAS_N_SIZES: tl.constexpr,
    HAS_M_SIZES: tl.constexpr,
    SCALING: tl.constexpr,
    WARM_START: tl.constexpr,
    HAS_PLAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n_b, m_b, e = _problem(
        b, n_sizes_ptr, m_sizes_ptr, eps_start_ptr, n, m, eps, HAS_N_SIZES, HAS_M_SIZES, SCALING
    )
    nonempty = (n_b > 0) & (m_b > 0)
    c_base = cost_ptr + b * stride_b
    la_row = log_a_ptr + b * n
    lb_row = log_b_ptr + b * m
    f_row = f_ptr + b * n
    g_row = g_ptr + b * m
    t_row = scratch_ptr + b * n
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if not WARM_START:
        for j0 in range(0, m, BLOCK_M):
            cols = j0 + offs_m
            tl.store(g_row + cols, tl.zeros([BLOCK_M], tl.float32), mask=cols < m)
        tl.debug_barrier()

    s = LOG2E / e
    no_check = tl.zeros([], tl.int1)
    if nonempty:
        _stream_f(
            c_base,
            stride_i,
            stride_j,
            la_row,
            lb_row,
            f_row,
            g_row,
            t_row,
            n_b,
            m_b,
            s,
            no_check,
            BLOCK_N,
            BLOCK_M,
        )
    tl.debug_barrier()
    it = tl.zeros([], tl.int32)
    err = tl.zeros([], tl.float32)
    run = nonempty
    while run:
        _stream_g(c_base, stride_i, stride_j, la_row, f_row, g_row, n_b, m_b, s, BLOCK_N, BLOCK_M)
        tl.debug_barrier()
        it += 1
        check, e_next = _step(e, it, eps, kappa, max_iters, check_every)
        s_next = LOG2E / e_next
        err_new = _stream_f(
            c_base,
            stride_i,
            stride_j,
            la_row,
            lb_row,
            f_row,
            g_row,
            t_row,
            n_b,
            m_b,
            s_next,
            check,
            BLOCK_N,
            BLOCK_M,
        )
        tl.debug_barrier()
        err = tl.where(check, err_new, err)
        stop = check & ((err < tol) | (it >= max_iters))
        if check & ~stop:
            for i0 in range(0, n_b, BLOCK_N):
                rows = i0 + offs_n
                row_in = rows < n_b
                tl.store(f_row + rows, tl.load(t_row + rows, mask=row_in), mask=row_in)
            tl.debug_barrier()
        e = e_next
        s = s_next
        run = ~stop

    # P at the final (f, g, e) by tiles: within the sizes for <P, C> and sum P, over [n, m]
    # with the plan (0 outside the sizes, where a log weight reads as -inf).
    transport = tl.zeros([], tl.float32)
    mass = tl.zeros([], tl.float32)
    n_end = n_b
    m_end = m_b
    if HAS_PLAN:
        n_end = tl.zeros([], tl.int32) + n
        m_end = tl.zeros([], tl.int32) + m
    for i0 in range(0, n_end, BLOCK_N):
        rows = i0 + offs_n
        row_in = rows < n_b
        f = tl.load(f_row + rows, mask=row_in, other=0.0)
        la2 = tl.load(la_row + rows, mask=row_in, other=NEG_INF) * LOG2E
        for j0 in range(0, m_end, BLOCK_M):
            cols = j0 + offs_m
            col_in = cols < m_b
            c = _cost_tile(c_base, rows, cols, row_in, col_in, stride_i, stride_j)
            g = tl.load(g_row + cols, mask=col_in, other=0.0)
            lb2 = tl.load(lb_row + cols, mask=col_in, other=NEG_INF) * LOG2E
            p = _plan_tile(f, g, c, la2, lb2, s)
            transport += tl.sum(tl.sum(p * c, axis=1), axis=0)
            mass += tl.sum(tl.sum(p, axis=1), axis=0)
            if HAS_PLAN:
                tl.store(
                    plan_ptr + b * n * m + rows.to(tl.int64)[:, None] * m + cols[None, :],
                    p,
                    mask=(rows < n)[:, None] & (cols < m)[None, :],
                )
    tl.store(iters_ptr + b, it)
    tl.store(err_ptr + b, err)
    tl.store(eps_final_ptr + b, tl.where(nonempty, e, eps))
    tl.store(transport_ptr + b, transport)
    tl.store(mass_ptr + b, mass)
    # Potentials beyond the sizes (all of an empty problem's) are 0; the reads above are done.
    tl.debug_barrier()
    n_keep = tl.where(nonempty, n_b, 0)
    m_keep = tl.where(nonempty, m_b, 0)
    for i0 in range(0, n, BLOCK_N):
        rows = i0 + offs_n
        tl.store(f_row + rows, tl.zeros([BLOCK_N], tl.float32), mask=(rows >= n_keep) & (rows < n))
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + offs_m
        tl.store(g_row + cols, tl.zeros([BLOCK_M], tl.float32), mask=(cols >= m_keep) & (cols < m))


def sinkhorn_forward(
    cost,
    log_a,
    log_b,
    n_sizes,
    m_sizes,
    eps_start,
    f,
    g,
    iters,
    err,
    transport,
    mass,
    eps_final,
    plan,
    *,
    eps: float,
    kappa: float,
    max_iters: int,
    check_every: int,
    tol: float,
    warm_start: bool,
) -> None:
    """Solves the ``B`` problems of ``cost [B, n, m]`` (fp32/bf16/fp16, any strides, stride 0
    broadcasting over the batch) from ``log_a [B, n]``, ``log_b [B, m]`` (fp32 contiguous, -inf:
    zero weight), ``n_sizes``/``m_sizes`` (int32 ``[B]`` or None: all n / m) and ``eps_start``
    (fp32 ``[B]`` or None: no eps scaling). Writes the contiguous fp32 outputs ``f [B, n]``,
    ``g [B, m]`` (read first as the initial g when ``warm_start``), ``iters`` (int32 ``[B]``),
    ``err``, ``transport``, ``mass``, ``eps_final`` (``[B]``) and ``plan [B, n, m]`` (or None),
    following ``csrc/common/sinkhorn_args.h``. ``max_iters`` and ``check_every`` are >= 1.

    Problems with ``next_pow2(n) * next_pow2(m) <= RESIDENT_ELEMENTS`` are solved from registers,
    larger ones by streaming ``STREAM_BLOCK_N x STREAM_BLOCK_M`` tiles of the cost.
    """
    batch, n, m = cost.shape
    if batch == 0:
        return
    # eps, kappa and tol rounded to fp32 as the native binding holds them.
    eps = fp32(eps)
    if n == 0 or m == 0:
        for out in (f, g, iters, err, transport, mass) + ((plan,) if plan is not None else ()):
            out.zero_()
        eps_final.fill_(eps)
        return
    block_n = triton.next_power_of_2(n)
    block_m = triton.next_power_of_2(m)
    scalars = (eps, fp32(kappa), max_iters, check_every, fp32(tol))
    flags = dict(
        HAS_N_SIZES=n_sizes is not None,
        HAS_M_SIZES=m_sizes is not None,
        SCALING=eps_start is not None,
        WARM_START=bool(warm_start),
        HAS_PLAN=plan is not None,
    )
    outputs = (f, g, iters, err, transport, mass, eps_final, plan)
    inputs = (cost, log_a, log_b, n_sizes, m_sizes, eps_start)
    shape = (cost.stride(0), cost.stride(1), cost.stride(2), n, m)
    if block_n * block_m <= RESIDENT_ELEMENTS:
        _sinkhorn_resident_kernel[(batch,)](
            *inputs,
            *outputs,
            *shape,
            *scalars,
            **flags,
            BLOCK_N=block_n,
            BLOCK_M=block_m,
            num_warps=warps_for(block_n * block_m, ELEMENTS_PER_WARP, MAX_WARPS),
        )
    else:
        tile_n = min(STREAM_BLOCK_N, block_n)
        tile_m = min(STREAM_BLOCK_M, block_m)
        scratch = torch.empty_like(f)
        _sinkhorn_streamed_kernel[(batch,)](
            *inputs,
            *outputs,
            scratch,
            *shape,
            *scalars,
            **flags,
            BLOCK_N=tile_n,
            BLOCK_M=tile_m,
            num_warps=warps_for(tile_n * tile_m, STREAM_ELEMENTS_PER_WARP, MAX_WARPS),
        )
