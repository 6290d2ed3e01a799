// Fused softmax-divergence loss, CUDA kernel: the per-row schedule of csrc/cpu/kd_loss_cpu.cpp
// (the same formulas, from csrc/common/kd_math.h) on a warp, a CTA, or a cluster of CTAs per row.
//
// Columns are processed in chunks of kChunk = 8 elements. Chunk u covers columns
// [col0 + 8u, col0 + 8u + 8), with -8 < col0 <= 0 chosen so that the full chunks of both operands
// start on 16-byte boundaries whenever their row pointers allow it; those chunks are read with
// 16-byte loads, the (at most two) partial chunks at the row ends element by element. Columns
// outside [0, vocab) of a partial chunk become a = b = -inf: exp(-inf) = 0 removes them from the
// stats sums (and the kl term's guard from its sum), the terms pass excludes them explicitly,
// and the gradient pass does not store them. Every pass gives a thread the same chunks, so a
// thread only reads back what it staged itself, and only writes gradient columns it has already
// read (grad may alias z_s).
//
// Passes over a row (a = cap(z_s)/T, b = cap(z_t)/T, fp32 throughout):
//   1. stats : online max and sum of exp of a and b, the CE sum at T != 1 and the fkl/rkl loss
//              accumulator, rescaled whenever a running maximum grows, then combined over the
//              group in a fixed order (deterministic);
//   2. terms : (loss, dot) of the divergences other than fkl/rkl, once the LSEs are known;
//   3. grad  : dL/dz_s of every column, written once in the student's dtype.
// Staged plan: each CTA first copies its slice of both raw rows into shared memory (cp.async,
// the whole slice in flight at once) and every pass reads it from there, so each logit crosses
// HBM once (per element: read z_s and z_t, write the gradient); a row too long for one CTA's
// shared memory is split over a cluster of CTAs that combine their statistics through
// distributed shared memory. Streaming plan: every pass reads global memory (the gradient pass
// in reverse order, so that the part of the row read last is still in L2).
//
// Element types: the staged kernels for rows of one dtype (the common case) are compiled for it;
// the other kernels read the types from the arguments (uniform branches per chunk, a few more
// instructions per chunk), which keeps the build at five kernels per divergence instead of 18.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../common/kd_loss_args.h"
#include "cuda_math.cuh"

namespace fastkd {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;
constexpr int kMaxCtasPerRow = 8;  // the portable cluster size

// How a launch maps rows onto the GPU (chosen by launch_divergence).
struct LaunchPlan {
  int warp_rows;     // 1: one warp per row, kWarps rows per CTA; 0: ctas_per_row CTAs per row
  int ctas_per_row;  // > 1 only as a thread-block cluster (sm_90)
  int staged;        // 1: each CTA stages its slice of the row in shared memory
  int stage_chunks;  // chunks per CTA that the shared memory holds
};

FASTKD_HD constexpr int element_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Template argument for an element type chosen at run time.
constexpr int kAnyDType = -1;

// ---------------------------------------------------------------------------------------------
// One operand's chunk as raw bits: fp32 elements in w[0..7], 16-bit elements in w[0..3]
// (element 2i in the low half of w[i]).

struct RawChunk {
  uint32_t w[kChunk];
};

__device__ __forceinline__ uint4 load_vec(const char* p, bool last_use) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
  return last_use ? __ldcs(v) : __ldg(v);
}

// Chunk at p (16-byte aligned, all kChunk columns valid); `wide`: fp32 elements.
__device__ __forceinline__ RawChunk load_full(const char* p, bool wide, bool last_use) {
  RawChunk r;
  const uint4 lo = load_vec(p, last_use);
  const uint4 hi = wide ? load_vec(p + 16, last_use) : make_uint4(0u, 0u, 0u, 0u);
  r.w[0] = lo.x, r.w[1] = lo.y, r.w[2] = lo.z, r.w[3] = lo.w;
  r.w[4] = hi.x, r.w[5] = hi.y, r.w[6] = hi.z, r.w[7] = hi.w;
  return r;
}

__device__ __forceinline__ uint32_t load_element_bits(const char* row, bool wide, int64_t col,
                                                      bool last_use) {
  if (wide) {
    const unsigned int* p = reinterpret_cast<const unsigned int*>(row) + col;
    return last_use ? __ldcs(p) : __ldg(p);
  }
  const unsigned short* p = reinterpret_cast<const unsigned short*>(row) + col;
  return last_use ? __ldcs(p) : __ldg(p);
}

// Columns [lo, hi) of the chunk whose element 0 is column `col` of `row`; the rest are 0.
__device__ __forceinline__ RawChunk load_partial(const char* row, bool wide, int col, int lo,
                                                 int hi, bool last_use) {
  RawChunk r;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) r.w[i] = 0u;
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    if (e < lo || e >= hi) continue;
    const uint32_t bits = load_element_bits(row, wide, col + e, last_use);
    if (wide) r.w[e] = bits;
    else r.w[e / 2] |= bits << (16 * (e % 2));
  }
  return r;
}

__device__ __forceinline__ void store_element_bits(char* row, bool wide, int64_t col,
                                                   uint32_t bits) {
  if (wide) __stcs(reinterpret_cast<unsigned int*>(row) + col, bits);
  else __stcs(reinterpret_cast<unsigned short*>(row) + col, static_cast<unsigned short>(bits));
}

// Shared memory holds a slice as 16-byte planes of `stride` vectors (plane 1: the upper half of
// fp32 chunks), so that consecutive threads touch consecutive 16-byte words.
__device__ __forceinline__ void stage_store(uint4* stage, int stride, int slot, bool wide,
                                            const RawChunk& r) {
  stage[slot] = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
  if (wide) stage[stride + slot] = make_uint4(r.w[4], r.w[5], r.w[6], r.w[7]);
}

__device__ __forceinline__ RawChunk stage_load(const uint4* stage, int stride, int slot,
                                               bool wide) {
  RawChunk r;
  const uint4 lo = stage[slot];
  const uint4 hi = wide ? stage[stride + slot] : make_uint4(0u, 0u, 0u, 0u);
  r.w[0] = lo.x, r.w[1] = lo.y, r.w[2] = lo.z, r.w[3] = lo.w;
  r.w[4] = hi.x, r.w[5] = hi.y, r.w[6] = hi.z, r.w[7] = hi.w;
  return r;
}

// 16-byte copy from global to shared memory that completes asynchronously (cp.async, sm_80+).
// Each thread closes a group of copies per chunk and later waits until at most `pending` of its
// groups are incomplete (PTX takes the count as an immediate, hence the switch; counts above 7
// wait for more than needed, which is only later than necessary).
// CPU execution of the kernels (tools/cuda_on_cpu): a copy lands when its thread waits for its
// group, as the latest a GPU may deliver it.
__device__ __forceinline__ void copy_async_16(uint4* dst, const char* src) {
#if defined(FASTKD_CUDA_ON_CPU)
  cuda_on_cpu::copy_async_16(dst, src);
#else
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void copy_async_close_group() {
#if defined(FASTKD_CUDA_ON_CPU)
  cuda_on_cpu::copy_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void copy_async_wait(int pending) {
#if defined(FASTKD_CUDA_ON_CPU)
  cuda_on_cpu::copy_async_wait(pending < 7 ? pending : 7);
#else
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
  }
#endif
}

// One chunk as fp32, passed by value (registers) to the helpers below.
struct Floats {
  float v[kChunk];
};

// Raw bits -> fp32 (exact for all three types).
__device__ __forceinline__ Floats decode(const RawChunk& r, int dtype) {
  Floats z;
  if (dtype == kFloat32) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) z.v[e] = __uint_as_float(r.w[e]);
  } else if (dtype == kBFloat16) {
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      z.v[2 * i] = __uint_as_float(r.w[i] << 16);
      z.v[2 * i + 1] = __uint_as_float(r.w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r.w[i]));
      z.v[2 * i] = f.x;
      z.v[2 * i + 1] = f.y;
    }
  }
  return z;
}

// fp32 -> raw bits, round to nearest even (NaN stays NaN).
__device__ __forceinline__ RawChunk encode(const Floats& g, int dtype) {
  RawChunk r;
  if (dtype == kFloat32) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) r.w[e] = __float_as_uint(g.v[e]);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      if (dtype == kBFloat16) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(g.v[2 * i], g.v[2 * i + 1]);
        memcpy(&r.w[i], &h, sizeof(uint32_t));
      } else {
        const __half2 h = __floats2half2_rn(g.v[2 * i], g.v[2 * i + 1]);
        memcpy(&r.w[i], &h, sizeof(uint32_t));
      }
      r.w[kChunk / 2 + i] = 0u;
    }
  }
  return r;
}

__device__ __forceinline__ uint32_t element_bits(const RawChunk& r, bool wide, int e) {
  return wide ? r.w[e] : (r.w[e / 2] >> (16 * (e % 2))) & 0xffffu;
}

// Softcap of a chunk, and the chain-rule factor d cap(z)/dz = 1 - (cap(z)/c)^2 applied to a
// chunk of gradients.
__device__ __forceinline__ Floats softcap_chunk(Floats z, float cap) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) z.v[e] = softcap<CudaMath>(z.v[e], cap);
  return z;
}
__device__ __forceinline__ Floats softcap_chain(Floats g, const Floats& capped, float cap) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    const float r = capped.v[e] / cap;
    g.v[e] *= 1.0f - r * r;
  }
  return g;
}

// Capped logits cap(z) of a chunk, with the columns outside [lo, hi) set to -inf.
__device__ __forceinline__ Floats chunk_logits(const RawChunk& r, int dtype, int lo, int hi,
                                               float cap) {
  Floats z = decode(r, dtype);
  if (cap > 0.0f) z = softcap_chunk(z, cap);
  if (lo != 0 || hi != kChunk) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) z.v[e] = (e >= lo && e < hi) ? z.v[e] : kNegInf;
  }
  return z;
}

// Capped logits of one chunk of both rows.
struct ChunkLogits {
  Floats zs, zt;
  int lo, hi;  // the chunk's columns inside [0, vocab) are [lo, hi) of [0, kChunk)
};

// Elements from p to the next 16-byte boundary, or -1 when p is not element-aligned.
__device__ __forceinline__ int elements_to_alignment(const void* p, int bytes) {
  const int misalignment = int(reinterpret_cast<uintptr_t>(p) & 15u);
  if (misalignment % bytes != 0) return -1;
  return ((16 - misalignment) & 15) / bytes;
}

// Zeros elements [0, n) of p, with 16-byte stores where the alignment allows.
__device__ __forceinline__ void fill_zero(char* p, int bytes, int64_t n, int index, int count) {
  const int h = elements_to_alignment(p, bytes);
  const int64_t head = h < 0 || h > n ? n : h;
  const bool wide = bytes == 4;
  for (int64_t i = index; i < head; i += count) store_element_bits(p, wide, i, 0u);
  const int64_t per_vec = 16 / bytes;
  const int64_t vecs = (n - head) / per_vec;
  uint4* body = reinterpret_cast<uint4*>(p + head * bytes);
  for (int64_t i = index; i < vecs; i += count) __stcs(body + i, make_uint4(0u, 0u, 0u, 0u));
  for (int64_t i = head + vecs * per_vec + index; i < n; i += count)
    store_element_bits(p, wide, i, 0u);
}

// ---------------------------------------------------------------------------------------------
// Row geometry: the chunk grid, and whether full chunks use 16-byte loads and stores.

struct RowGeometry {
  int col0;
  int n_chunks;
  bool vector_loads;
  bool vector_stores;
};

__device__ __forceinline__ RowGeometry row_geometry(const char* zs, int bytes_s, const char* zt,
                                                    int bytes_t, const char* grad, int vocab) {
  const int vec_s = 16 / bytes_s;
  const int vec_t = 16 / bytes_t;
  const int common = vec_s < vec_t ? vec_s : vec_t;
  const int hs = elements_to_alignment(zs, bytes_s);
  const int ht = elements_to_alignment(zt, bytes_t);
  const int hg = elements_to_alignment(grad, bytes_s);
  RowGeometry g;
  // The aligned columns of an operand are h + k * vec; the two operands share theirs iff hs and
  // ht agree modulo the smaller vector width, and then the wider type's h starts the grid.
  g.vector_loads = hs >= 0 && ht >= 0 && hs % common == ht % common;
  const int start = g.vector_loads ? (vec_s >= vec_t ? hs : ht) : 0;
  g.col0 = start == 0 ? 0 : start - kChunk;
  g.n_chunks = (vocab - g.col0 + kChunk - 1) / kChunk;
  g.vector_stores = hg >= 0 && (hg - start) % vec_s == 0;
  return g;
}

// ---------------------------------------------------------------------------------------------
// Pass-1 statistics and their fixed-order combination.

struct Stats {
  float ma, mb;  // running maxima of a and b (-inf while none is finite)
  float sa, sb;  // sum exp(a - shift(ma)), sum exp(b - shift(mb)); shift(m) = m, or 0 at -inf
  float sz;      // CE at T != 1: sum exp(T (a - shift(ma)))
  float kl;      // fkl: sum e_b ((b - shift(mb)) - (a - shift(ma))), e_b = exp(b - shift(mb));
                 // rkl: the same with a and b swapped
};

__device__ __forceinline__ Stats empty_stats() {
  return {kNegInf, kNegInf, 0.0f, 0.0f, 0.0f, 0.0f};
}

__device__ __forceinline__ float shift_of(float m) { return m == kNegInf ? 0.0f : m; }

// `s` re-expressed against the maxima (ma, mb) >= (s.ma, s.mb). With old shifts (A, B) and new
// ones (A', B'), every exp(x - A) gains the factor exp(A - A') (0 when the old maximum was -inf:
// then all its terms were exp(-inf) = 0), and each kl bracket gains (B - B') - (A - A'):
//   fkl: kl' = exp(B - B') (kl + sb ((B - B') - (A - A')))      (rkl: a and b swapped)
template <int DIV>
__device__ __forceinline__ Stats rescaled(const Stats& s, float ma, float mb, float t,
                                          bool tempered) {
  const float da = shift_of(s.ma) - shift_of(ma);
  const float db = shift_of(s.mb) - shift_of(mb);
  const float fa = s.ma == kNegInf ? 0.0f : CudaMath::exp(da);
  const float fb = s.mb == kNegInf ? 0.0f : CudaMath::exp(db);
  Stats r;
  r.ma = ma;
  r.mb = mb;
  r.sa = s.sa * fa;
  r.sb = s.sb * fb;
  r.sz = tempered ? s.sz * (s.ma == kNegInf ? 0.0f : CudaMath::exp(t * da)) : 0.0f;
  if (DIV == kFKL) r.kl = fb * (s.kl + s.sb * (db - da));
  else if (DIV == kRKL) r.kl = fa * (s.kl + s.sa * (da - db));
  else r.kl = 0.0f;
  return r;
}

template <int DIV>
__device__ __forceinline__ Stats merged(const Stats& x, const Stats& y, float t, bool tempered) {
  const float ma = fmaxf(x.ma, y.ma);
  const float mb = fmaxf(x.mb, y.mb);
  const Stats rx = rescaled<DIV>(x, ma, mb, t, tempered);
  const Stats ry = rescaled<DIV>(y, ma, mb, t, tempered);
  return {ma, mb, rx.sa + ry.sa, rx.sb + ry.sb, rx.sz + ry.sz, rx.kl + ry.kl};
}

// Adds one chunk to a thread's statistics, from the capped logits (a = zs / T, b = zt / T).
// Multiplying by 1/T > 0 is monotone, so max(z) / T is the chunk's maximum of a exactly.
template <int DIV>
__device__ __forceinline__ void accumulate(Stats& st, const Floats& zs, const Floats& zt,
                                           float inv_t, float t, bool tempered) {
  float zma = zs.v[0], zmb = zt.v[0];
#pragma unroll
  for (int e = 1; e < kChunk; ++e) {
    zma = fmaxf(zma, zs.v[e]);
    zmb = fmaxf(zmb, zt.v[e]);
  }
  const float cma = zma * inv_t;
  const float cmb = zmb * inv_t;
  if (cma > st.ma || cmb > st.mb)
    st = rescaled<DIV>(st, fmaxf(st.ma, cma), fmaxf(st.mb, cmb), t, tempered);
  const float sha = shift_of(st.ma);
  const float shb = shift_of(st.mb);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) {
    const float xa = fmaf(zs.v[e], inv_t, -sha);
    const float xb = fmaf(zt.v[e], inv_t, -shb);
    const float ea = CudaMath::exp(xa);
    const float eb = CudaMath::exp(xb);
    st.sa += ea;
    st.sb += eb;
    if (DIV == kFKL) st.kl += shifted_kl_term(eb, xb, xa);
    if (DIV == kRKL) st.kl += shifted_kl_term(ea, xa, xb);
  }
  // Chunk-level branch: per-element predication would cost issue slots in every call.
  if (tempered) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) st.sz += CudaMath::exp(t * fmaf(zs.v[e], inv_t, -sha));
  }
}

// Row scalars every thread needs for the later passes.
struct RowScalars {
  float la, lb;  // LSE(a), LSE(b)
  float lz;      // CE: LSE(T a)
  float loss;    // soft loss
  float dot;     // terms-pass dot (divergences other than fkl/rkl)
};

__device__ __forceinline__ Stats shfl_down(const Stats& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.ma, offset), __shfl_down_sync(0xffffffffu, s.mb, offset),
          __shfl_down_sync(0xffffffffu, s.sa, offset), __shfl_down_sync(0xffffffffu, s.sb, offset),
          __shfl_down_sync(0xffffffffu, s.sz, offset), __shfl_down_sync(0xffffffffu, s.kl, offset)};
}
__device__ __forceinline__ Terms shfl_down(const Terms& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.loss, offset),
          __shfl_down_sync(0xffffffffu, s.dot, offset)};
}
__device__ __forceinline__ RowScalars shfl_lane0(const RowScalars& s) {
  return {__shfl_sync(0xffffffffu, s.la, 0), __shfl_sync(0xffffffffu, s.lb, 0),
          __shfl_sync(0xffffffffu, s.lz, 0), __shfl_sync(0xffffffffu, s.loss, 0),
          __shfl_sync(0xffffffffu, s.dot, 0)};
}

// Tree over lanes [0, width) (a power of two): lane 0 gets the combination, in an order fixed by
// the lane numbering.
template <class T, class Merge>
__device__ __forceinline__ T lane_tree(T v, int width, Merge merge) {
#pragma unroll 1
  for (int offset = width / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset));
  return v;
}

// Combines one value per thread of the row's group (its warp, its CTA, or its cluster of CTAs) in
// a fixed order: `warp_combine` within each warp (result in lane 0), then `merge` over the
// warps and over the CTAs of the cluster. The result is valid in lane 0 of the warp (warp rows)
// or in thread 0 of each CTA (identical in all CTAs of a cluster). Every thread of the CTA calls
// it.
template <class T, class WarpCombine, class Merge>
__device__ __forceinline__ T group_reduce(T v, bool warp_rows, int ctas, T* warp_slots,
                                          T* cluster_slot, const T& empty, WarpCombine warp_combine,
                                          Merge merge) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_combine(v);
  if (warp_rows) return v;
  if (lane == 0) warp_slots[warp] = v;
  __syncthreads();
  if (warp == 0) v = lane_tree(lane < kWarps ? warp_slots[lane] : empty, kWarps, merge);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (ctas > 1) {
    if (threadIdx.x == 0) *cluster_slot = v;
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    if (warp == 0) {
      const T remote =
          lane < ctas
              ? *static_cast<const T*>(__cluster_map_shared_rank(cluster_slot, unsigned(lane)))
              : empty;
      v = lane_tree(remote, ctas, merge);
    }
  }
#endif
  return v;
}

// Warp-level combination of Stats, cheaper than a tree of merges: the warp's maxima (fmaxf is
// exact, so every lane gets the same), one rescale per lane to them, then a tree of plain sums
// (lane 0 gets the result, in a fixed order).
template <int DIV>
__device__ __forceinline__ Stats warp_stats(const Stats& s, float t, bool tempered) {
  float ma = s.ma, mb = s.mb;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, offset));
    mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, offset));
  }
  Stats r = rescaled<DIV>(s, ma, mb, t, tempered);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    r.sa += __shfl_down_sync(0xffffffffu, r.sa, offset);
    r.sb += __shfl_down_sync(0xffffffffu, r.sb, offset);
    if (tempered) r.sz += __shfl_down_sync(0xffffffffu, r.sz, offset);
    if (DIV == kFKL || DIV == kRKL) r.kl += __shfl_down_sync(0xffffffffu, r.kl, offset);
  }
  return r;
}

// The value of the thread that group_reduce left its result in, in every thread of the group.
__device__ __forceinline__ RowScalars group_broadcast(const RowScalars& v, bool warp_rows,
                                                      RowScalars* slot) {
  if (warp_rows) return shfl_lane0(v);
  if (threadIdx.x == 0) *slot = v;
  __syncthreads();
  return *slot;
}

// The chunks of one thread, first + j * stride for j in [0, count) (`reverse`: j downwards).
template <class Fetch, class Use>
__device__ __forceinline__ void for_each_chunk(int first, int stride, int count, bool reverse,
                                               Fetch fetch, Use use) {
  const int step = reverse ? -stride : stride;
  int u = reverse ? first + (count - 1) * stride : first;
  for (int j = 0; j < count; ++j, u += step) use(u, fetch(u));
}

// ---------------------------------------------------------------------------------------------
// The kernel.

struct GroupSlots {
  Stats warp_stats[kWarps];
  Terms warp_terms[kWarps];
  Stats cluster_stats;
  Terms cluster_terms;
  RowScalars row_after_stats;
  RowScalars row_after_terms;
};

// Row `row`, as CTA `rank` of `ctas` (a power of two) in its group; this thread is `index` of the
// `count` threads of its CTA (or warp) that share the CTA's chunks.
template <int DIV, bool STAGED, int SDT, int TDT>
__device__ __forceinline__ void kd_row(const KdLossArgs& A, const LaunchPlan& plan, int64_t row,
                                       int rank, int ctas, int index, int count, GroupSlots& slots,
                                       uint4* stage) {
  const KdRowConfig& cfg = A.config;
  const int vocab = int(A.vocab);
  // ctas is a power of two: slices of the row are split with shifts, not 64-bit divisions
  // (which every thread would pay for every row).
  const int ctas_log2 = __ffs(ctas) - 1;
  const int ds = SDT == kAnyDType ? A.student_dtype : SDT;
  const int dt = TDT == kAnyDType ? A.teacher_dtype : TDT;
  const int bytes_s = element_bytes(ds);
  const int bytes_t = element_bytes(dt);
  const bool wide_s = bytes_s == 4;
  const bool wide_t = bytes_t == 4;
  char* grad = static_cast<char*>(A.grad) + row * A.grad_vocab * bytes_s;
  const int64_t label = A.labels ? A.labels[row] : cfg.ignore_index;
  if (A.labels && label == cfg.ignore_index) {
    const int64_t begin = (A.grad_vocab * rank) >> ctas_log2;
    const int64_t end = (A.grad_vocab * (rank + 1)) >> ctas_log2;
    fill_zero(grad + begin * bytes_s, bytes_s, end - begin, index, count);
    if (rank == 0 && index == 0) A.loss[row] = 0.0f;
    return;
  }
  int64_t offset_s, offset_t;
  if (((row | A.inner_rows) >> 32) == 0) {
    // row_offset with a 32-bit division (every thread of the row computes it; a 64-bit
    // division costs several times more).
    const uint32_t outer = uint32_t(row) / uint32_t(A.inner_rows);
    const int64_t inner = int64_t(uint32_t(row) - outer * uint32_t(A.inner_rows));
    offset_s = outer * A.student_layout.outer_stride + inner * A.student_layout.inner_stride;
    offset_t = outer * A.teacher_layout.outer_stride + inner * A.teacher_layout.inner_stride;
  } else {
    offset_s = row_offset(A.student_layout, A.inner_rows, row);
    offset_t = row_offset(A.teacher_layout, A.inner_rows, row);
  }
  const char* zs = static_cast<const char*>(A.student) + offset_s * bytes_s;
  const char* zt = static_cast<const char*>(A.teacher) + offset_t * bytes_t;
  const RowGeometry geo = row_geometry(zs, bytes_s, zt, bytes_t, grad, vocab);
  const int begin = int((int64_t(geo.n_chunks) * rank) >> ctas_log2);
  const int end = int((int64_t(geo.n_chunks) * (rank + 1)) >> ctas_log2);
  const int first = begin + index;
  const int mine = first < end ? (end - first + count - 1) / count : 0;

  const float cap = cfg.softcap;
  const float inv_t = cfg.inv_temperature;
  const float t = cfg.temperature;
  const bool ce = A.labels && cfg.hard_weight > 0.0f;
  const bool tempered = ce && t != 1.0f;
  const bool label_ok = label >= 0 && label < vocab;
  constexpr bool staged = STAGED;
  uint4* stage_s = stage;
  uint4* stage_t = stage + (wide_s ? 2 : 1) * plan.stage_chunks;

  // Read before any thread of the group writes the gradient (grad may alias z_s).
  float a_label = 0.0f;
  if (ce && label_ok && rank == 0 && index == 0) {
    RawChunk r = {};
    r.w[0] = load_element_bits(zs, wide_s, label, false);
    const float z = decode(r, ds).v[0];
    a_label = (cap > 0.0f ? softcap<CudaMath>(z, cap) : z) * inv_t;
  }

  // Chunk u of both rows as capped logits, from shared memory or from global memory.
  auto fetch = [&](int u, bool last_use) {
    ChunkLogits c;
    const int col = geo.col0 + u * kChunk;
    c.lo = col < 0 ? -col : 0;
    c.hi = vocab - col < kChunk ? vocab - col : kChunk;
    RawChunk rs, rt;
    if (staged) {
      rs = stage_load(stage_s, plan.stage_chunks, u - begin, wide_s);
      rt = stage_load(stage_t, plan.stage_chunks, u - begin, wide_t);
    } else if (geo.vector_loads && c.lo == 0 && c.hi == kChunk) {
      rs = load_full(zs + int64_t(col) * bytes_s, wide_s, last_use);
      rt = load_full(zt + int64_t(col) * bytes_t, wide_t, last_use);
    } else {
      rs = load_partial(zs, wide_s, col, c.lo, c.hi, last_use);
      rt = load_partial(zt, wide_t, col, c.lo, c.hi, last_use);
    }
    c.zs = chunk_logits(rs, ds, c.lo, c.hi, cap);
    c.zt = chunk_logits(rt, dt, c.lo, c.hi, cap);
    return c;
  };
  const bool warp_rows = count == 32;  // else count == kThreads: CTAs per row
  const bool group_leader = index == 0;

  // Staged plan: every copy of the thread's slice is issued at once (the whole slice is in
  // flight, one group per chunk), pass 1 takes each chunk as soon as it has landed, and all
  // passes read shared memory.
  if (staged) {
#pragma unroll 1
    for (int u = first; u < end; u += count) {
      const int col = geo.col0 + u * kChunk;
      const int lo = col < 0 ? -col : 0;
      const int hi = vocab - col < kChunk ? vocab - col : kChunk;
      const int slot = u - begin;
      if (geo.vector_loads && lo == 0 && hi == kChunk) {
        const char* ps = zs + int64_t(col) * bytes_s;
        const char* pt = zt + int64_t(col) * bytes_t;
        copy_async_16(stage_s + slot, ps);
        if (wide_s) copy_async_16(stage_s + plan.stage_chunks + slot, ps + 16);
        copy_async_16(stage_t + slot, pt);
        if (wide_t) copy_async_16(stage_t + plan.stage_chunks + slot, pt + 16);
      } else {
        stage_store(stage_s, plan.stage_chunks, slot, wide_s,
                    load_partial(zs, wide_s, col, lo, hi, true));
        stage_store(stage_t, plan.stage_chunks, slot, wide_t,
                    load_partial(zt, wide_t, col, lo, hi, true));
      }
      copy_async_close_group();
    }
  }

  // Pass 1: statistics.
  Stats st = empty_stats();
  for_each_chunk(
      first, count, mine, false,
      [&](int u) {
        if (staged) copy_async_wait(mine - 1 - (u - first) / count);
        return fetch(u, false);
      },
      [&](int, const ChunkLogits& c) { accumulate<DIV>(st, c.zs, c.zt, inv_t, t, tempered); });
  st = group_reduce(
      st, warp_rows, ctas, slots.warp_stats, &slots.cluster_stats, empty_stats(),
      [&](const Stats& x) { return warp_stats<DIV>(x, t, tempered); },
      [&](const Stats& x, const Stats& y) { return merged<DIV>(x, y, t, tempered); });
  RowScalars rs{};
  if (group_leader) {
    // A row whose maximum is -inf has sums exp(-inf - -inf) = NaN in the CPU kernel.
    const float nan = __int_as_float(0x7fc00000);
    const float sa = st.ma == kNegInf ? nan : st.sa;
    const float sb = st.mb == kNegInf ? nan : st.sb;
    const float sz = tempered ? (st.ma == kNegInf ? nan : st.sz) : sa;
    rs.la = st.ma + CudaMath::log(sa);
    rs.lb = st.mb + CudaMath::log(sb);
    rs.lz = ce ? t * st.ma + CudaMath::log(sz) : 0.0f;
    if (DIV == kFKL) rs.loss = shifted_kl_finish<CudaMath>(st.kl, sb, sa);
    if (DIV == kRKL) rs.loss = shifted_kl_finish<CudaMath>(st.kl, sa, sb);
  }
  rs = group_broadcast(rs, warp_rows, &slots.row_after_stats);

  // Pass 2: terms of the divergences that need the normalized log-probabilities.
  if (!loss_in_stats_pass(DIV)) {
    Terms tm{0.0f, 0.0f};
    for_each_chunk(
        first, count, mine, false, [&](int u) { return fetch(u, false); },
        [&](int, const ChunkLogits& c) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            const float lp = fmaf(c.zt.v[e], inv_t, -rs.lb);
            const float lq = fmaf(c.zs.v[e], inv_t, -rs.la);
            const Terms x = divergence_terms<DIV, CudaMath>(lp, lq, cfg.coefs);
            // Columns outside the row are excluded explicitly rather than through the value
            // the terms take at lp = lq = -inf.
            const bool inside = e >= c.lo && e < c.hi;
            tm.loss += inside ? x.loss : 0.0f;
            tm.dot += inside ? x.dot : 0.0f;
          }
        });
    const auto add = [](const Terms& x, const Terms& y) {
      return Terms{x.loss + y.loss, x.dot + y.dot};
    };
    tm = group_reduce(
        tm, warp_rows, ctas, slots.warp_terms, &slots.cluster_terms, Terms{0.0f, 0.0f},
        [&](const Terms& x) { return lane_tree(x, 32, add); }, add);
    if (group_leader) {
      rs.loss = tm.loss;
      rs.dot = tm.dot;
    }
    rs = group_broadcast(rs, warp_rows, &slots.row_after_terms);
  }

  // NaN, added to the loss and to every gradient element, where the row has no softmax.
  const float row_nan = row_has_distribution(rs.la, rs.lb) ? 0.0f : __int_as_float(0x7fc00000);
  if (rank == 0 && index == 0) {
    float loss = cfg.soft_weight * rs.loss + row_nan;
    if (ce) loss += label_ok ? cfg.hard_weight * (rs.lz - t * a_label) : __int_as_float(0x7fc00000);
    A.loss[row] = loss;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // This CTA is done reading the other CTAs' slots; they wait for that before they exit.
  if (ctas > 1) __cluster_barrier_arrive();
#endif

  // Pass 3: dL/dz_s = (soft_grad_scale dL_soft/da
  //                    + hard_grad_weight (softmax(T a) - onehot(label))) * dcap,
  // in the student's dtype.
  const int label_chunk = ce && label_ok ? int((label - geo.col0) / kChunk) : -1;
  const int label_elem = ce && label_ok ? int((label - geo.col0) % kChunk) : -1;
  for_each_chunk(
      first, count, mine, !staged, [&](int u) { return fetch(u, true); },
      [&](int u, const ChunkLogits& c) {
        Floats g;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const float lq = fmaf(c.zs.v[e], inv_t, -rs.la);
          const float lp = fmaf(c.zt.v[e], inv_t, -rs.lb);
          g.v[e] = cfg.soft_grad_scale *
                       divergence_grad<DIV, CudaMath>(lp, lq, rs.loss, rs.dot, cfg.coefs) +
                   row_nan;
        }
        // Options as chunk-level branches (per-element predication costs issue slots always).
        // CE: exp(T a - lz), which at T == 1 is exp(a - LSE(a)) (lz == la).
        if (ce) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e)
            g.v[e] += cfg.hard_grad_weight * CudaMath::exp(t * (c.zs.v[e] * inv_t) - rs.lz);
        }
        if (u == label_chunk) {
#pragma unroll
          for (int e = 0; e < kChunk; ++e) g.v[e] -= e == label_elem ? cfg.hard_grad_weight : 0.0f;
        }
        if (cap > 0.0f) g = softcap_chain(g, c.zs, cap);
        const RawChunk out = encode(g, ds);
        const int col = geo.col0 + u * kChunk;
        if (geo.vector_stores && c.lo == 0 && c.hi == kChunk) {
          uint4* p = reinterpret_cast<uint4*>(grad + int64_t(col) * bytes_s);
          __stcs(p, make_uint4(out.w[0], out.w[1], out.w[2], out.w[3]));
          if (wide_s) __stcs(p + 1, make_uint4(out.w[4], out.w[5], out.w[6], out.w[7]));
        } else {
#pragma unroll
          for (int e = 0; e < kChunk; ++e)
            if (e >= c.lo && e < c.hi)
              store_element_bits(grad, wide_s, col + e, element_bits(out, wide_s, e));
        }
      });

  // Columns past the common vocabulary.
  const int64_t tail = A.grad_vocab - A.vocab;
  const int64_t tail_begin = A.vocab + ((tail * rank) >> ctas_log2);
  const int64_t tail_end = A.vocab + ((tail * (rank + 1)) >> ctas_log2);
  fill_zero(grad + tail_begin * bytes_s, bytes_s, tail_end - tail_begin, index, count);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Keep this CTA's slots alive until every CTA of the cluster has read them.
  if (ctas > 1) __cluster_barrier_wait();
#endif
}

// STAGED: the staged plan (rows in shared memory); else the streaming plan and warp rows, which
// need more registers (the staged kernel fits 3 CTAs of 256 threads per SM). SDT, TDT: student
// and teacher dtype codes fixed at compile time, or kAnyDType to read them from the arguments
// (uniform branches per chunk: fewer kernels to build, some instructions more per chunk).
template <int DIV, bool STAGED, int SDT, int TDT>
__global__ void __launch_bounds__(kThreads, STAGED ? 3 : 2)
    kd_loss_kernel(const KdLossArgs args, const LaunchPlan plan) {
  __shared__ GroupSlots slots;
  extern __shared__ uint4 stage[];
  // One call site for both mappings, so that the row code is compiled once.
  const bool warp_rows = !STAGED && plan.warp_rows != 0;
  const int64_t row = warp_rows ? int64_t(blockIdx.x) * kWarps + threadIdx.x / 32
                                : int64_t(blockIdx.x / plan.ctas_per_row);
  if (row >= args.n_rows) return;
  const int ctas = warp_rows ? 1 : plan.ctas_per_row;
  const int rank = warp_rows ? 0 : int(blockIdx.x % plan.ctas_per_row);
  const int index = warp_rows ? int(threadIdx.x % 32) : int(threadIdx.x);
  const int count = warp_rows ? 32 : kThreads;
  kd_row<DIV, STAGED, SDT, TDT>(args, plan, row, rank, ctas, index, count, slots, stage);
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct DeviceLimits {
  int compute_major;
  int cluster_launch;  // thread-block clusters can be launched
  int smem_per_block;  // opt-in maximum of shared memory per CTA
};

// The plan requested through FASTKD_CUDA_KD_PLAN (see kd_loss_cuda.cu).
struct PlanRequest {
  enum Kind { kAuto, kWarp, kStream, kStaged } kind;
  int ctas_per_row;  // kStaged: 1, 2, 4 or 8, or 0 to choose
};

const char* device_limits(DeviceLimits* limits);

inline const char* last_error() { return cudaGetErrorString(cudaGetLastError()); }

// Staged plan with the fewest CTAs per row among those that keep the most CTAs (up to 3)
// resident per SM: resident CTAs overlap one row's loads with another's arithmetic, and fewer
// CTAs per row mean fewer, longer slices. Leaves `plan` unstaged when nothing fits.
template <class Kernel>
const char* choose_staging(Kernel kernel, const KdLossArgs& A, const PlanRequest& request,
                           LaunchPlan* plan, size_t* stage_bytes) {
  DeviceLimits dev;
  if (const char* err = device_limits(&dev)) return err;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return last_error();
  const int64_t stage_limit = int64_t(dev.smem_per_block) - int64_t(attr.sharedSizeBytes);
  if (attr.maxDynamicSharedSizeBytes < stage_limit &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(stage_limit)) !=
          cudaSuccess)
    return last_error();
  const int64_t bytes_per_chunk =
      kChunk * int64_t(element_bytes(A.student_dtype) + element_bytes(A.teacher_dtype));
  const int64_t max_chunks = (A.vocab + 2 * kChunk - 2) / kChunk;  // col0 > -kChunk
  const bool clusters = dev.cluster_launch && dev.compute_major >= 9;
  int best_resident = 0;
  for (int ctas = 1; ctas <= (clusters ? kMaxCtasPerRow : 1); ctas *= 2) {
    if (request.ctas_per_row != 0 && request.ctas_per_row != ctas) continue;
    const int64_t chunks = (max_chunks + ctas - 1) / ctas;
    const int64_t bytes = chunks * bytes_per_chunk;
    if (bytes > stage_limit) continue;
    int resident = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, size_t(bytes)) !=
        cudaSuccess)
      return last_error();
    if (ctas > 1 && resident > 0) {
      cudaLaunchAttribute cluster;
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = unsigned(ctas);
      cluster.val.clusterDim.y = 1;
      cluster.val.clusterDim.z = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(unsigned(ctas));
      config.blockDim = dim3(kThreads);
      config.dynamicSmemBytes = size_t(bytes);
      config.attrs = &cluster;
      config.numAttrs = 1;
      int active = 0;
      if (cudaOccupancyMaxActiveClusters(&active, kernel, &config) != cudaSuccess)
        return last_error();
      if (active < 1) resident = 0;
    }
    resident = resident < 3 ? resident : 3;
    if (resident > best_resident) {
      best_resident = resident;
      *plan = {0, ctas, 1, int(chunks)};
      *stage_bytes = size_t(bytes);
    }
  }
  return nullptr;
}

// Chooses the plan and launches the kernel of divergence DIV; explicitly instantiated once per
// divergence, each in its own translation unit (kd_loss_cuda_<name>.cu, which CMakeLists.txt
// generates from kd_loss_cuda_divergence.cu.in), so that they compile in parallel.
template <int DIV>
const char* launch_divergence(const KdLossArgs& A, const PlanRequest& request,
                              cudaStream_t stream) {
  // One warp per row while a lane has at most 4 chunks (vocab up to about 1000).
  constexpr int64_t kWarpRowChunks = 4 * 32;
  const int64_t max_chunks = (A.vocab + 2 * kChunk - 2) / kChunk;
  // Staged rows of one dtype, the common case, get kernels specialized to it.
  auto staged_kernel = kd_loss_kernel<DIV, true, kAnyDType, kAnyDType>;
  if (A.student_dtype == A.teacher_dtype) {
    switch (A.student_dtype) {
      case kFloat32: staged_kernel = kd_loss_kernel<DIV, true, kFloat32, kFloat32>; break;
      case kBFloat16: staged_kernel = kd_loss_kernel<DIV, true, kBFloat16, kBFloat16>; break;
      default: staged_kernel = kd_loss_kernel<DIV, true, kFloat16, kFloat16>; break;
    }
  }
  LaunchPlan plan{0, 1, 0, 0};
  size_t stage_bytes = 0;
  if (request.kind == PlanRequest::kWarp ||
      (request.kind == PlanRequest::kAuto && max_chunks <= kWarpRowChunks)) {
    plan.warp_rows = 1;
  } else if (request.kind != PlanRequest::kStream) {
    if (const char* err = choose_staging(staged_kernel, A, request, &plan, &stage_bytes))
      return err;
    if (request.kind == PlanRequest::kStaged && !plan.staged)
      return "FASTKD_CUDA_KD_PLAN asks for a staged plan that does not fit this device and vocab";
  }

  const int64_t blocks =
      plan.warp_rows ? (A.n_rows + kWarps - 1) / kWarps : A.n_rows * plan.ctas_per_row;
  if (blocks > 0x7fffffff) return "kd_loss: too many rows for one CUDA launch";
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(plan.ctas_per_row);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = stage_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = plan.ctas_per_row > 1 ? 1 : 0;
  const auto kernel =
      plan.staged ? staged_kernel : kd_loss_kernel<DIV, false, kAnyDType, kAnyDType>;
  cudaLaunchKernelEx(&config, kernel, A, plan);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#define FASTKD_DECLARE_LAUNCHER(id, name, code)                                            \
  extern template const char* launch_divergence<id>(const KdLossArgs&, const PlanRequest&, \
                                                    cudaStream_t);
FASTKD_DIVERGENCES(FASTKD_DECLARE_LAUNCHER)
#undef FASTKD_DECLARE_LAUNCHER

}  // namespace cuda
}  // namespace fastkd
