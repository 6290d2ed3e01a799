// pybind11 bindings of the batched token alignment (see bindings.cpp for the conventions).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "common/align_spans_args.h"
#include "cpu/align_spans_cpu.h"
#include "cpu/isa.h"

namespace py = pybind11;

namespace fastkd {

namespace cpu {
FASTKD_CPU_DISPATCH(align_spans, AlignSpansArgs)
}  // namespace cpu

namespace {

AlignSpansArgs make_align_spans_args(uintptr_t student_spans, uintptr_t teacher_spans,
                                     int64_t batch, int64_t student_len, int64_t teacher_len,
                                     uintptr_t student_chunk, uintptr_t teacher_chunk,
                                     uintptr_t num_chunks, uintptr_t status, uintptr_t detail) {
  // Chunk ids are int32: a sequence has fewer than 2^31 tokens on either side.
  constexpr int64_t kMaxLen = INT32_MAX;
  if (batch < 0 || student_len < 0 || teacher_len < 0 || student_len > kMaxLen ||
      teacher_len > kMaxLen)
    throw std::invalid_argument("bad sizes: batch=" + std::to_string(batch) +
                                " student_len=" + std::to_string(student_len) +
                                " teacher_len=" + std::to_string(teacher_len));
  AlignSpansArgs a{};
  a.student_spans = as_ptr<const int64_t>(student_spans);
  a.teacher_spans = as_ptr<const int64_t>(teacher_spans);
  a.batch = batch;
  a.student_len = student_len;
  a.teacher_len = teacher_len;
  a.student_chunk = as_ptr<int32_t>(student_chunk);
  a.teacher_chunk = as_ptr<int32_t>(teacher_chunk);
  a.num_chunks = as_ptr<int32_t>(num_chunks);
  a.status = as_ptr<int32_t>(status);
  a.detail = as_ptr<int64_t>(detail);
  return a;
}

}  // namespace

void bind_align_spans(pybind11::module_& m) {
  py::class_<AlignSpansArgs>(m, "AlignSpansArgs",
                             "Pointers and sizes of one batched token alignment "
                             "(csrc/common/align_spans_args.h).")
      .def(py::init(&make_align_spans_args), py::arg("student_spans"), py::arg("teacher_spans"),
           py::arg("batch"), py::arg("student_len"), py::arg("teacher_len"),
           py::arg("student_chunk"), py::arg("teacher_chunk"), py::arg("num_chunks"),
           py::arg("status"), py::arg("detail"));

  m.def(
      "align_spans_cpu",
      [](const AlignSpansArgs& args, int num_threads) {
        py::gil_scoped_release release;
        cpu::align_spans(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "Batched two-pointer alignment of byte spans on CPU: writes both sides' chunk ids, the "
      "chunk count and a status per sequence.");
}

FASTKD_BIND_FAMILY(bind_align_spans);

}  // namespace fastkd
