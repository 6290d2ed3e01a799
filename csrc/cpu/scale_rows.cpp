#include "scale_rows.h"

#include "../common/dtype.h"
#include "parallel.h"

namespace fastkd {
namespace cpu {

namespace {

template <typename T>
void scale_rows_typed(T* data, int64_t n_rows, int64_t row_len, const float* factors, float unit,
                      int num_threads) {
  const int64_t min_rows = min_rows_per_thread(row_len, n_rows);
  parallel_for(n_rows, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (factors[r] == unit) continue;
      const float f = factors[r] / unit;
      T* row = data + r * row_len;
      for (int64_t i = 0; i < row_len; ++i) row[i] = from_float<T>(to_float(row[i]) * f);
    }
  });
}

}  // namespace

void scale_rows(void* data, int dtype, int64_t n_rows, int64_t row_len, const float* factors,
                float unit, int num_threads) {
  switch (dtype) {
    case kFloat32:
      return scale_rows_typed(static_cast<float*>(data), n_rows, row_len, factors, unit,
                              num_threads);
    case kBFloat16:
      return scale_rows_typed(static_cast<bf16_t*>(data), n_rows, row_len, factors, unit,
                              num_threads);
    default:
      return scale_rows_typed(static_cast<fp16_t*>(data), n_rows, row_len, factors, unit,
                              num_threads);
  }
}

}  // namespace cpu
}  // namespace fastkd
