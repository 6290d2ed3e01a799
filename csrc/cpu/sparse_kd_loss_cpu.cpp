// sparse_kd_loss CPU kernel. Per row, with a = z/T over the first V columns, q = softmax(a),
// target weights w_k at ids s_k (W = sum_k w_k) and, for tail="bucket", the teacher's tail mass
// w_b matched against the student's mass outside the ids, q_b = sum_{j not in ids} q_j:
//   L       = sum_k w_k (log w_k - log q_{s_k})  +  w_b (log w_b - log q_b)
//   dL/da_j = c_in q_j - w_j                  for j in ids,      c_in = W + w_b
//           = (c_in - w_b / q_b) q_j          for j not in ids
// (w_b = 0 without a bucket, or where the ids cover all V columns; terms with a zero weight are
// 0). The ids of a row are distinct (the Python side merges equal ones). Passes over the row:
//   load   : a into an fp32 scratch row, with its maximum m;
//   gather : a at the ids, whose scratch entries are then set to -inf for the sum pass;
//   sum    : e_j = exp(a_j - m), kept, and S_out = their sum, which skips the ids: the bucket's
//            q_b = S_out / S is summed over its own columns, with no 1 - sum_k q_k cancellation;
//            S = S_out + sum_k exp(a_{s_k} - m);
//   grad   : e_j (c_in / S - w_b / S_out) (+ the CE term) written for every column, then the
//            id columns overwritten with c_in q - w_k (+ CE), each rounded once to the
//            student's dtype.
// The slot loops are scalar (K << V); the row loops vectorize: row_max on vector types, the sums
// over fixed-width lane arrays, exp from CpuMath.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include "sparse_kd_loss_cpu.h"

#include <cstdint>
#include <vector>

#include "huge_pages.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

using Math = CpuMath;

// The gradient of a column outside the ids from e = exp(a - m) and a:
//   k_off e + hard (softmax(z)_j)   with k_off = soft_grad_scale (c_in / S - w_b / S_out).
// CE: 0 none; 1 at T = 1, where softmax(z) = e / S; 2 at T != 1, softmax(z)_j = exp(T a_j - lz).
struct OffIdGrad {
  float k_off, hard, inv_sum, temperature, lz;

  template <int CE>
  inline __attribute__((always_inline)) float value(float e, float a) const {
    if (CE == 1) return e * (k_off + hard * inv_sum);
    if (CE == 2) return e * k_off + hard * Math::exp(temperature * a - lz);
    return e * k_off;
  }
};

template <typename TS, int CE>
void grad_pass(const float* __restrict e, const float* __restrict a, int64_t n, const OffIdGrad& r,
               TS* __restrict g) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_float<TS>(r.value<CE>(e[i], a[i]));
}

template <typename TS>
void grad_pass_dispatch(const float* e, const float* a, int64_t n, const OffIdGrad& r, int ce,
                        TS* g) {
  if (ce == 1) grad_pass<TS, 1>(e, a, n, r, g);
  else if (ce == 2) grad_pass<TS, 2>(e, a, n, r, g);
  else grad_pass<TS, 0>(e, a, n, r, g);
}

float off_id_value(const OffIdGrad& r, int ce, float e, float a) {
  if (ce == 1) return r.value<1>(e, a);
  if (ce == 2) return r.value<2>(e, a);
  return r.value<0>(e, a);
}

// x where it is finite or -inf, NaN where it is NaN or +inf.
inline float nan_unless_finite(float x) { return x < kPosInf ? x : __builtin_nanf(""); }

struct Scratch {
  std::vector<float> a, e, a_ids;
  Scratch(int64_t n, int64_t k) : a(n), e(n), a_ids(k) {}
};

template <typename TS>
void zero_grad_row(TS* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_float<TS>(0.0f);
}

template <typename TS>
void sparse_row(const SparseKdLossArgs& A, int64_t row, Scratch& s) {
  const int64_t n = A.vocab;
  const int64_t k_slots = A.num_slots;
  TS* g = A.grad ? static_cast<TS*>(A.grad) + row * A.grad_vocab : nullptr;
  const int32_t* ids = A.ids + row * k_slots;
  const float* w = A.weights + row * k_slots;
  const int64_t label = A.labels ? A.labels[row] : A.ignore_index;
  const bool bucket = A.tail_mass != nullptr;
  const bool ce = A.labels && A.hard_weight > 0.0f;
  const float nan = __builtin_nanf("");

  int64_t n_ids = 0;
  bool bad_id = false;
  for (int64_t k = 0; k < k_slots; ++k) {
    n_ids += ids[k] >= 0 && ids[k] < n;
    bad_id = bad_id || ids[k] >= n;
  }
  // Ignored tokens, and tokens with neither a target nor a CE term (all-padding targets: W = 0
  // makes L and its gradient 0 without reading the logits).
  const bool ignored = A.labels && label == A.ignore_index;
  if (ignored || (n_ids == 0 && !bad_id && !bucket && !ce)) {
    A.loss[row] = 0.0f;
    if (g) zero_grad_row(g, A.grad_vocab);
    return;
  }

  const TS* z = static_cast<const TS*>(A.student) + row_offset(A.student_layout, A.inner_rows, row);
  float* a = s.a.data();
  float* e = s.e.data();
  float* a_ids = s.a_ids.data();
  const float m = load_scaled_row(z, n, A.inv_temperature, a);
  for (int64_t k = 0; k < k_slots; ++k) {
    const bool valid = ids[k] >= 0 && ids[k] < n;
    a_ids[k] = valid ? a[ids[k]] : kNegInf;
  }
  for (int64_t k = 0; k < k_slots; ++k)
    if (ids[k] >= 0 && ids[k] < n) a[ids[k]] = kNegInf;
  const float sum_out = exp_sum_pass(a, n, m, e);
  for (int64_t k = 0; k < k_slots; ++k)
    if (ids[k] >= 0 && ids[k] < n) a[ids[k]] = a_ids[k];

  // S = S_out + sum_k e_k; the soft loss from log q_k = (a_k - m) - log S.
  float sum_in = 0.0f;
  for (int64_t k = 0; k < k_slots; ++k) sum_in += Math::exp(a_ids[k] - m);
  const float sum = sum_out + sum_in;
  const float log_sum = Math::log(sum);
  // Weights <= 0 count as 0; a NaN or +inf one (or an id >= V) makes the row's loss and,
  // through c_in, every gradient entry NaN: the NaN rule of the sparse ops.
  float total_w = 0.0f, soft = 0.0f;
  for (int64_t k = 0; k < k_slots; ++k) {
    const float wk = nan_unless_finite(w[k]);
    if (ids[k] < 0 || ids[k] >= n || wk <= 0.0f) continue;
    total_w += wk;
    soft += wk * (Math::log(wk) - ((a_ids[k] - m) - log_sum));
  }
  // Where the (distinct) ids cover all V columns the bucket is empty and its mass (rounding of
  // 1 - sum_k w_k, or teacher mass past V) is dropped.
  float w_b = 0.0f, k_bucket = 0.0f;
  const float tail = bucket ? nan_unless_finite(A.tail_mass[row]) : 0.0f;
  if (bucket && !(tail <= 0.0f) && n_ids < n) {
    w_b = tail;
    soft += w_b * (Math::log(w_b) - (Math::log(sum_out) - log_sum));
    // q_j / q_b = e_j / S_out; where S_out = 0 every e_j outside the ids is 0 as well.
    if (sum_out > 0.0f) k_bucket = w_b / sum_out;
  }
  const float c_in = bad_id ? nan : total_w + w_b;
  const float inv_sum = 1.0f / sum;
  float loss = A.soft_weight * soft;

  OffIdGrad r{A.soft_grad_scale * (c_in * inv_sum - k_bucket), A.hard_grad_weight, inv_sum,
              A.temperature, 0.0f};
  const bool label_ok = label >= 0 && label < n;
  int ce_mode = 0;
  if (ce) {
    // z = T a: LSE(z) = T m + log sum exp(T (a - m)).
    const bool unit_t = A.temperature == 1.0f;
    r.lz =
        unit_t ? m + log_sum : A.temperature * m + Math::log(tempered_sum(a, n, A.temperature, m));
    ce_mode = unit_t ? 1 : 2;
    loss += label_ok ? A.hard_weight * (r.lz - A.temperature * a[label]) : nan;
  }
  A.loss[row] = bad_id ? nan : loss;
  if (!g) return;

  grad_pass_dispatch(e, a, n, r, ce_mode, g);
  bool label_in_ids = false;
  for (int64_t k = 0; k < k_slots; ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= n) continue;
    const float q = Math::exp(a_ids[k] - m) * inv_sum;
    float v = A.soft_grad_scale * (c_in * q - (w[k] > 0.0f ? w[k] : 0.0f));
    if (ce_mode == 1) v += A.hard_grad_weight * q;
    if (ce_mode == 2) v += A.hard_grad_weight * Math::exp(A.temperature * a_ids[k] - r.lz);
    if (ce && id == label) {
      v -= A.hard_grad_weight;
      label_in_ids = true;
    }
    g[id] = from_float<TS>(v);
  }
  if (ce && label_ok && !label_in_ids)
    g[label] = from_float<TS>(off_id_value(r, ce_mode, e[label], a[label]) - A.hard_grad_weight);
  for (int64_t i = n; i < A.grad_vocab; ++i) g[i] = from_float<TS>(0.0f);
}

}  // namespace

void sparse_kd_loss_forward(const SparseKdLossArgs& A, int num_threads) {
  visit_dtype(A.student_dtype, [&](auto tag) {
    using TS = typename decltype(tag)::type;
    if (A.grad) advise_huge_pages(A.grad, size_t(A.n_rows) * size_t(A.grad_vocab) * sizeof(TS));
    for_each_row(
        A.n_rows, A.vocab, num_threads, [&] { return Scratch(A.vocab, A.num_slots); },
        [&](int64_t row, Scratch& s) { sparse_row<TS>(A, row, s); });
  });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
