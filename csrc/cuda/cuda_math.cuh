// exp and log for the CUDA kernels, on the multi-function unit (one MUFU.EX2 / MUFU.LG2 each):
//   exp(x) = 2^(x log2 e),   log(x) = log2(x) ln 2.
// Relative error is a few ulp plus |x| 2^-24 from rounding x log2 e, the size of the rounding
// already in x = a - LSE. Special values follow IEEE: exp(-inf) = 0, exp(+inf) = inf,
// log(0) = -inf, log(x < 0) = NaN, NaN propagates. exp results below 2^-126 flush to 0, as in
// the CPU kernels' exp (ex2.approx.ftz); log takes subnormal arguments as they are.
#pragma once

namespace fastkd {
namespace cuda {

struct CudaMath {
  static __device__ __forceinline__ float exp(float x) {
#if defined(FASTKD_CUDA_ON_CPU)
    // CPU execution of the kernels (tools/cuda_on_cpu): libm's exp2, flushed below 2^-126.
    const float y = exp2f(x * 1.4426950408889634f);
    return y < 1.17549435e-38f ? 0.0f : y;
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
#endif
  }
  static __device__ __forceinline__ float log(float x) {
#if defined(FASTKD_CUDA_ON_CPU)
    return log2f(x) * 0.6931471805599453f;
#else
    float y;
    asm("lg2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y * 0.6931471805599453f;
#endif
  }
};

}  // namespace cuda
}  // namespace fastkd
