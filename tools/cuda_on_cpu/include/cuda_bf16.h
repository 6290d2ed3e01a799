// __nv_bfloat16 and __nv_bfloat162 for the CPU execution of the CUDA kernels (see
// cuda_on_cpu.h): storage types with CUDA's conversions, fp32 -> bf16 rounded to nearest even
// bit-exactly as cvt.rn.bf16.f32 (NaN becomes the canonical 0x7fff).
#pragma once

#include "cuda_on_cpu.h"

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x: the low 16 bits
};

namespace cuda_on_cpu {

inline unsigned short float_to_bfloat16_bits(float f) {
  const uint32_t u = uint32_t(to_bits(f));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace cuda_on_cpu

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{cuda_on_cpu::float_to_bfloat16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  return cuda_on_cpu::from_bits<float>(uint32_t(h.__x) << 16);
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16{x}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
