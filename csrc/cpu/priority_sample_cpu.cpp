// Priority-sampling sparse teacher targets (Duffield, Lund & Thorup, "Priority sampling for
// estimation of arbitrary subset sums", JACM 2007): per row, p = softmax(z), one uniform u_i per
// id (Philox keyed by (seed, token, i // 4) on stream 1, word i % 4; csrc/common/philox.h),
// priority q_i = p_i / u_i. The k ids of largest priority are kept with weight max(p_i, tau),
// tau the (k+1)-th largest priority (0 when fewer than k + 1 ids have mass), so that
// E[sum_kept w_i f(i)] = sum_i p_i f(i) for every f.
//
// Ids are ranked by key_i = log q_i + LSE(z) = z_i - log u_i in float64, ties to the smaller id
// (python/fastkd/reference/sample_teacher.py ranks log q_i in float64: the same order up to
// float64 rounding). One pass selects, with a heap of the k + 1 best keys seen so far. Once the
// heap is full with worst key w, id i can enter only if z_i - log u_i > w, that is
//   u_i < exp(z_i - w) = e_i exp(m - w),   e_i = exp(z_i - m) (kept from the LSE pass),
// so a block of four ids (one Philox call) whose largest e_i exp(m - w) is below the smallest
// uniform 2^-25 is skipped without drawing its uniforms, and inside a drawn block only the ids
// passing the test (with a relative slack for the fp32 rounding of e_i) get their float64 key.
// The skip needs z_i more than 25 ln 2 = 17.3 below w for all four ids: it pays for a teacher
// whose mass sits on few ids; with logit noise of a few nats per id (the benchmark's LM-like
// rows) nearly every block is drawn, and the Philox calls are the kernel's cost.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time.
#include "priority_sample_cpu.h"

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

constexpr uint32_t kPriorityStream = 1u;        // counter word 3 of the priority uniforms
constexpr int64_t kChunk = 64;                  // ids screened together: 16 Philox calls
constexpr float kMinUniform = 2.98023224e-08f;  // 2^-25, the smallest uniform_open01
constexpr float kNoDraw = 2.0f;                 // the uniform of an id left undrawn
// Relative slack of the screen u_i <= e_i exp(m - w): e_i is fp32 (a few ulp off), exp(m - w)
// rounded to fp32.
constexpr double kScreenSlack = 1e-5;
// The screen needs m - w below this: e_i = 0 (z_i - m < -87, fp32 underflow) must then imply
// z_i - log u_i <= z_i + 25 ln 2 < m - 69 < w, and exp(m - w) stays finite in fp32.
constexpr double kMaxScreenGap = 60.0;

struct Entry {
  double key;
  int32_t id;
};

// a ranks before b: larger key, then smaller id.
inline bool ranks_before(const Entry& a, const Entry& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}

struct Scratch {
  // The row as fp32 and e = exp(x - m), padded to whole chunks with -inf and 0.
  std::vector<float> x, e;
  std::vector<Entry> heap;  // the k + 1 best so far; std heap order puts the worst on top
  float uniforms[kChunk];
  uint8_t candidate[kChunk];
  explicit Scratch(int64_t vocab, int k)
      : x((vocab + kChunk - 1) / kChunk * kChunk, -INFINITY),
        e((vocab + kChunk - 1) / kChunk * kChunk, 0.0f) {
    heap.reserve(size_t(k) + 1);
  }
};

// fp32 row into x; true when it holds NaN or +inf.
template <typename T>
bool load_row(const T* __restrict z, int64_t n, float* __restrict x) {
  const float inf = __builtin_huge_valf();
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(z[i]);
    x[i] = v;
    bad |= int(v != v) | int(v == inf);
  }
  return bad != 0;
}

template <typename T>
void sample_row(const SampleTeacherArgs& A, int64_t row, Scratch& s) {
  const int k = A.num_samples;
  int32_t* ids = A.ids + row * k;
  float* weights = A.weights + row * k;
  float* logprobs = A.logprobs ? A.logprobs + row * k : nullptr;
  std::fill(ids, ids + k, -1);
  std::fill(weights, weights + k, 0.0f);
  if (logprobs) std::fill(logprobs, logprobs + k, 0.0f);

  const T* z = static_cast<const T*>(A.logits) + row_offset(A.layout, A.inner_rows, row);
  const int64_t n = A.vocab;
  float* x = s.x.data();
  const float* e = s.e.data();
  const bool bad = load_row(z, n, x);
  A.invalid[row] = uint8_t(bad);
  if (bad) return;
  const float m = row_max(x, n);
  if (!(m > -INFINITY)) return;  // no id has mass
  const double lse = shifted_lse(x, n, m, s.e.data());

  const uint64_t token = uint64_t(A.token_offset + row);
  const size_t capacity = size_t(k) + 1;
  std::vector<Entry>& heap = s.heap;
  heap.clear();
  bool screening = false;
  float scale = 0.0f;  // exp(m - w) (1 + slack) while screening
  auto offer = [&](double key, int32_t id) {
    const Entry entry{key, id};
    if (heap.size() < capacity) {
      heap.push_back(entry);
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else if (ranks_before(entry, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), ranks_before);
      heap.back() = entry;
      std::push_heap(heap.begin(), heap.end(), ranks_before);
    } else {
      return;
    }
    if (heap.size() == capacity) {
      const double gap = double(m) - heap.front().key;
      screening = gap < kMaxScreenGap;
      if (screening) scale = float(std::exp(gap) * (1.0 + kScreenSlack));
    }
  };
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    // Draw the blocks of four ids that hold mass and pass the screen; the others get a uniform
    // above any e_i exp(m - w) (they are skipped only while screening, or have no mass).
    for (int64_t b = 0; b < kChunk; b += 4) {
      const float* xb = x + c0 + b;
      const float* eb = e + c0 + b;
      const float x_max = std::max(std::max(xb[0], xb[1]), std::max(xb[2], xb[3]));
      const float e_max = std::max(std::max(eb[0], eb[1]), std::max(eb[2], eb[3]));
      if (!(x_max > -INFINITY) || (screening && e_max * scale < kMinUniform)) {
        std::fill(s.uniforms + b, s.uniforms + b + 4, kNoDraw);
        continue;
      }
      const Philox4 words =
          token_draw_block(A.seed, token, uint32_t((c0 + b) / 4), kPriorityStream);
      for (int w = 0; w < 4; ++w) s.uniforms[b + w] = uniform_open01(words.x[w]);
    }
    // Candidates, vectorized: ids with mass passing the screen (all of them while the heap
    // fills); the padding past the row has no mass.
    for (int64_t j = 0; j < kChunk; ++j)
      s.candidate[j] =
          uint8_t((x[c0 + j] > -INFINITY) & (!screening | (s.uniforms[j] <= e[c0 + j] * scale)));
    for (int64_t j = 0; j < kChunk; ++j)
      if (s.candidate[j])
        offer(double(x[c0 + j]) - std::log(double(s.uniforms[j])), int32_t(c0 + j));
  }

  // Best first; the (k + 1)-th key, if any, is tau's.
  std::sort(heap.begin(), heap.end(), ranks_before);
  double tau = 0.0;
  if (heap.size() == capacity) {
    tau = std::exp(heap.back().key - lse);
    heap.pop_back();
  }
  std::sort(heap.begin(), heap.end(), [](const Entry& a, const Entry& b) { return a.id < b.id; });
  for (size_t j = 0; j < heap.size(); ++j) {
    const int32_t id = heap[j].id;
    const double log_p = double(x[id]) - lse;
    ids[j] = id;
    weights[j] = float(std::max(std::exp(log_p), tau));
    if (logprobs) logprobs[j] = float(log_p);
  }
}

}  // namespace

void priority_sample(const SampleTeacherArgs& A, int num_threads) {
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
