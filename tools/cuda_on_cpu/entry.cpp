// C entry points (ctypes) into fastkd's CUDA launchers compiled for the CPU: each argument struct
// built by the checked constructor the pybind11 bindings call (make_*_args in csrc/common/
// *_args.h), from the same fields in the same order, then the CUDA entry point. Device pointers
// are host pointers here.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>

#include "common/kd_loss_args.h"
#include "common/sample_teacher_args.h"
#include "common/sinkhorn_args.h"
#include "common/token_rows_args.h"
#include "cuda/fused_linear_logprobs_cuda.h"
#include "cuda/fused_linear_topk_cuda.h"
#include "cuda/kd_loss_cuda.h"
#include "cuda/sample_teacher_cuda.h"
#include "cuda/sinkhorn_cuda.h"

using namespace fastkd;

namespace {

// *out = make(), or -1 with the exception's message in err.
template <typename Args, typename Make>
int make_checked(Args* out, char* err, size_t err_size, Make make) {
  try {
    *out = make();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_size, "%s", e.what());
    return -1;
  }
}

}  // namespace

extern "C" {

// The fastkd_make_*_args functions fill *out and return 0, or -1 with the reason in err.

size_t fastkd_args_size(const char* name) {
  if (std::strcmp(name, "KdLossArgs") == 0) return sizeof(KdLossArgs);
  if (std::strcmp(name, "SinkhornArgs") == 0) return sizeof(SinkhornArgs);
  if (std::strcmp(name, "SampleTeacherArgs") == 0) return sizeof(SampleTeacherArgs);
  if (std::strcmp(name, "LogprobRowsArgs") == 0) return sizeof(LogprobRowsArgs);
  if (std::strcmp(name, "TopkRowsArgs") == 0) return sizeof(TopkRowsArgs);
  return 0;
}

int fastkd_make_kd_args(KdLossArgs* out, uintptr_t student, int student_dtype, int64_t s_outer,
                        int64_t s_inner, uintptr_t teacher, int teacher_dtype, int64_t t_outer,
                        int64_t t_inner, int64_t inner_rows, int64_t n_rows, int64_t vocab,
                        int64_t grad_vocab, uintptr_t labels, uintptr_t grad, uintptr_t loss,
                        int divergence, float temperature, float softcap, float soft_weight,
                        float hard_weight, float grad_scale, int64_t ignore_index, float log_wp,
                        float log_wq, float w_p, float w_q, char* err, size_t err_size) {
  return make_checked(out, err, err_size, [&] {
    return make_kd_loss_args(student, student_dtype, s_outer, s_inner, teacher, teacher_dtype,
                             t_outer, t_inner, inner_rows, n_rows, vocab, grad_vocab, labels, grad,
                             loss, divergence, temperature, softcap, soft_weight, hard_weight,
                             grad_scale, ignore_index, log_wp, log_wq, w_p, w_q);
  });
}

int fastkd_make_sinkhorn_args(SinkhornArgs* out, uintptr_t cost, int cost_dtype, int64_t stride_b,
                              int64_t stride_i, int64_t stride_j, uintptr_t log_a, uintptr_t log_b,
                              uintptr_t n_sizes, uintptr_t m_sizes, uintptr_t eps_start,
                              int64_t batch, int64_t n, int64_t m, float eps, float kappa,
                              int max_iters, int check_every, float tol, bool warm_start,
                              uintptr_t f, uintptr_t g, uintptr_t iters, uintptr_t err_out,
                              uintptr_t transport, uintptr_t mass, uintptr_t eps_final,
                              uintptr_t plan, char* err, size_t err_size) {
  return make_checked(out, err, err_size, [&] {
    return make_sinkhorn_args(cost, cost_dtype, stride_b, stride_i, stride_j, log_a, log_b, n_sizes,
                              m_sizes, eps_start, batch, n, m, eps, kappa, max_iters, check_every,
                              tol, warm_start, f, g, iters, err_out, transport, mass, eps_final,
                              plan);
  });
}

int fastkd_make_sample_teacher_args(SampleTeacherArgs* out, uintptr_t logits, int dtype,
                                    int64_t outer_stride, int64_t inner_stride, int64_t inner_rows,
                                    int64_t n_rows, int64_t vocab, float temperature, int slots,
                                    uint64_t seed, int64_t token_offset, uintptr_t ids,
                                    uintptr_t weights, uintptr_t logprobs, uintptr_t invalid,
                                    char* err, size_t err_size) {
  return make_checked(out, err, err_size, [&] {
    return make_sample_teacher_args(logits, dtype, outer_stride, inner_stride, inner_rows, n_rows,
                                    vocab, temperature, slots, seed, token_offset, ids, weights,
                                    logprobs, invalid);
  });
}

int fastkd_make_logprob_rows_args(LogprobRowsArgs* out, uintptr_t logits, int64_t row_stride,
                                  int64_t n_rows, int64_t vocab, uintptr_t targets,
                                  uintptr_t row_grads, uintptr_t logprob, uintptr_t lse,
                                  uintptr_t entropy, float temperature, int64_t ignore_index,
                                  float grad_scale, char* err, size_t err_size) {
  return make_checked(out, err, err_size, [&] {
    return make_logprob_rows_args(logits, row_stride, n_rows, vocab, targets, row_grads, logprob,
                                  lse, entropy, temperature, ignore_index, grad_scale);
  });
}

int fastkd_make_topk_rows_args(TopkRowsArgs* out, uintptr_t logits, int64_t row_stride,
                               int64_t n_rows, int64_t vocab, int64_t k, uintptr_t ids,
                               uintptr_t logprobs, uintptr_t log_tail, uintptr_t lse,
                               float temperature, char* err, size_t err_size) {
  return make_checked(out, err, err_size, [&] {
    return make_topk_rows_args(logits, row_stride, n_rows, vocab, k, ids, logprobs, log_tail, lse,
                               temperature);
  });
}

// The CUDA entry points; each returns nullptr or the launcher's error message.
const char* fastkd_kd_loss_forward_cuda(const KdLossArgs* args) {
  return cuda::kd_loss_forward(*args, nullptr);
}
const char* fastkd_sinkhorn_cuda(const SinkhornArgs* args) {
  return cuda::sinkhorn(*args, nullptr);
}
const char* fastkd_sample_teacher_cuda(const SampleTeacherArgs* args) {
  return cuda::sample_teacher(*args, nullptr);
}
const char* fastkd_fused_linear_logprobs_cuda(const LogprobRowsArgs* args) {
  return cuda::fused_linear_logprobs_rows(*args, nullptr);
}
const char* fastkd_fused_linear_topk_cuda(const TopkRowsArgs* args) {
  return cuda::fused_linear_topk_rows(*args, nullptr);
}

}  // extern "C"
