// Output buffers of the fused losses are fresh N x V allocations that the kernel touches first.
// With 4 KB pages that first touch costs one page fault per 4 KB (about 40 % of a CPU kd_loss
// call at N = 2048, V = 32000); asking the kernel for transparent huge pages on the buffer
// (honoured where THP is in "madvise" or "always" mode) cuts the faults 512-fold. Torch offers
// the same for its own allocations behind THP_MEM_ALLOC_ENABLE.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {
namespace cpu {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace fastkd
