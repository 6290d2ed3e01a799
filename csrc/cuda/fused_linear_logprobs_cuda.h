// CUDA entry point of the fused_linear_logprobs row kernel. Compiled only when nvcc is found
// (FASTKD_WITH_CUDA); this header itself needs no CUDA headers.
#pragma once

#include "../common/token_rows_args.h"

namespace fastkd {
namespace cuda {

// Enqueues the row kernel on `stream` (a cudaStream_t); pointers in `args` are device pointers.
// Returns nullptr on success, else the reason (the CUDA error of the launch, or a vocabulary
// beyond the kernel's 32-bit column index).
const char* fused_linear_logprobs_rows(const LogprobRowsArgs& args, void* stream);

}  // namespace cuda
}  // namespace fastkd
