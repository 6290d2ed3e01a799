// Element types crossing the Python boundary, and their loads/stores as fp32.
// All arithmetic in fastkd is fp32; storage may be fp32, bf16 or fp16.
// The bit-level conversions are branch-free so that CPU loops over them vectorize.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline __attribute__((always_inline))
#endif

namespace fastkd {

// Codes shared with python/fastkd/ops/_native.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

template <typename T>
struct DTypeTag {
  using type = T;
};

// fn(DTypeTag<T>{}) with T the element type of `code` (the bindings have checked the code; any
// code past bf16 is fp16).
template <class Fn>
decltype(auto) visit_dtype(int code, Fn&& fn) {
  switch (code) {
    case kFloat32: return fn(DTypeTag<float>{});
    case kBFloat16: return fn(DTypeTag<bf16_t>{});
    default: return fn(DTypeTag<fp16_t>{});
  }
}

FASTKD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FASTKD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FASTKD_HD float to_float(float x) { return x; }

// bf16 is the top half of an fp32.
FASTKD_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

// fp16 -> fp32: place exponent+mantissa in an fp32 and rescale by 2^(127-15), which is exact
// for normals and subnormals alike; the all-ones exponent (inf/nan) is patched separately.
FASTKD_HD float to_float(fp16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const float scaled = bits_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t mag = em >= 0x7c00u ? special : float_bits(scaled);
  return bits_float(mag | sign);
}

template <typename T> struct FromFloat;

template <> struct FromFloat<float> {
  FASTKD_HD static float convert(float f) { return f; }
};

// fp32 -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN.
template <> struct FromFloat<bf16_t> {
  FASTKD_HD static bf16_t convert(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return bf16_t{uint16_t(is_nan ? 0x7fc0u : rounded)};
  }
};

// fp32 -> fp16 with round-to-nearest-even. Three ranges: overflow/inf/nan, subnormal half
// (rounded by the FPU through an addition of 0.5, whose ulp is 2^-24, the smallest half step),
// and normal half (rebias the exponent, round on bit 13).
template <> struct FromFloat<fp16_t> {
  FASTKD_HD static fp16_t convert(float f) {
    uint32_t u = float_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    const uint32_t sub = float_bits(bits_float(u) + 0.5f) - 0x3f000000u;
    const uint32_t odd = (u >> 13) & 1u;
    const uint32_t norm = (u + 0xc8000fffu + odd) >> 13;  // 0xc8000000 = (15 - 127) << 23
    const uint32_t mag = u >= 0x47800000u ? big : (u < 0x38800000u ? sub : norm);
    return fp16_t{uint16_t(mag | sign)};
  }
};

template <typename T> FASTKD_HD T from_float(float f) { return FromFloat<T>::convert(f); }

}  // namespace fastkd
