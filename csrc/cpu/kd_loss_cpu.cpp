// Fused softmax-divergence loss, CPU kernel. One row at a time per thread:
//   load   : a = cap(z_s)/T, b = cap(z_t)/T into fp32 scratch rows, with their maxima;
//   stats  : sum exp(a - ma), sum exp(b - mb) (and the fkl/rkl loss with the maxima fixed),
//            keeping the exponentials, so that the later passes need no exp for p and q;
//   terms  : (loss, dot) of the divergences other than fkl/rkl from normalized log-probs; the
//            mixtures (jsd/skl/srkl) also leave in b's row the one value per element that their
//            gradient needs (kd_math.h mixture_keep), so that the mixture's log is taken once;
//   grad   : dL/dz_s written once in the student's dtype; columns past the common vocab get 0.
// Scratch rows stay in cache for V up to a few 10^5, so the passes after the load are
// arithmetic-bound; loops run over fixed-width lane arrays so that they vectorize with the same
// summation order on every instruction set.
//
// This file is compiled once per instruction-set level with FASTKD_ISA naming the namespace
// (see CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/kd_loss_args.h"
#include "huge_pages.h"
#include "kd_loss_cpu.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

using Math = CpuMath;

// x_i = cap(load(z_i)) / T into `out`; d(cap)/dz into `dcap` when DCAP. Returns max_i x_i, taken
// over each block of 16 right after it is written, in L1 (a separate pass that read the row
// back from L2 cost 0.9 of fkl's 10.7 instructions per element).
template <typename T, bool CAP, bool DCAP>
float load_row(const T* __restrict z, int64_t n, float inv_t, float cap, float* __restrict out,
               float* __restrict dcap) {
  auto element = [&](int64_t i) {
    float v = to_float(z[i]);
    if (CAP) {
      v = softcap<Math>(v, cap);
      if (DCAP) {
        const float r = v / cap;
        dcap[i] = 1.0f - r * r;
      }
    }
    out[i] = v * inv_t;
  };
  MaxLanes mx;
  const int64_t body = n - n % 16;
  for (int64_t i = 0; i < body; i += 16) {
    for (int64_t j = 0; j < 16; ++j) element(i + j);
    mx.add16(out + i);
  }
  for (int64_t i = body; i < n; ++i) element(i);
  return mx.finish(out + body, n - body);
}

// dcap == nullptr: the capping derivative is not needed (teacher rows).
template <typename T>
float load_row_dispatch(const T* z, int64_t n, float inv_t, float cap, float* out, float* dcap) {
  if (cap <= 0.0f) return load_row<T, false, false>(z, n, inv_t, cap, out, dcap);
  return dcap ? load_row<T, true, true>(z, n, inv_t, cap, out, dcap)
              : load_row<T, true, false>(z, n, inv_t, cap, out, dcap);
}

struct RowStats {
  float sum_a, sum_b, kl_acc;
};

// sum exp(a - ma), sum exp(b - mb) and, for fkl/rkl, the shifted loss accumulator. The
// exponentials are kept in ea, eb: later passes get q and p from them without another exp.
// Each block of kLanes elements is computed first and then added into LaneSums from memory (in
// L1): with the sums as lane arrays updated inside the element loop, GCC kept them in memory
// and ran that loop twice per block (3 % more time, 0.3 more instructions per element).
template <int DIV>
RowStats stats_pass(const float* __restrict a, const float* __restrict b, int64_t n, float ma,
                    float mb, float* __restrict ea, float* __restrict eb) {
  auto element = [&](int64_t i) {
    const float xa = a[i] - ma;
    const float xb = b[i] - mb;
    ea[i] = Math::exp_nonpositive(xa);
    eb[i] = Math::exp_nonpositive(xb);
    if (DIV == kFKL) return shifted_kl_term(eb[i], xb, xa);
    if (DIV == kRKL) return shifted_kl_term(ea[i], xa, xb);
    return 0.0f;
  };
  LaneSums sa, sb, kl;
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    float klb[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) klb[j] = element(i + j);
    sa.add(ea + i);
    sb.add(eb + i);
    if (loss_in_stats_pass(DIV)) kl.add(klb);
  }
  RowStats r{sa.sum(), sb.sum(), kl.sum()};
  for (int64_t i = body; i < n; ++i) {
    r.kl_acc += element(i);
    r.sum_a += ea[i];
    r.sum_b += eb[i];
  }
  return r;
}

// A row after the stats pass: logits a, b with their LSEs la, lb, and exp(a - ma), exp(b - mb)
// with the reciprocals of their sums, so that q = ea / sum_a and p = eb / sum_b. After the terms
// pass of a mixture, b holds the elements' mixture_keep values instead.
struct StatsRow {
  const float* a;
  const float* b;
  const float* ea;
  const float* eb;
  float la, lb, inv_sum_a, inv_sum_b;
};

// The row's factors of tau (kd_math.h mixture) in terms of the stored exponentials:
//   wq q / (wp p) = tau_qp * ea / eb,   wp p / (wq q) = tau_pq * eb / ea.
struct MixtureRow {
  float tau_qp, tau_pq;
};

MixtureRow mixture_row(const DivergenceCoefs& c, float sum_a, float sum_b) {
  const double wq_over_wp = double(c.wq) / double(c.wp);  // inf or 0 at a zero weight
  const double sb_over_sa = double(sum_b) / double(sum_a);
  return {float(wq_over_wp * sb_over_sa), float(1.0 / (wq_over_wp * sb_over_sa))};
}

// The scratch rows come as restrict parameters (not as StatsRow's fields) so that the stores
// into b need no run-time overlap checks: GCC placed them inside the loop over lane blocks,
// where they took 40 % of the pass's instructions.
template <int DIV>
Terms terms_pass(const float* __restrict a, float* __restrict b, const float* __restrict ea,
                 const float* __restrict eb, int64_t n, const StatsRow& row,
                 const DivergenceCoefs& c, const MixtureRow& mr) {
  float loss[kLanes] = {}, dot[kLanes] = {};
  auto element = [&](int64_t i) {
    const float lp = b[i] - row.lb;
    const float lq = a[i] - row.la;
    const float p = eb[i] * row.inv_sum_b;
    const float q = ea[i] * row.inv_sum_a;
    if (!is_mixture(DIV)) return plain_terms<DIV, Math>(lp, lq, p, q);
    // tau = the lesser weighted term over the greater, by one division of the stored
    // exponentials (both are normal where the model's probability counts, kd_math.h
    // kLogMinProb); the log-domain sign decides which leads.
    const float d = lp - lq;
    const bool p_leads = mixture_log_ratio(d, c) > 0.0f;
    const float num = p_leads ? ea[i] : eb[i];
    const float den = p_leads ? eb[i] : ea[i];
    const Mixture x = mixture(d, (p_leads ? mr.tau_qp : mr.tau_pq) * (num / den), c);
    b[i] = mixture_keep<DIV>(x, c);
    return mixture_terms<DIV>(lp, lq, p, q, x, c);
  };
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const Terms t = element(i + j);
      loss[j] += t.loss;
      dot[j] += t.dot;
    }
  Terms r{lane_sum(loss), lane_sum(dot)};
  for (int64_t i = body; i < n; ++i) {
    const Terms t = element(i);
    r.loss += t.loss;
    r.dot += t.dot;
  }
  return r;
}

// Everything the gradient of one element needs besides its logits.
struct GradRow {
  StatsRow stats;
  float loss, dot;
  float soft_grad_scale;
  float hard_grad_weight, temperature, lz;  // CE: dCE/dz'_i = softmax(T a)_i - [i == y]
  DivergenceCoefs coefs;
};

// CE: 0 none; 1 at T = 1, where softmax(T a) = q; 2 at T != 1, softmax(T a) = exp(T a - lz).
template <int DIV, int CE, bool CAP>
inline __attribute__((always_inline)) float grad_element(int64_t i, const float* dcap,
                                                         const GradRow& r) {
  const StatsRow& s = r.stats;
  const float q = s.ea[i] * s.inv_sum_a;
  const float lq = s.a[i] - s.la;
  const float soft =
      is_mixture(DIV)
          ? mixture_grad<DIV>(lq, q, s.b[i], r.dot, r.coefs)
          : plain_grad<DIV, Math>(s.b[i] - s.lb, lq, s.eb[i] * s.inv_sum_b, q, r.loss, r.dot);
  float g = r.soft_grad_scale * soft;
  if (CE == 1) g += r.hard_grad_weight * q;
  if (CE == 2) g += r.hard_grad_weight * Math::exp(r.temperature * s.a[i] - r.lz);
  if (CAP) g *= dcap[i];
  return g;
}

template <int DIV, typename TS, int CE, bool CAP>
void grad_pass(const float* __restrict dcap, int64_t n, const GradRow& r, TS* __restrict g) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_float<TS>(grad_element<DIV, CE, CAP>(i, dcap, r));
}

template <int DIV, typename TS, int CE>
void grad_pass_cap(const float* dcap, int64_t n, const GradRow& r, TS* g) {
  if (dcap) grad_pass<DIV, TS, CE, true>(dcap, n, r, g);
  else grad_pass<DIV, TS, CE, false>(dcap, n, r, g);
}

template <int DIV, typename TS>
void grad_pass_dispatch(const float* dcap, int64_t n, const GradRow& r, int ce, TS* g) {
  if (ce == 1) grad_pass_cap<DIV, TS, 1>(dcap, n, r, g);
  else if (ce == 2) grad_pass_cap<DIV, TS, 2>(dcap, n, r, g);
  else grad_pass_cap<DIV, TS, 0>(dcap, n, r, g);
}

struct Scratch {
  std::vector<float> a, b, ea, eb, dcap;
  explicit Scratch(int64_t n, bool cap) : a(n), b(n), ea(n), eb(n), dcap(cap ? n : 0) {}
};

template <int DIV, typename TS, typename TT>
void kd_row(const KdLossArgs& A, int64_t row, Scratch& s) {
  const KdRowConfig& cfg = A.config;
  const int64_t n = A.vocab;
  TS* g = A.grad ? static_cast<TS*>(A.grad) + row * A.grad_vocab : nullptr;
  const int64_t label = A.labels ? A.labels[row] : cfg.ignore_index;
  if (A.labels && label == cfg.ignore_index) {
    A.loss[row] = 0.0f;
    if (g)
      for (int64_t i = 0; i < A.grad_vocab; ++i) g[i] = from_float<TS>(0.0f);
    return;
  }
  const TS* zs =
      static_cast<const TS*>(A.student) + row_offset(A.student_layout, A.inner_rows, row);
  const TT* zt =
      static_cast<const TT*>(A.teacher) + row_offset(A.teacher_layout, A.inner_rows, row);
  const bool cap = cfg.softcap > 0.0f;
  const bool ce = A.labels && cfg.hard_weight > 0.0f;

  float* dcap = cap ? s.dcap.data() : nullptr;
  const float ma = load_row_dispatch(zs, n, cfg.inv_temperature, cfg.softcap, s.a.data(), dcap);
  const float mb = load_row_dispatch(zt, n, cfg.inv_temperature, cfg.softcap, s.b.data(), nullptr);
  const RowStats st = stats_pass<DIV>(s.a.data(), s.b.data(), n, ma, mb, s.ea.data(), s.eb.data());
  const StatsRow row_stats{s.a.data(),
                           s.b.data(),
                           s.ea.data(),
                           s.eb.data(),
                           ma + Math::log(st.sum_a),
                           mb + Math::log(st.sum_b),
                           1.0f / st.sum_a,
                           1.0f / st.sum_b};
  if (!row_has_distribution(row_stats.la, row_stats.lb)) {
    const float nan = __builtin_nanf("");
    A.loss[row] = nan;
    if (g) {
      for (int64_t i = 0; i < n; ++i) g[i] = from_float<TS>(nan);
      for (int64_t i = n; i < A.grad_vocab; ++i) g[i] = from_float<TS>(0.0f);
    }
    return;
  }

  Terms soft{0.0f, 0.0f};
  if (DIV == kFKL) soft.loss = shifted_kl_finish<Math>(st.kl_acc, st.sum_b, st.sum_a);
  else if (DIV == kRKL) soft.loss = shifted_kl_finish<Math>(st.kl_acc, st.sum_a, st.sum_b);
  else
    soft = terms_pass<DIV>(s.a.data(), s.b.data(), s.ea.data(), s.eb.data(), n, row_stats,
                           cfg.coefs, mixture_row(cfg.coefs, st.sum_a, st.sum_b));

  GradRow r{row_stats,       soft.loss, soft.dot, cfg.soft_grad_scale, cfg.hard_grad_weight,
            cfg.temperature, 0.0f,      cfg.coefs};
  float loss = cfg.soft_weight * soft.loss;
  const bool label_ok = label >= 0 && label < n;
  int ce_mode = 0;
  if (ce) {
    // z' = T a: LSE(z') = T ma + log sum exp(T (a - ma)).
    const bool unit_t = cfg.temperature == 1.0f;
    const float sum_z = unit_t ? st.sum_a : tempered_sum(s.a.data(), n, cfg.temperature, ma);
    r.lz = cfg.temperature * ma + Math::log(sum_z);
    ce_mode = unit_t ? 1 : 2;
    loss += label_ok ? cfg.hard_weight * (r.lz - cfg.temperature * s.a[label]) : __builtin_nanf("");
  }
  A.loss[row] = loss;
  if (!g) return;

  grad_pass_dispatch<DIV, TS>(dcap, n, r, ce_mode, g);
  if (ce && label_ok) {
    const float gy = (ce_mode == 1 ? grad_element<DIV, 1, false>(label, nullptr, r)
                                   : grad_element<DIV, 2, false>(label, nullptr, r)) -
                     cfg.hard_grad_weight;
    g[label] = from_float<TS>(cap ? gy * dcap[label] : gy);
  }
  for (int64_t i = n; i < A.grad_vocab; ++i) g[i] = from_float<TS>(0.0f);
}

template <int DIV, typename TS, typename TT>
void run_rows(const KdLossArgs& A, int num_threads) {
  const int64_t min_rows = min_rows_per_thread(A.vocab, A.n_rows);
  if (A.grad) advise_huge_pages(A.grad, size_t(A.n_rows) * size_t(A.grad_vocab) * sizeof(TS));
  parallel_for(A.n_rows, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    Scratch s(A.vocab, A.config.softcap > 0.0f);
    for (int64_t row = begin; row < end; ++row) kd_row<DIV, TS, TT>(A, row, s);
  });
}

template <int DIV, typename TS>
void dispatch_teacher(const KdLossArgs& A, int num_threads) {
  switch (A.teacher_dtype) {
    case kFloat32: return run_rows<DIV, TS, float>(A, num_threads);
    case kBFloat16: return run_rows<DIV, TS, bf16_t>(A, num_threads);
    default: return run_rows<DIV, TS, fp16_t>(A, num_threads);
  }
}

template <int DIV>
void dispatch_student(const KdLossArgs& A, int num_threads) {
  switch (A.student_dtype) {
    case kFloat32: return dispatch_teacher<DIV, float>(A, num_threads);
    case kBFloat16: return dispatch_teacher<DIV, bf16_t>(A, num_threads);
    default: return dispatch_teacher<DIV, fp16_t>(A, num_threads);
  }
}

}  // namespace

// The divergence code is one of FASTKD_DIVERGENCES (make_kd_args in bindings.cpp checks it).
void kd_loss_forward(const KdLossArgs& A, int num_threads) {
  switch (A.config.divergence) {
#define FASTKD_DISPATCH_DIVERGENCE(id, name, code) \
  case id: return dispatch_student<id>(A, num_threads);
    FASTKD_DIVERGENCES(FASTKD_DISPATCH_DIVERGENCE)
#undef FASTKD_DISPATCH_DIVERGENCE
  }
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
