// pybind11 bindings of the fused_linear_topk row kernel (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "cpu/fused_linear_topk_cpu.h"
#include "cpu/isa.h"
#if defined(FASTKD_WITH_CUDA)
#include "cuda/fused_linear_topk_cuda.h"
#endif

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(fused_linear_topk_rows, TopkRowsArgs)
}  // namespace cpu

void bind_fused_linear_topk(pybind11::module_& m) {
  py::class_<TopkRowsArgs>(m, "TopkRowsArgs",
                           "Pointers, sizes and scalars of one fused_linear_topk row-kernel call.")
      .def(py::init(&make_topk_rows_args), py::arg("logits"), py::arg("row_stride"),
           py::arg("n_rows"), py::arg("vocab"), py::arg("k"), py::arg("ids"), py::arg("logprobs"),
           py::arg("log_tail"), py::arg("lse"), py::arg("temperature"));

  m.def(
      "fused_linear_topk_cpu",
      [](const TopkRowsArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::fused_linear_topk_rows(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "fused_linear_topk rows on CPU: the k largest z / T per row with their log-probs, the "
      "log-sum-exp and the log of the mass outside the k, summed over its own columns.");
#if defined(FASTKD_WITH_CUDA)
  m.def(
      "fused_linear_topk_cuda",
      [](const TopkRowsArgs& args, uintptr_t stream) {
        const char* err = cuda::fused_linear_topk_rows(args, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(std::string("fastkd CUDA fused_linear_topk: ") + err);
      },
      py::arg("args"), py::arg("stream"),
      "fused_linear_topk rows on CUDA (see fused_linear_topk_cpu), the k ids of a row in no "
      "particular order, enqueued on `stream` (cudaStream_t as an integer).");
#endif
}

FASTKD_BIND_FAMILY(bind_fused_linear_topk);

}  // namespace fastkd
