// fused_linear_topk CPU row kernel. Per row, with a = z / T and m = max_j a_j:
//   load   : a into an fp32 scratch row, with m;
//   select : the k best (a_j, j) by a k-entry heap whose root is the worst kept entry: one
//            comparison per column against the root for the columns that do not enter
//            (NaN counts as -inf here; it reaches lse through the sums);
//   sums   : the kept columns' scratch entries set to -inf; lse_rest = LSE of the rest, shifted
//            by the rest's own maximum and summed in double (shifted_lse), S_kept = sum of
//            exp(a_j - m) over the kept ones; lse = m + log(S_kept + exp(lse_rest - m)),
//            log_tail = lse_rest - lse.
// The tail is summed over its own columns, never formed as 1 - sum_k p_k: where the kept mass
// is within 1e-7 of 1, that difference would be all fp32 rounding.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); the bindings' dispatcher picks one at run time.
#include "fused_linear_topk_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/kd_math.h"
#include "parallel.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

struct Entry {
  float value;
  int64_t id;
};

// x ranks before y: larger value, then the lower id.
inline bool ranks_before(const Entry& x, const Entry& y) {
  return x.value > y.value || (x.value == y.value && x.id < y.id);
}

struct Scratch {
  std::vector<float> a;
  std::vector<Entry> heap;
  Scratch(int64_t n, int64_t k) : a(n) { heap.reserve(k); }
};

void topk_row(const TopkRowsArgs& A, int64_t row, Scratch& s) {
  const int64_t n = A.vocab;
  const int64_t k = A.k;
  float* a = s.a.data();
  const float m = load_scaled_row(A.logits + row * A.row_stride, n, A.inv_temperature, a);

  // std heap functions keep the "largest" under the comparator at the front: with ranks_before
  // as "less", that is the entry every other kept one ranks before, the worst kept.
  std::vector<Entry>& heap = s.heap;
  heap.clear();
  for (int64_t j = 0; j < n; ++j) {
    const Entry x{a[j] == a[j] ? a[j] : kNegInf, j};
    if (int64_t(heap.size()) < k) {
      heap.push_back(x);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before(x, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = x;
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), ranks_before);  // best first

  int64_t* ids = A.ids + row * k;
  float* logprobs = A.logprobs + row * k;
  double kept = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t id = heap[i].id;
    ids[i] = id;
    logprobs[i] = a[id];  // a_id for now; - lse below
    kept += CpuMath::exp(a[id] - m);
    a[id] = kNegInf;
  }
  // The rest is summed shifted by its own maximum m_rest (the (k+1)-th largest a): shifted by
  // m, a tail below e^-87 of the row's mass would flush to 0 term by term (at T = 0.25 a
  // 57-column row's tail was e^-94).
  const float m_rest = k < n ? row_max(a, n) : kNegInf;
  const double lse_rest = m_rest > kNegInf ? shifted_lse(a, n, m_rest) : double(kNegInf);
  const double lse = double(m) + std::log(kept + std::exp(lse_rest - double(m)));
  A.lse[row] = float(lse);
  A.log_tail[row] = m > kNegInf ? float(lse_rest - lse) : __builtin_nanf("");
  for (int64_t i = 0; i < k; ++i) logprobs[i] = float(double(logprobs[i]) - lse);
}

}  // namespace

void fused_linear_topk_rows(const TopkRowsArgs& A, int num_threads) {
  for_each_row(
      A.n_rows, A.vocab, num_threads, [&] { return Scratch(A.vocab, A.k); },
      [&](int64_t row, Scratch& s) { topk_row(A, row, s); });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
