// uld_loss on CPU: the sorted-probability L1 distance of Universal Logit Distillation, between a
// student and a teacher whose vocabularies need not match. Arguments as passed from Python: raw
// pointers, sizes, element strides, dtype codes.
#pragma once

#include <cstdint>

#include "../common/kd_loss_args.h"

namespace fastkd {
namespace cpu {

struct UldLossArgs {
  const void* student;  // [n_rows, student_vocab] logits, row r at row_offset(student_layout)
  const void* teacher;  // [n_rows, teacher_vocab] logits, row r at row_offset(teacher_layout)
  int student_dtype;    // DType codes
  int teacher_dtype;
  RowLayout student_layout;
  RowLayout teacher_layout;
  int64_t inner_rows;
  int64_t n_rows;
  int64_t student_vocab;  // V_s
  int64_t teacher_vocab;  // V_t
  const int64_t* labels;  // [n_rows] or nullptr
  int64_t ignore_index;
  void* grad;   // [n_rows, V_s] contiguous, student dtype: grad_scale * dLoss_row/dz_s;
                // nullptr: loss only
  float* loss;  // [n_rows] per-row loss, 0 at ignored rows
  float inv_student_temperature;
  float inv_teacher_temperature;
  float grad_scale;  // the mean's 1 / #tokens, or 1
};

namespace base { void uld_loss_forward(const UldLossArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void uld_loss_forward(const UldLossArgs& args, int num_threads); }
namespace avx512 { void uld_loss_forward(const UldLossArgs& args, int num_threads); }
#endif

// Writes args.loss[n_rows] and, when args.grad is set, args.grad[n_rows, V_s]; the build for this
// processor's ISA.
void uld_loss_forward(const UldLossArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
