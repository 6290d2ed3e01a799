// The CUDA runtime API that fastkd's kernels call, for their CPU execution (see cuda_on_cpu.h):
// errors, device attributes of a configurable sm_90-like device (runtime.cpp), function
// attributes, occupancy, and launches (cudaLaunchKernelEx; build_kernels.py rewrites `<<<...>>>` into
// cuda_on_cpu::launch_kernel). Launches run to completion before they return.
#pragma once

#include "cuda_on_cpu.h"

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorInvalidClusterSize = 912,
  cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;

typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrReservedSharedMemoryPerBlock = 111,
  cudaDevAttrClusterLaunch = 120,
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
  int clusterDimMustBeSet;
  int requiredClusterWidth;
  int requiredClusterHeight;
  int requiredClusterDepth;
  int clusterSchedulingPolicyPreference;
  int nonPortableClusterSizeAllowed;
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeClusterDimension = 4,
};
union cudaLaunchAttributeValue {
  char pad[64];
  struct {
    unsigned int x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  char pad[8 - sizeof(cudaLaunchAttributeID)];
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

namespace cuda_on_cpu {

struct LaunchSpec {
  const void* kernel;  // identifies the kernel (its attributes)
  dim3 grid, block, cluster;
  size_t dynamic_smem;
  const char* signature;  // the kernel's parameter types, for messages
};

// Runs body(ctx) as every thread of the launch; returns its status (also cudaGetLastError's).
cudaError_t launch(const LaunchSpec& spec, void (*body)(void*), void* ctx);

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t occupancy_blocks(int* blocks, const void* kernel, int block_size, size_t dynamic_smem);
cudaError_t occupancy_clusters(int* clusters, const void* kernel, const cudaLaunchConfig_t* config);

template <class... Params, class... Args>
cudaError_t launch_with(LaunchSpec spec, void (*kernel)(Params...), Args&&... args) {
  spec.kernel = reinterpret_cast<const void*>(kernel);
  spec.signature = __PRETTY_FUNCTION__;
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Call call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return launch(
      spec,
      [](void* c) {
        Call* x = static_cast<Call*>(c);
        std::apply(x->kernel, x->params);
      },
      &call);
}

// kernel<<<grid, block, dynamic_smem, stream>>>(args...), as build_kernels.py rewrites it.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem,
                          cudaStream_t, Args&&... args) {
  return launch_with(LaunchSpec{nullptr, grid, block, dim3(1, 1, 1), dynamic_smem, ""}, kernel,
                     std::forward<Args>(args)...);
}

}  // namespace cuda_on_cpu

template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                               Args&&... args) {
  cuda_on_cpu::LaunchSpec spec{nullptr, config->gridDim, config->blockDim, dim3(1, 1, 1),
                               config->dynamicSmemBytes, ""};
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension)
      spec.cluster = dim3(config->attrs[i].val.clusterDim.x, config->attrs[i].val.clusterDim.y,
                          config->attrs[i].val.clusterDim.z);
  return cuda_on_cpu::launch_with(spec, kernel, std::forward<Args>(args)...);
}

template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* kernel) {
  return cuda_on_cpu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <class T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return cuda_on_cpu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <class T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T kernel, int block_size,
                                                          size_t dynamic_smem) {
  return cuda_on_cpu::occupancy_blocks(blocks, reinterpret_cast<const void*>(kernel), block_size,
                                       dynamic_smem);
}
template <class T>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, T kernel,
                                           const cudaLaunchConfig_t* config) {
  return cuda_on_cpu::occupancy_clusters(clusters, reinterpret_cast<const void*>(kernel), config);
}
