// sparse_kd_loss on CPU: the distillation loss against sparse teacher targets (K (id, weight)
// pairs per token, optionally a tail bucket), fused with the student's softmax; with the
// targets' log-probabilities instead of their weights, the reverse KL over the ids and the
// bucket. Arguments as passed from Python: raw pointers, sizes, element strides, dtype codes.
#pragma once

#include <cstdint>

#include "../common/kd_loss_args.h"

namespace fastkd {
namespace cpu {

struct SparseKdLossArgs {
  const void* student;  // logits, row r at row_offset(student_layout, inner_rows, r)
  int student_dtype;    // DType code
  RowLayout student_layout;
  int64_t inner_rows;
  int64_t n_rows;
  int64_t vocab;           // V = min(V_s, targets.vocab_size): the columns the loss sees
  int64_t grad_vocab;      // V_s: columns of a gradient row; [vocab, grad_vocab) are written as 0
  const int32_t* ids;      // [n_rows, num_slots] contiguous; < 0: padding; >= vocab: NaN loss
  const float* weights;    // [n_rows, num_slots] contiguous; <= 0 counts as 0 (forward only)
  const float* logprobs;   // [n_rows, num_slots] contiguous log p_k (reverse), or nullptr
  bool reverse;            // the reverse direction (logprobs and tail_mass), else the forward
                           // one (weights); explicit because K = 0 makes logprobs nullptr
  int64_t num_slots;       // K
  const float* tail_mass;  // [n_rows] teacher mass outside the ids (tail="bucket"), or nullptr
  const int64_t* labels;   // [n_rows] or nullptr
  void* grad;              // [n_rows, grad_vocab] contiguous, student dtype: grad_scale *
                           // dLoss_row/dz; nullptr: loss only
  float* loss;             // [n_rows] per-row loss, 0 at ignored rows
  float temperature;
  float inv_temperature;
  float soft_weight;       // (1 - hard_weight) * (T^2 if t2_scale else 1)
  float soft_grad_scale;   // grad_scale * soft_weight / T: dLoss/dz = soft_grad_scale dL_soft/da
  float hard_weight;       // weight of CE(student at T = 1, label); 0 = no CE term
  float hard_grad_weight;  // grad_scale * hard_weight
  int64_t ignore_index;
};

namespace base { void sparse_kd_loss_forward(const SparseKdLossArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void sparse_kd_loss_forward(const SparseKdLossArgs& args, int num_threads); }
namespace avx512 { void sparse_kd_loss_forward(const SparseKdLossArgs& args, int num_threads); }
#endif

// Writes args.loss[n_rows] and, when args.grad is set, args.grad[n_rows, grad_vocab]; the build
// for this processor's ISA.
void sparse_kd_loss_forward(const SparseKdLossArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
