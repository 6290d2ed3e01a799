// pybind11 bindings of the priority-sampling kernel of sample_teacher (see bindings.cpp for the
// conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/dtype.h"
#include "cpu/priority_sample_cpu.h"

namespace py = pybind11;

namespace fastkd {

void bind_priority_sample(py::module_& m) {
  m.def(
      "priority_sample_cpu",
      [](uintptr_t logits, int dtype, int64_t outer_stride, int64_t inner_stride,
         int64_t inner_rows, int64_t n_rows, int64_t vocab, int k, uint64_t seed,
         int64_t token_offset, uintptr_t ids, uintptr_t weights, uintptr_t logprobs,
         uintptr_t invalid, int num_threads) {
        if (dtype < kFloat32 || dtype > kFloat16)
          throw std::invalid_argument("unknown dtype code " + std::to_string(dtype));
        if (inner_rows < 1 || n_rows < 0 || vocab < 1 || k < 1 || k > vocab)
          throw std::invalid_argument(
              "bad arguments: inner_rows=" + std::to_string(inner_rows) + " n_rows=" +
              std::to_string(n_rows) + " vocab=" + std::to_string(vocab) + " k=" +
              std::to_string(k));
        PrioritySampleArgs a{};
        a.logits = reinterpret_cast<const void*>(logits);
        a.dtype = dtype;
        a.layout = {outer_stride, inner_stride};
        a.inner_rows = inner_rows;
        a.n_rows = n_rows;
        a.vocab = vocab;
        a.k = k;
        a.seed = seed;
        a.token_offset = token_offset;
        a.ids = reinterpret_cast<int32_t*>(ids);
        a.weights = reinterpret_cast<float*>(weights);
        a.logprobs = reinterpret_cast<float*>(logprobs);
        a.invalid = reinterpret_cast<uint8_t*>(invalid);
        py::gil_scoped_release release;
        cpu::priority_sample(a, num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("outer_stride"), py::arg("inner_stride"),
      py::arg("inner_rows"), py::arg("n_rows"), py::arg("vocab"), py::arg("k"), py::arg("seed"),
      py::arg("token_offset"), py::arg("ids"), py::arg("weights"), py::arg("logprobs"),
      py::arg("invalid"), py::arg("num_threads"),
      "Priority-sampling sparse targets: per row the k ids of largest p_i / u_i, ascending, "
      "with weights max(p_i, tau); invalid[r] = 1 marks rows with NaN or +inf logits.");
}

}  // namespace fastkd
