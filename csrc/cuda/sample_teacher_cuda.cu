// Random-sampling sparse teacher targets on CUDA: the draws of csrc/cpu/sample_teacher_cpu.cpp and
// python/fastkd/triton/sample_teacher.py (the same Philox uniforms and thresholds, and the same
// rule: draw k lands on the first column whose cumulative mass exceeds t_k), with one CTA of
// kThreads threads per row (rows beyond the grid by a grid-stride loop).
//
// The row is cut into chunks of kWidth = 512 columns; in a chunk, lane l of a warp loads the
// groups of kGroup = 8 columns l and l + 32 (coalesced, 16 bytes wide where the row is 16-byte
// aligned). Per row, with a = z / T in fp32:
//   1. stats  : warp w takes chunks w, w + kWarps, ...: the chunk's maximum m_c and
//               s_c = sum e'_i, e'_i = exp(a_i - m_c) in fp32, go to shared memory (each pair
//               of columns 2 i, 2 i + 1 summed in fp32, the pair sums in double). NaN or +inf in
//               a marks the row invalid (no draws). At T != 1 each lane also keeps an online
//               (max, sum exp) of z itself, for LSE(z).
//   2. masses : m = max m_c; chunk masses M_c = s_c exp(m_c - m) (the factor in double), their
//               inclusive scan I_c, and the chunk ends J_c = max(I_c' : c' <= c, M_c' > 0) (0 if
//               none). The prefix maximum is exact whatever the rounding of the scan's additions,
//               so the intervals [J_{c-1}, J_c) are ordered, partition [0, S) with S = the last
//               J_c, and are empty for the chunks without mass.
//   3. draws  : E_j = -log u_j for j = 0..N (u from Philox keyed by (seed, token, draw), the log
//               in fp32), C their inclusive scan (double), thresholds t_k = C_k (S / C_N) for
//               k < N. Consecutive C_k differ by at least -log(1 - 2^-25) ~ 3e-8, far above the
//               scan's rounding, so the t_k are sorted.
//   4. merge  : chunk c holds the draws with t_k in [J_{c-1}, J_c) (binary search); the last
//               chunk with mass also takes any t_k >= S. Warp w walks the chunks w, w + kWarps, ...
//               that hold draws. Lane l now owns the kPerLane = 16 consecutive columns
//               16 l .. 16 l + 15 of the chunk, with masses exp(m_c - m) e'_i: the very e'_i and
//               pair sums of step 1, so the chunk's masses add up to M_c up to double rounding.
//               (This consistency matters: fp32 sums of the chunks in step 1 against double
//               sums in the walk would shift every later column boundary by the fp32 rounding of
//               the large masses, and the draws would differ from the exact ones at long rows.)
//               The lanes' masses are scanned and prefix-maximized as in step 2, and each lane
//               gives each draw of its interval the first of its columns whose running mass
//               exceeds t_k. Draws that a lane's running sum does not reach (it rounds below the
//               interval's end) go to the lane's last column of nonzero mass; the last lane with
//               mass also takes the draws above the lanes' total, which thereby go to the chunk's
//               last column of nonzero mass, and those >= S to the row's.
//               An interval is nonempty only where its lane or chunk has mass, and a chunk with
//               mass has a column of nonzero e' (its maximum, e' = 1), so every draw lands on a
//               column of nonzero mass, and the draws' columns are nondecreasing in k.
//               A lane finds where each column's draws end by a binary search in the thresholds,
//               so many draws on one column cost no more than a few.
//   5. slots  : the walk leaves, per draw k, the column of the run of draws that starts at k
//               (-1 inside a run); a block scan over the run starts gives each run its slot:
//               distinct ids ascending, counts from the distances between run starts.
//   6. weights: count / N, times p / r = exp(log p - log r) for T != 1, with log r = a - LSE(a),
//               LSE(a) = m + log S, and log p = z - LSE(z) (LSE(z) = LSE(a) at T = 1); -1 / 0 / 0
//               in the slots past the kept ids.
// Step 1 reads the row from global memory once; step 4 re-reads only the chunks that hold draws
// (at most N). Every sum and scan runs in a fixed order: results do not depend on timing.
//
// Shared memory per CTA: 16 bytes per chunk and 16 per draw (see shared_bytes); the launcher
// refuses a call whose num_samples (or vocabulary) needs more than the device allows.
#include "sample_teacher_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../common/dtype.h"
#include "../common/kd_math.h"
#include "../common/philox.h"
#include "cuda_math.cuh"

namespace fastkd {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                     // columns per load: 16 bytes of bf16 / fp16
constexpr int kGroups = 2;                    // groups per lane and chunk
constexpr int kPerLane = kGroup * kGroups;    // columns per lane and chunk
constexpr int kWidth = 32 * kPerLane;         // columns per chunk
constexpr int kPerThread = 4;                 // scan elements per thread (chunks, draws, runs)
constexpr int kTile = kThreads * kPerThread;  // elements per block scan
constexpr int kMaxVocab = INT_MAX - kWidth;   // columns are int, with a chunk of slack
constexpr unsigned kFullMask = 0xffffffffu;

// A thread's four draws take the four words of one Philox block.
static_assert(kPerThread == 4, "draw tiles map one Philox block to each thread");

// ---------------------------------------------------------------------------------------------
// Loads as fp32.

__device__ __forceinline__ float load_element(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_element(const bf16_t* p) {
  return __uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ __forceinline__ float load_element(const fp16_t* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// kGroup elements at the 16-byte aligned p.
__device__ __forceinline__ void load_vector(const float* p, float (&z)[kGroup]) {
  const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
  const float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
  z[0] = lo.x, z[1] = lo.y, z[2] = lo.z, z[3] = lo.w;
  z[4] = hi.x, z[5] = hi.y, z[6] = hi.z, z[7] = hi.w;
}
__device__ __forceinline__ void load_vector(const bf16_t* p, float (&z)[kGroup]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    z[2 * i] = __uint_as_float(w[i] << 16);
    z[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load_vector(const fp16_t* p, float (&z)[kGroup]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  __half2 h[4];
  memcpy(h, &v, sizeof(h));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    z[2 * i] = f.x;
    z[2 * i + 1] = f.y;
  }
}

// Columns col .. col + kGroup - 1 of `row` (col a multiple of kGroup) as fp32, -inf past the
// row's end; vector loads where the row is 16-byte aligned and the group lies inside it.
template <typename T>
__device__ __forceinline__ void load_group(const T* row, int col, int vocab, bool aligned,
                                           float (&z)[kGroup]) {
  if (aligned && col + kGroup <= vocab) {
    load_vector(row + col, z);
    return;
  }
#pragma unroll
  for (int e = 0; e < kGroup; ++e) z[e] = col + e < vocab ? load_element(row + col + e) : kNegInf;
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp of z (T != 1): mx = max of the values seen, s = sum exp(x - shift) with
// shift = mx, or 0 while mx = -inf so that no -inf - -inf is formed.

// The factor that re-expresses a sum taken against `from` against `to` >= from: 0 when
// from = -inf (the sum is then 0).
__device__ __forceinline__ float rescale_factor(float from, float to) {
  return from == kNegInf ? 0.0f : CudaMath::exp(from - to);
}

// Adds x[0 .. kGroup) to (mx, s), the group's terms summed in fp32 first.
__device__ __forceinline__ void online_add(float& mx, double& s, const float (&x)[kGroup]) {
  float top = x[0];
#pragma unroll
  for (int e = 1; e < kGroup; ++e) top = fmaxf(top, x[e]);
  if (top > mx) {
    s *= rescale_factor(mx, top);
    mx = top;
  }
  const float shift = mx == kNegInf ? 0.0f : mx;
  float group = 0.0f;
#pragma unroll
  for (int e = 0; e < kGroup; ++e) group += CudaMath::exp(x[e] - shift);
  s += group;
}

// ---------------------------------------------------------------------------------------------
// Scans and reductions in a fixed order.

template <typename V>
struct Sum {
  __device__ __forceinline__ V operator()(V x, V y) const { return x + y; }
};
template <typename V>
struct Max {
  __device__ __forceinline__ V operator()(V x, V y) const { return x > y ? x : y; }
};

// Inclusive scan over the lanes of a warp (Kogge-Stone; earlier lanes on the left of op).
template <typename V, class Op>
__device__ __forceinline__ V warp_scan(V v, Op op) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const V earlier = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v = op(earlier, v);
  }
  return v;
}

// op over the lanes of a warp, in every lane (the xor butterfly combines the same pairs in every
// lane, and op commutes).
template <typename V, class Op>
__device__ __forceinline__ V warp_all(V v, Op op) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Inclusive scan of every thread's v[0 .. kPerThread), thread t's elements following thread
// t - 1's: sequential within a thread, then across lanes, then the warps' totals in order.
// Returns the block total to every thread. Every thread of the CTA calls it (two barriers).
template <typename V, class Op>
__device__ __forceinline__ V block_scan(V (&v)[kPerThread], Op op, V identity, V* warp_slots) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 1; i < kPerThread; ++i) v[i] = op(v[i - 1], v[i]);
  const V inclusive = warp_scan(v[kPerThread - 1], op);
  V before = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane == 0) before = identity;
  if (lane == 31) warp_slots[warp] = inclusive;
  __syncthreads();
  V offset = identity, total = identity;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) offset = total;
    total = op(total, warp_slots[w]);
  }
  __syncthreads();  // the slots are free for the next call
  const V prefix = op(offset, before);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) v[i] = op(prefix, v[i]);
  return total;
}

// max over the CTA, in every thread. Every thread of the CTA calls it (two barriers).
template <typename V>
__device__ __forceinline__ V block_max(V v, V* warp_slots) {
  v = warp_all(v, Max<V>());
  if (threadIdx.x % 32 == 0) warp_slots[threadIdx.x / 32] = v;
  __syncthreads();
  V total = warp_slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = Max<V>()(total, warp_slots[w]);
  __syncthreads();
  return total;
}

// LSE of the union of the threads' online states (mx, s), in every thread. Every thread of the
// CTA calls it (two barriers).
__device__ __forceinline__ float block_lse(float mx, double s, float* max_slots,
                                           double* sum_slots) {
  const float top = warp_all(mx, Max<float>());
  const double sum = warp_all(s * rescale_factor(mx, top), Sum<double>());
  if (threadIdx.x % 32 == 0) {
    max_slots[threadIdx.x / 32] = top;
    sum_slots[threadIdx.x / 32] = sum;
  }
  __syncthreads();
  float row_top = kNegInf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) row_top = fmaxf(row_top, max_slots[w]);
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += sum_slots[w] * rescale_factor(max_slots[w], row_top);
  __syncthreads();
  return row_top + float(log(total));
}

// First k in [lo, hi) with t[k] >= x, or hi; t sorted.
__device__ __forceinline__ int lower_bound(const double* t, int lo, int hi, double x) {
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (t[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// The kernel.

// Dynamic shared memory, in this order: per chunk its sum s_c, then its end J_c (double), per
// draw j <= N the cumulative C_j, then the threshold t_j (double); per chunk its maximum m_c
// (float) and the end of its draws (int); per draw the column of the run starting there, per
// slot its first draw (int).
int64_t shared_bytes(int64_t n_chunks, int64_t num_samples) {
  return 16 * n_chunks + 16 * num_samples + 8;
}

// The scale exp(m_c - m) of chunk c's masses e' against the row's maximum, in double.
__device__ __forceinline__ double chunk_scale(float chunk_max, float m) {
  return exp(double(chunk_max) - double(m));
}

// 4 CTAs per SM (64 registers): several rows in flight per SM, so that the loads of step 1 of
// some rows overlap the scans and merges of others.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    sample_teacher_kernel(const SampleTeacherArgs A, int n_chunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double double_slots[kWarps];
  __shared__ float float_slots[kWarps];
  __shared__ int int_slots[kWarps];

  const int n_draws = A.num_samples;
  double* const chunk_sum = reinterpret_cast<double*>(smem);  // s_c, then J_c
  double* const thresholds = chunk_sum + n_chunks;            // C_j, then t_j
  float* const chunk_max = reinterpret_cast<float*>(thresholds + n_draws + 1);
  int* const chunk_draws = reinterpret_cast<int*>(chunk_max + n_chunks);  // draws up to chunk c
  int* const run_column = chunk_draws + n_chunks;  // column of the run starting at draw k, or -1
  int* const run_start = run_column + n_draws;     // first draw of slot s

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int vocab = int(A.vocab);
  const float inv_t = A.inv_temperature;
  const bool tempered = inv_t != 1.0f;

  for (int64_t row = blockIdx.x; row < A.n_rows; row += gridDim.x) {
    const T* const z = static_cast<const T*>(A.logits) + row_offset(A.layout, A.inner_rows, row);
    const bool aligned = (reinterpret_cast<uintptr_t>(z) & 15u) == 0;

    // 1. Chunk stats of a = z / T (and the lanes' online LSE state of z at T != 1).
    bool bad = false;
    float z_max = kNegInf;
    double z_sum = 0.0;  // in double: a lane adds up to V / 256 terms, most of them tiny
    for (int c = warp; c < n_chunks; c += kWarps) {
      float a[kGroups][kGroup];
      float top = kNegInf;
#pragma unroll
      for (int j = 0; j < kGroups; ++j) {
        load_group(z, c * kWidth + kGroup * (lane + 32 * j), vocab, aligned, a[j]);
        if (tempered) online_add(z_max, z_sum, a[j]);
#pragma unroll
        for (int e = 0; e < kGroup; ++e) {
          a[j][e] = __fmul_rn(a[j][e], inv_t);
          top = fmaxf(top, a[j][e]);
        }
      }
      top = warp_all(top, Max<float>());
      // fmaxf drops NaN from the maximum, but its term exp(NaN) then makes the sum NaN.
      const float shift = top == kNegInf ? 0.0f : top;
      double sum = 0.0;
#pragma unroll
      for (int j = 0; j < kGroups; ++j)
#pragma unroll
        for (int i = 0; i < kGroup; i += 2)
          sum += double(CudaMath::exp(a[j][i] - shift) + CudaMath::exp(a[j][i + 1] - shift));
      sum = warp_all(sum, Sum<double>());
      bad = bad || !(top < kPosInf) || sum != sum;
      if (lane == 0) {
        chunk_max[c] = top;
        chunk_sum[c] = sum;
      }
    }
    bad = __syncthreads_or(bad) != 0;

    int kept = 0;
    float lse_a = 0.0f, lse_z = 0.0f;
    float m = kNegInf;
    if (!bad) {
      float own_max = kNegInf;
      for (int c = threadIdx.x; c < n_chunks; c += kThreads) own_max = fmaxf(own_max, chunk_max[c]);
      m = block_max(own_max, float_slots);
    }
    // Uniform branch: `bad` and m are the same in every thread.
    if (m > kNegInf) {
      // 2. Chunk masses M_c and ends J_c (written over s_c), kTile chunks per block scan.
      double sum_carry = 0.0, end_carry = 0.0;
      int last_with_mass = -1;
      for (int base = 0; base < n_chunks; base += kTile) {
        const int first = base + kPerThread * threadIdx.x;
        double mass[kPerThread], ends[kPerThread];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          const int c = first + i;
          mass[i] = c < n_chunks ? chunk_sum[c] * chunk_scale(chunk_max[c], m) : 0.0;
          if (mass[i] > 0.0) last_with_mass = c;
          ends[i] = mass[i];
        }
        const double tile_sum = block_scan(ends, Sum<double>(), 0.0, double_slots);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) ends[i] = mass[i] > 0.0 ? sum_carry + ends[i] : 0.0;
        sum_carry += tile_sum;
        const double tile_end = block_scan(ends, Max<double>(), 0.0, double_slots);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
          if (first + i < n_chunks) chunk_sum[first + i] = fmax(end_carry, ends[i]);
        end_carry = fmax(end_carry, tile_end);
      }
      const double total = end_carry;  // S
      const int last_chunk = block_max(last_with_mass, int_slots);

      // 3. Thresholds: C_0 .. C_N, kTile draws per block scan, then t_k = C_k (S / C_N).
      const uint64_t token = uint64_t(A.token_offset + row);
      double carry = 0.0;
      for (int base = 0; base <= n_draws; base += kTile) {
        const int first = base + kPerThread * threadIdx.x;
        double c[kPerThread] = {0.0, 0.0, 0.0, 0.0};
        if (first <= n_draws) {
          const Philox4 words = token_draw_block(A.seed, token, uint32_t(first / 4));
#pragma unroll
          for (int i = 0; i < kPerThread; ++i)
            if (first + i <= n_draws) c[i] = -double(logf(uniform_open01(words.x[i])));
        }
        const double tile_total = block_scan(c, Sum<double>(), 0.0, double_slots);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
          if (first + i <= n_draws) thresholds[first + i] = carry + c[i];
        carry += tile_total;
      }
      __syncthreads();
      const double to_mass = total / thresholds[n_draws];
      for (int k = threadIdx.x; k < n_draws; k += kThreads) thresholds[k] *= to_mass;
      __syncthreads();

      // Draws [chunk_draws[c - 1], chunk_draws[c]) fall in chunk c; the last chunk with mass
      // takes the rest.
      for (int c = threadIdx.x; c < n_chunks; c += kThreads)
        chunk_draws[c] =
            c < last_chunk ? lower_bound(thresholds, 0, n_draws, chunk_sum[c]) : n_draws;
      for (int k = threadIdx.x; k < n_draws; k += kThreads) run_column[k] = -1;
      __syncthreads();

      // 4. Merge: each warp walks its chunks that hold draws.
      for (int c = warp; c < n_chunks; c += kWarps) {
        const int k_first = c == 0 ? 0 : chunk_draws[c - 1];
        const int k_last = chunk_draws[c];
        if (k_first == k_last) continue;  // warp-uniform
        const double start = c == 0 ? 0.0 : chunk_sum[c - 1];
        const float shift = chunk_max[c];  // finite: the chunk has mass
        const double scale = chunk_scale(shift, m);
        const int col0 = c * kWidth + lane * kPerLane;
        // e' of the lane's group j, as step 1 computes them.
        const auto group_masses = [&](int j, float (&e)[kGroup]) {
          load_group(z, col0 + kGroup * j, vocab, aligned, e);
#pragma unroll
          for (int i = 0; i < kGroup; ++i) e[i] = CudaMath::exp(__fmul_rn(e[i], inv_t) - shift);
        };
        double lane_sum = 0.0;
#pragma unroll
        for (int j = 0; j < kGroups; ++j) {
          float e[kGroup];
          group_masses(j, e);
#pragma unroll
          for (int i = 0; i < kGroup; i += 2) lane_sum += double(e[i] + e[i + 1]);
        }
        // The lanes' intervals [start + before, start + end), built as the chunk ends of step 2.
        const double lane_mass = scale * lane_sum;
        double end = warp_scan(lane_mass, Sum<double>());
        end = warp_scan(lane_mass > 0.0 ? end : 0.0, Max<double>());
        double before = __shfl_up_sync(kFullMask, end, 1);
        if (lane == 0) before = 0.0;
        // The chunk has mass (it holds draws), so some lane has.
        const int last_lane = 31 - __clz(__ballot_sync(kFullMask, lane_mass > 0.0));
        const int k_begin = lower_bound(thresholds, k_first, k_last, start + before);
        const int k_end =
            lane == last_lane ? k_last : lower_bound(thresholds, k_first, k_last, start + end);
        if (k_begin < k_end) {
          const double lane_start = start + before;
          double done = 0.0;  // the lane's pairs before column i's, summed as lane_sum sums them
          int k = k_begin;    // the first draw not yet given a column
          int last = -1;      // the last column of nonzero mass so far
          int last_run = -1;  // the column of the last run started
#pragma unroll
          for (int j = 0; j < kGroups; ++j) {
            float e[kGroup];
            group_masses(j, e);
#pragma unroll
            for (int i = 0; i < kGroup; ++i) {
              // Column i's pair up to column i (the pair sum, as in lane_sum, at its second).
              const float pair_part = i % 2 ? e[i - 1] + e[i] : e[i];
              if (e[i] > 0.0f) {
                last = col0 + kGroup * j + i;
                // Draws [k, next) have t < the running mass through this column.
                const double running = lane_start + scale * (done + double(pair_part));
                const int next = lower_bound(thresholds, k, k_end, running);
                if (next > k) {
                  run_column[k] = last;
                  last_run = last;
                  k = next;
                }
              }
              if (i % 2) done += double(pair_part);
            }
          }
          // Not reached by the running sum: the lane's last column of nonzero mass (the lane
          // has one, as its interval is nonempty or it is the last lane with mass), extending
          // its run when it has one.
          if (k < k_end && last_run != last) run_column[k] = last;
        }
      }
      __syncthreads();

      // 5. Slots: one per run of draws, in the draws' order (draw 0 starts a run).
      for (int base = 0; base < n_draws; base += kTile) {
        const int first = base + kPerThread * threadIdx.x;
        int starts[kPerThread];
        bool opens[kPerThread];
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          opens[i] = first + i < n_draws && run_column[first + i] >= 0;
          starts[i] = opens[i];
        }
        const int tile_runs = block_scan(starts, Sum<int>(), 0, int_slots);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i)
          if (opens[i]) run_start[kept + starts[i] - 1] = first + i;
        kept += tile_runs;
      }
      __syncthreads();

      lse_a = m + float(log(total));
      lse_z = tempered ? block_lse(z_max, z_sum, float_slots, double_slots) : lse_a;
    }

    // 6. Weights and log-probabilities of every slot; -1 / 0 / 0 past the kept ids.
    for (int s = threadIdx.x; s < n_draws; s += kThreads) {
      int id = -1;
      float weight = 0.0f, log_p = 0.0f;
      if (s < kept) {
        const int k0 = run_start[s];
        const int k1 = s + 1 < kept ? run_start[s + 1] : n_draws;
        id = run_column[k0];
        const float zj = load_element(z + id);
        log_p = zj - lse_z;
        weight = float(k1 - k0) / float(n_draws);
        if (tempered) weight *= expf(log_p - (__fmul_rn(zj, inv_t) - lse_a));
      }
      const int64_t out = row * n_draws + s;
      A.ids[out] = id;
      A.weights[out] = weight;
      if (A.logprobs) A.logprobs[out] = log_p;
    }
    if (threadIdx.x == 0) A.invalid[row] = bad ? 1 : 0;
    // No barrier before the next row: its first shared-memory writes (step 1) go to chunk_max
    // and chunk_sum, last read in this row's step 4 (or before its block_max, without draws),
    // which ends at a barrier; the arrays step 6 reads are next written after several more.
  }
}

using Kernel = void (*)(SampleTeacherArgs, int);

Kernel kernel_for(int dtype) {
  switch (dtype) {
    case kFloat32: return sample_teacher_kernel<float>;
    case kBFloat16: return sample_teacher_kernel<bf16_t>;
    default: return sample_teacher_kernel<fp16_t>;
  }
}

// Messages with numbers in them (see the header for their lifetime).
thread_local char message[320];

}  // namespace

const char* sample_teacher(const SampleTeacherArgs& A, void* stream) {
  if (A.dtype != kFloat32 && A.dtype != kBFloat16 && A.dtype != kFloat16)
    return "sample_teacher: logits dtype must be float32, bfloat16 or float16";
  if (A.n_rows < 0 || A.inner_rows < 1 || A.vocab < 1 || A.num_samples < 1)
    return "sample_teacher: need n_rows >= 0, inner_rows >= 1, vocab >= 1, num_samples >= 1";
  if (A.vocab > kMaxVocab) return "sample_teacher: vocabulary too large for CUDA";
  if (A.n_rows == 0) return nullptr;
  if (A.logits == nullptr || A.ids == nullptr || A.weights == nullptr || A.invalid == nullptr)
    return "sample_teacher: missing input or output";

  const int64_t n_chunks = (A.vocab + kWidth - 1) / kWidth;
  const Kernel kernel = kernel_for(A.dtype);
  int device = 0, optin = 0;
  cudaFuncAttributes attr;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess)
    status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaFuncGetAttributes(&attr, kernel);
  if (status != cudaSuccess) return cudaGetErrorString(status);

  const int64_t bytes = shared_bytes(n_chunks, A.num_samples);
  const int64_t room = int64_t(optin) - int64_t(attr.sharedSizeBytes);
  if (bytes > room) {
    const int64_t most = (room - shared_bytes(n_chunks, 0)) / 16;
    std::snprintf(message, sizeof(message),
                  "sample_teacher: num_samples=%d at vocab=%lld needs %lld bytes of shared "
                  "memory per CTA (16 per draw, 16 per %d columns); this GPU allows %lld, so at "
                  "most %lld draws per token at this vocabulary",
                  A.num_samples, static_cast<long long>(A.vocab), static_cast<long long>(bytes),
                  kWidth, static_cast<long long>(room),
                  static_cast<long long>(most > 0 ? most : 0));
    return message;
  }
  if (bytes > attr.maxDynamicSharedSizeBytes &&
      (status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(bytes))) != cudaSuccess)
    return cudaGetErrorString(status);

  // Rows beyond the grid are taken by the grid-stride loop.
  const unsigned grid = unsigned(A.n_rows < INT_MAX ? A.n_rows : INT_MAX);
  kernel<<<grid, kThreads, size_t(bytes), static_cast<cudaStream_t>(stream)>>>(A, int(n_chunks));
  status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace cuda
}  // namespace fastkd
