// exp and log for the CPU kernels, written as straight-line float/int arithmetic and selects so
// that GCC/Clang vectorize the loops that call them without -ffast-math (glibc's vector expf is
// only used under finite-math-only, which would make -inf logits undefined behaviour).
// Special values are handled explicitly: exp(-inf) = 0, exp(+inf) = inf, log(0) = -inf,
// log(x < 0) = NaN, NaN propagates. Results below 2^-126 flush to 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/dtype.h"

namespace fastkd {
namespace cpu {

struct CpuMath {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2; exp(r) by a degree-7 polynomial
  // (Cephes expf coefficients, ~1 ulp). 2^n is built in two halves so that n = 128 stays finite.
  static inline __attribute__((always_inline)) float exp(float x) {
    const float hi = 88.72283f;   // log(FLT_MAX)
    const float lo = -87.33654f;  // log(2^-126)
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = xc * 1.44269504088896341f + shifter;
    const float n = t - shifter;
    const int32_t ni = int32_t(float_bits(t) - float_bits(shifter));
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const float er = poly * r * r + r + 1.0f;
    const int32_t n_half = ni >> 1;
    const float s1 = bits_float(uint32_t(n_half + 127) << 23);
    const float s2 = bits_float(uint32_t(ni - n_half + 127) << 23);
    float y = er * s1 * s2;
    // A flat chain of selects on the input (not nested, not on computed values) is what GCC
    // if-converts into blends.
    y = x < lo ? 0.0f : y;
    y = x > hi ? __builtin_huge_valf() : y;
    return y;
  }

  // exp(x) for x <= 88, for the exponentials of logits shifted by their row's maximum (x <= 0,
  // -inf, or NaN): exp's reduction and polynomial (max error 1.03 ulp against exp's 1.02 on
  // [-87, 0]) in 17 AVX2 vector operations instead of exp's 33. Where 2^n fits one exponent field
  // (n <= 127) the split scaling and both clamps can go: below the flush threshold the reduction
  // computes garbage (NaN at -inf) that the final select replaces by 0. The polynomial is
  // evaluated by Estrin's scheme (three dependent FMAs instead of Horner's five): the loop is
  // bound by the latency of its exps, and this took 11 % off kd_loss's fkl at V = 32000. With
  // exp, kd_loss's stats pass (two of these per element) took 64 % of an fkl call's kernel time.
  static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    const float lo = -87.33654f;        // log(2^-126)
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = x * 1.44269504088896341f + shifter;
    const float n = t - shifter;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float r2 = r * r;
    const float p01 = 1.6666665459e-1f * r + 5.0000001201e-1f;
    const float p23 = 8.3334519073e-3f * r + 4.1665795894e-2f;
    const float p45 = 1.9875691500e-4f * r + 1.3981999507e-3f;
    const float poly = (p45 * r2 + p23) * r2 + p01;
    const float er = poly * r2 + r + 1.0f;
    // 2^n: the bits of t are those of the shifter plus n.
    const float scale = bits_float((float_bits(t) - float_bits(shifter) + 127u) << 23);
    const float y = er * scale;
    return x < lo ? 0.0f : y;
  }

  // log(x) = e ln 2 + log(m), x = m 2^e with m in [sqrt(1/2), sqrt(2)); log(m) = log1p(m - 1)
  // by the Cephes logf polynomial. Subnormal x is rescaled by 2^23 first.
  static inline __attribute__((always_inline)) float log(float x) {
    const float scale = x < 1.17549435e-38f ? 8388608.0f : 1.0f;
    const float bias = x < 1.17549435e-38f ? 23.0f : 0.0f;
    const int32_t ix = int32_t(float_bits(x * scale)) - 0x3f3504f3;  // bits of sqrt(1/2)
    const float e = float(ix >> 23) - bias;
    const float m = bits_float(uint32_t((ix & 0x007fffff) + 0x3f3504f3));
    const float f = m - 1.0f;
    const float z = f * f;
    float poly = 7.0376836292e-2f;
    poly = poly * f - 1.1514610310e-1f;
    poly = poly * f + 1.1676998740e-1f;
    poly = poly * f - 1.2420140846e-1f;
    poly = poly * f + 1.4249322787e-1f;
    poly = poly * f - 1.6668057665e-1f;
    poly = poly * f + 2.0000714765e-1f;
    poly = poly * f - 2.4999993993e-1f;
    poly = poly * f + 3.3333331174e-1f;
    float y = f * z * poly + e * -2.12194440e-4f - 0.5f * z;
    y = f + y + e * 0.693359375f;
    const float inf = __builtin_huge_valf();
    y = x == inf ? inf : y;
    y = x == 0.0f ? -inf : y;
    y = x < 0.0f ? __builtin_nanf("") : y;
    y = x != x ? x : y;
    return y;
  }
};

// Accumulator lanes of the vectorized row sums: loops run over fixed-width lane arrays so that
// they vectorize with the same summation order on every instruction set.
constexpr int64_t kLanes = 16;

static inline float lane_sum(const float* v) {
  float s = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// sum_i exp(t (a_i - m)): the T = 1 softmax normalizer of z = t a, shifted by t m.
static inline float tempered_sum(const float* __restrict a, int64_t n, float t, float m) {
  float s[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) s[j] += CpuMath::exp(t * (a[i + j] - m));
  float r = lane_sum(s);
  for (int64_t i = body; i < n; ++i) r += CpuMath::exp(t * (a[i] - m));
  return r;
}

// Eight floats as a GCC/Clang vector type. Internal linkage of what follows (static functions,
// structs in an unnamed namespace): every per-ISA build of a kernel gets its own copy.
typedef float f32x8 __attribute__((vector_size(32)));

namespace {

// kLanes running sums held as vectors: lane j adds the j-th float of every block of kLanes, so
// the result equals lane_sum of lane arrays summed the same way.
struct LaneSums {
  static_assert(kLanes == 16, "two vectors of 8 lanes");
  f32x8 s0 = {}, s1 = {};
  inline __attribute__((always_inline)) void add(const float* __restrict x) {
    f32x8 v0, v1;
    std::memcpy(&v0, x, sizeof(v0));
    std::memcpy(&v1, x + 8, sizeof(v1));
    s0 += v0;
    s1 += v1;
  }
  float sum() const {
    float v[kLanes];
    std::memcpy(v, &s0, sizeof(s0));
    std::memcpy(v + 8, &s1, sizeof(s1));
    return lane_sum(v);
  }
};

// max_i x_i, NaN entries ignored, as a running maximum over blocks of 16 floats. Written with
// vector types: a select on scalar lanes is not turned into vmaxps without -ffinite-math-only.
struct MaxLanes {
  f32x8 m0, m1;

  MaxLanes() {
    const float ninf = -__builtin_huge_valf();
    m0 = f32x8{ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
    m1 = m0;
  }

  inline __attribute__((always_inline)) void add16(const float* __restrict x) {
    f32x8 v0, v1;
    std::memcpy(&v0, x, sizeof(v0));
    std::memcpy(&v1, x + 8, sizeof(v1));
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
  }

  // The maximum of the blocks seen and of the `count` floats at `tail`.
  float finish(const float* __restrict tail, int64_t count) const {
    const f32x8 m = m1 > m0 ? m1 : m0;
    float mx = -__builtin_huge_valf();
    for (int j = 0; j < 8; ++j) mx = m[j] > mx ? m[j] : mx;
    for (int64_t i = 0; i < count; ++i) mx = tail[i] > mx ? tail[i] : mx;
    return mx;
  }
};

}  // namespace

static inline float row_max(const float* __restrict x, int64_t n) {
  MaxLanes m;
  const int64_t body = n - n % 16;
  for (int64_t i = 0; i < body; i += 16) m.add16(x + i);
  return m.finish(x + body, n - body);
}

// a_i = load(z_i) * inv_t into `a`; returns max_i a_i (NaN entries ignored: they reach the
// results through the sums).
template <typename T>
static inline float load_scaled_row(const T* __restrict z, int64_t n, float inv_t,
                                    float* __restrict a) {
  for (int64_t i = 0; i < n; ++i) a[i] = to_float(z[i]) * inv_t;
  return row_max(a, n);
}

// e_i = exp(a_i - m) into `e`; returns sum_i e_i.
static inline float exp_sum_pass(const float* __restrict a, int64_t n, float m,
                                 float* __restrict e) {
  float s[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = CpuMath::exp(a[i + j] - m);
      e[i + j] = v;
      s[j] += v;
    }
  float r = lane_sum(s);
  for (int64_t i = body; i < n; ++i) {
    e[i] = CpuMath::exp(a[i] - m);
    r += e[i];
  }
  return r;
}

// log sum_i exp(x_i) as shift + log sum_i exp(x_i - shift), for a shift >= about max x (so no
// term overflows); exps, when given, receives exp(x_i - shift). The sum is kept in double: in
// fp32 the many tail terms of a long-tailed row each fall below half an ulp of the running sum
// and are lost, a bias of several 1e-6 in the result at V = 32000.
template <typename T>
static inline double shifted_lse(const T* __restrict x, int64_t n, float shift,
                                 float* __restrict exps = nullptr) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = CpuMath::exp(to_float(x[i + j]) - shift);
      if (exps) exps[i + j] = v;
      lanes[j] += v;
    }
  double s = 0.0;
  for (; i < n; ++i) {
    const float v = CpuMath::exp(to_float(x[i]) - shift);
    if (exps) exps[i] = v;
    s += v;
  }
  for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
  return double(shift) + std::log(s);
}

}  // namespace cpu
}  // namespace fastkd
