// In-place row scaling, the backward of the fused losses: their forward already wrote
// grad_scale * dLoss_row/dlogits, so the backward multiplies row r by upstream[r] / grad_scale
// and, in the usual case where that ratio is exactly 1, touches no memory at all.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

// data: contiguous [n_rows, row_len] of dtype (DType code); factors: [n_rows] fp32.
void scale_rows(void* data, int dtype, int64_t n_rows, int64_t row_len, const float* factors,
                float unit, int num_threads);

}  // namespace cpu
}  // namespace fastkd
