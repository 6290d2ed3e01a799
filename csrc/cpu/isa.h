// Run-time choice among the per-instruction-set builds of the CPU kernels. A wheel cannot assume
// the build machine's processor, so each kernel file is compiled once per x86-64 level (baseline,
// x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512; CMakeLists.txt) into namespaces base, avx2 and
// avx512, and one dispatcher per entry point, compiled once, calls the widest build the
// processor supports.
#pragma once

namespace fastkd {
namespace cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest level the processor supports among those built, detected once.
Isa cached_isa();

// The level the kernels run at: "avx512", "avx2" or "base".
const char* isa_level();

}  // namespace cpu
}  // namespace fastkd

// Defines fastkd::cpu::NAME(const ARGS& args, int num_threads), forwarding to the build of NAME
// for the widest level (declared as base::NAME, avx2::NAME, avx512::NAME in the op's header).
// Used inside namespace fastkd::cpu by the op's bindings file, so that adding an op adds its
// dispatcher there and edits no central list.
#if defined(FASTKD_CPU_X86_LEVELS)
#define FASTKD_CPU_DISPATCH(NAME, ARGS)                          \
  void NAME(const ARGS& args, int num_threads) {                 \
    switch (cached_isa()) {                                      \
      case Isa::kAvx512: return avx512::NAME(args, num_threads); \
      case Isa::kAvx2: return avx2::NAME(args, num_threads);     \
      default: return base::NAME(args, num_threads);             \
    }                                                            \
  }
#else
#define FASTKD_CPU_DISPATCH(NAME, ARGS) \
  void NAME(const ARGS& args, int num_threads) { base::NAME(args, num_threads); }
#endif
