"""What the Triton kernels share: constants, small jitted helpers (row addressing, the NaN of a
row without a distribution, the zero gradient row of an ignored token), block and warp choices,
and the rounding of scalar arguments to fp32."""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

__all__ = [
    "MAX_BLOCK_V",
    "NAN_BITS",
    "NEG_INF",
    "POS_INF",
    "fp32",
    "inverse_temperature",
    "loss_grad_weights",
    "quiet_nan",
    "row_pointer",
    "row_warps",
    "vocab_block",
    "warps_for",
    "write_zero_row",
]

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
# Quiet NaN as its fp32 bits (a float NaN global would fail the JIT's NaN != NaN global check).
NAN_BITS = tl.constexpr(0x7FC00000)

# Widest vocabulary chunk of the row kernels, run by 4 warps: 16 columns per thread, two 16-byte
# loads per model in bf16. On an H100 at V = 128256 (bf16, 4096 rows) this ran kd_loss's fkl in
# 2.14 ms and jsd in 3.57 ms, against 2.91 and 3.65 ms for 4096 columns at 16 warps; wider chunks
# leave fewer rows in flight.
MAX_BLOCK_V = 2048


@triton.jit
def row_pointer(base, row, inner_rows, outer_stride, inner_stride):
    # Row r of a [..., V] tensor addressed as in ops/_layout.py: (r // inner_rows) outer rows,
    # then (r % inner_rows) inner ones.
    return base + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride


@triton.jit
def quiet_nan():
    return tl.full([], NAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def write_zero_row(g_ptr, grad_vocab, BLOCK_V: tl.constexpr):
    # The gradient row of an ignored token: zeros over all grad_vocab columns.
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, grad_vocab, BLOCK_V):
        cols = start + offs
        tl.store(g_ptr + cols, tl.zeros([BLOCK_V], g_ptr.dtype.element_ty), mask=cols < grad_vocab)


def vocab_block(vocab: int, most: int = MAX_BLOCK_V) -> int:
    """The chunk of columns a row kernel loads at a time: next_pow2(vocab), at most ``most``
    (a kernel module passes its own ``MAX_BLOCK_V`` binding, which tests lower to reach the
    multi-chunk paths with small vocabularies)."""
    return min(triton.next_power_of_2(max(vocab, 1)), most)


def row_warps(block_v: int, most: int) -> int:
    """Warps of a row kernel: one per 256 columns of its chunk, between 1 and ``most``."""
    return max(1, min(most, block_v // 256))


def warps_for(elements: int, per_warp: int, most: int) -> int:
    """Warps for a tile of ``elements`` values at ``per_warp`` values a warp, between 1 and
    ``most``."""
    return min(most, max(1, elements // per_warp))


def fp32(x: float) -> float:
    """``x`` rounded to fp32, as a GPU takes a float argument (the interpreter would compute
    with Python's doubles) and as the native bindings round it."""
    return float(np.float32(x))


def inverse_temperature(temperature: float) -> float:
    """1/T computed in fp32, as the native bindings compute it."""
    return float(np.float32(1.0) / np.float32(temperature))


def loss_grad_weights(
    grad_scale: float, soft_weight: float, hard_weight: float, temperature: float
) -> tuple[float, float]:
    """(grad_scale soft_weight / T, grad_scale hard_weight) computed in fp32, as the native
    bindings compute them: the weights of the soft and hard terms' gradients."""
    t32 = np.float32(temperature)
    scale = np.float32(grad_scale)
    return (float(scale * (np.float32(soft_weight) / t32)), float(scale * np.float32(hard_weight)))
