// Run-time choice among the per-ISA builds of the CPU kernels (a wheel cannot assume the build
// machine's processor): x86-64-v4 (AVX-512) where available, else x86-64-v3 (AVX2 + FMA), else
// the baseline build.
#include "kd_loss_cpu.h"
#include "priority_sample_cpu.h"
#include "sample_teacher_cpu.h"
#include "sinkhorn_cpu.h"
#include "sparse_kd_loss_cpu.h"
#include "uld_loss_cpu.h"

namespace fastkd {
namespace cpu {

namespace {
enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(FASTKD_CPU_X86_LEVELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa cached_isa() {
  static const Isa isa = detect_isa();
  return isa;
}
}  // namespace

void kd_loss_forward(const KdLossArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::kd_loss_forward(args, num_threads);
    case Isa::kAvx2: return avx2::kd_loss_forward(args, num_threads);
#endif
    default: return base::kd_loss_forward(args, num_threads);
  }
}

void sample_teacher(const SampleTeacherArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::sample_teacher(args, num_threads);
    case Isa::kAvx2: return avx2::sample_teacher(args, num_threads);
#endif
    default: return base::sample_teacher(args, num_threads);
  }
}

void priority_sample(const SampleTeacherArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::priority_sample(args, num_threads);
    case Isa::kAvx2: return avx2::priority_sample(args, num_threads);
#endif
    default: return base::priority_sample(args, num_threads);
  }
}

void sparse_kd_loss_forward(const SparseKdLossArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::sparse_kd_loss_forward(args, num_threads);
    case Isa::kAvx2: return avx2::sparse_kd_loss_forward(args, num_threads);
#endif
    default: return base::sparse_kd_loss_forward(args, num_threads);
  }
}

void sinkhorn(const SinkhornArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::sinkhorn(args, num_threads);
    case Isa::kAvx2: return avx2::sinkhorn(args, num_threads);
#endif
    default: return base::sinkhorn(args, num_threads);
  }
}

void uld_loss_forward(const UldLossArgs& args, int num_threads) {
  switch (cached_isa()) {
#if defined(FASTKD_CPU_X86_LEVELS)
    case Isa::kAvx512: return avx512::uld_loss_forward(args, num_threads);
    case Isa::kAvx2: return avx2::uld_loss_forward(args, num_threads);
#endif
    default: return base::uld_loss_forward(args, num_threads);
  }
}

const char* isa_level() {
  switch (cached_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace fastkd
