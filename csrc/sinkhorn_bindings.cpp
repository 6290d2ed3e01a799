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

namespace {

SinkhornArgs make_sinkhorn_args(uintptr_t cost, int cost_dtype, int64_t stride_b, int64_t stride_i,
                                int64_t stride_j, uintptr_t log_a, uintptr_t log_b,
                                uintptr_t n_sizes, uintptr_t m_sizes, uintptr_t eps_start,
                                int64_t batch, int64_t n, int64_t m, float eps, float kappa,
                                int max_iters, int check_every, float tol, bool warm_start,
                                uintptr_t f, uintptr_t g, uintptr_t iters, uintptr_t err,
                                uintptr_t transport, uintptr_t mass, uintptr_t eps_final,
                                uintptr_t plan) {
  check_dtype_code(cost_dtype);
  if (batch < 0 || n < 0 || m < 0)
    throw std::invalid_argument("bad sizes: batch=" + std::to_string(batch) +
                                " n=" + std::to_string(n) + " m=" + std::to_string(m));
  if (!(eps > 0.0f) || !(kappa > 0.0f && kappa < 1.0f) || max_iters < 1 || check_every < 1)
    throw std::invalid_argument(
        "need eps > 0, 0 < kappa < 1, max_iters >= 1, check_every >= 1; "
        "got eps=" +
        std::to_string(eps) + " kappa=" + std::to_string(kappa) +
        " max_iters=" + std::to_string(max_iters) + " check_every=" + std::to_string(check_every));
  SinkhornArgs a{};
  a.cost = as_ptr<const void>(cost);
  a.cost_dtype = cost_dtype;
  a.cost_stride_b = stride_b;
  a.cost_stride_i = stride_i;
  a.cost_stride_j = stride_j;
  a.log_a = as_ptr<const float>(log_a);
  a.log_b = as_ptr<const float>(log_b);
  a.n_sizes = as_ptr<const int32_t>(n_sizes);
  a.m_sizes = as_ptr<const int32_t>(m_sizes);
  a.eps_start = as_ptr<const float>(eps_start);
  a.batch = batch;
  a.n = n;
  a.m = m;
  a.eps = eps;
  a.kappa = kappa;
  a.max_iters = max_iters;
  a.check_every = check_every;
  a.tol = tol;
  a.warm_start = warm_start ? 1 : 0;
  a.f = as_ptr<float>(f);
  a.g = as_ptr<float>(g);
  a.iters = as_ptr<int32_t>(iters);
  a.err = as_ptr<float>(err);
  a.transport = as_ptr<float>(transport);
  a.mass = as_ptr<float>(mass);
  a.eps_final = as_ptr<float>(eps_final);
  a.plan = as_ptr<float>(plan);
  return a;
}

}  // namespace

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
