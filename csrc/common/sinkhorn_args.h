// Arguments of one batched Sinkhorn solve, as passed from Python (raw pointers, sizes, element
// strides, dtype code), and the iteration every backend follows. Shared by the CPU and CUDA
// launchers; python/fastkd/reference/sinkhorn.py is the plain-PyTorch statement of the same loop.
//
// Problem b transports a (log_a[b, :n_b]) to b (log_b[b, :m_b]) at cost C[b, :n_b, :m_b]. With
// potentials f, g in the units of C, at entropic regularization e:
//   F: f_i = -e LSE_{j<m_b} ((g_j - C_ij) / e + log b_j)       (row marginals exact)
//   G: g_j = -e LSE_{i<n_b} ((f_i - C_ij) / e + log a_i)       (column marginals exact)
//   E: err = sum_{i<n_b} a_i |exp((f_i - F(g)_i) / e) - 1|    (L1 row-marginal error of (f, g))
//   P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j)
// The loop, per problem (e and kappa in fp32; "scaling" when eps_start != nullptr):
//   e = scaling && eps_start[b] > eps ? eps_start[b] : eps;  it = 0
//   repeat:
//     F(e); G(e); ++it
//     stage = e > eps
//     if ((!stage || it >= max_iters) && (it % check_every == 0 || it >= max_iters)):
//       err = E(e); if (err < tol || it >= max_iters) stop
//     if (stage) e = max(e * kappa, eps)
// then transport = sum_ij P_ij C_ij and mass = sum_ij P_ij at the final (f, g, e), that e as
// eps_final, and the plan when asked for. An empty problem (n_b == 0 or m_b == 0) gives iters 0,
// eps_final = eps and zeros everywhere else.
// Potentials beyond n_b / m_b, and the plan outside [n_b, m_b], are written as 0.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "checked_args.h"

namespace fastkd {

struct SinkhornArgs {
  const void* cost;       // C[b, i, j] at b cost_stride_b + i cost_stride_i + j cost_stride_j
  int cost_dtype;         // DType code (fp32, bf16, fp16)
  int64_t cost_stride_b;  // element strides; 0 broadcasts one cost over the batch
  int64_t cost_stride_i;
  int64_t cost_stride_j;
  const float* log_a;      // [batch, n] contiguous; -inf: zero weight (masked entry)
  const float* log_b;      // [batch, m] contiguous
  const int32_t* n_sizes;  // [batch] rows n_b <= n of each problem, or nullptr (all n)
  const int32_t* m_sizes;  // [batch] columns m_b <= m, or nullptr (all m)
  const float* eps_start;  // [batch] first e of the eps-scaling schedule, or nullptr (no scaling)
  int64_t batch;
  int64_t n;
  int64_t m;
  float eps;        // final regularization, > 0
  float kappa;      // eps-scaling factor in (0, 1)
  int max_iters;    // >= 1
  int check_every;  // >= 1
  float tol;
  int warm_start;    // nonzero: g holds the initial potential; else the loop starts at g = 0
  float* f;          // [batch, n] out
  float* g;          // [batch, m] in (warm start) / out
  int32_t* iters;    // [batch] out: iterations run
  float* err;        // [batch] out: the last E computed
  float* transport;  // [batch] out: <P, C>
  float* mass;       // [batch] out: sum P
  float* eps_final;  // [batch] out: the e of the last iteration (eps, unless max_iters
                     // ended the schedule early)
  float* plan;       // [batch, n, m] contiguous out, or nullptr
};

inline SinkhornArgs make_sinkhorn_args(uintptr_t cost, int cost_dtype, int64_t stride_b,
                                       int64_t stride_i, int64_t stride_j, uintptr_t log_a,
                                       uintptr_t log_b, uintptr_t n_sizes, uintptr_t m_sizes,
                                       uintptr_t eps_start, int64_t batch, int64_t n, int64_t m,
                                       float eps, float kappa, int max_iters, int check_every,
                                       float tol, bool warm_start, uintptr_t f, uintptr_t g,
                                       uintptr_t iters, uintptr_t err, uintptr_t transport,
                                       uintptr_t mass, uintptr_t eps_final, uintptr_t plan) {
  check_dtype_code(cost_dtype);
  if (batch < 0 || n < 0 || m < 0)
    throw std::invalid_argument("bad sizes: batch=" + std::to_string(batch) +
                                " n=" + std::to_string(n) + " m=" + std::to_string(m));
  if (!(eps > 0.0f) || !(kappa > 0.0f && kappa < 1.0f) || max_iters < 1 || check_every < 1)
    throw std::invalid_argument(
        "need eps > 0, 0 < kappa < 1, max_iters >= 1, check_every >= 1; "
        "got eps=" +
        std::to_string(eps) + " kappa=" + std::to_string(kappa) +
        " max_iters=" + std::to_string(max_iters) + " check_every=" + std::to_string(check_every));
  SinkhornArgs a{};
  a.cost = as_ptr<const void>(cost);
  a.cost_dtype = cost_dtype;
  a.cost_stride_b = stride_b;
  a.cost_stride_i = stride_i;
  a.cost_stride_j = stride_j;
  a.log_a = as_ptr<const float>(log_a);
  a.log_b = as_ptr<const float>(log_b);
  a.n_sizes = as_ptr<const int32_t>(n_sizes);
  a.m_sizes = as_ptr<const int32_t>(m_sizes);
  a.eps_start = as_ptr<const float>(eps_start);
  a.batch = batch;
  a.n = n;
  a.m = m;
  a.eps = eps;
  a.kappa = kappa;
  a.max_iters = max_iters;
  a.check_every = check_every;
  a.tol = tol;
  a.warm_start = warm_start ? 1 : 0;
  a.f = as_ptr<float>(f);
  a.g = as_ptr<float>(g);
  a.iters = as_ptr<int32_t>(iters);
  a.err = as_ptr<float>(err);
  a.transport = as_ptr<float>(transport);
  a.mass = as_ptr<float>(mass);
  a.eps_final = as_ptr<float>(eps_final);
  a.plan = as_ptr<float>(plan);
  return a;
}

}  // namespace fastkd
