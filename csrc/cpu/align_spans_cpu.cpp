// align_spans CPU kernel: per sequence, one pass over each side checks the spans (ends
// non-decreasing, starts >= 0) and finds the first start and last end of the tokens taking part;
// a second pass walks both sides with two pointers, the side whose token ends first advancing,
// and closes a chunk where both ends are equal (after taking in any further tokens ending at
// that same byte, which an ends-only rule puts in the same chunk). O(student_len + teacher_len)
// per sequence; sequences are independent and spread over threads.
//
// Compiled once per instruction-set level with FASTKD_ISA naming the namespace (see
// CMakeLists.txt); there is nothing to vectorize, the dispatch only keeps the build uniform.
#include "align_spans_cpu.h"

#include <cstdint>

#include "parallel.h"

namespace fastkd {
namespace cpu {
namespace FASTKD_ISA {
namespace {

struct SideSummary {
  int64_t first_start = -1;  // -1: no token takes part
  int64_t last_end = -1;
  int64_t bad = -1;  // first offending token, or -1
};

inline bool takes_part(const int64_t* span) { return span[1] > span[0]; }

SideSummary summarize(const int64_t* spans, int64_t len) {
  SideSummary out;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t* span = spans + 2 * i;
    if (!takes_part(span)) continue;
    if (span[0] < 0 || span[1] < out.last_end) {
      out.bad = i;
      return out;
    }
    if (out.first_start < 0) out.first_start = span[0];
    out.last_end = span[1];
  }
  return out;
}

// The two-pointer walk over one sequence whose spans passed summarize() and agree in coverage.
int32_t walk(const int64_t* s, int64_t ns, const int64_t* t, int64_t nt, int32_t* s_chunk,
             int32_t* t_chunk) {
  int64_t i = 0, j = 0;
  int32_t chunk = 0;
  int64_t closing = -1;  // the common end just reached, while later tokens may still end there
  for (;;) {
    while (i < ns && !takes_part(s + 2 * i)) s_chunk[i++] = -1;
    while (j < nt && !takes_part(t + 2 * j)) t_chunk[j++] = -1;
    if (closing >= 0) {
      if (i < ns && s[2 * i + 1] == closing) {
        s_chunk[i++] = chunk;
        continue;
      }
      if (j < nt && t[2 * j + 1] == closing) {
        t_chunk[j++] = chunk;
        continue;
      }
      ++chunk;
      closing = -1;
    }
    if (i == ns || j == nt) break;  // equal last ends: both sides run out together
    const int64_t es = s[2 * i + 1], et = t[2 * j + 1];
    if (es <= et) s_chunk[i++] = chunk;
    if (et <= es) t_chunk[j++] = chunk;
    if (es == et) closing = es;
  }
  return chunk;
}

}  // namespace

void align_spans(const AlignSpansArgs& a, int num_threads) {
  const int64_t ns = a.student_len, nt = a.teacher_len;
  // A sequence is a few thousand tokens: ~16k tokens per thread keep the thread start-up small.
  const int64_t per_thread = 16384 / (ns + nt + 1) + 1;
  parallel_for(a.batch, num_threads, per_thread, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* s = a.student_spans + 2 * ns * b;
      const int64_t* t = a.teacher_spans + 2 * nt * b;
      int32_t* s_chunk = a.student_chunk + ns * b;
      int32_t* t_chunk = a.teacher_chunk + nt * b;
      for (int64_t i = 0; i < ns; ++i) s_chunk[i] = -1;
      for (int64_t j = 0; j < nt; ++j) t_chunk[j] = -1;
      a.num_chunks[b] = 0;
      a.detail[b] = -1;
      const SideSummary ss = summarize(s, ns), ts = summarize(t, nt);
      if (ss.bad >= 0 || ts.bad >= 0) {
        a.status[b] = ss.bad >= 0 ? kAlignBadStudent : kAlignBadTeacher;
        a.detail[b] = ss.bad >= 0 ? ss.bad : ts.bad;
        continue;
      }
      if (ss.first_start != ts.first_start || ss.last_end != ts.last_end) {
        a.status[b] = kAlignCoverage;
        continue;
      }
      a.status[b] = kAlignOk;
      a.num_chunks[b] = walk(s, ns, t, nt, s_chunk, t_chunk);
    }
  });
}

}  // namespace FASTKD_ISA
}  // namespace cpu
}  // namespace fastkd
