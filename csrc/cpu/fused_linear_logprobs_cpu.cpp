// fused_linear_logprobs CPU row kernel. Per row, with a = z / T and m = max_j a_j:
//   load   : a into an fp32 scratch row, with m;
//   sums   : e_j = exp(a_j - m) kept, S = sum_j e_j and W = sum_j e_j (a_j - m) in double
//            lanes; lse = m + log S, logprob = a_t - lse, H = log S - W / S;
//   grad   : with the row's incoming gradients, dL/dz_j from token_logprob_math.h written over
//            the row (its logits are in the scratch row by then).
// A row whose logits are all -inf has no softmax: lse = -inf and the other outputs NaN (a NaN
// anywhere in the row makes every output NaN).
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); the bindings' dispatcher picks one at run time.
#include "fused_linear_logprobs_cpu.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/token_logprob_math.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

using Math = CpuMath;

struct Scratch {
  std::vector<float> a, e;
  explicit Scratch(int64_t n) : a(n), e(n) {}
};

// e_j = exp(a_j - m) into e; S = sum_j e_j and W = sum_j e_j (a_j - m) (for the entropy; 0
// terms where e_j = 0), both in double lanes (as shifted_lse: in fp32 the tail terms of a
// 128k-column row fall below half an ulp of the running sum). One pass: a second pass over the
// scratch rows for W was miscompiled by GCC 12 at -O3 -march=x86-64-v3 once inlined here (it
// read a stale a_j; 371 instead of 6e-15 in a 16-column row).
struct ExpSums {
  double sum, weighted;
};

ExpSums exp_sums(const float* __restrict a, int64_t n, float m, float* __restrict e) {
  double lanes[kLanes] = {}, weighted[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float x = a[i + j] - m;
      const float v = CpuMath::exp(x);
      e[i + j] = v;
      lanes[j] += v;
      weighted[j] += entropy_term(v, x);
    }
  ExpSums r{0.0, 0.0};
  for (; i < n; ++i) {
    const float x = a[i] - m;
    const float v = CpuMath::exp(x);
    e[i] = v;
    r.sum += v;
    r.weighted += entropy_term(v, x);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    r.sum += lanes[j];
    r.weighted += weighted[j];
  }
  return r;
}

void logprob_row(const LogprobRowsArgs& A, int64_t row, Scratch& s) {
  const int64_t n = A.vocab;
  float* z = A.logits + row * A.row_stride;
  const int64_t target = A.targets[row];
  if (target == A.ignore_index) {
    A.logprob[row] = 0.0f;
    A.lse[row] = 0.0f;
    if (A.entropy) A.entropy[row] = 0.0f;
    if (A.row_grads)
      for (int64_t i = 0; i < n; ++i) z[i] = 0.0f;
    return;
  }
  float* a = s.a.data();
  float* e = s.e.data();
  const float m = load_scaled_row(z, n, A.inv_temperature, a);
  const float nan = __builtin_nanf("");
  if (!(m > kNegInf)) {  // all -inf or NaN (row_max drops NaN): no softmax
    bool has_nan = false;
    for (int64_t i = 0; i < n; ++i) has_nan |= a[i] != a[i];
    A.lse[row] = has_nan ? nan : kNegInf;
    A.logprob[row] = nan;
    if (A.entropy) A.entropy[row] = nan;
    if (A.row_grads)
      for (int64_t i = 0; i < n; ++i) z[i] = nan;
    return;
  }
  const ExpSums sums = exp_sums(a, n, m, e);
  const double sum = sums.sum;
  const double log_sum_d = std::log(sum);
  const double lse_d = double(m) + log_sum_d;
  const float log_sum = float(log_sum_d);
  const float lse = float(lse_d);
  A.lse[row] = lse;
  A.logprob[row] = float(double(a[target]) - lse_d);
  const bool need_entropy = A.entropy != nullptr;
  float h = 0.0f;
  if (need_entropy) {
    h = float(log_sum_d - sums.weighted / sum);
    A.entropy[row] = h;
  }
  if (!A.row_grads) return;
  const float* g = A.row_grads + 3 * row;
  const float scale = A.grad_scale * A.inv_temperature;
  const LogprobGradCoefs c{g[1] - g[0], need_entropy ? g[2] : 0.0f, h, scale};
  const float inv_sum = float(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) {
    const float d = a[i] - m;
    z[i] = logprob_grad(c, e[i] * inv_sum, d - log_sum);
  }
  z[target] += scale * g[0];
}

}  // namespace

void fused_linear_logprobs_rows(const LogprobRowsArgs& A, int num_threads) {
  for_each_row(
      A.n_rows, A.vocab, num_threads, [&] { return Scratch(A.vocab); },
      [&](int64_t row, Scratch& s) { logprob_row(A, row, s); });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
