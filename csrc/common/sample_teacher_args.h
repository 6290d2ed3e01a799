// Arguments of one sample_teacher call (method="random" or "priority"), as passed from Python:
// raw pointers, sizes, element strides, a dtype code. Shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "checked_args.h"
#include "kd_loss_args.h"

namespace fastkd {

struct SampleTeacherArgs {
  const void* logits;  // rows of teacher logits, addressed through layout / inner_rows
  int dtype;           // DType code of the logits
  RowLayout layout;
  int64_t inner_rows;
  int64_t n_rows;
  int64_t vocab;          // columns sampled from: [0, vocab)
  float inv_temperature;  // 1 / T of the proposal softmax(z / T) ("random"; 1 for "priority")
  int num_samples;        // slots per row: N draws with replacement ("random") or the k ids
                          // kept ("priority", 1 <= k <= vocab)
  uint64_t seed;
  int64_t token_offset;  // row r is token token_offset + r of the random stream
  int32_t* ids;          // [n_rows, num_samples]: kept ids ascending, then -1
  float* weights;        // [n_rows, num_samples]: count / N (T = 1) or (count / N) p / r
                         // ("random"), max(p, tau) ("priority"); 0 at padding
  float* logprobs;       // [n_rows, num_samples] log softmax(z)[id], 0 at padding; may be null
  uint8_t* invalid;      // [n_rows]: set to 1 where a row has NaN or +inf logits (no draws)
};

// The checked arguments of a sampler call as SampleTeacherArgs.
inline SampleTeacherArgs make_sample_teacher_args(uintptr_t logits, int dtype, int64_t outer_stride,
                                                  int64_t inner_stride, int64_t inner_rows,
                                                  int64_t n_rows, int64_t vocab, float temperature,
                                                  int slots, uint64_t seed, int64_t token_offset,
                                                  uintptr_t ids, uintptr_t weights,
                                                  uintptr_t logprobs, uintptr_t invalid) {
  check_dtype_code(dtype);
  if (inner_rows < 1 || n_rows < 0 || vocab < 1 || slots < 1 || !(temperature > 0))
    throw std::invalid_argument(
        "bad arguments: inner_rows=" + std::to_string(inner_rows) +
        " n_rows=" + std::to_string(n_rows) + " vocab=" + std::to_string(vocab) +
        " slots=" + std::to_string(slots) + " temperature=" + std::to_string(temperature));
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
  return a;
}

}  // namespace fastkd
