// pybind11 bindings of the fused_linear_topk row kernel (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "cpu/fused_linear_topk_cpu.h"
#include "cpu/isa.h"

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(fused_linear_topk_rows, TopkRowsArgs)
}  // namespace cpu

namespace {

cpu::TopkRowsArgs make_topk_args(uintptr_t logits, int64_t row_stride, int64_t n_rows,
                                 int64_t vocab, int64_t k, uintptr_t ids, uintptr_t logprobs,
                                 uintptr_t log_tail, uintptr_t lse, float temperature) {
  if (n_rows < 0 || vocab < 1 || row_stride < vocab || k < 1 || k > vocab)
    throw std::invalid_argument(
        "bad sizes: n_rows=" + std::to_string(n_rows) + " vocab=" + std::to_string(vocab) +
        " row_stride=" + std::to_string(row_stride) + " k=" + std::to_string(k));
  if (!(temperature > 0.0f))
    throw std::invalid_argument("temperature must be > 0; got " + std::to_string(temperature));
  if (n_rows > 0 && (!logits || !ids || !logprobs || !log_tail || !lse))
    throw std::invalid_argument("logits, ids, logprobs, log_tail and lse must be given");
  cpu::TopkRowsArgs a{};
  a.logits = as_ptr<const float>(logits);
  a.row_stride = row_stride;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.k = k;
  a.ids = as_ptr<int64_t>(ids);
  a.logprobs = as_ptr<float>(logprobs);
  a.log_tail = as_ptr<float>(log_tail);
  a.lse = as_ptr<float>(lse);
  a.inv_temperature = 1.0f / temperature;
  return a;
}

}  // namespace

void bind_fused_linear_topk(pybind11::module_& m) {
  py::class_<cpu::TopkRowsArgs>(
      m, "TopkRowsArgs", "Pointers, sizes and scalars of one fused_linear_topk row-kernel call.")
      .def(py::init(&make_topk_args), py::arg("logits"), py::arg("row_stride"), py::arg("n_rows"),
           py::arg("vocab"), py::arg("k"), py::arg("ids"), py::arg("logprobs"), py::arg("log_tail"),
           py::arg("lse"), py::arg("temperature"));

  m.def(
      "fused_linear_topk_cpu",
      [](const cpu::TopkRowsArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::fused_linear_topk_rows(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "fused_linear_topk rows on CPU: the k largest z / T per row with their log-probs, the "
      "log-sum-exp and the log of the mass outside the k, summed over its own columns.");
}

FASTKD_BIND_FAMILY(bind_fused_linear_topk);

}  // namespace fastkd
