// The skl kernels of kd_loss and their launcher.
#include "kd_loss_kernel.cuh"

namespace fastkd {
namespace cuda {

template const char* launch_divergence<kSKL>(const KdLossArgs&, const PlanRequest&, cudaStream_t);

}  // namespace cuda
}  // namespace fastkd
