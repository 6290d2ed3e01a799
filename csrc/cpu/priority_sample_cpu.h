// Priority-sampling sparse teacher targets on CPU (see priority_sample_cpu.cpp).
#pragma once

#include <cstdint>

#include "../common/sample_teacher_args.h"

namespace fastkd {
namespace cpu {

namespace base { void priority_sample(const SampleTeacherArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void priority_sample(const SampleTeacherArgs& args, int num_threads); }
namespace avx512 { void priority_sample(const SampleTeacherArgs& args, int num_threads); }
#endif

// Writes A.ids, A.weights (and A.logprobs) of every row, A.num_samples = k slots each (the
// temperature is not used); the build for this processor's ISA.
void priority_sample(const SampleTeacherArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
