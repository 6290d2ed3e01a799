// fused_linear_logprobs on CPU: the row kernel of the chunked lm_head op. Per row of fp32 chunk
// logits z: the log-prob of the target under softmax(z / T), the log-sum-exp of z / T, the entropy
// and, given the incoming gradients of those three, the gradient over z (written over the row).
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

struct LogprobRowsArgs {
  float* logits;       // [n_rows, row_stride] fp32; overwritten by the gradient if row_grads
  int64_t row_stride;  // elements between rows (>= vocab)
  int64_t n_rows;
  int64_t vocab;
  const int64_t* targets;  // [n_rows] ids in [0, vocab) or ignore_index
  const float* row_grads;  // [n_rows, 3] incoming gradients of (logprob, lse, entropy), or null
  float* logprob;          // [n_rows]; 0 at ignored rows
  float* lse;              // [n_rows]; 0 at ignored rows
  float* entropy;          // [n_rows] or null (not wanted: its incoming gradient is then 0)
  float inv_temperature;
  float grad_scale;  // multiplies dL/dz (the head's logit scale)
  int64_t ignore_index;
};

namespace base { void fused_linear_logprobs_rows(const LogprobRowsArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void fused_linear_logprobs_rows(const LogprobRowsArgs& args, int num_threads); }
namespace avx512 { void fused_linear_logprobs_rows(const LogprobRowsArgs& args, int num_threads); }
#endif

// Writes logprob, lse, entropy and (with row_grads) the gradient rows; the build for this
// processor's ISA.
void fused_linear_logprobs_rows(const LogprobRowsArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
