// pybind11 bindings of the fused_linear_logprobs row kernel (see bindings.cpp for the
// conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "cpu/fused_linear_logprobs_cpu.h"
#include "cpu/isa.h"
#if defined(FASTKD_WITH_CUDA)
#include "cuda/fused_linear_logprobs_cuda.h"
#endif

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(fused_linear_logprobs_rows, LogprobRowsArgs)
}  // namespace cpu

void bind_fused_linear_logprobs(pybind11::module_& m) {
  py::class_<LogprobRowsArgs>(
      m, "LogprobRowsArgs",
      "Pointers, sizes and scalars of one fused_linear_logprobs row-kernel call.")
      .def(py::init(&make_logprob_rows_args), py::arg("logits"), py::arg("row_stride"),
           py::arg("n_rows"), py::arg("vocab"), py::arg("targets"), py::arg("row_grads"),
           py::arg("logprob"), py::arg("lse"), py::arg("entropy"), py::arg("temperature"),
           py::arg("ignore_index"), py::arg("grad_scale"));

  m.def(
      "fused_linear_logprobs_cpu",
      [](const LogprobRowsArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::fused_linear_logprobs_rows(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "fused_linear_logprobs rows on CPU: per-row log-prob at the target, log-sum-exp and "
      "entropy of softmax(z / T), and with row_grads the gradient written over the logits.");
#if defined(FASTKD_WITH_CUDA)
  m.def(
      "fused_linear_logprobs_cuda",
      [](const LogprobRowsArgs& args, uintptr_t stream) {
        const char* err = cuda::fused_linear_logprobs_rows(args, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(std::string("fastkd CUDA fused_linear_logprobs: ") + err);
      },
      py::arg("args"), py::arg("stream"),
      "fused_linear_logprobs rows on CUDA (see fused_linear_logprobs_cpu), enqueued on `stream` "
      "(cudaStream_t as an integer).");
#endif
}

FASTKD_BIND_FAMILY(bind_fused_linear_logprobs);

}  // namespace fastkd
