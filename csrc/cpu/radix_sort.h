// Stable descending sort of probabilities, for the sorted-probability losses (uld_loss).
// For non-negative floats the bit patterns order as unsigned integers, and below 2.0 bit 30 is
// clear, so key = 0x3FFFFFFF - bits(p) is a 30-bit key that ascends as p descends. A
// least-significant-digit radix sort over three 10-bit digits sorts n keys in O(n), and is
// stable: equal probabilities keep column order, as torch.sort(stable=True) keeps them.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "../common/dtype.h"

namespace fastkd {
namespace cpu {

constexpr int kRadixDigitBits = 10;
constexpr int kRadixDigits = 3;
constexpr uint32_t kRadixBuckets = 1u << kRadixDigitBits;
constexpr uint32_t kMaxProbabilityKey = 0x3FFFFFFFu;

// p in [0, 1] (not NaN) -> its descending-order key, and back.
static inline uint32_t descending_key(float p) { return kMaxProbabilityKey - float_bits(p); }
static inline float key_probability(uint32_t key) { return bits_float(kMaxProbabilityKey - key); }

// Sorts items[0, n) by key_of(item) (30-bit keys) ascending, stably, with tmp[0, n) as the
// other buffer. A digit shared by all keys skips its pass (common for the top digit). Internal
// linkage, as in vec_math.h: every per-ISA build gets its own copy.
template <class Item, class KeyOf>
static void radix_sort(Item* items, Item* tmp, int64_t n, KeyOf key_of) {
  uint32_t counts[kRadixDigits][kRadixBuckets] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key_of(items[i]);
    for (int d = 0; d < kRadixDigits; ++d)
      ++counts[d][(k >> (d * kRadixDigitBits)) & (kRadixBuckets - 1)];
  }
  Item* src = items;
  Item* dst = tmp;
  for (int d = 0; d < kRadixDigits; ++d) {
    uint32_t* count = counts[d];
    bool one_bucket = false;
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kRadixBuckets; ++b) {
      one_bucket = one_bucket || count[b] == uint32_t(n);
      const uint32_t c = count[b];
      count[b] = offset;
      offset += c;
    }
    if (one_bucket) continue;
    const int shift = d * kRadixDigitBits;
    for (int64_t i = 0; i < n; ++i)
      dst[count[(key_of(src[i]) >> shift) & (kRadixBuckets - 1)]++] = src[i];
    std::swap(src, dst);
  }
  if (src != items) std::memcpy(items, src, size_t(n) * sizeof(Item));
}

}  // namespace cpu
}  // namespace fastkd
