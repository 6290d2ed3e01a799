// Device side of the CPU execution of fastkd's CUDA kernels: CUDA's built-in variables, types
// and intrinsics as host C++, so that g++ compiles the kernels' .cu sources unchanged (build_kernels.py
// rewrites only `<<<...>>>` launches and `__shared__` declarations, which are not C++).
//
// Execution model (runtime.cpp): every CUDA thread is a fiber with its own stack; the fibers of a
// cluster of CTAs (a lone CTA is a cluster of one) take turns on one OS thread, each running until
// it reaches a synchronization point (__syncthreads, a warp collective, a cluster barrier) or
// exits. A synchronization point completes once every thread it names has reached it; where that
// can no longer happen, or the threads disagree on what they reached, the launch fails with a
// description instead of hanging.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
#define __grid_constant__

// ---------------------------------------------------------------------------------------------
// Vector types (alignment as CUDA's) and dim3.

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

constexpr int warpSize = 32;

namespace cuda_on_cpu {

// What a CUDA thread sees as threadIdx, blockIdx, blockDim, gridDim (set per fiber).
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
  uint3 cluster_dim;
  unsigned cluster_rank;  // rank of this CTA in its cluster
};

extern __thread const ThreadContext* tls_context;

inline const ThreadContext& context() { return *tls_context; }

// Ends the calling kernel thread's launch with `message` (printf-style), as a failed launch.
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Warp collectives: the calling lane deposits `value` and `arg`, waits until every lane of
// `mask` has reached the same collective, and gets its result.
enum class WarpOp { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);

// CTA barrier (__syncthreads and its predicate forms); returns the reduction.
enum class BarrierOp { kSync, kOr, kAnd, kCount };
int cta_barrier(BarrierOp op, int predicate, const char* file, int line);

void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
void* cluster_map_shared(const void* p, unsigned rank);

// Shared memory of the current CTA: the static variable declared at `site` (allocated by the
// first thread of the CTA that reaches it), and the dynamic block sized by the launch.
void* static_shared(const char* site, size_t bytes, size_t align);
void* dynamic_shared();
template <class T>
T& shared_variable(const char* site) {
  return *static_cast<T*>(static_shared(site, sizeof(T), alignof(T) < 16 ? 16 : alignof(T)));
}

// cp.async: a 16-byte global -> shared copy that lands when the thread waits for its group.
void copy_async_16(void* dst, const void* src);
void copy_async_commit();
void copy_async_wait(int pending);

// Vector accesses fault on misaligned addresses, as on the GPU.
void check_aligned(const void* p, size_t align, const char* what);

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move at most 8 bytes of a trivially copyable type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace cuda_on_cpu

// The built-in variables of the running CUDA thread, set whenever the scheduler switches to a
// thread (every access after a synchronization point reloads them: those are calls into the
// runtime).
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread uint3 blockDim;
extern __thread uint3 gridDim;

// ---------------------------------------------------------------------------------------------
// Synchronization.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_on_cpu::cta_barrier(cuda_on_cpu::BarrierOp::kSync, 0, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return cuda_on_cpu::cta_barrier(cuda_on_cpu::BarrierOp::kOr, p != 0, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return cuda_on_cpu::cta_barrier(cuda_on_cpu::BarrierOp::kAnd, p != 0, file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return cuda_on_cpu::cta_barrier(cuda_on_cpu::BarrierOp::kCount, p != 0, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kSyncwarp, mask, 0, 0, 32, file, line);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_on_cpu::from_bits<T>(cuda_on_cpu::warp_collective(
      cuda_on_cpu::WarpOp::kShfl, mask, cuda_on_cpu::to_bits(var), src, width, file, line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_on_cpu::from_bits<T>(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kShflUp, mask,
                                                                cuda_on_cpu::to_bits(var),
                                                                int(delta), width, file, line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_on_cpu::from_bits<T>(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kShflDown,
                                                                mask, cuda_on_cpu::to_bits(var),
                                                                int(delta), width, file, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_on_cpu::from_bits<T>(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kShflXor,
                                                                mask, cuda_on_cpu::to_bits(var),
                                                                lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kBallot, mask, 0,
                                               predicate != 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kAny, mask, 0, predicate != 0, 32,
                                          file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(cuda_on_cpu::warp_collective(cuda_on_cpu::WarpOp::kAll, mask, 0, predicate != 0, 32,
                                          file, line));
}

// Thread-block clusters (sm_90): split barrier over every thread of the cluster, and the address
// of the same shared variable in another CTA of the cluster.
inline void __cluster_barrier_arrive(const char* file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
  cuda_on_cpu::cluster_arrive(file, line);
}
inline void __cluster_barrier_arrive_relaxed(const char* file = __builtin_FILE(),
                                             int line = __builtin_LINE()) {
  cuda_on_cpu::cluster_arrive(file, line);
}
inline void __cluster_barrier_wait(const char* file = __builtin_FILE(),
                                   int line = __builtin_LINE()) {
  cuda_on_cpu::cluster_wait(file, line);
}
inline void* __cluster_map_shared_rank(void* p, unsigned rank) {
  return cuda_on_cpu::cluster_map_shared(p, rank);
}
template <class T>
inline T* __cluster_map_shared_rank(T* p, unsigned rank) {
  return static_cast<T*>(cuda_on_cpu::cluster_map_shared(p, rank));
}
inline unsigned __clusterRelativeBlockRank() { return cuda_on_cpu::context().cluster_rank; }
inline dim3 __clusterDim() { return cuda_on_cpu::context().cluster_dim; }
inline unsigned __clusterSizeInBlocks() {
  const uint3 d = cuda_on_cpu::context().cluster_dim;
  return d.x * d.y * d.z;
}

// ---------------------------------------------------------------------------------------------
// Memory access intrinsics: plain accesses, with the alignment check of vector types.

template <class T>
inline T __ldg(const T* p) {
  if (alignof(T) > 4) cuda_on_cpu::check_aligned(p, alignof(T), "__ldg");
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  if (alignof(T) > 4) cuda_on_cpu::check_aligned(p, alignof(T), "__ldcs");
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return __ldg(p);
}
template <class T>
inline T __ldlu(const T* p) {
  return __ldg(p);
}
template <class T>
inline void __stcs(T* p, T v) {
  if (alignof(T) > 4) cuda_on_cpu::check_aligned(p, alignof(T), "__stcs");
  *p = v;
}
template <class T>
inline void __stcg(T* p, T v) {
  __stcs(p, v);
}
template <class T>
inline void __stwt(T* p, T v) {
  __stcs(p, v);
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// Atomics: the fibers of a cluster never run at once, but clusters run on several OS threads.
template <class T>
inline T atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
  float old, desired;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do desired = old + v;
  while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline double atomicAdd(double* p, double v) {
  double old, desired;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do desired = old + v;
  while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  return __atomic_fetch_max(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicMin(T* p, T v) {
  return __atomic_fetch_min(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
template <class T>
inline T atomicOr(T* p, T v) {
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------------------------
// Bit reinterpretation, integer intrinsics, math.

inline float __int_as_float(int x) { return cuda_on_cpu::from_bits<float>(uint32_t(x)); }
inline float __uint_as_float(unsigned x) { return cuda_on_cpu::from_bits<float>(x); }
inline int __float_as_int(float x) { return int(uint32_t(cuda_on_cpu::to_bits(x))); }
inline unsigned __float_as_uint(float x) { return uint32_t(cuda_on_cpu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return cuda_on_cpu::from_bits<double>(x); }
inline long long __double_as_longlong(double x) { return (long long)cuda_on_cpu::to_bits(x); }

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// The fast-math intrinsics are the multi-function unit's approximations on the GPU; libm here.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
// The _rn forms keep an operation from being contracted into an FMA: g++ contracts nothing here.
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __ddiv_rn(double x, double y) { return x / y; }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
