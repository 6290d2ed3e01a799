// Per-element math of fused_linear_logprobs (log-prob at a target, log-sum-exp, entropy of the
// tempered softmax and their gradient), for the CPU kernel and a CUDA port (FASTKD_HD).
//
// Notation (docs/math.md): a = z / T, p = softmax(a), lse = LSE(a), log p_j = a_j - lse,
// H = -sum_j p_j log p_j. Incoming gradients g_lp, g_lse, g_H of a row's three outputs give
//   dL/da_j = (g_lse - g_lp) p_j - g_H p_j (log p_j + H) + g_lp [j = t]
// and dL/dz = dL/da / T; the p_j log p_j terms are 0 where p_j = 0 (a_j = -inf).
#pragma once

#include "dtype.h"
#include "kd_math.h"

namespace fastkd {

// The row's coefficients of dL/dz_j = scale (c_p p_j - c_h (p_j log p_j + p_j H)), with
// scale = grad_scale / T; the target column adds scale * g_lp.
struct LogprobGradCoefs {
  float c_p;  // g_lse - g_lp
  float c_h;  // g_H
  float h;    // the row's entropy H
  float scale;
};

// dL/dz_j off the target from p_j and log p_j (= a_j - lse).
FASTKD_HD float logprob_grad(const LogprobGradCoefs& c, float p, float log_p) {
  const float plogp = p == 0.0f ? 0.0f : p * log_p;
  return c.scale * (c.c_p * p - c.c_h * (plogp + p * c.h));
}

// -p_j log p_j from e_j = exp(a_j - m) and d_j = a_j - m, for H = log S - sum_j e_j d_j / S:
// e_j d_j is 0 where e_j = 0 (a_j = -inf makes d_j = -inf).
FASTKD_HD float entropy_term(float e, float d) { return e == 0.0f ? 0.0f : e * d; }

}  // namespace fastkd
