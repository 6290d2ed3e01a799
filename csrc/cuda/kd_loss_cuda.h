// CUDA entry point of the fused kd_loss kernel. Compiled only when nvcc is found
// (FASTKD_WITH_CUDA); this header itself needs no CUDA headers.
#pragma once

#include "../common/kd_loss_args.h"

namespace fastkd {
namespace cuda {

// Enqueues the forward kernel on `stream` (a cudaStream_t); pointers in `args` are device
// pointers. Returns nullptr on success, else the CUDA error string of the launch.
const char* kd_loss_forward(const KdLossArgs& args, void* stream);

}  // namespace cuda
}  // namespace fastkd
