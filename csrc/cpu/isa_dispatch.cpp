// Detection of the instruction-set level the CPU kernels run at (isa.h): x86-64-v4 (AVX-512)
// where available, else x86-64-v3 (AVX2 + FMA), else the baseline build. The dispatchers
// themselves are defined next to each op's bindings (FASTKD_CPU_DISPATCH).
#include "isa.h"

namespace fastkd {
namespace cpu {

namespace {

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

}  // namespace

Isa cached_isa() {
  static const Isa isa = detect_isa();
  return isa;
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
