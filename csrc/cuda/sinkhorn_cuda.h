// CUDA entry point of the batched Sinkhorn solver. Compiled only when nvcc is found
// (FASTKD_WITH_CUDA); this header itself needs no CUDA headers.
#pragma once

#include "../common/sinkhorn_args.h"

namespace fastkd {
namespace cuda {

// Enqueues the solve of every problem in `args` on `stream` (a cudaStream_t); pointers in `args`
// are device pointers. Returns nullptr on success, else the CUDA error string of the launch.
const char* sinkhorn(const SinkhornArgs& args, void* stream);

}  // namespace cuda
}  // namespace fastkd
