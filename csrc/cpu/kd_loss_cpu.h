// CPU entry points of the fused kd_loss kernel, one per instruction-set level, and the
// run-time dispatcher that picks the widest one the processor supports.
#pragma once

#include "../common/kd_loss_args.h"

namespace fastkd {
namespace cpu {

namespace base { void kd_loss_forward(const KdLossArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void kd_loss_forward(const KdLossArgs& args, int num_threads); }
namespace avx512 { void kd_loss_forward(const KdLossArgs& args, int num_threads); }
#endif

// Writes A.loss[n_rows] and A.grad[n_rows, grad_vocab]; see KdLossArgs.
void kd_loss_forward(const KdLossArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
