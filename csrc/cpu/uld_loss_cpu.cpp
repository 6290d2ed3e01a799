// uld_loss CPU kernel: Universal Logit Distillation (Boizard et al., 2024). Per row, with
// q = softmax(z_s / T_s) over the student's V_s columns and p = softmax(z_t / T_t) over the
// teacher's V_t columns, each sorted in descending order, the shorter padded with zeros:
//   L = sum_{i < max(V_s, V_t)} |q_(i) - p_(i)|                       (0 <= L <= 2)
// L depends on q through its sorted values only. With r_j the rank of column j in q and
// h_j = sign(q_j - p_(r_j)) (p_(i) = 0 for i >= V_t; sign(0) = 0, as torch's abs gives),
//   dL/da_j = q_j (h_j - <q, h>),   a = z_s / T_s                      (softmax Jacobian)
// and dL/dz_s = dL/da / T_s. The teacher gets no gradient. Equal probabilities are ranked by
// column (a stable sort), so that a tie gives the subgradient torch.sort(stable=True) gives.
// Passes over a row:
//   load, exp : exp(a - max) and exp(b - max) in fp32 scratch rows (a row's LSE not finite: loss
//               and gradient NaN);
//   sort      : q and p normalized while their keys are built, then (key, column) pairs of q and
//               keys of p sorted by a radix sort, O(V) (radix_sort.h);
//   walk      : the two sorted lists side by side: L, h at each student column, <q, h>;
//   grad      : grad_scale / T_s * q_j (h_j - <q, h>) in the student's dtype.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include "uld_loss_cpu.h"

#include <cstdint>
#include <vector>

#include "huge_pages.h"
#include "parallel.h"
#include "radix_sort.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

struct Scratch {
  std::vector<float> logits, q, p, sign;
  std::vector<uint64_t> student_items, student_tmp;  // key << 32 | column
  std::vector<uint32_t> teacher_keys, teacher_tmp;
  Scratch(int64_t vs, int64_t vt)
      : logits(vs > vt ? vs : vt), q(vs), p(vt), sign(vs), student_items(vs), student_tmp(vs),
        teacher_keys(vt), teacher_tmp(vt) {}
};

// A row's softmax before normalization: the LSE of the scaled logits and 1 / sum of exps. The
// probabilities exps[i] * inv_sum are formed in the pass that builds the sort keys.
struct ExpRow {
  float lse, inv_sum;
};

// exp(load(z) * inv_t - max) into `exps`, through the scaled logits in `logits`.
template <typename T>
ExpRow exp_row(const T* z, int64_t n, float inv_t, float* logits, float* exps) {
  const float m = load_scaled_row(z, n, inv_t, logits);
  const float sum = exp_sum_pass(logits, n, m, exps);
  return {m + CpuMath::log(sum), 1.0f / sum};
}

template <typename TS>
void fill_row(TS* g, int64_t n, float v) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_float<TS>(v);
}

template <typename TS, typename TT>
void uld_row(const UldLossArgs& A, int64_t row, Scratch& s) {
  const int64_t vs = A.student_vocab;
  const int64_t vt = A.teacher_vocab;
  TS* g = A.grad ? static_cast<TS*>(A.grad) + row * vs : nullptr;
  if (A.labels && A.labels[row] == A.ignore_index) {
    A.loss[row] = 0.0f;
    if (g) fill_row(g, vs, 0.0f);
    return;
  }
  const TS* zs =
      static_cast<const TS*>(A.student) + row_offset(A.student_layout, A.inner_rows, row);
  const TT* zt =
      static_cast<const TT*>(A.teacher) + row_offset(A.teacher_layout, A.inner_rows, row);
  float* q = s.q.data();
  float* p = s.p.data();
  const ExpRow a = exp_row(zs, vs, A.inv_student_temperature, s.logits.data(), q);
  const ExpRow b = exp_row(zt, vt, A.inv_teacher_temperature, s.logits.data(), p);
  if (!row_has_distribution(a.lse, b.lse)) {
    A.loss[row] = __builtin_nanf("");
    if (g) fill_row(g, vs, __builtin_nanf(""));
    return;
  }

  // q = exps / sum (kept for the gradient pass) and the sort keys, in one pass per model.
  uint64_t* items = s.student_items.data();
  for (int64_t j = 0; j < vs; ++j) {
    q[j] *= a.inv_sum;
    items[j] = uint64_t(descending_key(q[j])) << 32 | uint64_t(j);
  }
  radix_sort(items, s.student_tmp.data(), vs, [](uint64_t x) { return uint32_t(x >> 32); });
  uint32_t* keys = s.teacher_keys.data();
  for (int64_t j = 0; j < vt; ++j) keys[j] = descending_key(p[j] * b.inv_sum);
  radix_sort(keys, s.teacher_tmp.data(), vt, [](uint32_t k) { return k; });

  // Ranks past the shorter list compare against 0: |q_(i)| or |p_(i)|, with h = +1 (or 0).
  double loss = 0.0, dot = 0.0;
  float* sign = s.sign.data();
  const int64_t both = vs < vt ? vs : vt;
  for (int64_t i = 0; i < both; ++i) {
    const float sq = key_probability(uint32_t(items[i] >> 32));
    const float sp = key_probability(keys[i]);
    const float h = sq > sp ? 1.0f : (sq < sp ? -1.0f : 0.0f);
    sign[uint32_t(items[i])] = h;
    loss += sq > sp ? double(sq) - double(sp) : double(sp) - double(sq);
    dot += double(sq) * h;
  }
  for (int64_t i = both; i < vs; ++i) {
    const float sq = key_probability(uint32_t(items[i] >> 32));
    const float h = sq > 0.0f ? 1.0f : 0.0f;
    sign[uint32_t(items[i])] = h;
    loss += sq;
    dot += double(sq) * h;
  }
  for (int64_t i = both; i < vt; ++i) loss += key_probability(keys[i]);
  A.loss[row] = float(loss);
  if (!g) return;

  const float scale = A.grad_scale * A.inv_student_temperature;
  const float d = float(dot);
  for (int64_t j = 0; j < vs; ++j) g[j] = from_float<TS>(scale * (q[j] * (sign[j] - d)));
}

}  // namespace

void uld_loss_forward(const UldLossArgs& A, int num_threads) {
  visit_dtype(A.student_dtype, [&](auto student_tag) {
    using TS = typename decltype(student_tag)::type;
    visit_dtype(A.teacher_dtype, [&](auto teacher_tag) {
      using TT = typename decltype(teacher_tag)::type;
      if (A.grad)
        advise_huge_pages(A.grad, size_t(A.n_rows) * size_t(A.student_vocab) * sizeof(TS));
      const int64_t row_len = A.student_vocab + A.teacher_vocab;
      for_each_row(
          A.n_rows, row_len, num_threads, [&] { return Scratch(A.student_vocab, A.teacher_vocab); },
          [&](int64_t row, Scratch& s) { uld_row<TS, TT>(A, row, s); });
    });
  });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
