// Arguments of one fused kd_loss forward call, as passed from Python (raw pointers, sizes,
// element strides, dtype codes). Shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "checked_args.h"
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

inline KdLossArgs make_kd_loss_args(
    uintptr_t student, int student_dtype, int64_t s_outer, int64_t s_inner, uintptr_t teacher,
    int teacher_dtype, int64_t t_outer, int64_t t_inner, int64_t inner_rows, int64_t n_rows,
    int64_t vocab, int64_t grad_vocab, uintptr_t labels, uintptr_t grad, uintptr_t loss,
    int divergence, float temperature, float softcap, float soft_weight, float hard_weight,
    float grad_scale, int64_t ignore_index, float log_wp, float log_wq, float w_p, float w_q) {
  if (!is_divergence_code(divergence))
    throw std::invalid_argument("unknown divergence code " + std::to_string(divergence));
  check_dtype_code(student_dtype);
  check_dtype_code(teacher_dtype);
  if (inner_rows < 1 || n_rows < 0 || vocab < 1 || grad_vocab < vocab)
    throw std::invalid_argument("bad sizes: inner_rows=" + std::to_string(inner_rows) + " n_rows=" +
                                std::to_string(n_rows) + " vocab=" + std::to_string(vocab) +
                                " grad_vocab=" + std::to_string(grad_vocab));
  KdLossArgs a{};
  a.student = as_ptr<const void>(student);
  a.teacher = as_ptr<const void>(teacher);
  a.student_dtype = student_dtype;
  a.teacher_dtype = teacher_dtype;
  a.student_layout = {s_outer, s_inner};
  a.teacher_layout = {t_outer, t_inner};
  a.inner_rows = inner_rows;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.grad_vocab = grad_vocab;
  a.labels = as_ptr<const int64_t>(labels);
  a.grad = as_ptr<void>(grad);
  a.loss = as_ptr<float>(loss);
  a.config.divergence = divergence;
  a.config.temperature = temperature;
  a.config.inv_temperature = 1.0f / temperature;
  a.config.softcap = softcap;
  a.config.soft_weight = soft_weight;
  a.config.soft_grad_scale = grad_scale * (soft_weight / temperature);
  a.config.hard_weight = hard_weight;
  a.config.hard_grad_weight = grad_scale * hard_weight;
  a.config.ignore_index = ignore_index;
  a.config.coefs = {log_wp, log_wq, w_p, w_q};
  return a;
}

}  // namespace fastkd
