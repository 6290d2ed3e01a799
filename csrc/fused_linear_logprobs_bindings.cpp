// pybind11 bindings of the fused_linear_logprobs row kernel (see bindings.cpp for the
// conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "cpu/fused_linear_logprobs_cpu.h"
#include "cpu/isa.h"

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(fused_linear_logprobs_rows, LogprobRowsArgs)
}  // namespace cpu

namespace {

cpu::LogprobRowsArgs make_logprob_args(uintptr_t logits, int64_t row_stride, int64_t n_rows,
                                       int64_t vocab, uintptr_t targets, uintptr_t row_grads,
                                       uintptr_t logprob, uintptr_t lse, uintptr_t entropy,
                                       float temperature, int64_t ignore_index, float grad_scale) {
  if (n_rows < 0 || vocab < 1 || row_stride < vocab)
    throw std::invalid_argument("bad sizes: n_rows=" + std::to_string(n_rows) +
                                " vocab=" + std::to_string(vocab) +
                                " row_stride=" + std::to_string(row_stride));
  if (!(temperature > 0.0f))
    throw std::invalid_argument("temperature must be > 0; got " + std::to_string(temperature));
  if (n_rows > 0 && (!logits || !targets || !logprob || !lse))
    throw std::invalid_argument("logits, targets, logprob and lse must be given");
  cpu::LogprobRowsArgs a{};
  a.logits = as_ptr<float>(logits);
  a.row_stride = row_stride;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.targets = as_ptr<const int64_t>(targets);
  a.row_grads = as_ptr<const float>(row_grads);
  a.logprob = as_ptr<float>(logprob);
  a.lse = as_ptr<float>(lse);
  a.entropy = as_ptr<float>(entropy);
  a.inv_temperature = 1.0f / temperature;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  return a;
}

}  // namespace

void bind_fused_linear_logprobs(pybind11::module_& m) {
  py::class_<cpu::LogprobRowsArgs>(
      m, "LogprobRowsArgs",
      "Pointers, sizes and scalars of one fused_linear_logprobs row-kernel call.")
      .def(py::init(&make_logprob_args), py::arg("logits"), py::arg("row_stride"),
           py::arg("n_rows"), py::arg("vocab"), py::arg("targets"), py::arg("row_grads"),
           py::arg("logprob"), py::arg("lse"), py::arg("entropy"), py::arg("temperature"),
           py::arg("ignore_index"), py::arg("grad_scale"));

  m.def(
      "fused_linear_logprobs_cpu",
      [](const cpu::LogprobRowsArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::fused_linear_logprobs_rows(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "fused_linear_logprobs rows on CPU: per-row log-prob at the target, log-sum-exp and "
      "entropy of softmax(z / T), and with row_grads the gradient written over the logits.");
}

FASTKD_BIND_FAMILY(bind_fused_linear_logprobs);

}  // namespace fastkd
