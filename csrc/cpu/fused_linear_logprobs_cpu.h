// fused_linear_logprobs on CPU: the row kernel of the chunked lm_head op. Per row of fp32 chunk
// logits z: the log-prob of the target under softmax(z / T), the log-sum-exp of z / T, the entropy
// and, given the incoming gradients of those three, the gradient over z (written over the row).
#pragma once

#include <cstdint>

#include "../common/token_rows_args.h"

namespace fastkd {
namespace cpu {

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
