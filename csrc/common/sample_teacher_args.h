// Arguments of one sample_teacher call (method="random" or "priority"), as passed from Python:
// raw pointers, sizes, element strides, a dtype code. Shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>

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

}  // namespace fastkd
