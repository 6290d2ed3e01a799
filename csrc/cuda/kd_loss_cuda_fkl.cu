// The fkl kernels of kd_loss and their launcher.
#include "kd_loss_kernel.cuh"

namespace fastkd {
namespace cuda {

template const char* launch_divergence<kFKL>(const KdLossArgs&, const PlanRequest&, cudaStream_t);

}  // namespace cuda
}  // namespace fastkd
