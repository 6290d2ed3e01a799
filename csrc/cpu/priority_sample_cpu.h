// Priority-sampling sparse teacher targets on CPU (see priority_sample_cpu.cpp).
#pragma once

#include <cstdint>

#include "../common/kd_loss_args.h"

namespace fastkd {

struct PrioritySampleArgs {
  const void* logits;      // rows of teacher logits, addressed through layout / inner_rows
  int dtype;               // DType code of the logits
  RowLayout layout;
  int64_t inner_rows;
  int64_t n_rows;
  int64_t vocab;           // ids sampled from: [0, vocab)
  int k;                   // ids kept per row, 1 <= k <= vocab
  uint64_t seed;
  int64_t token_offset;    // row r is token token_offset + r of the random stream
  int32_t* ids;            // [n_rows, k]: kept ids ascending, then -1
  float* weights;          // [n_rows, k]: max(p_id, tau), 0 at padding
  float* logprobs;         // [n_rows, k]: log p_id, 0 at padding; may be null
  uint8_t* invalid;        // [n_rows]: set to 1 where a row has NaN or +inf logits (no ids)
};

namespace cpu {

namespace base { void priority_sample(const PrioritySampleArgs& args, int num_threads); }
#if defined(FASTKD_CPU_X86_LEVELS)
namespace avx2 { void priority_sample(const PrioritySampleArgs& args, int num_threads); }
namespace avx512 { void priority_sample(const PrioritySampleArgs& args, int num_threads); }
#endif

// Writes A.ids, A.weights (and A.logprobs) of every row; the build for this processor's ISA.
void priority_sample(const PrioritySampleArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastkd
