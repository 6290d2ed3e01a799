// Arguments of one batched token alignment (fastkd.xtok.align_spans), as passed from Python, and
// the rule every backend follows; python/fastkd/reference/align_spans.py states it as a plain
// Python two-pointer loop and python/fastkd/xtok/align.py as vectorized torch.
//
// Sequence b has student spans s[b, i] = [start, end) and teacher spans t[b, j], byte offsets
// into the same UTF-8 text. A token takes part when end > start (empty spans: special tokens,
// BOS/EOS, padding marked (-1, -1)); a token's bytes run from the previous taking-part token's
// end to its own end, so only the ends decide the chunks. A chunk closes at every byte that both
// sides end a token at; a token's chunk is the one closing at the first common end >= its end.
// Chunk ids are 0-based per sequence and increasing; tokens that take no part get -1.
// Errors (status[b] != 0, the first offending token in detail[b]):
//   1 / 2  student / teacher: a taking-part token starts below 0 or ends before the previous one
//   3      the two sides do not cover the same bytes (first start or last end differ, or only
//          one side has a taking-part token); detail = -1
#pragma once

#include <cstdint>

namespace fastkd {

enum AlignStatus : int32_t {
  kAlignOk = 0,
  kAlignBadStudent = 1,
  kAlignBadTeacher = 2,
  kAlignCoverage = 3,
};

struct AlignSpansArgs {
  const int64_t* student_spans;  // [batch, student_len, 2] contiguous (start, end)
  const int64_t* teacher_spans;  // [batch, teacher_len, 2] contiguous
  int64_t batch;
  int64_t student_len;
  int64_t teacher_len;
  int32_t* student_chunk;  // [batch, student_len]
  int32_t* teacher_chunk;  // [batch, teacher_len]
  int32_t* num_chunks;     // [batch]
  int32_t* status;         // [batch] AlignStatus
  int64_t* detail;         // [batch] first offending token, or -1
};

}  // namespace fastkd
