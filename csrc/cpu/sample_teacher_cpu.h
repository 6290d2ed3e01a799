// Random-sampling sparse teacher targets on CPU (see sample_teacher_cpu.cpp).
#pragma once

#include <cstdint>

#include "../common/sample_teacher_args.h"

namespace fastkd {
namespace cpu {

namespace base { void sample_teacher(const SampleTeacherArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void sample_teacher(const SampleTeacherArgs& args, int num_threads); }
namespace avx512 { void sample_teacher(const SampleTeacherArgs& args, int num_threads); }
#endif

// Writes A.ids, A.weights (and A.logprobs) of every row; the build for this processor's ISA.
void sample_teacher(const SampleTeacherArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
