// CUDA entry point of the random-sampling sparse teacher targets (sample_teacher,
// method="random"). Compiled only when nvcc is found (FASTKD_WITH_CUDA); this header itself
// needs no CUDA headers.
#pragma once

#include "../common/sample_teacher_args.h"

namespace fastkd {
namespace cuda {

// Enqueues the sampling of every row of `args` on `stream` (a cudaStream_t); pointers in `args`
// are device pointers. Returns nullptr on success, else a message: the CUDA error of the launch,
// or why the call cannot run (such as num_samples beyond what shared memory holds). The message
// stays valid until the next call from the same host thread.
const char* sample_teacher(const SampleTeacherArgs& args, void* stream);

}  // namespace cuda
}  // namespace fastkd
