// pybind11 bindings of the batched Sinkhorn solver (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/dtype.h"
#include "common/sinkhorn_args.h"
#include "cpu/isa.h"
#include "cpu/sinkhorn_cpu.h"
#if defined(FASTKD_WITH_CUDA)
#include "cuda/sinkhorn_cuda.h"
#endif

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(sinkhorn, SinkhornArgs)
}  // namespace cpu

void bind_sinkhorn(pybind11::module_& m) {
  py::class_<SinkhornArgs>(m, "SinkhornArgs",
                           "Pointers, sizes, strides, dtype code and scalars of one batched "
                           "Sinkhorn solve (csrc/common/sinkhorn_args.h).")
      .def(py::init(&make_sinkhorn_args), py::arg("cost"), py::arg("cost_dtype"),
           py::arg("stride_b"), py::arg("stride_i"), py::arg("stride_j"), py::arg("log_a"),
           py::arg("log_b"), py::arg("n_sizes"), py::arg("m_sizes"), py::arg("eps_start"),
           py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("eps"), py::arg("kappa"),
           py::arg("max_iters"), py::arg("check_every"), py::arg("tol"), py::arg("warm_start"),
           py::arg("f"), py::arg("g"), py::arg("iters"), py::arg("err"), py::arg("transport"),
           py::arg("mass"), py::arg("eps_final"), py::arg("plan"));

  m.def(
      "sinkhorn_cpu",
      [](const SinkhornArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::sinkhorn(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "Batched log-domain Sinkhorn on CPU: writes potentials, iterations, errors, <P, C>, "
      "sum P and (when given) the plan.");

#if defined(FASTKD_WITH_CUDA)
  m.def(
      "sinkhorn_cuda",
      [](const SinkhornArgs& args, uintptr_t stream) {
        const char* err = cuda::sinkhorn(args, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(std::string("fastkd CUDA sinkhorn: ") + err);
      },
      py::arg("args"), py::arg("stream"),
      "Batched log-domain Sinkhorn on CUDA, enqueued on `stream` (cudaStream_t as an integer).");
#endif
}

FASTKD_BIND_FAMILY(bind_sinkhorn);

}  // namespace fastkd
