// Batched log-domain Sinkhorn on CPU: the iteration of csrc/common/sinkhorn_args.h, one problem
// per thread at a time.
#pragma once

#include "../common/sinkhorn_args.h"

namespace fastkd {
namespace cpu {

namespace base { void sinkhorn(const SinkhornArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void sinkhorn(const SinkhornArgs& args, int num_threads); }
namespace avx512 { void sinkhorn(const SinkhornArgs& args, int num_threads); }
#endif

// Solves every problem of `args`, writing its outputs; the build for this processor's ISA.
void sinkhorn(const SinkhornArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
