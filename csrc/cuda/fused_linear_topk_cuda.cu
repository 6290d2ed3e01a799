// fused_linear_topk CUDA row kernel: the selection and sums of csrc/cpu/fused_linear_topk_cpu.cpp
// with one CTA of kThreads threads per row of the chunk's fp32 logits (rows beyond the grid by a
// grid-stride loop). Per row, with a = z / T and each a mapped to a 32-bit key whose unsigned
// order is a's (NaN as -inf, -0 as +0, so that ties are ties as floats):
//   select : radix select of the k-th largest key tau, 8 bits per pass from the top: a 256-bin
//            histogram (shared-memory atomics) of the keys that match the digits chosen so far,
//            then the digit where the count from the top reaches the number still wanted. Four
//            passes over the row; integer counts, so the result does not depend on timing.
//   gather : keys above tau are kept, and of the keys equal to tau the lowest ids, as many as
//            still wanted. When every tie is wanted (the last histogram tells; with continuous
//            logits there is one) a single pass with no barriers; otherwise the row is walked in
//            tiles of kThreads consecutive columns, each tile's ties ranked by warp ballots.
//            Kept columns take output slots from a shared counter (so in no particular order:
//            the op sorts the k slots afterwards). In the same pass each thread keeps an online
//            (max, sum exp) of its kept and of its other columns.
//   sums   : both combined over the CTA (sums in double): lse_rest of the columns outside the
//            k, shifted by their own maximum (as the CPU kernel: shifted by the row's, a tail
//            below e^-87 of the row's mass would flush term by term), lse = LSE of both,
//            log_tail = lse_rest - lse (-inf where k = vocab), logprobs a_id - lse.
// A row with a NaN, or whose logits are all -inf, has lse, log_tail and logprobs NaN.
// The row is read five times (four selection passes and the gather), from L2 at these sizes.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "block_reduce.cuh"
#include "cuda_math.cuh"
#include "fused_linear_topk_cuda.h"

namespace fastkd {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;  // 8 bits of the key per selection pass
constexpr int64_t kMaxVocab = INT_MAX - kThreads;

// a with NaN as -inf and -0 as +0: the value ranked, and stored for the kept columns. __fadd_rn:
// nvcc contracts z * (1 / T) + 0 into one FMA by default, which keeps the -0 of a product that
// underflows.
__device__ __forceinline__ float ranked_value(float a) {
  return a == a ? __fadd_rn(a, 0.0f) : kNegInf;
}

// Unsigned order of the key = order of the float (sign-magnitude to offset binary).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Selection {
  uint32_t tau;        // key of the k-th largest
  uint32_t wanted;     // ties at tau to keep (>= 1)
  bool all_ties_kept;  // every column with key tau is kept
};

__device__ Selection radix_select(const float* z, int n, float inv_t, uint32_t k, uint32_t* hist,
                                  Selection* shared) {
  uint32_t prefix = 0, mask = 0, wanted = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kBins; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const uint32_t key = order_key(ranked_value(z[j] * inv_t));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t above = 0;
      int digit = kBins - 1;
      for (; digit > 0 && above + hist[digit] < wanted; --digit) above += hist[digit];
      shared->tau = prefix | (uint32_t(digit) << shift);
      shared->wanted = wanted - above;
      shared->all_ties_kept = hist[digit] == wanted - above;
    }
    __syncthreads();
    prefix = shared->tau;
    wanted = shared->wanted;
    mask |= uint32_t(kBins - 1) << shift;
  }
  return *shared;
}

struct RowOutputs {
  int64_t* ids;
  float* values;  // a of the kept columns for now; logprobs once lse is known
  uint32_t* next_slot;
};

__device__ __forceinline__ void keep(const RowOutputs& out, int j, float v, OnlineLse& kept) {
  const uint32_t slot = atomicAdd(out.next_slot, 1u);
  out.ids[slot] = j;
  out.values[slot] = v;
  kept.add(v);
}

__global__ void __launch_bounds__(kThreads) topk_rows_kernel(TopkRowsArgs A) {
  __shared__ uint32_t hist[kBins];
  __shared__ Selection selection;
  __shared__ uint32_t next_slot;
  __shared__ uint32_t tile_ties[kWarps];
  __shared__ float max_scratch[kWarps];
  __shared__ double sum_scratch[kWarps];
  const int n = int(A.vocab);
  const float inv_t = A.inv_temperature;
  const float nan = __int_as_float(0x7fffffff);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t row = blockIdx.x; row < A.n_rows; row += gridDim.x) {
    const float* z = A.logits + row * A.row_stride;
    const Selection sel = radix_select(z, n, inv_t, uint32_t(A.k), hist, &selection);
    if (threadIdx.x == 0) next_slot = 0;
    __syncthreads();
    const RowOutputs out{A.ids + row * A.k, A.logprobs + row * A.k, &next_slot};
    OnlineLse kept, rest;
    int nan_own = 0;
    if (sel.all_ties_kept) {
      for (int j = threadIdx.x; j < n; j += kThreads) {
        const float a = z[j] * inv_t;
        nan_own |= a != a;
        const float v = ranked_value(a);
        if (order_key(v) >= sel.tau) keep(out, j, v, kept);
        else rest.add(v);
      }
    } else {
      // Ties at tau in id order: before = ties in earlier tiles + earlier warps of this tile +
      // earlier lanes of this warp; the first `wanted` of them are kept.
      uint32_t ties_before_tile = 0;
      for (int base = 0; base < n; base += kThreads) {
        const int j = base + threadIdx.x;
        const bool in_row = j < n;
        const float a = in_row ? z[j] * inv_t : kNegInf;
        nan_own |= a != a;
        const float v = ranked_value(a);
        const uint32_t key = order_key(v);
        const bool tie = in_row && key == sel.tau;
        const unsigned ballot = __ballot_sync(kFullWarp, tie);
        if (lane == 0) tile_ties[warp] = __popc(ballot);
        __syncthreads();
        uint32_t before = ties_before_tile + __popc(ballot & ((1u << lane) - 1u));
        uint32_t tile_total = 0;
        for (int w = 0; w < kWarps; ++w) {
          if (w < warp) before += tile_ties[w];
          tile_total += tile_ties[w];
        }
        __syncthreads();  // tile_ties is rewritten by the next tile
        ties_before_tile += tile_total;
        if (!in_row) continue;
        if (key > sel.tau || (tie && before < sel.wanted)) keep(out, j, v, kept);
        else rest.add(v);
      }
    }
    const bool has_nan = __syncthreads_or(nan_own) != 0;
    float kept_max, rest_max;
    double kept_sum, rest_sum;
    block_lse<kThreads>(kept, max_scratch, sum_scratch, &kept_max, &kept_sum);
    block_lse<kThreads>(rest, max_scratch, sum_scratch, &rest_max, &rest_sum);
    const float m = fmaxf(kept_max, rest_max);
    const bool valid = m > kNegInf && !has_nan;
    const double lse_rest = rest_sum > 0.0 ? double(rest_max) + log(rest_sum) : double(kNegInf);
    double total = 0.0;
    if (kept_sum > 0.0) total += kept_sum * exp(double(kept_max) - double(m));
    if (rest_sum > 0.0) total += rest_sum * exp(double(rest_max) - double(m));
    const double lse = double(m) + log(total);
    if (threadIdx.x == 0) {
      A.lse[row] = valid ? float(lse) : nan;
      A.log_tail[row] = valid ? float(lse_rest - lse) : nan;
    }
    // The slots written above are visible to every thread of the CTA after the barriers of
    // the reductions.
    for (int i = threadIdx.x; i < A.k; i += kThreads)
      out.values[i] = valid ? float(double(out.values[i]) - lse) : nan;
  }
}

}  // namespace

const char* fused_linear_topk_rows(const TopkRowsArgs& A, void* stream) {
  if (A.vocab > kMaxVocab) return "fused_linear_topk: vocabulary too large for CUDA";
  if (A.n_rows == 0) return nullptr;
  const unsigned grid = unsigned(A.n_rows < INT_MAX ? A.n_rows : INT_MAX);
  topk_rows_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(A);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace cuda
}  // namespace fastkd
