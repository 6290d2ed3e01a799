// __half and __half2 for the CPU execution of the CUDA kernels (see cuda_on_cpu.h): storage
// types with CUDA's conversions, fp32 -> fp16 rounded to nearest even bit-exactly as cvt.rn.f16.f32
// (NaN becomes the canonical 0x7fff).
#pragma once

#include "cuda_on_cpu.h"

struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;  // x: the low 16 bits
};

namespace cuda_on_cpu {

inline unsigned short float_to_half_bits(float f) {
  const uint32_t u = uint32_t(to_bits(f));
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;
  if (a >= 0x47800000u) return uint16_t(sign | 0x7c00u);  // >= 2^16: inf (and inf itself)
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal half or 0
    const int exponent = int(a >> 23);
    const int shift = 126 - exponent;  // value = mantissa 2^(exponent - 150), unit 2^-24
    if (exponent == 0 || shift > 24) return uint16_t(sign);
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    uint32_t q = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t tie = 1u << (shift - 1);
    if (rest > tie || (rest == tie && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return uint16_t(sign | h);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return from_bits<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;  // 2^-24, exact
    return sign ? -magnitude : magnitude;
  }
  return from_bits<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace cuda_on_cpu

inline __half __float2half_rn(float f) { return __half{cuda_on_cpu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return cuda_on_cpu::half_bits_to_float(h.__x); }
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __float2half2_rn(float f) { return __floats2half2_rn(f, f); }
