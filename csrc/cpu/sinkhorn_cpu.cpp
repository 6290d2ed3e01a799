// Batched log-domain Sinkhorn, CPU kernel. Problems are spread over threads; a thread copies its
// problem's cost into two fp32 scratch matrices, C [n_b, m_b] and its transpose, so that both
// half-iterations read unit-stride rows:
//   F (row i)    : f_i = -e LSE_j ((g_j - C_ij) / e + log b_j)
//   G (column j) : g_j = -e LSE_i ((f_i - C^T_ji) / e + log a_i)
// Each LSE is two vectorized passes over the row (its maximum, then the sum of exponentials).
// The error check E needs F(g) in full: when the loop goes on at the same e (always the case
// after a check that does not stop), that F(g) is the next iteration's F, so a check costs one
// pass over n_b entries, not a half-iteration.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include "sinkhorn_cpu.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/dtype.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

using Math = CpuMath;

// out_i = -e LSE_j ((pot_j - c_ij) / e + logw_j) for the rows of `c` ([rows, cols] row-major),
// through `buf` (cols floats). pot_j - c_ij is formed before the scaling: the two are of the
// same size where the potentials have converged, and their difference is what the exponent
// needs to the last bit (pot_j / e - c_ij / e would round each term at |c| / e ulps). The
// scaling multiplies by ie = fl(1/e) and the result is divided by the same ie, so that the
// iteration is exactly the one at e' = 1/ie (a relative change of e by < 2^-24): with -e LSE
// instead, the potentials would be off by that factor, an error of |C| / e ulps in the
// exponents that no iteration removes.
void half_update(const float* __restrict c, int64_t rows, int64_t cols,
                 const float* __restrict pot, const float* __restrict logw, float ie,
                 float* __restrict out, float* __restrict buf) {
  const float ninf = -__builtin_huge_valf();
  for (int64_t i = 0; i < rows; ++i) {
    const float* ci = c + i * cols;
    for (int64_t j = 0; j < cols; ++j) buf[j] = (pot[j] - ci[j]) * ie + logw[j];
    const float mx = row_max(buf, cols);
    if (!(mx > ninf)) {
      out[i] = -mx / ie;
      continue;
    }
    float acc[kLanes] = {};
    const int64_t body = cols - cols % kLanes;
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += Math::exp(buf[j + l] - mx);
    float sum = lane_sum(acc);
    for (int64_t j = body; j < cols; ++j) sum += Math::exp(buf[j] - mx);
    out[i] = -(mx + Math::log(sum)) / ie;
  }
}

template <typename T>
void load_cost(const T* __restrict cost, int64_t si, int64_t sj, int64_t rows, int64_t cols,
               float* __restrict c, float* __restrict ct) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = to_float(cost[i * si + j * sj]);
      c[i * cols + j] = v;
      ct[j * rows + i] = v;
    }
}

struct Scratch {
  std::vector<float> c, ct, f_next, buf;
  explicit Scratch(int64_t n, int64_t m) : c(n * m), ct(n * m), f_next(n), buf(n > m ? n : m) {}
};

template <typename T>
void solve_problem(const SinkhornArgs& a, int64_t b, Scratch& s) {
  const int64_t n = a.n, m = a.m;
  const int64_t nb = a.n_sizes ? a.n_sizes[b] : n;
  const int64_t mb = a.m_sizes ? a.m_sizes[b] : m;
  float* f = a.f + b * n;
  float* g = a.g + b * m;
  float* plan = a.plan ? a.plan + b * n * m : nullptr;
  const float* la = a.log_a + b * n;
  const float* lb = a.log_b + b * m;
  if (!a.warm_start) for (int64_t j = 0; j < m; ++j) g[j] = 0.0f;
  for (int64_t i = 0; i < n; ++i) f[i] = 0.0f;
  if (plan) for (int64_t k = 0; k < n * m; ++k) plan[k] = 0.0f;
  if (nb == 0 || mb == 0) {
    for (int64_t j = 0; j < m; ++j) g[j] = 0.0f;
    a.iters[b] = 0;
    a.err[b] = a.transport[b] = a.mass[b] = 0.0f;
    a.eps_final[b] = a.eps;
    return;
  }
  for (int64_t j = mb; j < m; ++j) g[j] = 0.0f;
  const T* cost = static_cast<const T*>(a.cost) + b * a.cost_stride_b;
  load_cost(cost, a.cost_stride_i, a.cost_stride_j, nb, mb, s.c.data(), s.ct.data());

  const float eps = a.eps;
  float e = eps;
  if (a.eps_start && a.eps_start[b] > eps) e = a.eps_start[b];
  int it = 0;
  float err = 0.0f;
  bool f_ready = false;  // f already holds F(g) at e, from the last check
  while (true) {
    if (!f_ready) half_update(s.c.data(), nb, mb, g, lb, 1.0f / e, f, s.buf.data());
    half_update(s.ct.data(), mb, nb, f, la, 1.0f / e, g, s.buf.data());
    f_ready = false;
    ++it;
    const bool stage = e > eps;
    const bool last = it >= a.max_iters;
    if ((!stage || last) && (it % a.check_every == 0 || last)) {
      half_update(s.c.data(), nb, mb, g, lb, 1.0f / e, s.f_next.data(), s.buf.data());
      const float ie = 1.0f / e;
      double sum = 0.0;
      for (int64_t i = 0; i < nb; ++i) {
        const float w = Math::exp(la[i]);
        if (w > 0.0f) sum += double(w) * std::fabs(Math::exp((f[i] - s.f_next[i]) * ie) - 1.0f);
      }
      err = float(sum);
      if (err < a.tol || last) break;
      for (int64_t i = 0; i < nb; ++i) f[i] = s.f_next[i];
      f_ready = true;
    }
    if (stage) e = e * a.kappa > eps ? e * a.kappa : eps;
  }

  // P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j).
  const float ie = 1.0f / e;
  double transport = 0.0, mass = 0.0;
  for (int64_t i = 0; i < nb; ++i) {
    if (!(la[i] > -__builtin_huge_valf())) continue;
    const float fi = f[i], lai = la[i];
    const float* c = s.c.data() + i * mb;
    float* p = plan ? plan + i * m : s.buf.data();
    float pc[kLanes] = {}, pm[kLanes] = {};
    const int64_t body = mb - mb % kLanes;
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const float v = Math::exp((fi + g[j + l] - c[j + l]) * ie + lai + lb[j + l]);
        p[j + l] = v;
        pc[l] += v * c[j + l];
        pm[l] += v;
      }
    float row_pc = lane_sum(pc), row_pm = lane_sum(pm);
    for (int64_t j = body; j < mb; ++j) {
      const float v = Math::exp((fi + g[j] - c[j]) * ie + lai + lb[j]);
      p[j] = v;
      row_pc += v * c[j];
      row_pm += v;
    }
    transport += row_pc;
    mass += row_pm;
  }
  a.iters[b] = it;
  a.err[b] = err;
  a.transport[b] = float(transport);
  a.mass[b] = float(mass);
  a.eps_final[b] = e;
}

// Problems are handed out one at a time from a shared counter: their iteration counts differ,
// so fixed slices would leave threads idle.
template <typename T>
void solve_all(const SinkhornArgs& args, int num_threads) {
  std::atomic<int64_t> next{0};
  const int64_t workers = num_threads < args.batch ? num_threads : args.batch;
  parallel_for(workers, num_threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(args.n, args.m);
    for (int64_t b = next++; b < args.batch; b = next++) solve_problem<T>(args, b, scratch);
  });
}

}  // namespace

void sinkhorn(const SinkhornArgs& args, int num_threads) {
  switch (args.cost_dtype) {
    case kBFloat16: return solve_all<bf16_t>(args, num_threads);
    case kFloat16: return solve_all<fp16_t>(args, num_threads);
    default: return solve_all<float>(args, num_threads);
  }
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
