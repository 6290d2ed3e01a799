// C entry points (ctypes) into fastkd's CUDA launchers compiled for the CPU: the argument structs
// built from the same fields, in the same order and with the same derived values as the pybind11
// bindings build them (csrc/bindings.cpp make_kd_args, csrc/sinkhorn_bindings.cpp
// make_sinkhorn_args, csrc/sample_teacher_bindings.cpp make_args; the row kernels of the chunked
// lm_head ops through the very constructors of csrc/common/token_rows_args.h), then the CUDA entry
// point. Device pointers are host pointers here.
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

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

bool dtype_ok(int code) { return code >= kFloat32 && code <= kFloat16; }

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

size_t fastkd_args_size(const char* name) {
  if (std::strcmp(name, "KdLossArgs") == 0) return sizeof(KdLossArgs);
  if (std::strcmp(name, "SinkhornArgs") == 0) return sizeof(SinkhornArgs);
  if (std::strcmp(name, "SampleTeacherArgs") == 0) return sizeof(SampleTeacherArgs);
  if (std::strcmp(name, "LogprobRowsArgs") == 0) return sizeof(LogprobRowsArgs);
  if (std::strcmp(name, "TopkRowsArgs") == 0) return sizeof(TopkRowsArgs);
  return 0;
}

// Fills *out as csrc/bindings.cpp make_kd_args does; 0, or -1 with the reason in err.
int fastkd_make_kd_args(KdLossArgs* out, uintptr_t student, int student_dtype, int64_t s_outer,
                        int64_t s_inner, uintptr_t teacher, int teacher_dtype, int64_t t_outer,
                        int64_t t_inner, int64_t inner_rows, int64_t n_rows, int64_t vocab,
                        int64_t grad_vocab, uintptr_t labels, uintptr_t grad, uintptr_t loss,
                        int divergence, float temperature, float softcap, float soft_weight,
                        float hard_weight, float grad_scale, int64_t ignore_index, float log_wp,
                        float log_wq, float w_p, float w_q, char* err, size_t err_size) {
  if (!is_divergence_code(divergence) || !dtype_ok(student_dtype) || !dtype_ok(teacher_dtype) ||
      inner_rows < 1 || n_rows < 0 || vocab < 1 || grad_vocab < vocab) {
    std::snprintf(err, err_size,
                  "bad arguments: divergence=%d dtypes=%d,%d inner_rows=%lld n_rows=%lld "
                  "vocab=%lld grad_vocab=%lld",
                  divergence, student_dtype, teacher_dtype, (long long)inner_rows,
                  (long long)n_rows, (long long)vocab, (long long)grad_vocab);
    return -1;
  }
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
  *out = a;
  return 0;
}

// Fills *out as csrc/sinkhorn_bindings.cpp make_sinkhorn_args does; 0, or -1 with the reason.
int fastkd_make_sinkhorn_args(SinkhornArgs* out, uintptr_t cost, int cost_dtype, int64_t stride_b,
                              int64_t stride_i, int64_t stride_j, uintptr_t log_a,
                              uintptr_t log_b, uintptr_t n_sizes, uintptr_t m_sizes,
                              uintptr_t eps_start, int64_t batch, int64_t n, int64_t m, float eps,
                              float kappa, int max_iters, int check_every, float tol,
                              bool warm_start, uintptr_t f, uintptr_t g, uintptr_t iters,
                              uintptr_t err_out, uintptr_t transport, uintptr_t mass,
                              uintptr_t eps_final, uintptr_t plan, char* err, size_t err_size) {
  if (!dtype_ok(cost_dtype) || batch < 0 || n < 0 || m < 0 || !(eps > 0.0f) ||
      !(kappa > 0.0f && kappa < 1.0f) || max_iters < 1 || check_every < 1) {
    std::snprintf(err, err_size,
                  "bad arguments: dtype=%d batch=%lld n=%lld m=%lld eps=%g kappa=%g "
                  "max_iters=%d check_every=%d",
                  cost_dtype, (long long)batch, (long long)n, (long long)m, double(eps),
                  double(kappa), max_iters, check_every);
    return -1;
  }
  SinkhornArgs a{};
  a.cost = as_ptr<const void>(cost);
  a.cost_dtype = cost_dtype;
  a.cost_stride_b = stride_b;
  a.cost_stride_i = stride_i;
  a.cost_stride_j = stride_j;
  a.log_a = as_ptr<const float>(log_a);
  a.log_b = as_ptr<const float>(log_b);
  a.n_sizes = as_ptr<const int32_t>(n_sizes);
  a.m_sizes = as_ptr<const int32_t>(m_sizes);
  a.eps_start = as_ptr<const float>(eps_start);
  a.batch = batch;
  a.n = n;
  a.m = m;
  a.eps = eps;
  a.kappa = kappa;
  a.max_iters = max_iters;
  a.check_every = check_every;
  a.tol = tol;
  a.warm_start = warm_start ? 1 : 0;
  a.f = as_ptr<float>(f);
  a.g = as_ptr<float>(g);
  a.iters = as_ptr<int32_t>(iters);
  a.err = as_ptr<float>(err_out);
  a.transport = as_ptr<float>(transport);
  a.mass = as_ptr<float>(mass);
  a.eps_final = as_ptr<float>(eps_final);
  a.plan = as_ptr<float>(plan);
  *out = a;
  return 0;
}

// Fills *out as csrc/sample_teacher_bindings.cpp make_args does; 0, or -1 with the reason.
int fastkd_make_sample_teacher_args(SampleTeacherArgs* out, uintptr_t logits, int dtype,
                                    int64_t outer_stride, int64_t inner_stride,
                                    int64_t inner_rows, int64_t n_rows, int64_t vocab,
                                    float temperature, int slots, uint64_t seed,
                                    int64_t token_offset, uintptr_t ids, uintptr_t weights,
                                    uintptr_t logprobs, uintptr_t invalid, char* err,
                                    size_t err_size) {
  if (!dtype_ok(dtype) || inner_rows < 1 || n_rows < 0 || vocab < 1 || slots < 1 ||
      !(temperature > 0)) {
    std::snprintf(err, err_size,
                  "bad arguments: dtype=%d inner_rows=%lld n_rows=%lld vocab=%lld slots=%d "
                  "temperature=%g",
                  dtype, (long long)inner_rows, (long long)n_rows, (long long)vocab, slots,
                  double(temperature));
    return -1;
  }
  SampleTeacherArgs a{};
  a.logits = reinterpret_cast<const void*>(logits);
  a.dtype = dtype;
  a.layout = {outer_stride, inner_stride};
  a.inner_rows = inner_rows;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.inv_temperature = 1.0f / temperature;
  a.num_samples = slots;
  a.seed = seed;
  a.token_offset = token_offset;
  a.ids = reinterpret_cast<int32_t*>(ids);
  a.weights = reinterpret_cast<float*>(weights);
  a.logprobs = reinterpret_cast<float*>(logprobs);
  a.invalid = reinterpret_cast<uint8_t*>(invalid);
  *out = a;
  return 0;
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
