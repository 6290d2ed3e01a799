// fused_linear_logprobs CUDA row kernel: the math of csrc/cpu/fused_linear_logprobs_cpu.cpp
// (token_logprob_math.h) with one CTA of kThreads threads per row of the chunk's fp32 logits
// (rows beyond the grid by a grid-stride loop). Per row, with a = z / T:
//   max    : m = max_j a_j over the row (NaN dropped; a NaN anywhere is flagged);
//   sums   : e_j = exp(a_j - m), each thread's S_t = sum e_j and W_t = sum e_j (a_j - m) in fp32
//            over its columns j = t, t + kThreads, ... (about V / 256 = 500 terms at V = 128k),
//            the threads' partials added in double in a fixed order; lse = m + log S,
//            logprob = a_t - lse, H = log S - W / S;
//   grad   : with the row's incoming gradients, dL/dz_j written over the row, re-reading a_j.
// The row is read from global memory (L2 at these sizes) two or three times; no shared memory
// beyond the reductions'. A row whose logits are all -inf has no softmax (lse = -inf, the other
// outputs and the gradient NaN); a NaN anywhere makes every output and the gradient NaN, as does
// a target outside [0, vocab) that is not ignore_index (the op checks targets on CPU only, where
// that costs no synchronization), instead of an out-of-bounds read.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/token_logprob_math.h"
#include "block_reduce.cuh"
#include "cuda_math.cuh"
#include "fused_linear_logprobs_cuda.h"

namespace fastkd {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Columns are int: j + kThreads must not overflow.
constexpr int64_t kMaxVocab = INT_MAX - kThreads;

__global__ void __launch_bounds__(kThreads) logprob_rows_kernel(LogprobRowsArgs A) {
  __shared__ float max_scratch[kWarps];
  __shared__ double sum_scratch[kWarps];
  const int n = int(A.vocab);
  const float inv_t = A.inv_temperature;
  const float nan = __int_as_float(0x7fffffff);
  for (int64_t row = blockIdx.x; row < A.n_rows; row += gridDim.x) {
    float* z = A.logits + row * A.row_stride;
    const int64_t target = A.targets[row];
    if (target == A.ignore_index) {
      if (threadIdx.x == 0) {
        A.logprob[row] = 0.0f;
        A.lse[row] = 0.0f;
        if (A.entropy) A.entropy[row] = 0.0f;
      }
      if (A.row_grads)
        for (int j = threadIdx.x; j < n; j += kThreads) z[j] = 0.0f;
      continue;
    }
    const bool target_ok = target >= 0 && target < n;
    // Read before any thread writes the gradient over the row (the reductions below are
    // barriers in between).
    const float a_target = target_ok ? z[target] * inv_t : nan;

    float m_own = kNegInf;
    int nan_own = 0;
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const float a = z[j] * inv_t;
      m_own = fmaxf(m_own, a);
      nan_own |= a != a;
    }
    const float m = block_reduce<kThreads>(m_own, MaxOp{}, max_scratch);
    const bool has_nan = __syncthreads_or(nan_own) != 0;
    const bool valid = m > kNegInf && !has_nan && target_ok;

    float s_own = 0.0f, w_own = 0.0f;
    if (valid)
      for (int j = threadIdx.x; j < n; j += kThreads) {
        const float d = z[j] * inv_t - m;
        const float e = CudaMath::exp(d);
        s_own += e;
        w_own += entropy_term(e, d);
      }
    const double sum = block_reduce<kThreads>(double(s_own), SumOp{}, sum_scratch);
    const double weighted = block_reduce<kThreads>(double(w_own), SumOp{}, sum_scratch);
    const double log_sum_d = log(sum);
    const double lse_d = double(m) + log_sum_d;
    const float h = float(log_sum_d - weighted / sum);
    if (threadIdx.x == 0) {
      if (valid) {
        A.lse[row] = float(lse_d);
        A.logprob[row] = float(double(a_target) - lse_d);
        if (A.entropy) A.entropy[row] = h;
      } else {
        A.lse[row] = m > kNegInf || has_nan || !target_ok ? nan : kNegInf;
        A.logprob[row] = nan;
        if (A.entropy) A.entropy[row] = nan;
      }
    }
    if (!A.row_grads) continue;
    if (!valid) {
      for (int j = threadIdx.x; j < n; j += kThreads) z[j] = nan;
      continue;
    }
    const float* g = A.row_grads + 3 * row;
    const float scale = A.grad_scale * inv_t;
    const LogprobGradCoefs c{g[1] - g[0], A.entropy ? g[2] : 0.0f, h, scale};
    const float target_grad = scale * g[0];
    const float inv_sum = float(1.0 / sum);
    const float log_sum = float(log_sum_d);
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const float d = z[j] * inv_t - m;
      const float grad = logprob_grad(c, CudaMath::exp(d) * inv_sum, d - log_sum);
      z[j] = j == target ? grad + target_grad : grad;
    }
  }
}

}  // namespace

const char* fused_linear_logprobs_rows(const LogprobRowsArgs& A, void* stream) {
  if (A.vocab > kMaxVocab) return "fused_linear_logprobs: vocabulary too large for CUDA";
  if (A.n_rows == 0) return nullptr;
  // Rows beyond the grid are taken by the grid-stride loop.
  const unsigned grid = unsigned(A.n_rows < INT_MAX ? A.n_rows : INT_MAX);
  logprob_rows_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(A);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace cuda
}  // namespace fastkd
