// Batched two-pointer token alignment on CPU (the rule of csrc/common/align_spans_args.h), one
// sequence per thread at a time.
#pragma once

#include "../common/align_spans_args.h"

namespace fastkd {
namespace cpu {

namespace base { void align_spans(const AlignSpansArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void align_spans(const AlignSpansArgs& args, int num_threads); }
namespace avx512 { void align_spans(const AlignSpansArgs& args, int num_threads); }
#endif

// Aligns every sequence of `args`, writing chunk ids, chunk counts and statuses; the build for
// this processor's ISA.
void align_spans(const AlignSpansArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
