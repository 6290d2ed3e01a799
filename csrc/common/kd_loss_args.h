// Arguments of one fused kd_loss forward call, as passed from Python (raw pointers, sizes,
// element strides, dtype codes). Shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>

#include "kd_math.h"

namespace fastkd {

// Row r of a logits operand starts at element
//   (r / inner_rows) * outer_stride + (r % inner_rows) * inner_stride
// which covers contiguous [N, V] tensors, row slices such as logits[:, :-1, :] of a [B, T, V]
// tensor, and rows broadcast with stride 0. Columns are unit-stride.
struct RowLayout {
  int64_t outer_stride;
  int64_t inner_stride;
};

FASTKD_HD int64_t row_offset(const RowLayout& layout, int64_t inner_rows, int64_t row) {
  return (row / inner_rows) * layout.outer_stride + (row % inner_rows) * layout.inner_stride;
}

struct KdLossArgs {
  const void* student;  // [n_rows, >= vocab] logits, dtype student_dtype
  const void* teacher;  // [n_rows, >= vocab] logits, dtype teacher_dtype
  int student_dtype;
  int teacher_dtype;
  RowLayout student_layout;
  RowLayout teacher_layout;
  int64_t inner_rows;
  int64_t n_rows;
  int64_t vocab;          // common prefix min(V_s, V_t): the columns the loss sees
  int64_t grad_vocab;     // V_s: columns of a gradient row; [vocab, grad_vocab) are written as 0
  const int64_t* labels;  // [n_rows] or nullptr
  void* grad;             // [n_rows, grad_vocab] contiguous, student dtype: grad_scale *
                          // dLoss_row/dz_s; nullptr (CPU kernel only): loss only, no gradient
  float* loss;            // [n_rows] per-row loss, 0 at ignored rows
  KdRowConfig config;
};

}  // namespace fastkd
