// Batched log-domain Sinkhorn, CPU kernel. Problems are spread over threads, or, when there are
// fewer problems than threads and they are large, solved one after the other by all threads as
// a team (rows of each half-iteration split among them, a barrier after each). The cost of a
// problem is copied into two fp32 scratch matrices, C [n_b, m_b] and its transpose, so that both
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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
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
void half_update(const float* __restrict c, int64_t rows, int64_t cols, const float* __restrict pot,
                 const float* __restrict logw, float ie, float* __restrict out,
                 float* __restrict buf) {
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

// Rows [0, rows) of a cost block (element strides si, sj) into c (row stride cols) and, as
// columns, into ct (row stride ct_stride).
template <typename T>
void load_cost(const T* __restrict cost, int64_t si, int64_t sj, int64_t rows, int64_t cols,
               int64_t ct_stride, float* __restrict c, float* __restrict ct) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = to_float(cost[i * si + j * sj]);
      c[i * cols + j] = v;
      ct[j * ct_stride + i] = v;
    }
}

// Threads that run the same solve and meet at barriers; a team of one never waits.
class Team {
 public:
  explicit Team(int size) : size_(size) {}
  int size() const { return size_; }
  // Rows [begin, end) of `rank` out of `rows`, in contiguous slices.
  void slice(int rank, int64_t rows, int64_t* begin, int64_t* end) const {
    const int64_t per = (rows + size_ - 1) / size_;
    *begin = std::min<int64_t>(rows, rank * per);
    *end = std::min<int64_t>(rows, *begin + per);
  }
  // Returns once every thread of the team has called it (sense-reversing spin barrier: the
  // waits are the length of a half-iteration's imbalance, far below a sleep's wake-up).
  void barrier() {
    if (size_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    while (generation_.load(std::memory_order_acquire) == generation) std::this_thread::yield();
  }

 private:
  const int size_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// What the threads of a team share: the cost in both orientations, F(g) of the error check, and
// per-row terms that one thread then sums in row order, so that the results do not depend on
// the team's size.
struct Shared {
  std::vector<float> c, ct, f_next;
  std::vector<double> row_err, row_transport, row_mass;
  float err = 0.0f;
  explicit Shared(int64_t n, int64_t m)
      : c(n * m), ct(n * m), f_next(n), row_err(n), row_transport(n), row_mass(n) {}
};

double ordered_sum(const std::vector<double>& terms, int64_t count) {
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) sum += terms[i];
  return sum;
}

// Problem b, solved by the thread `rank` of `team` (every thread of the team calls it); `buf`
// holds max(n, m) floats of this thread.
template <typename T>
void solve_problem(const SinkhornArgs& a, int64_t b, Shared& s, float* buf, Team& team, int rank) {
  const int64_t n = a.n, m = a.m;
  const int64_t nb = a.n_sizes ? a.n_sizes[b] : n;
  const int64_t mb = a.m_sizes ? a.m_sizes[b] : m;
  float* f = a.f + b * n;
  float* g = a.g + b * m;
  float* plan = a.plan ? a.plan + b * n * m : nullptr;
  const float* la = a.log_a + b * n;
  const float* lb = a.log_b + b * m;
  int64_t r0, r1, c0, c1;  // this thread's rows of C and of C^T
  team.slice(rank, nb, &r0, &r1);
  team.slice(rank, mb, &c0, &c1);
  if (rank == 0) {
    if (!a.warm_start)
      for (int64_t j = 0; j < m; ++j) g[j] = 0.0f;
    for (int64_t i = 0; i < n; ++i) f[i] = 0.0f;
    for (int64_t j = mb; j < m; ++j) g[j] = 0.0f;
  }
  if (plan) {  // all n rows, each thread its slice; the final pass fills [nb, mb] again
    int64_t p0, p1;
    team.slice(rank, n, &p0, &p1);
    std::fill(plan + p0 * m, plan + p1 * m, 0.0f);
  }
  if (nb == 0 || mb == 0) {
    if (rank == 0) {
      for (int64_t j = 0; j < m; ++j) g[j] = 0.0f;
      a.iters[b] = 0;
      a.err[b] = a.transport[b] = a.mass[b] = 0.0f;
      a.eps_final[b] = a.eps;
    }
    team.barrier();
    return;
  }
  const T* cost = static_cast<const T*>(a.cost) + b * a.cost_stride_b;
  load_cost(cost + r0 * a.cost_stride_i, a.cost_stride_i, a.cost_stride_j, r1 - r0, mb, nb,
            s.c.data() + r0 * mb, s.ct.data() + r0);
  team.barrier();

  const float eps = a.eps;
  float e = eps;
  if (a.eps_start && a.eps_start[b] > eps) e = a.eps_start[b];
  int it = 0;
  bool f_ready = false;  // f already holds F(g) at e, from the last check
  while (true) {
    if (!f_ready) {
      half_update(s.c.data() + r0 * mb, r1 - r0, mb, g, lb, 1.0f / e, f + r0, buf);
      team.barrier();
    }
    half_update(s.ct.data() + c0 * nb, c1 - c0, nb, f, la, 1.0f / e, g + c0, buf);
    team.barrier();
    f_ready = false;
    ++it;
    const bool stage = e > eps;
    const bool last = it >= a.max_iters;
    if ((!stage || last) && (it % a.check_every == 0 || last)) {
      half_update(s.c.data() + r0 * mb, r1 - r0, mb, g, lb, 1.0f / e, s.f_next.data() + r0, buf);
      const float ie = 1.0f / e;
      for (int64_t i = r0; i < r1; ++i) {
        const float w = Math::exp(la[i]);
        s.row_err[i] =
            w > 0.0f ? double(w) * std::fabs(Math::exp((f[i] - s.f_next[i]) * ie) - 1.0f) : 0.0;
      }
      team.barrier();
      if (rank == 0) s.err = float(ordered_sum(s.row_err, nb));
      team.barrier();
      if (s.err < a.tol || last) break;
      for (int64_t i = r0; i < r1; ++i) f[i] = s.f_next[i];
      f_ready = true;
      team.barrier();
    }
    if (stage) e = e * a.kappa > eps ? e * a.kappa : eps;
  }

  // P_ij = exp((f_i + g_j - C_ij) / e + log a_i + log b_j).
  const float ie = 1.0f / e;
  for (int64_t i = r0; i < r1; ++i) {
    s.row_transport[i] = s.row_mass[i] = 0.0;
    if (!(la[i] > -__builtin_huge_valf())) continue;
    const float fi = f[i], lai = la[i];
    const float* c = s.c.data() + i * mb;
    float* p = plan ? plan + i * m : buf;
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
    s.row_transport[i] = row_pc;
    s.row_mass[i] = row_pm;
  }
  team.barrier();
  if (rank == 0) {
    a.iters[b] = it;
    a.err[b] = s.err;
    a.transport[b] = float(ordered_sum(s.row_transport, nb));
    a.mass[b] = float(ordered_sum(s.row_mass, nb));
    a.eps_final[b] = e;
  }
  // The next problem's first writes (rank 0's zeroing of its outputs, everyone's cost rows)
  // must not overtake this one's reads of the shared scratch.
  team.barrier();
}

// Entries per problem from which a team of threads shares one problem (below, a half-iteration
// of a few microseconds would be dominated by the barriers).
constexpr int64_t kTeamMinEntries = 1 << 16;

template <typename T>
void solve_all(const SinkhornArgs& args, int num_threads) {
  const int threads = num_threads < 1 ? 1 : num_threads;
  const int64_t scratch = std::max(args.n, args.m);
  if (args.batch < threads && args.n * args.m >= kTeamMinEntries) {
    Shared shared(args.n, args.m);
    Team team(threads);
    parallel_for(threads, threads, 1, [&](int64_t rank, int64_t) {
      std::vector<float> buf(scratch);
      for (int64_t b = 0; b < args.batch; ++b)
        solve_problem<T>(args, b, shared, buf.data(), team, int(rank));
    });
    return;
  }
  // Problems are handed out one at a time from a shared counter: their iteration counts
  // differ, so fixed slices would leave threads idle.
  std::atomic<int64_t> next{0};
  const int64_t workers = threads < args.batch ? threads : args.batch;
  parallel_for(workers, threads, 1, [&](int64_t, int64_t) {
    Shared shared(args.n, args.m);
    Team alone(1);
    std::vector<float> buf(scratch);
    for (int64_t b = next++; b < args.batch; b = next++)
      solve_problem<T>(args, b, shared, buf.data(), alone, 0);
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
