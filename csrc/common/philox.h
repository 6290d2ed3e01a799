// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator. The same (key, counter) gives the same four 32-bit words on every
// backend, so a draw is a pure function of (seed, token index, draw index), whatever the batch
// layout or device.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace fastkd {

struct Philox4 {
  uint32_t x[4];
};

FASTKD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(product >> 32);
  return uint32_t(product);
}

// Ten rounds of the Philox-4x32 bijection of `counter` under `key`.
FASTKD_HD Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, counter.x[0], &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, counter.x[2], &hi1);
    counter = Philox4{{hi1 ^ counter.x[1] ^ key0, lo1, hi0 ^ counter.x[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// Uniform in the open interval (0, 1) from the top 24 bits of a word: ((w >> 8) + 1/2) 2^-24,
// exact in fp32 and never 0 or 1, so -log(u) is finite and > 0.
FASTKD_HD float uniform_open01(uint32_t word) {
  return (float(word >> 8) + 0.5f) * 5.9604644775390625e-08f;
}

// Four words for draws 4 b .. 4 b + 3 of token `token` under `seed`: counter
// (token lo, token hi, b, stream), key (seed lo, seed hi). Stream 0 feeds method="random",
// stream 1 the per-id uniforms of method="priority", so the two never share uniforms.
FASTKD_HD Philox4 token_draw_block(uint64_t seed, uint64_t token, uint32_t b,
                                   uint32_t stream = 0u) {
  return philox4x32_10(Philox4{{uint32_t(token), uint32_t(token >> 32), b, stream}}, uint32_t(seed),
                       uint32_t(seed >> 32));
}

}  // namespace fastkd
