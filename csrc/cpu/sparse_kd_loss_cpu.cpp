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
// With the targets' log-probabilities (args.logprobs) the same passes give the reverse KL over the
// ids and the bucket (reverse_row below). The slot loops are scalar (K << V); the row loops
// vectorize: row_max on vector types, the sums over fixed-width lane arrays, exp from CpuMath.
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

// The row's slots: how many ids lie in [0, V), and whether one is >= V.
struct SlotCount {
  int64_t n_ids;
  bool bad_id;
};

inline SlotCount count_slots(const int32_t* ids, int64_t k_slots, int64_t n) {
  SlotCount c{0, false};
  for (int64_t k = 0; k < k_slots; ++k) {
    c.n_ids += ids[k] >= 0 && ids[k] < n;
    c.bad_id = c.bad_id || ids[k] >= n;
  }
  return c;
}

// The load, gather and sum passes: a in s.a (the ids' entries restored), a at the ids in
// s.a_ids, e_j = exp(a_j - m) in s.e (0 at the ids). S_out sums e outside the ids; S = S_out +
// sum_k exp(a_{s_k} - m).
struct RowSums {
  float m, sum_out, sum, log_sum;
};

template <typename TS>
inline __attribute__((always_inline)) RowSums load_row(const SparseKdLossArgs& A, int64_t row,
                                                       const int32_t* ids, Scratch& s) {
  const int64_t n = A.vocab;
  const int64_t k_slots = A.num_slots;
  const TS* z = static_cast<const TS*>(A.student) + row_offset(A.student_layout, A.inner_rows, row);
  float* a = s.a.data();
  float* a_ids = s.a_ids.data();
  const float m = load_scaled_row(z, n, A.inv_temperature, a);
  for (int64_t k = 0; k < k_slots; ++k) {
    const bool valid = ids[k] >= 0 && ids[k] < n;
    a_ids[k] = valid ? a[ids[k]] : kNegInf;
  }
  for (int64_t k = 0; k < k_slots; ++k)
    if (ids[k] >= 0 && ids[k] < n) a[ids[k]] = kNegInf;
  const float sum_out = exp_sum_pass(a, n, m, s.e.data());
  for (int64_t k = 0; k < k_slots; ++k)
    if (ids[k] >= 0 && ids[k] < n) a[ids[k]] = a_ids[k];
  float sum_in = 0.0f;
  for (int64_t k = 0; k < k_slots; ++k) sum_in += Math::exp(a_ids[k] - m);
  const float sum = sum_out + sum_in;
  return {m, sum_out, sum, Math::log(sum)};
}

// The hard CE term's mode (OffIdGrad's CE) with r.lz = LSE(z) set, and its loss added to *loss.
inline int ce_setup(const SparseKdLossArgs& A, const float* a, int64_t label, const RowSums& rs,
                    OffIdGrad& r, float* loss) {
  // z = T a: LSE(z) = T m + log sum exp(T (a - m)).
  const bool unit_t = A.temperature == 1.0f;
  r.lz = unit_t ? rs.m + rs.log_sum
                : A.temperature * rs.m + Math::log(tempered_sum(a, A.vocab, A.temperature, rs.m));
  const bool label_ok = label >= 0 && label < A.vocab;
  *loss += label_ok ? A.hard_weight * (r.lz - A.temperature * a[label]) : __builtin_nanf("");
  return unit_t ? 1 : 2;
}

// The gradient row: every column as one outside the ids (r), then the id columns overwritten
// with soft_id(k, q_k) (the slot's soft gradient, scaled) plus the CE term, zeros past V. Each
// value is rounded once to the student's dtype.
template <typename TS, typename SoftId>
inline __attribute__((always_inline)) void write_grad(const SparseKdLossArgs& A, TS* g,
                                                      const int32_t* ids, const Scratch& s,
                                                      const RowSums& rs, const OffIdGrad& r,
                                                      int ce_mode, int64_t label, SoftId soft_id) {
  const int64_t n = A.vocab;
  const bool ce = ce_mode != 0;
  const float* a = s.a.data();
  const float* a_ids = s.a_ids.data();
  const float inv_sum = 1.0f / rs.sum;
  grad_pass_dispatch(s.e.data(), a, n, r, ce_mode, g);
  bool label_in_ids = false;
  for (int64_t k = 0; k < A.num_slots; ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= n) continue;
    const float q = Math::exp(a_ids[k] - rs.m) * inv_sum;
    float v = soft_id(k, q);
    if (ce_mode == 1) v += A.hard_grad_weight * q;
    if (ce_mode == 2) v += A.hard_grad_weight * Math::exp(A.temperature * a_ids[k] - r.lz);
    if (ce && id == label) {
      v -= A.hard_grad_weight;
      label_in_ids = true;
    }
    g[id] = from_float<TS>(v);
  }
  if (ce && label >= 0 && label < n && !label_in_ids)
    g[label] = from_float<TS>(off_id_value(r, ce_mode, s.e[label], a[label]) - A.hard_grad_weight);
  for (int64_t i = n; i < A.grad_vocab; ++i) g[i] = from_float<TS>(0.0f);
}

// Ignored tokens, and tokens with neither a target nor a CE term (all-padding targets, no
// bucket: L and its gradient are 0 without reading the logits): loss 0, zero gradient.
template <typename TS>
inline bool skip_row(const SparseKdLossArgs& A, int64_t row, const SlotCount& c, TS* g) {
  const int64_t label = A.labels ? A.labels[row] : A.ignore_index;
  const bool ignored = A.labels && label == A.ignore_index;
  const bool ce = A.labels && A.hard_weight > 0.0f;
  if (!ignored && (c.n_ids > 0 || c.bad_id || A.tail_mass != nullptr || ce)) return false;
  A.loss[row] = 0.0f;
  if (g) zero_grad_row(g, A.grad_vocab);
  return true;
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

  const SlotCount c = count_slots(ids, k_slots, n);
  if (skip_row(A, row, c, g)) return;
  const RowSums rs = load_row<TS>(A, row, ids, s);
  const float* a_ids = s.a_ids.data();

  // The soft loss from log q_k = (a_k - m) - log S. Weights <= 0 count as 0; a NaN or +inf one
  // (or an id >= V) makes the row's loss and, through c_in, every gradient entry NaN: the NaN
  // rule of the sparse ops.
  float total_w = 0.0f, soft = 0.0f;
  for (int64_t k = 0; k < k_slots; ++k) {
    const float wk = nan_unless_finite(w[k]);
    if (ids[k] < 0 || ids[k] >= n || wk <= 0.0f) continue;
    total_w += wk;
    soft += wk * (Math::log(wk) - ((a_ids[k] - rs.m) - rs.log_sum));
  }
  // Where the (distinct) ids cover all V columns the bucket is empty and its mass (rounding of
  // 1 - sum_k w_k, or teacher mass past V) is dropped.
  float w_b = 0.0f, k_bucket = 0.0f;
  const float tail = bucket ? nan_unless_finite(A.tail_mass[row]) : 0.0f;
  if (bucket && !(tail <= 0.0f) && c.n_ids < n) {
    w_b = tail;
    soft += w_b * (Math::log(w_b) - (Math::log(rs.sum_out) - rs.log_sum));
    // q_j / q_b = e_j / S_out; where S_out = 0 every e_j outside the ids is 0 as well.
    if (rs.sum_out > 0.0f) k_bucket = w_b / rs.sum_out;
  }
  const float c_in = c.bad_id ? nan : total_w + w_b;
  const float inv_sum = 1.0f / rs.sum;
  float loss = A.soft_weight * soft;

  OffIdGrad r{A.soft_grad_scale * (c_in * inv_sum - k_bucket), A.hard_grad_weight, inv_sum,
              A.temperature, 0.0f};
  const int ce_mode = ce ? ce_setup(A, s.a.data(), label, rs, r, &loss) : 0;
  A.loss[row] = c.bad_id ? nan : loss;
  if (!g) return;
  write_grad<TS>(A, g, ids, s, rs, r, ce_mode, label, [&](int64_t k, float q) {
    return A.soft_grad_scale * (c_in * q - (w[k] > 0.0f ? w[k] : 0.0f));
  });
}

// The reverse direction over the support S = the ids plus the bucket, with the targets'
// log p_k and tail mass p_b (<= 0: 0):
//   L       = sum_k q_k (log q_k - log p_k) + q_b (log q_b - log p_b)
//   dL/da_j = q_j (c_j - L),   c_j = log q_j - log p_j at the ids, log q_b - log p_b elsewhere
// (from dq_k/da_j = q_k ([k = j] - q_j), dq_b/da_j = ([j not in S] - q_b) q_j and
// sum_k q_k + q_b = 1). The terms and the id columns' gradient are kd_loss's rkl elements
// (plain_terms / plain_grad of kd_math.h): 0 where q counts as 0. Columns outside the ids get
// e_j (c_b - L) / S, 0 where the bucket has no student mass (S_out = 0, so every e_j is 0 and
// c_b = -inf). A NaN or +inf log p_k or p_b, or an id >= V, makes L and every gradient entry
// NaN.
template <typename TS>
void reverse_row(const SparseKdLossArgs& A, int64_t row, Scratch& s) {
  const int64_t n = A.vocab;
  const int64_t k_slots = A.num_slots;
  TS* g = A.grad ? static_cast<TS*>(A.grad) + row * A.grad_vocab : nullptr;
  const int32_t* ids = A.ids + row * k_slots;
  const float* lp = A.logprobs + row * k_slots;
  const int64_t label = A.labels ? A.labels[row] : A.ignore_index;
  const bool ce = A.labels && A.hard_weight > 0.0f;
  const float nan = __builtin_nanf("");

  const SlotCount c = count_slots(ids, k_slots, n);
  if (skip_row(A, row, c, g)) return;
  const RowSums rs = load_row<TS>(A, row, ids, s);
  const float* a_ids = s.a_ids.data();

  bool bad = c.bad_id;
  float soft = 0.0f;
  for (int64_t k = 0; k < k_slots; ++k) {
    if (ids[k] < 0 || ids[k] >= n) continue;
    bad = bad || !(lp[k] < kPosInf);
    const float lq = (a_ids[k] - rs.m) - rs.log_sum;
    soft += plain_terms<kRKL, Math>(lp[k], lq, 0.0f, Math::exp(lq)).loss;
  }
  // The bucket, empty where the ids cover all V columns. Its term, like the ids', is 0 where
  // q_b counts as 0 (below 2^-126: plain_terms); its columns' gradient is then 0 too, so that a
  // p_b of 0 (c_b = +inf) never meets such a q_b.
  float c_b = 0.0f;
  bool bucket_counts = false;
  if (c.n_ids < n) {
    const float tail = A.tail_mass[row];
    bad = bad || !(tail < kPosInf);
    const float lp_b = tail > 0.0f ? Math::log(tail) : kNegInf;
    const float lq_b = Math::log(rs.sum_out) - rs.log_sum;
    soft += plain_terms<kRKL, Math>(lp_b, lq_b, 0.0f, Math::exp(lq_b)).loss;
    bucket_counts = rs.sum_out > 0.0f && lq_b > kLogMinProb;
    if (bucket_counts) c_b = lq_b - lp_b;
  }
  if (bad) soft = nan;
  const float inv_sum = 1.0f / rs.sum;
  float loss = A.soft_weight * soft;
  const float k_off = bucket_counts || bad ? (c_b - soft) * inv_sum : 0.0f;
  OffIdGrad r{A.soft_grad_scale * k_off, A.hard_grad_weight, inv_sum, A.temperature, 0.0f};
  const int ce_mode = ce ? ce_setup(A, s.a.data(), label, rs, r, &loss) : 0;
  A.loss[row] = loss;
  if (!g) return;
  write_grad<TS>(A, g, ids, s, rs, r, ce_mode, label, [&](int64_t k, float q) {
    const float lq = (a_ids[k] - rs.m) - rs.log_sum;
    return bad ? nan : A.soft_grad_scale * plain_grad<kRKL, Math>(lp[k], lq, 0.0f, q, soft, 0.0f);
  });
}

}  // namespace

void sparse_kd_loss_forward(const SparseKdLossArgs& A, int num_threads) {
  visit_dtype(A.student_dtype, [&](auto tag) {
    using TS = typename decltype(tag)::type;
    if (A.grad) advise_huge_pages(A.grad, size_t(A.n_rows) * size_t(A.grad_vocab) * sizeof(TS));
    const auto scratch = [&] { return Scratch(A.vocab, A.num_slots); };
    if (A.reverse)
      for_each_row(A.n_rows, A.vocab, num_threads, scratch,
                   [&](int64_t row, Scratch& s) { reverse_row<TS>(A, row, s); });
    else
      for_each_row(A.n_rows, A.vocab, num_threads, scratch,
                   [&](int64_t row, Scratch& s) { sparse_row<TS>(A, row, s); });
  });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
