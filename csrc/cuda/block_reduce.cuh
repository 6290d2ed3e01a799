// Block-wide reductions for kernels with one CTA per row (the chunked lm_head ops' row kernels):
// every thread gets the same value, summed in the same order whatever the timing (warp xor
// shuffles, then the warps' partials in warp order), so results are deterministic.
#pragma once

#include "../common/kd_math.h"
#include "cuda_math.cuh"

namespace fastkd {
namespace cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

struct MaxOp {
  // fmaxf drops a NaN operand: a row's NaN reaches its results through the sums instead.
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// op over `v` of all kThreads threads of the CTA; `scratch` holds kThreads / 32 values of T in
// shared memory. Starts with a barrier, so consecutive calls may share one scratch array.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  constexpr int kWarps = kThreads / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullWarp, v, offset));
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}

// Online (max, sum of exp(x - max)) of a thread's share of a row; -inf and NaN terms are
// skipped (callers that must see a NaN detect it themselves).
struct OnlineLse {
  float m = kNegInf;
  float s = 0.0f;

  __device__ __forceinline__ void add(float x) {
    if (!(x > kNegInf)) return;
    if (x > m) {
      s = s * CudaMath::exp(m - x) + 1.0f;
      m = x;
    } else {
      s += CudaMath::exp(x - m);
    }
  }
};

// The CTA's (max M, sum S) of its threads' OnlineLse, S = sum_t s_t exp(m_t - M) in double;
// S = 0 and M = -inf where no thread saw a finite term.
template <int kThreads>
__device__ __forceinline__ void block_lse(const OnlineLse& t, float* max_scratch,
                                          double* sum_scratch, float* m, double* s) {
  *m = block_reduce<kThreads>(t.m, MaxOp{}, max_scratch);
  const double own = t.s > 0.0f ? double(t.s) * double(CudaMath::exp(t.m - *m)) : 0.0;
  *s = block_reduce<kThreads>(own, SumOp{}, sum_scratch);
}

}  // namespace cuda
}  // namespace fastkd
