// CUDA kernel of the batched log-domain Sinkhorn solver: the iteration of
// csrc/common/sinkhorn_args.h (python/fastkd/reference/sinkhorn.py states it in plain PyTorch),
// one CTA per problem, many problems per launch.
//
// A CTA of kThreads = 256 threads (8 warps) solves problems b = blockIdx.x, + gridDim.x, ...
// Where the operands live is chosen per launch from the device's opt-in shared memory per CTA:
//   staged   : the cost, as fp32, is copied once into shared memory as [n_b, s] with the odd row
//              stride s = m_b | 1 (m_b + 1 for even m_b), so that the 32 lanes of a warp reading
//              one column touch 32 distinct banks; f, g, the log weights and a spare f' are there
//              too: 4 (n (m | 1) + 3 n + 2 m) bytes (128 x 128: 68,608).
//   streamed : the cost does not fit; it is re-read from global memory (L2) by every pass, and
//              f, f', g, log a, log b stay in shared memory: 4 (3 n + 2 m) bytes.
//   global   : not even those fit; f and g are kept in the output arrays, the log weights are
//              read where they are, and there is no f'.
//
// Every update is a log-sum-exp per line (a row for F, a column for G) over the other axis k:
//   out_l = -e LSE_k x_lk,   x_lk = (p_k - C_lk) / e + log w_k,  -inf where log w_k = -inf
// (whatever the cost holds there), p, w = g, b for F and f, a for G. Two mappings:
//   line mode  : a warp per line, its lanes along k. Each lane keeps an online (max, sum) over
//                steps of kPerLane = 4 of its elements (one rescaling exp per step), then
//                LSE = M + log sum_lanes s_lane exp(m_lane - M), M the warp max (shuffles).
//                Used for both passes when staged (the padded stride makes the column pass of G
//                conflict-free), and for a streamed pass whose k axis is the contiguous one.
//   strip mode : for a streamed pass whose lines are the contiguous axis (G of a row-major cost,
//                F of a transposed one), 32 lines per step, a lane per line so that a warp's
//                loads are coalesced, the 8 warps splitting k; their (max, sum) pairs are
//                combined through shared memory in a fixed order by warp 0.
// Sums run in a fixed order, so results do not depend on timing.
//
// The loop of sinkhorn_args.h, with one fusion: E needs F(g) row by row, and a check that does
// not stop happens at e = eps (during the schedule a check happens only at max_iters, which
// stops), so the next iteration's F is the very same computation. E therefore writes F(g) into
// f' and, when the loop goes on, f' becomes f and that F pass is skipped (not in the global
// placement, which has no f'). The stop test is a block-wide sum of the error terms (the same
// value in every thread), then a uniform branch.
// Final pass: P_ij, transport = sum P C and mass = sum P at the final (f, g, e) (that e, the e
// of the last iteration, is eps_final), the plan rows written whole (zeros outside [n_b, m_b])
// with coalesced streaming stores.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/kd_math.h"
#include "cuda_math.cuh"
#include "sinkhorn_cuda.h"

namespace fastkd {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = 4;  // elements per lane between two rescalings of the online sum
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Cost elements as fp32.

__device__ __forceinline__ float load_cost(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_cost(const bf16_t* p) {
  return to_float(bf16_t{__ldg(reinterpret_cast<const unsigned short*>(p))});
}
__device__ __forceinline__ float load_cost(const fp16_t* p) {
  return to_float(fp16_t{__ldg(reinterpret_cast<const unsigned short*>(p))});
}

// C as seen by a pass: element (line l, position k along the line). The row pass F takes
// (l, k) = (i, j), the column pass G (l, k) = (j, i), by swapping the strides.
template <typename T, bool STAGED>
struct CostView {  // streamed: global memory of dtype T, element strides
  const T* p;
  int64_t s_line, s_k;
  __device__ __forceinline__ float operator()(int l, int k) const {
    return load_cost(p + l * s_line + k * s_k);
  }
};

template <typename T>
struct CostView<T, true> {  // staged: fp32 in shared memory
  const float* p;
  int s_line, s_k;
  __device__ __forceinline__ float operator()(int l, int k) const {
    return p[l * s_line + k * s_k];
  }
};

// ---------------------------------------------------------------------------------------------
// Log-sum-exp.

// Online state: mx = max of the x seen, s = sum exp(x - shift(mx)).
struct Lse {
  float mx, s;
};

// shift(mx): mx, or 0 when mx is infinite, so that no inf - inf appears (at mx = -inf all terms
// are exp(-inf) = 0; at mx = +inf the sum, hence the LSE, becomes +inf as it should).
__device__ __forceinline__ float lse_shift(float mx) { return isinf(mx) ? 0.0f : mx; }

// Adds x[0, count) (count in [1, kPerLane], warp-uniform) to `a` with one rescaling:
//   mx' = max(mx, max x),  s' = s exp(mx - shift(mx')) + sum exp(x - shift(mx')).
// fmaxf drops NaN from the max, but the NaN term itself then makes s NaN.
__device__ __forceinline__ Lse lse_add(Lse a, const float (&x)[kPerLane], int count) {
  float top = x[0];
#pragma unroll
  for (int u = 1; u < kPerLane; ++u)
    if (u < count) top = fmaxf(top, x[u]);
  const float mx = fmaxf(a.mx, top);
  const float shift = lse_shift(mx);
  float s = a.s * CudaMath::exp(a.mx - shift);
#pragma unroll
  for (int u = 0; u < kPerLane; ++u)
    if (u < count) s += CudaMath::exp(x[u] - shift);
  return {mx, s};
}

// LSE of the union of the lanes' states, in every lane (the xor butterfly adds the same pairs in
// every lane, and float addition commutes).
__device__ __forceinline__ float warp_lse(Lse a) {
  float mx = a.mx;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, offset));
  const float shift = lse_shift(mx);
  float s = a.s * CudaMath::exp(a.mx - shift);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(kFullMask, s, offset);
  return shift + CudaMath::log(s);
}

// x_lk = (p_k - C_lk) / e + log w_k, or -inf for a zero weight without reading the cost.
template <class Cost>
__device__ __forceinline__ float lse_term(const Cost& c, int l, int k, const float* pot,
                                          const float* logw, float inv_e) {
  const float w = logw[k];
  return w == kNegInf ? kNegInf : fmaf(pot[k] - c(l, k), inv_e, w);
}

// Line mode: warp w takes lines w, w + kWarps, ...; lane 0 calls out(l, LSE_k x_lk).
template <class Cost, class Out>
__device__ __forceinline__ void lse_lines(const Cost& c, int lines, int len, const float* pot,
                                          const float* logw, float inv_e, Out out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int l = warp; l < lines; l += kWarps) {
    Lse acc{kNegInf, 0.0f};
    for (int k0 = 0; k0 < len; k0 += 32 * kPerLane) {
      const int count = min(kPerLane, (len - k0 + 31) / 32);
      float x[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int k = k0 + 32 * u + lane;
        x[u] = k < len ? lse_term(c, l, k, pot, logw, inv_e) : kNegInf;
      }
      acc = lse_add(acc, x, count);
    }
    const float lse = warp_lse(acc);
    if (lane == 0) out(l, lse);
  }
}

// Strip mode: lines l0 + lane, 32 at a time; warp w takes k = w, w + kWarps, ... Its partial
// states meet in partial[buf] (double-buffered: warp 0 may still read one strip's while the
// others fill the next), and warp 0 calls out(l, LSE) for its lane's line.
template <class Cost, class Out>
__device__ __forceinline__ void lse_strips(const Cost& c, int lines, int len, const float* pot,
                                           const float* logw, float inv_e,
                                           float2 (*partial)[kWarps][32], Out out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int l0 = 0, buf = 0; l0 < lines; l0 += 32, buf ^= 1) {
    const int l = l0 + lane;
    const bool live = l < lines;
    Lse acc{kNegInf, 0.0f};
    for (int k0 = warp; k0 < len; k0 += kWarps * kPerLane) {
      const int count = min(kPerLane, (len - k0 + kWarps - 1) / kWarps);
      float x[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int k = k0 + kWarps * u;
        x[u] = u < count && live ? lse_term(c, l, k, pot, logw, inv_e) : kNegInf;
      }
      acc = lse_add(acc, x, count);
    }
    partial[buf][warp][lane] = make_float2(acc.mx, acc.s);
    __syncthreads();
    if (warp == 0) {
      float mx = kNegInf;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, partial[buf][w][lane].x);
      const float shift = lse_shift(mx);
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 p = partial[buf][w][lane];
        s += p.y * CudaMath::exp(p.x - shift);
      }
      if (live) out(l, shift + CudaMath::log(s));
    }
  }
}

// out(l, LSE_{k < len} x_lk) for every line l < lines, in one of the two modes (uniform).
template <class Cost, class Out>
__device__ __forceinline__ void lse_pass(const Cost& c, bool line_mode, int lines, int len,
                                         const float* pot, const float* logw, float inv_e,
                                         float2 (*partial)[kWarps][32], Out out) {
  if (line_mode) lse_lines(c, lines, len, pot, logw, inv_e, out);
  else lse_strips(c, lines, len, pot, logw, inv_e, partial, out);
}

// ---------------------------------------------------------------------------------------------
// Block-wide helpers.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the CTA, returned to every thread bit-identical (each adds the warp sums in the same
// order). `slots` may be rewritten only after a later __syncthreads.
__device__ __forceinline__ float block_sum(float v, float* slots) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += slots[w];
  return total;
}

__device__ __forceinline__ float2 block_sum2(float2 v, float2* slots) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total.x += slots[w].x, total.y += slots[w].y;
  return total;
}

// fn(i, j) for every cell of a row-major [rows, cols] grid, thread t taking the flat indices
// t, t + kThreads, ... (consecutive threads on consecutive columns), stepped without divisions.
template <class Fn>
__device__ __forceinline__ void for_each_cell(int rows, int cols, Fn fn) {
  if (cols == 0) return;
  const int di = kThreads / cols, dj = kThreads % cols;
  int i = threadIdx.x / cols, j = threadIdx.x % cols;
  while (i < rows) {
    fn(i, j);
    i += di;
    j += dj;
    if (j >= cols) j -= cols, ++i;
  }
}

// n_b or m_b: sizes[b] clamped to [0, full], or full without sizes.
__device__ __forceinline__ int problem_size(const int32_t* sizes, int64_t b, int full) {
  if (sizes == nullptr) return full;
  const int s = sizes[b];
  return s < 0 ? 0 : (s > full ? full : s);
}

// ---------------------------------------------------------------------------------------------
// The kernel. STAGED: the cost in shared memory (which then also holds the potentials); else
// streamed, with the potentials in shared memory when `shared_potentials`, else in f and g.

// 4 CTAs per SM (64 registers): enough to overlap one problem's L2 reads with another's
// arithmetic when streamed; staged, shared memory admits fewer anyway.
template <typename T, bool STAGED>
__global__ void __launch_bounds__(kThreads, 4)
    sinkhorn_kernel(const SinkhornArgs args, bool shared_potentials) {
  // [cost: n x (m | 1), staged only] f [n] | f' [n] | g [m] | log a [n] | log b [m]
  extern __shared__ float smem[];
  __shared__ float2 partial[2][kWarps][32];
  __shared__ float err_slots[kWarps];
  __shared__ float2 sum_slots[kWarps];
  const int n = int(args.n), m = int(args.m);
  const int64_t si = args.cost_stride_i, sj = args.cost_stride_j;
  // A streamed pass runs in line mode when its k axis is the more contiguous one.
  const bool rows_by_line = STAGED || llabs(sj) <= llabs(si);
  const bool cols_by_line = STAGED || llabs(si) <= llabs(sj);
  const bool shared = STAGED || shared_potentials;
  float* const potentials = smem + (STAGED ? n * (m | 1) : 0);

  for (int64_t b = blockIdx.x; b < args.batch; b += gridDim.x) {
    int rows = problem_size(args.n_sizes, b, n), cols = problem_size(args.m_sizes, b, m);
    if (rows == 0 || cols == 0) rows = cols = 0;  // empty: zeros everywhere
    float* const f_out = args.f + b * n;
    float* const g_out = args.g + b * m;
    for (int i = rows + threadIdx.x; i < n; i += kThreads) f_out[i] = 0.0f;
    for (int j = cols + threadIdx.x; j < m; j += kThreads) g_out[j] = 0.0f;

    float* f = f_out;
    float* f2 = nullptr;
    float* g = g_out;
    const float* la = args.log_a + b * n;
    const float* lb = args.log_b + b * m;
    if (shared) {
      f = potentials;
      f2 = f + n;
      g = f2 + n;
      float* const sa = g + m;
      float* const sb = sa + n;
      for (int i = threadIdx.x; i < rows; i += kThreads) sa[i] = la[i];
      for (int j = threadIdx.x; j < cols; j += kThreads) {
        sb[j] = lb[j];
        g[j] = args.warm_start ? g_out[j] : 0.0f;
      }
      la = sa;
      lb = sb;
    } else if (!args.warm_start) {
      for (int j = threadIdx.x; j < cols; j += kThreads) g[j] = 0.0f;
    }

    const T* const cost = static_cast<const T*>(args.cost) + b * args.cost_stride_b;
    CostView<T, STAGED> by_row, by_col;
    if constexpr (STAGED) {
      const int s = cols | 1;
      // Walk the global cost along its more contiguous axis (the shared stores are
      // conflict-free either way: consecutive j, or consecutive i at the odd stride s).
      const auto copy = [&](int i, int j) { smem[i * s + j] = load_cost(cost + i * si + j * sj); };
      if (llabs(sj) <= llabs(si)) for_each_cell(rows, cols, copy);
      else for_each_cell(cols, rows, [&](int j, int i) { copy(i, j); });
      by_row = {smem, s, 1};
      by_col = {smem, 1, s};
    } else {
      by_row = {cost, si, sj};
      by_col = {cost, sj, si};
    }
    __syncthreads();

    int it = 0;
    float err = 0.0f;
    float e = args.eps;
    if (rows > 0) {
      if (args.eps_start != nullptr && args.eps_start[b] > e) e = args.eps_start[b];
      bool fused = false;  // f already holds F(g) at this e (from the last check)
      for (;;) {
        // The potentials are -LSE / inv_e, not -e LSE: the iteration is then exactly the one at
        // e' = 1 / fl(1/e), whereas -e LSE would be off by the rounding of 1/e, an error of
        // |C| / e ulps in the exponents that no iteration removes.
        const float inv_e = 1.0f / e;
        if (!fused) {
          lse_pass(by_row, rows_by_line, rows, cols, g, lb, inv_e, partial,
                   [&](int i, float lse) { f[i] = -lse / inv_e; });
          __syncthreads();
        }
        lse_pass(by_col, cols_by_line, cols, rows, f, la, inv_e, partial,
                 [&](int j, float lse) { g[j] = -lse / inv_e; });
        __syncthreads();
        ++it;
        const bool stage = e > args.eps;
        const bool last = it >= args.max_iters;
        fused = false;
        if ((!stage || last) && (it % args.check_every == 0 || last)) {
          // err = sum_i a_i |exp((f_i - F(g)_i) / e) - 1| over a_i > 0; F(g) rounded as the F
          // pass rounds it (__fdiv_rn: no contraction into the subtraction).
          float part = 0.0f;
          lse_pass(by_row, rows_by_line, rows, cols, g, lb, inv_e, partial, [&](int i, float lse) {
            const float fg = __fdiv_rn(-lse, inv_e);
            const float a = CudaMath::exp(la[i]);
            if (a > 0.0f) part += a * fabsf(CudaMath::exp((f[i] - fg) * inv_e) - 1.0f);
            if (f2 != nullptr) f2[i] = fg;
          });
          err = block_sum(part, err_slots);
          if (err < args.tol || last) break;
          if (f2 != nullptr) {  // not stopped, so stage is false: e stays, f' is the next F
            float* const t = f;
            f = f2;
            f2 = t;
            fused = true;
          }
        }
        if (stage) e = fmaxf(e * args.kappa, args.eps);
      }
    }

    // P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j), 0 for a zero weight or outside
    // [n_b, m_b]; the plan's whole [n, m] slab is written.
    const float inv_e = 1.0f / e;
    float* const plan = args.plan != nullptr ? args.plan + b * n * int64_t(m) : nullptr;
    float2 acc = make_float2(0.0f, 0.0f);
    for_each_cell(plan != nullptr ? n : rows, plan != nullptr ? m : cols, [&](int i, int j) {
      float p = 0.0f;
      if (i < rows && j < cols && la[i] != kNegInf && lb[j] != kNegInf) {
        const float c = by_row(i, j);
        p = CudaMath::exp((f[i] + g[j] - c) * inv_e + la[i] + lb[j]);
        acc.x += p * c;
        acc.y += p;
      }
      if (plan != nullptr) __stcs(plan + i * int64_t(m) + j, p);
    });
    const float2 total = block_sum2(acc, sum_slots);
    if (threadIdx.x == 0) {
      args.iters[b] = it;
      args.err[b] = err;
      args.transport[b] = total.x;
      args.mass[b] = total.y;
      args.eps_final[b] = e;
    }
    if (shared) {
      for (int i = threadIdx.x; i < rows; i += kThreads) f_out[i] = f[i];
      for (int j = threadIdx.x; j < cols; j += kThreads) g_out[j] = g[j];
    }
    __syncthreads();  // the next problem overwrites shared memory and sum_slots
  }
}

using Kernel = void (*)(SinkhornArgs, bool);

template <bool STAGED>
Kernel kernel_for(int dtype) {
  switch (dtype) {
    case kFloat32: return sinkhorn_kernel<float, STAGED>;
    case kBFloat16: return sinkhorn_kernel<bf16_t, STAGED>;
    default: return sinkhorn_kernel<fp16_t, STAGED>;
  }
}

}  // namespace

const char* sinkhorn(const SinkhornArgs& args, void* stream) {
  if (args.batch < 0 || args.n < 0 || args.m < 0) return "sinkhorn: negative size";
  // Rows and columns are int inside the kernel, whose loop counters step past them by < 1024.
  if (args.n > INT_MAX - 1024 || args.m > INT_MAX - 1024)
    return "sinkhorn: n or m too large for CUDA";
  if (args.max_iters < 1) return "sinkhorn: max_iters must be >= 1";
  if (args.check_every < 1) return "sinkhorn: check_every must be >= 1";
  if (!(args.eps > 0.0f)) return "sinkhorn: eps must be > 0";
  if (args.eps_start != nullptr && !(args.kappa > 0.0f && args.kappa < 1.0f))
    return "sinkhorn: kappa must lie in (0, 1)";
  if (args.cost_dtype != kFloat32 && args.cost_dtype != kBFloat16 && args.cost_dtype != kFloat16)
    return "sinkhorn: cost dtype must be float32, bfloat16 or float16";
  if (args.batch == 0) return nullptr;
  if (args.iters == nullptr || args.err == nullptr || args.transport == nullptr ||
      args.mass == nullptr || args.eps_final == nullptr || (args.n > 0 && args.f == nullptr) ||
      (args.m > 0 && args.g == nullptr))
    return "sinkhorn: missing output";
  if (args.n > 0 && args.m > 0 &&
      (args.cost == nullptr || args.log_a == nullptr || args.log_b == nullptr))
    return "sinkhorn: missing input";

  int device = 0, optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess)
    status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return cudaGetErrorString(status);

  // Staged when cost and potentials fit beside the kernel's static shared memory; else
  // streamed, with the potentials in shared memory when they fit. Sizes in floats (the cost's
  // n (m | 1) < 2^62 fits int64, its byte count need not).
  const int64_t potential_floats = 3 * args.n + 2 * args.m;
  const int64_t cost_floats = args.n * (args.m | 1);
  Kernel kernel = kernel_for<true>(args.cost_dtype);
  cudaFuncAttributes attr;
  if ((status = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess)
    return cudaGetErrorString(status);
  int64_t dynamic_floats = cost_floats + potential_floats;
  bool shared_potentials = true;
  if (dynamic_floats > (optin - int64_t(attr.sharedSizeBytes)) / 4) {
    kernel = kernel_for<false>(args.cost_dtype);
    if ((status = cudaFuncGetAttributes(&attr, kernel)) != cudaSuccess)
      return cudaGetErrorString(status);
    shared_potentials = potential_floats <= (optin - int64_t(attr.sharedSizeBytes)) / 4;
    dynamic_floats = shared_potentials ? potential_floats : 0;
  }
  const int64_t dynamic_bytes = 4 * dynamic_floats;
  if (dynamic_bytes > attr.maxDynamicSharedSizeBytes &&
      (status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(dynamic_bytes))) != cudaSuccess)
    return cudaGetErrorString(status);

  // Problems beyond the grid are taken by the grid-stride loop.
  const unsigned grid = unsigned(args.batch < INT_MAX ? args.batch : INT_MAX);
  kernel<<<grid, kThreads, size_t(dynamic_bytes), static_cast<cudaStream_t>(stream)>>>(
      args, shared_potentials);
  status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace cuda
}  // namespace fastkd
