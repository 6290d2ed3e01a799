// CUDA entry point of the fused kd_loss forward: argument checks, the device queries the launch
// plan needs, and the dispatch to the per-divergence launchers (kd_loss_cuda_<name>.cu).
//
// The plan (see kd_loss_kernel.cuh) is chosen automatically. FASTKD_CUDA_KD_PLAN, read at every
// call, forces one for tests and measurements:
//   auto      : the default
//   warp      : one warp per row (any vocab)
//   stream    : one CTA per row, rows re-read from global memory
//   staged    : rows staged in shared memory, CTAs per row chosen automatically
//   staged:N  : rows staged in shared memory with N CTAs per row (1, 2, 4 or 8; N > 1 is a
//               cluster, sm_90 and newer); an error when that does not fit
#include <cstdlib>
#include <cstring>

#include "kd_loss_cuda.h"
#include "kd_loss_kernel.cuh"

namespace fastkd {
namespace cuda {

namespace {

// False when FASTKD_CUDA_KD_PLAN holds something else than the values listed above.
bool plan_request(PlanRequest* request) {
  const char* env = std::getenv("FASTKD_CUDA_KD_PLAN");
  *request = {PlanRequest::kAuto, 0};
  if (!env || !*env || std::strcmp(env, "auto") == 0) return true;
  if (std::strcmp(env, "warp") == 0) {
    request->kind = PlanRequest::kWarp;
    return true;
  }
  if (std::strcmp(env, "stream") == 0) {
    request->kind = PlanRequest::kStream;
    return true;
  }
  if (std::strcmp(env, "staged") == 0) {
    request->kind = PlanRequest::kStaged;
    return true;
  }
  if (std::strncmp(env, "staged:", 7) == 0 && env[7] != '\0' && env[8] == '\0') {
    const int ctas = env[7] - '0';
    if (ctas == 1 || ctas == 2 || ctas == 4 || ctas == 8) {
      *request = {PlanRequest::kStaged, ctas};
      return true;
    }
  }
  return false;
}

}  // namespace

const char* device_limits(DeviceLimits* limits) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limits->compute_major, cudaDevAttrComputeCapabilityMajor, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&limits->cluster_launch, cudaDevAttrClusterLaunch, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&limits->smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                             device) != cudaSuccess)
    return cudaGetErrorString(cudaGetLastError());
  return nullptr;
}

const char* kd_loss_forward(const KdLossArgs& args, void* stream) {
  if (args.n_rows == 0) return nullptr;
  // Columns are int inside the kernel.
  if (args.grad_vocab > 0x7fffffff - 2 * kChunk) return "kd_loss: vocabulary too large for CUDA";
  PlanRequest request;
  if (!plan_request(&request))
    return "FASTKD_CUDA_KD_PLAN must be one of auto, warp, stream, staged, staged:1, staged:2, "
           "staged:4, staged:8";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.config.divergence) {
    case kFKL: return launch_divergence<kFKL>(args, request, s);
    case kRKL: return launch_divergence<kRKL>(args, request, s);
    case kJSD: return launch_divergence<kJSD>(args, request, s);
    case kTVD: return launch_divergence<kTVD>(args, request, s);
    case kSKL: return launch_divergence<kSKL>(args, request, s);
    default: return launch_divergence<kSRKL>(args, request, s);
  }
}

}  // namespace cuda
}  // namespace fastkd
