// fused_linear_topk on CPU: the row kernel of the chunked lm_head op. Per row of fp32 chunk
// logits z: the k largest a = z / T with their log-probs, lse(a), and the log of the mass
// outside them summed over its own columns (exact where the kept mass is within rounding of 1).
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

struct TopkRowsArgs {
  const float* logits;  // [n_rows, row_stride] fp32, read only
  int64_t row_stride;   // elements between rows (>= vocab)
  int64_t n_rows;
  int64_t vocab;
  int64_t k;        // 1 <= k <= vocab
  int64_t* ids;     // [n_rows, k], decreasing a; among equal a, the lower id first
  float* logprobs;  // [n_rows, k] a_id - lse
  float* log_tail;  // [n_rows] LSE(a outside ids) - lse; -inf where k = vocab
  float* lse;       // [n_rows] LSE(a)
  float inv_temperature;
};

namespace base { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
namespace avx512 { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
#endif

// Writes ids, logprobs, log_tail and lse; the build for this processor's ISA.
void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
