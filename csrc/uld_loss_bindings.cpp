// pybind11 bindings of the uld_loss kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/dtype.h"
#include "cpu/isa.h"
#include "cpu/uld_loss_cpu.h"

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(uld_loss_forward, UldLossArgs)
}  // namespace cpu

namespace {

cpu::UldLossArgs make_uld_args(uintptr_t student, int student_dtype, int64_t s_outer,
                               int64_t s_inner, uintptr_t teacher, int teacher_dtype,
                               int64_t t_outer, int64_t t_inner, int64_t inner_rows, int64_t n_rows,
                               int64_t student_vocab, int64_t teacher_vocab, uintptr_t labels,
                               int64_t ignore_index, uintptr_t grad, uintptr_t loss,
                               float student_temperature, float teacher_temperature,
                               float grad_scale) {
  check_dtype_code(student_dtype);
  check_dtype_code(teacher_dtype);
  // Column indices travel in 32 bits inside the sort's items.
  if (inner_rows < 1 || n_rows < 0 || student_vocab < 1 || teacher_vocab < 1 ||
      student_vocab > INT32_MAX || teacher_vocab > INT32_MAX)
    throw std::invalid_argument("bad sizes: inner_rows=" + std::to_string(inner_rows) +
                                " n_rows=" + std::to_string(n_rows) +
                                " student_vocab=" + std::to_string(student_vocab) +
                                " teacher_vocab=" + std::to_string(teacher_vocab));
  if (!(student_temperature > 0.0f) || !(teacher_temperature > 0.0f))
    throw std::invalid_argument("temperatures must be > 0; got " +
                                std::to_string(student_temperature) + " and " +
                                std::to_string(teacher_temperature));
  cpu::UldLossArgs a{};
  a.student = as_ptr<const void>(student);
  a.teacher = as_ptr<const void>(teacher);
  a.student_dtype = student_dtype;
  a.teacher_dtype = teacher_dtype;
  a.student_layout = {s_outer, s_inner};
  a.teacher_layout = {t_outer, t_inner};
  a.inner_rows = inner_rows;
  a.n_rows = n_rows;
  a.student_vocab = student_vocab;
  a.teacher_vocab = teacher_vocab;
  a.labels = as_ptr<const int64_t>(labels);
  a.ignore_index = ignore_index;
  a.grad = as_ptr<void>(grad);
  a.loss = as_ptr<float>(loss);
  a.inv_student_temperature = 1.0f / student_temperature;
  a.inv_teacher_temperature = 1.0f / teacher_temperature;
  a.grad_scale = grad_scale;
  return a;
}

}  // namespace

void bind_uld_loss(pybind11::module_& m) {
  py::class_<cpu::UldLossArgs>(
      m, "UldLossArgs", "Pointers, sizes, strides, dtype codes and scalars of one uld_loss call.")
      .def(py::init(&make_uld_args), py::arg("student"), py::arg("student_dtype"),
           py::arg("s_outer"), py::arg("s_inner"), py::arg("teacher"), py::arg("teacher_dtype"),
           py::arg("t_outer"), py::arg("t_inner"), py::arg("inner_rows"), py::arg("n_rows"),
           py::arg("student_vocab"), py::arg("teacher_vocab"), py::arg("labels"),
           py::arg("ignore_index"), py::arg("grad"), py::arg("loss"),
           py::arg("student_temperature"), py::arg("teacher_temperature"), py::arg("grad_scale"));

  m.def(
      "uld_loss_forward_cpu",
      [](const cpu::UldLossArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::uld_loss_forward(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "Fused uld_loss forward on CPU: writes per-row loss and grad_scale * dLoss_row/dstudent.");
}

FASTKD_BIND_FAMILY(bind_uld_loss);

}  // namespace fastkd
