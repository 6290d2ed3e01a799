// CUDA entry point of the fused kd_loss forward: argument checks, the device queries the launch
// plan needs, and the dispatch to the per-divergence launchers (kd_loss_cuda_<name>.cu, generated
// from kd_loss_cuda_divergence.cu.in).
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

// Every launch_divergence<id> dispatched below is instantiated in a translation unit that
// CMakeLists.txt generates per X(enumerator, name, code) entry it reads from kd_math.h; it passes
// how many it read, so that an entry it could not parse fails here rather than as an undefined
// symbol when the module is imported.
#define FASTKD_COUNT_DIVERGENCE(id, name, code) +1
static_assert(0 FASTKD_DIVERGENCES(FASTKD_COUNT_DIVERGENCE) == FASTKD_CUDA_DIVERGENCE_UNITS,
              "CMakeLists.txt generated a different number of CUDA translation units than "
              "FASTKD_DIVERGENCES has entries: write each as X(kEnumerator, name, code)");
#undef FASTKD_COUNT_DIVERGENCE

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
#define FASTKD_DISPATCH_DIVERGENCE(id, name, code) \
  case id: return launch_divergence<id>(args, request, s);
    FASTKD_DIVERGENCES(FASTKD_DISPATCH_DIVERGENCE)
#undef FASTKD_DISPATCH_DIVERGENCE
    default: return "kd_loss: unknown divergence code";
  }
}

}  // namespace cuda
}  // namespace fastkd
