// Small kernels that exercise the CPU execution of CUDA kernels itself: warp collectives, CTA
// barriers, clusters, shared memory, cp.async and the fp16/bf16 conversions, plus kernels that
// misuse them, whose launches must fail with a description. Written as CUDA, built by build_kernels.py
// like the fastkd kernels (launch syntax and shared memory declarations rewritten).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

namespace {

// Sum over each warp by an xor butterfly (every lane) and a shfl_down tree (lane 0), and an
// inclusive shfl_up scan: out[3 i] butterfly, out[3 i + 1] tree (valid in lane 0), out[3 i + 2]
// scan.
__global__ void warp_sums(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  float all = in[i], tree = in[i], scan = in[i];
  for (int d = 16; d > 0; d /= 2) all += __shfl_xor_sync(0xffffffffu, all, d);
  for (int d = 16; d > 0; d /= 2) tree += __shfl_down_sync(0xffffffffu, tree, d);
  for (int d = 1; d < 32; d *= 2) {
    const float before = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += before;
  }
  out[3 * i] = all;
  out[3 * i + 1] = tree;
  out[3 * i + 2] = scan;
}

// out[i] = __ballot_sync of in[i] > 0 over the warp, and the value of lane in[i] % 32 (as int).
__global__ void ballots(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned b = __ballot_sync(0xffffffffu, in[i] > 0.0f);
  const float picked = __shfl_sync(0xffffffffu, in[i], int(in[i]) & 31);
  out[2 * i] = float(b & 0xffffu) + 65536.0f * float(b >> 16);
  out[2 * i + 1] = picked;
}

// Per block: the sum of its in[] through a shared-memory tree with __syncthreads.
__global__ void block_sums(const float* in, float* out) {
  __shared__ float partial[128];
  const int t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
  if (__syncthreads_or(t == int(blockDim.x) - 1) && t == 1) out[gridDim.x + blockIdx.x] = 1.0f;
}

// Reverses each block's slice through dynamic shared memory.
__global__ void reverse_blocks(const float* in, float* out) {
  extern __shared__ float buffer[];
  const int t = threadIdx.x, n = blockDim.x;
  buffer[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buffer[n - 1 - t];
}

// Clusters of 2 CTAs: each CTA's value, read by its partner through distributed shared memory.
__global__ void cluster_swap(const float* in, float* out) {
  __shared__ float mine[4];
  const unsigned rank = __clusterRelativeBlockRank();
  if (threadIdx.x < 4) mine[threadIdx.x] = in[blockIdx.x * 4 + threadIdx.x];
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
  if (threadIdx.x < 4) {
    const float* other = __cluster_map_shared_rank(mine, rank ^ 1u);
    out[blockIdx.x * 4 + threadIdx.x] = other[threadIdx.x];
  }
  // Keep this CTA's shared memory until the partner has read it.
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
}

// fp16 and bf16 conversions: out[3 i] = fp16 bits of in[i], out[3 i + 1] = bf16 bits, out[3 i + 2]
// the fp16 value back as fp32 (bits stored as float values of the integers).
__global__ void conversions(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const __half2 h = __floats2half2_rn(in[i], 0.0f);
  const __nv_bfloat162 b = __floats2bfloat162_rn(in[i], 0.0f);
  out[3 * i] = float(__half_as_ushort(h.x));
  out[3 * i + 1] = float(__bfloat16_as_ushort(b.x));
  out[3 * i + 2] = __half22float2(h).x;
}

// cp.async: the staged value before the thread waits (the poison of fresh shared memory) and
// after.
__global__ void copy_async(const float* in, float* out) {
  __shared__ uint4 stage[32];
  const int t = threadIdx.x;
  cuda_on_cpu::copy_async_16(stage + t, in + 4 * t);
  cuda_on_cpu::copy_async_commit();
  float early;
  std::memcpy(&early, &stage[t].x, sizeof(float));
  cuda_on_cpu::copy_async_wait(0);
  float late;
  std::memcpy(&late, &stage[t].x, sizeof(float));
  out[2 * t] = early;
  out[2 * t + 1] = late;
}

// A missing barrier: each thread reads a slot its neighbour writes in the same phase, so the
// result depends on which thread runs first.
__global__ void racy_neighbours(const float* in, float* out) {
  __shared__ float slot[64];
  const int t = threadIdx.x;
  slot[t] = in[t];
  out[t] = slot[(t + 1) % blockDim.x];
}

// ---- misuse -----------------------------------------------------------------------------------

// Lanes 0-15 wait at __syncthreads, lanes 16-31 at a shuffle that names lanes 0-15.
__global__ void deadlock(const float* in, float* out) {
  const int t = threadIdx.x;
  float v = in[t];
  if (t < 16) __syncthreads();
  else v = __shfl_sync(0xffffffffu, v, 0);
  out[t] = v;
}

// Even and odd threads at different __syncthreads.
__global__ void divergent_barrier(const float*, float* out) {
  if (threadIdx.x % 2) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Lanes 16-31 exit; lanes 0-15 shuffle with a full mask.
__global__ void exited_lanes(const float* in, float* out) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  out[t] = __shfl_xor_sync(0xffffffffu, in[t], 1);
}

// Lanes 0-15 shuffle among themselves but read lane 20.
__global__ void read_outside_mask(const float* in, float* out) {
  const int t = threadIdx.x;
  if (t < 16) out[t] = __shfl_sync(0x0000ffffu, in[t], 20);
}

// Thread 0 writes one float past the end of the dynamic shared memory.
__global__ void shared_overflow(const float* in, float* out) {
  extern __shared__ float buffer[];
  const int n = int(in[0]);
  if (threadIdx.x == 0) buffer[n] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buffer[0];
}

// A 16-byte load from an address that is 4-byte aligned only.
__global__ void misaligned_vector(const float* in, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = __uint_as_float(v.x);
}

// __cluster_barrier_wait without an arrive.
__global__ void wait_without_arrive(const float*, float* out) {
  __cluster_barrier_wait();
  out[threadIdx.x] = 1.0f;
}

}  // namespace

extern "C" int cuda_on_cpu_selftest(const char* name, const float* in, float* out, int blocks,
                                    int threads, int smem) {
  bool known = false;
  const auto is = [&](const char* n) {
    const bool match = std::strcmp(name, n) == 0;
    known = known || match;
    return match;
  };
  cudaGetLastError();
  if (is("warp_sums")) cuda_on_cpu::launch_kernel(warp_sums, blocks, threads, 0, nullptr, in, out);
  if (is("ballots")) ballots<<<blocks, threads>>>(in, out);
  if (is("block_sums")) block_sums<<<blocks, threads, 0>>>(in, out);
  if (is("reverse_blocks")) reverse_blocks<<<blocks, threads, size_t(smem)>>>(in, out);
  if (is("conversions")) conversions<<<blocks, threads>>>(in, out);
  if (is("copy_async")) copy_async<<<blocks, threads>>>(in, out);
  if (is("racy_neighbours")) racy_neighbours<<<blocks, threads>>>(in, out);
  if (is("deadlock")) deadlock<<<blocks, threads>>>(in, out);
  if (is("divergent_barrier")) divergent_barrier<<<blocks, threads>>>(in, out);
  if (is("exited_lanes")) exited_lanes<<<blocks, threads>>>(in, out);
  if (is("read_outside_mask")) read_outside_mask<<<blocks, threads>>>(in, out);
  if (is("shared_overflow")) shared_overflow<<<blocks, threads, size_t(smem)>>>(in, out);
  if (is("misaligned_vector")) misaligned_vector<<<blocks, threads>>>(in, out);
  if (is("cluster_swap") || is("wait_without_arrive")) {
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned(blocks));
    config.blockDim = dim3(unsigned(threads));
    config.attrs = &cluster;
    config.numAttrs = 1;
    cudaLaunchKernelEx(&config, std::strcmp(name, "cluster_swap") == 0 ? cluster_swap
                                                                       : wait_without_arrive,
                       in, out);
  }
  return known ? int(cudaGetLastError()) : -1;
}
