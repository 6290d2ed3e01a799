// pybind11 bindings of the sample_teacher kernels, random and priority sampling (see bindings.cpp
// for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/dtype.h"
#include "common/sample_teacher_args.h"
#include "cpu/isa.h"
#include "cpu/priority_sample_cpu.h"
#include "cpu/sample_teacher_cpu.h"
#if defined(FASTKD_WITH_CUDA)
#include "cuda/sample_teacher_cuda.h"
#endif

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(sample_teacher, SampleTeacherArgs)
FASTKD_CPU_DISPATCH(priority_sample, SampleTeacherArgs)
}  // namespace cpu

namespace {

constexpr const char* kDoc =
    "Random-sampling sparse targets: N draws per row from softmax(z / T), kept as distinct ids "
    "with weights (count / N, importance-weighted towards softmax(z) when T != 1); "
    "invalid[r] = 1 marks rows with NaN or +inf logits.";

// Defines `name` with the Python arguments shared by the CPU and CUDA kernels, followed by one
// more, `last` (of type Last: the CPU's thread count, the CUDA stream); the arguments are checked
// and gathered into SampleTeacherArgs, then run(args, last) launches.
template <typename Last, class Run>
void def_sample_teacher(py::module_& m, const char* name, const char* last, Run run,
                        const std::string& doc) {
  m.def(
      name,
      [run](uintptr_t logits, int dtype, int64_t outer_stride, int64_t inner_stride,
            int64_t inner_rows, int64_t n_rows, int64_t vocab, float temperature, int num_samples,
            uint64_t seed, int64_t token_offset, uintptr_t ids, uintptr_t weights,
            uintptr_t logprobs, uintptr_t invalid, Last last_value) {
        run(make_sample_teacher_args(logits, dtype, outer_stride, inner_stride, inner_rows, n_rows,
                                     vocab, temperature, num_samples, seed, token_offset, ids,
                                     weights, logprobs, invalid),
            last_value);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("outer_stride"), py::arg("inner_stride"),
      py::arg("inner_rows"), py::arg("n_rows"), py::arg("vocab"), py::arg("temperature"),
      py::arg("num_samples"), py::arg("seed"), py::arg("token_offset"), py::arg("ids"),
      py::arg("weights"), py::arg("logprobs"), py::arg("invalid"), py::arg(last), doc.c_str());
}

}  // namespace

void bind_sample_teacher(py::module_& m) {
  def_sample_teacher<int>(
      m, "sample_teacher_cpu", "num_threads",
      [](const SampleTeacherArgs& a, int num_threads) {
        py::gil_scoped_release release;
        cpu::sample_teacher(a, num_threads);
      },
      kDoc);

  m.def(
      "priority_sample_cpu",
      [](uintptr_t logits, int dtype, int64_t outer_stride, int64_t inner_stride,
         int64_t inner_rows, int64_t n_rows, int64_t vocab, int k, uint64_t seed,
         int64_t token_offset, uintptr_t ids, uintptr_t weights, uintptr_t logprobs,
         uintptr_t invalid, int num_threads) {
        if (k > vocab)
          throw std::invalid_argument("k=" + std::to_string(k) +
                                      " exceeds vocab=" + std::to_string(vocab));
        const SampleTeacherArgs a = make_sample_teacher_args(
            logits, dtype, outer_stride, inner_stride, inner_rows, n_rows, vocab, 1.0f, k, seed,
            token_offset, ids, weights, logprobs, invalid);
        py::gil_scoped_release release;
        cpu::priority_sample(a, num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("outer_stride"), py::arg("inner_stride"),
      py::arg("inner_rows"), py::arg("n_rows"), py::arg("vocab"), py::arg("k"), py::arg("seed"),
      py::arg("token_offset"), py::arg("ids"), py::arg("weights"), py::arg("logprobs"),
      py::arg("invalid"), py::arg("num_threads"),
      "Priority-sampling sparse targets: per row the k ids of largest p_i / u_i, ascending, "
      "with weights max(p_i, tau); invalid[r] = 1 marks rows with NaN or +inf logits.");

#if defined(FASTKD_WITH_CUDA)
  def_sample_teacher<uintptr_t>(
      m, "sample_teacher_cuda", "stream",
      [](const SampleTeacherArgs& a, uintptr_t stream) {
        const char* err = cuda::sample_teacher(a, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(std::string("fastkd CUDA sample_teacher: ") + err);
      },
      std::string(kDoc) + " Enqueued on `stream` (cudaStream_t as an integer).");
#endif
}

FASTKD_BIND_FAMILY(bind_sample_teacher);

}  // namespace fastkd
