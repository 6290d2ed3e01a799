// pybind11 bindings of the sparse_kd_loss kernels (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/dtype.h"
#include "cpu/isa.h"
#include "cpu/sparse_kd_loss_cpu.h"

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(sparse_kd_loss_forward, SparseKdLossArgs)
}  // namespace cpu

namespace {

cpu::SparseKdLossArgs make_sparse_args(uintptr_t student, int student_dtype, int64_t s_outer,
                                       int64_t s_inner, int64_t inner_rows, int64_t n_rows,
                                       int64_t vocab, int64_t grad_vocab, uintptr_t ids,
                                       uintptr_t weights, uintptr_t logprobs, bool reverse,
                                       int64_t num_slots, uintptr_t tail_mass, uintptr_t labels,
                                       uintptr_t grad, uintptr_t loss, float temperature,
                                       float soft_weight, float hard_weight, float grad_scale,
                                       int64_t ignore_index) {
  check_dtype_code(student_dtype);
  if (inner_rows < 1 || n_rows < 0 || vocab < 1 || grad_vocab < vocab || num_slots < 0)
    throw std::invalid_argument(
        "bad sizes: inner_rows=" + std::to_string(inner_rows) +
        " n_rows=" + std::to_string(n_rows) + " vocab=" + std::to_string(vocab) +
        " grad_vocab=" + std::to_string(grad_vocab) + " num_slots=" + std::to_string(num_slots));
  if (reverse && n_rows > 0 && tail_mass == 0)
    throw std::invalid_argument("the reverse direction needs tail_mass");
  if (reverse && n_rows > 0 && num_slots > 0 && logprobs == 0)
    throw std::invalid_argument("the reverse direction needs logprobs");
  if (!reverse && n_rows > 0 && num_slots > 0 && weights == 0)
    throw std::invalid_argument("the forward direction needs weights");
  if (!(temperature > 0.0f))
    throw std::invalid_argument("temperature must be > 0; got " + std::to_string(temperature));
  cpu::SparseKdLossArgs a{};
  a.student = as_ptr<const void>(student);
  a.student_dtype = student_dtype;
  a.student_layout = {s_outer, s_inner};
  a.inner_rows = inner_rows;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.grad_vocab = grad_vocab;
  a.ids = as_ptr<const int32_t>(ids);
  a.weights = as_ptr<const float>(weights);
  a.logprobs = as_ptr<const float>(logprobs);
  a.reverse = reverse;
  a.num_slots = num_slots;
  a.tail_mass = as_ptr<const float>(tail_mass);
  a.labels = as_ptr<const int64_t>(labels);
  a.grad = as_ptr<void>(grad);
  a.loss = as_ptr<float>(loss);
  a.temperature = temperature;
  a.inv_temperature = 1.0f / temperature;
  a.soft_weight = soft_weight;
  a.soft_grad_scale = grad_scale * (soft_weight / temperature);
  a.hard_weight = hard_weight;
  a.hard_grad_weight = grad_scale * hard_weight;
  a.ignore_index = ignore_index;
  return a;
}

}  // namespace

void bind_sparse_kd_loss(pybind11::module_& m) {
  py::class_<cpu::SparseKdLossArgs>(
      m, "SparseKdLossArgs",
      "Pointers, sizes, strides, dtype code and scalars of one sparse_kd_loss call.")
      .def(py::init(&make_sparse_args), py::arg("student"), py::arg("student_dtype"),
           py::arg("s_outer"), py::arg("s_inner"), py::arg("inner_rows"), py::arg("n_rows"),
           py::arg("vocab"), py::arg("grad_vocab"), py::arg("ids"), py::arg("weights"),
           py::arg("logprobs"), py::arg("reverse"), py::arg("num_slots"), py::arg("tail_mass"),
           py::arg("labels"), py::arg("grad"), py::arg("loss"), py::arg("temperature"),
           py::arg("soft_weight"), py::arg("hard_weight"), py::arg("grad_scale"),
           py::arg("ignore_index"));

  m.def(
      "sparse_kd_loss_forward_cpu",
      [](const cpu::SparseKdLossArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::sparse_kd_loss_forward(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "Fused sparse_kd_loss on CPU (the forward direction, or the reverse one where args has "
      "logprobs): writes per-row loss and grad_scale * dLoss_row/dstudent.");
}

FASTKD_BIND_FAMILY(bind_sparse_kd_loss);

}  // namespace fastkd
