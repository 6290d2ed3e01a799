// fused_linear_topk on CPU: the row kernel of the chunked lm_head op. Per row of fp32 chunk
// logits z: the k largest a = z / T with their log-probs, lse(a), and the log of the mass
// outside them summed over its own columns (exact where the kept mass is within rounding of 1).
#pragma once

#include <cstdint>

#include "../common/token_rows_args.h"

namespace fastkd {
namespace cpu {

namespace base { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
namespace avx512 { void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads); }
#endif

// Writes ids, logprobs, log_tail and lse; the build for this processor's ISA.
void fused_linear_topk_rows(const TopkRowsArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
