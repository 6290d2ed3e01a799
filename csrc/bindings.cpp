// The pybind11 module fastkd._C: plain functions over data pointers, sizes, element strides,
// dtype codes and (CUDA) a stream handle. No torch headers: tensors are allocated and checked
// in Python (python/fastkd/ops/), which passes their data_ptr() here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/kd_loss_args.h"
#include "cpu/isa.h"
#include "cpu/kd_loss_cpu.h"
#include "cpu/scale_rows.h"
#if defined(FASTKD_WITH_CUDA)
#include "cuda/kd_loss_cuda.h"
#endif

namespace py = pybind11;
using namespace fastkd;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(kd_loss_forward, KdLossArgs)
}  // namespace cpu

// The families registered by FASTKD_BIND_FAMILY. A function-local static: the registrations
// run in other files' static initializers, whose order relative to this file's is unspecified.
std::vector<BindFamily>& families() {
  static std::vector<BindFamily> list;
  return list;
}

bool register_family(BindFamily bind) {
  families().push_back(bind);
  return true;
}

}  // namespace fastkd

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd native kernels (CPU, and CUDA when compiled with nvcc)";

  py::class_<KdLossArgs>(m, "KdLossArgs",
                         "Pointers, sizes, strides, dtype codes and scalars of one kd_loss call.")
      .def(py::init(&make_kd_loss_args), py::arg("student"), py::arg("student_dtype"),
           py::arg("s_outer"), py::arg("s_inner"), py::arg("teacher"), py::arg("teacher_dtype"),
           py::arg("t_outer"), py::arg("t_inner"), py::arg("inner_rows"), py::arg("n_rows"),
           py::arg("vocab"), py::arg("grad_vocab"), py::arg("labels"), py::arg("grad"),
           py::arg("loss"), py::arg("divergence"), py::arg("temperature"), py::arg("softcap"),
           py::arg("soft_weight"), py::arg("hard_weight"), py::arg("grad_scale"),
           py::arg("ignore_index"), py::arg("log_wp"), py::arg("log_wq"), py::arg("w_p"),
           py::arg("w_q"));

  m.def(
      "divergence_codes",
      [] {
        py::dict codes;
#define FASTKD_DIVERGENCE_ITEM(id, name, code) codes[#name] = int(id);
        FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_ITEM)
#undef FASTKD_DIVERGENCE_ITEM
        return codes;
      },
      "{name: code} of the divergences the kernels were built with (FASTKD_DIVERGENCES).");

  m.def(
      "kd_loss_forward_cpu",
      [](const KdLossArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::kd_loss_forward(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "Fused kd_loss forward on CPU: writes per-row loss and grad_scale * dLoss_row/dstudent.");

  m.def(
      "scale_rows_cpu",
      [](uintptr_t data, int dtype, int64_t n_rows, int64_t row_len, uintptr_t factors, float unit,
         int num_threads) {
        check_dtype_code(dtype);
        py::gil_scoped_release release;
        cpu::scale_rows(as_ptr<void>(data), dtype, n_rows, row_len, as_ptr<const float>(factors),
                        unit, num_threads);
      },
      py::arg("data"), py::arg("dtype"), py::arg("n_rows"), py::arg("row_len"), py::arg("factors"),
      py::arg("unit"), py::arg("num_threads"),
      "In place: row r of a contiguous [n_rows, row_len] tensor times factors[r] / unit; rows "
      "whose factor equals unit are not touched.");

#if defined(FASTKD_WITH_CUDA)
  m.def(
      "kd_loss_forward_cuda",
      [](const KdLossArgs& args, uintptr_t stream) {
        const char* err = cuda::kd_loss_forward(args, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(std::string("fastkd CUDA kd_loss: ") + err);
      },
      py::arg("args"), py::arg("stream"),
      "Fused kd_loss forward on CUDA, enqueued on `stream` (cudaStream_t as an integer).");
#endif

  for (BindFamily bind : families()) bind(m);

  py::dict info;
  info["cpu_isa"] = cpu::isa_level();
#if defined(FASTKD_CPU_X86_LEVELS)
  info["cpu_isa_builds"] = py::make_tuple("base", "avx2", "avx512");
#else
  info["cpu_isa_builds"] = py::make_tuple("base");
#endif
#if defined(FASTKD_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = FASTKD_CUDA_ARCHS_STR;
  info["cuda_compiler_version"] = FASTKD_CUDA_COMPILER_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_compiler_version"] = "";
#endif
  info["compiler"] = __VERSION__;
  m.attr("BUILD_INFO") = info;
}
