// Random-sampling sparse teacher targets (Anshumann et al., "Sparse Logit Sampling", ACL 2025):
// per row, N draws with replacement from r = softmax(z / T), kept as distinct (id, count).
//
// Two passes over the row, never one per draw and never a sort:
//   1. a = z / T into fp32 scratch, its maximum m, e_i = exp(a_i - m) kept, and the sums of e
//      over fixed blocks of kBlock columns (in double), S = sum of the block sums;
//   2. N sorted uniforms made directly: with E_0..E_N iid Exp(1) (E = -log u, u from Philox keyed
//      by (seed, token, draw)) and C_k = E_0 + .. + E_k, the ratios C_k / C_N, k < N, are
//      distributed as the order statistics of N uniforms. Thresholds t_k = S C_k / C_N are
//      merged with the running mass of the row: draw k lands on the first column whose
//      cumulative mass exceeds t_k. Blocks whose end the next threshold does not reach are
//      skipped with one comparison; inside a block the columns are summed one by one.
// The block ends are the same sums in both passes, so every t_k < S is consumed by the row's
// end; a draw that a block's column-by-column sum (rounded differently from its block sum) does
// not reach goes to the block's last column of nonzero mass.
//
// T != 1 gives importance weights towards p = softmax(z): w = (count / N) p_id / r_id.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include "sample_teacher_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/dtype.h"
#include "../common/philox.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

using Math = CpuMath;
constexpr int64_t kBlock = 64;

struct Scratch {
  std::vector<float> e;            // exp(a - m), then reused
  std::vector<double> block;       // block sums of e
  std::vector<double> cumulative;  // C_0 .. C_N
  std::vector<int32_t> counts;     // per kept id, parallel to the ids output
  Scratch(int64_t vocab, int n)
      : e(vocab), block((vocab + kBlock - 1) / kBlock), cumulative(n + 1), counts(n) {}
};

template <typename T>
float load_scaled(const T* __restrict z, int64_t n, float inv_t, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(z[i]) * inv_t;
  return row_max(out, n);
}

// e_i = exp(a_i - m) in place, block sums in double; returns S.
double exp_and_block_sums(float* e, int64_t n, float m, double* block) {
  double total = 0.0;
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += kBlock, ++b) {
    const int64_t len = std::min(kBlock, n - b0);
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = Math::exp(e[b0 + i + j] - m);
        e[b0 + i + j] = v;
        lanes[j] += v;
      }
    double s = 0.0;
    for (; i < len; ++i) {
      const float v = Math::exp(e[b0 + i] - m);
      e[b0 + i] = v;
      s += v;
    }
    for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
    block[b] = s;
    total += s;
  }
  return total;
}

template <typename T>
void sample_row(const SampleTeacherArgs& A, int64_t row, Scratch& s) {
  const int n_draws = A.num_samples;
  int32_t* ids = A.ids + row * n_draws;
  float* weights = A.weights + row * n_draws;
  float* logprobs = A.logprobs ? A.logprobs + row * n_draws : nullptr;
  std::fill(ids, ids + n_draws, -1);
  std::fill(weights, weights + n_draws, 0.0f);
  if (logprobs) std::fill(logprobs, logprobs + n_draws, 0.0f);

  const T* z = static_cast<const T*>(A.logits) + row_offset(A.layout, A.inner_rows, row);
  const int64_t n = A.vocab;
  float* e = s.e.data();
  A.invalid[row] = 0;
  const float m = load_scaled(z, n, A.inv_temperature, e);
  if (!(m > -INFINITY)) {  // no column has mass: nothing to draw, unless that hides a NaN
    for (int64_t i = 0; i < n; ++i) A.invalid[row] |= uint8_t(e[i] != e[i]);
    return;
  }
  // A NaN anywhere, or m = +inf (exp(inf - inf) = NaN), makes the total NaN.
  const double total = exp_and_block_sums(e, n, m, s.block.data());
  if (std::isnan(total)) {
    A.invalid[row] = 1;
    return;
  }

  // Sorted thresholds from cumulative exponentials.
  const uint64_t token = uint64_t(A.token_offset + row);
  double running = 0.0;
  for (int j = 0; j <= n_draws; j += 4) {
    const Philox4 words = token_draw_block(A.seed, token, uint32_t(j / 4));
    for (int w = 0; w < 4 && j + w <= n_draws; ++w) {
      running += -double(Math::log(uniform_open01(words.x[w])));
      s.cumulative[j + w] = running;
    }
  }
  const double to_mass = total / s.cumulative[n_draws];

  int kept = 0;
  int k = 0;
  auto add = [&](int64_t col, int count) {
    if (kept > 0 && ids[kept - 1] == int32_t(col)) {
      s.counts[kept - 1] += count;
    } else {
      ids[kept] = int32_t(col);
      s.counts[kept++] = count;
    }
  };
  auto threshold = [&](int draw) { return s.cumulative[draw] * to_mass; };
  double mass = 0.0;
  int64_t last_nonzero = -1;
  for (int64_t b0 = 0, b = 0; b0 < n && k < n_draws; b0 += kBlock, ++b) {
    const double block_end = mass + s.block[b];
    if (threshold(k) < block_end) {
      double partial = mass;
      const int64_t end = std::min(b0 + kBlock, n);
      int64_t block_last = -1;
      for (int64_t i = b0; i < end; ++i) {
        if (e[i] <= 0.0f) continue;
        partial += e[i];
        block_last = i;
        int count = 0;
        while (k < n_draws && threshold(k) < partial) ++count, ++k;
        if (count) add(i, count);
      }
      int rest = 0;
      while (k < n_draws && threshold(k) < block_end) ++rest, ++k;
      if (rest && block_last >= 0) add(block_last, rest);
    }
    if (s.block[b] > 0.0) {
      for (int64_t i = std::min(b0 + kBlock, n) - 1; i >= b0; --i)
        if (e[i] > 0.0f) {
          last_nonzero = i;
          break;
        }
    }
    mass = block_end;
  }
  if (k < n_draws && last_nonzero >= 0) add(last_nonzero, n_draws - k);  // rounding leftovers

  // log p = z - LSE(z) and log r = a - LSE(a); with T = 1, a is z.
  const bool tempered = A.inv_temperature != 1.0f;
  const float lse_a = m + float(std::log(total));
  // max z = T max a up to rounding: a safe shift for the sum of exp(z).
  const float lse_z = tempered ? float(shifted_lse(z, n, m / A.inv_temperature)) : lse_a;
  for (int j = 0; j < kept; ++j) {
    const float zj = to_float(z[ids[j]]);
    const float log_p = zj - lse_z;
    float w = float(s.counts[j]) / float(n_draws);
    if (tempered) w *= Math::exp(log_p - (zj * A.inv_temperature - lse_a));
    weights[j] = w;
    if (logprobs) logprobs[j] = log_p;
  }
}

}  // namespace

void sample_teacher(const SampleTeacherArgs& A, int num_threads) {
  visit_dtype(A.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for_each_row(
        A.n_rows, A.vocab, num_threads, [&] { return Scratch(A.vocab, A.num_samples); },
        [&](int64_t row, Scratch& s) { sample_row<T>(A, row, s); });
  });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
