// A minimal fork-join over row ranges with std::thread. The extension links no OpenMP runtime
// of its own (torch's wheels carry one; two runtimes in one process oversubscribe or clash);
// the thread count comes from Python (torch.get_num_threads()) on every call.
#pragma once

#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace fastkd {
namespace cpu {

// Calls body(begin, end) on disjoint slices of [0, n) from up to num_threads threads, with at
// least min_per_thread items per slice so that tiny calls stay on the calling thread.
template <class Body>
void parallel_for(int64_t n, int num_threads, int64_t min_per_thread, Body&& body) {
  if (n <= 0) return;
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t by_work = min_per_thread > 0 ? (n + min_per_thread - 1) / min_per_thread : n;
  if (threads > by_work) threads = by_work;
  if (threads > n) threads = n;
  if (threads <= 1) {
    body(int64_t(0), n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(threads);
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    if (begin >= end) break;
    workers.emplace_back([&, t, begin, end] {
      try {
        body(begin, end);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    body(int64_t(0), chunk < n ? chunk : n);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Rows of `row_len` elements each thread takes at least: below ~64k elements per thread, thread
// start-up costs more than it saves. All `n_rows` (one thread) for empty rows. Internal linkage:
// the per-ISA builds each get their own copy.
static inline int64_t min_rows_per_thread(int64_t row_len, int64_t n_rows) {
  constexpr int64_t kMinElementsPerThread = 65536;
  return row_len > 0 ? (kMinElementsPerThread + row_len - 1) / row_len : n_rows;
}

// row(r, scratch) for every row r of [0, n_rows) (rows of row_len elements), spread as
// parallel_for does with min_rows_per_thread rows per thread at least; each thread makes its own
// scratch by make_scratch().
template <class MakeScratch, class Row>
void for_each_row(int64_t n_rows, int64_t row_len, int num_threads, MakeScratch&& make_scratch,
                  Row&& row) {
  parallel_for(n_rows, num_threads, min_rows_per_thread(row_len, n_rows),
               [&](int64_t begin, int64_t end) {
                 auto scratch = make_scratch();
                 for (int64_t r = begin; r < end; ++r) row(r, scratch);
               });
}

}  // namespace cpu
}  // namespace fastkd
