// Arguments of the row kernels of the chunked lm_head ops fused_linear_logprobs and
// fused_linear_topk, shared by their CPU and CUDA launchers, and the checked constructors that the
// pybind11 bindings and the CPU execution of the CUDA kernels (tools/cuda_on_cpu) both call
// (see checked_args.h).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "checked_args.h"

namespace fastkd {

struct LogprobRowsArgs {
  float* logits;       // [n_rows, row_stride] fp32; overwritten by the gradient if row_grads
  int64_t row_stride;  // elements between rows (>= vocab)
  int64_t n_rows;
  int64_t vocab;
  const int64_t* targets;  // [n_rows] ids in [0, vocab) or ignore_index
  const float* row_grads;  // [n_rows, 3] incoming gradients of (logprob, lse, entropy), or null
  float* logprob;          // [n_rows]; 0 at ignored rows
  float* lse;              // [n_rows]; 0 at ignored rows
  float* entropy;          // [n_rows] or null (not wanted: its incoming gradient is then 0)
  float inv_temperature;
  float grad_scale;  // multiplies dL/dz (the head's logit scale)
  int64_t ignore_index;
};

struct TopkRowsArgs {
  const float* logits;  // [n_rows, row_stride] fp32, read only
  int64_t row_stride;   // elements between rows (>= vocab)
  int64_t n_rows;
  int64_t vocab;
  int64_t k;        // 1 <= k <= vocab
  int64_t* ids;     // [n_rows, k]: the k largest a (NaN counted as -inf; among equal a, the
                    // lower ids), in an order each backend documents
  float* logprobs;  // [n_rows, k] a_id - lse, in the order of ids
  float* log_tail;  // [n_rows] LSE(a outside ids) - lse; -inf where k = vocab
  float* lse;       // [n_rows] LSE(a)
  float inv_temperature;
};

inline LogprobRowsArgs make_logprob_rows_args(uintptr_t logits, int64_t row_stride, int64_t n_rows,
                                              int64_t vocab, uintptr_t targets, uintptr_t row_grads,
                                              uintptr_t logprob, uintptr_t lse, uintptr_t entropy,
                                              float temperature, int64_t ignore_index,
                                              float grad_scale) {
  if (n_rows < 0 || vocab < 1 || row_stride < vocab)
    throw std::invalid_argument("bad sizes: n_rows=" + std::to_string(n_rows) +
                                " vocab=" + std::to_string(vocab) +
                                " row_stride=" + std::to_string(row_stride));
  if (!(temperature > 0.0f))
    throw std::invalid_argument("temperature must be > 0; got " + std::to_string(temperature));
  if (n_rows > 0 && (!logits || !targets || !logprob || !lse))
    throw std::invalid_argument("logits, targets, logprob and lse must be given");
  LogprobRowsArgs a{};
  a.logits = as_ptr<float>(logits);
  a.row_stride = row_stride;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.targets = as_ptr<const int64_t>(targets);
  a.row_grads = as_ptr<const float>(row_grads);
  a.logprob = as_ptr<float>(logprob);
  a.lse = as_ptr<float>(lse);
  a.entropy = as_ptr<float>(entropy);
  a.inv_temperature = 1.0f / temperature;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  return a;
}

inline TopkRowsArgs make_topk_rows_args(uintptr_t logits, int64_t row_stride, int64_t n_rows,
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
  TopkRowsArgs a{};
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

}  // namespace fastkd
