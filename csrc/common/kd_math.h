// Per-element math of the fused softmax-divergence losses, shared by the CPU and CUDA kernels.
//
// Notation (see REFERENCES.md): a = cap(z_s)/T, b = cap(z_t)/T, q = softmax(a), p = softmax(b),
// lq = a - LSE(a), lp = b - LSE(b). Every divergence is evaluated in the same row schedule:
//   stats pass  : max and sum-of-exp of a and b (online), plus the loss of fkl/rkl;
//   terms pass  : (loss, dot) sums for divergences whose terms need normalized log-probs;
//   grad pass   : dL/da_i = q_i * G_i(loss, dot), written to the gradient buffer.
// `Math` supplies exp and log (a vectorizable polynomial on CPU, the hardware units on CUDA).
#pragma once

#include "dtype.h"

namespace fastkd {

enum Divergence : int { kFKL = 0, kRKL = 1, kJSD = 2, kTVD = 3, kSKL = 4, kSRKL = 5 };

// Divergences whose loss is known after the stats pass (no terms pass needed).
FASTKD_HD constexpr bool loss_in_stats_pass(int div) { return div == kFKL || div == kRKL; }

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();

// Whether a row has a softmax on both sides, from its log-sum-exps LSE(a), LSE(b). Where the
// compared logits of either model are all -inf, or hold NaN or +inf, that LSE is not finite: the
// row's loss and its gradient within the common vocabulary are then NaN, as plain PyTorch gives
// them (the comparisons are false for NaN as well).
FASTKD_HD bool row_has_distribution(float la, float lb) {
  return la > kNegInf && la < kPosInf && lb > kNegInf && lb < kPosInf;
}

// Scalars that shape the per-element terms of one call (identical for all rows): the weights of
// the mixture m = wp p + wq q (jsd: beta, 1 - beta; skl: alpha, 1 - alpha; srkl: 1 - alpha,
// alpha) and their logs, each formed in double precision by the caller and rounded once. No
// 1 - w is formed here: from a float w it would carry w's rounding, a relative error of 1.3e-5
// in 1 - beta at beta = 0.999.
struct DivergenceCoefs {
  float log_wp;
  float log_wq;
  float wp;
  float wq;
};

// z -> c * tanh(z / c). For |x| >= 1/8, tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|),
// exact at +-inf; below, where 1 - e would cancel, the odd series x - x^3/3 + 2x^5/15 - 17x^7/315
// (next term < 1e-10 relative). Returns the capped value; d(capped)/dz = 1 - (capped / c)^2.
template <class Math>
FASTKD_HD float softcap(float z, float cap) {
  const float x = z / cap;
  const float ax = x < 0.0f ? -x : x;
  const float e = Math::exp(-2.0f * ax);
  const float x2 = x * x;
  const float series = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const float t = (1.0f - e) / (1.0f + e);
  const float big = x < 0.0f ? -t : t;
  return cap * (ax < 0.125f ? series : big);
}

// log(exp(x) + exp(y)) without forming exp(x) + exp(y): stays finite when both underflow.
template <class Math>
FASTKD_HD float logaddexp(float x, float y) {
  const float hi = x > y ? x : y;
  const float lo = x > y ? y : x;
  const float r = hi + Math::log(1.0f + Math::exp(lo - hi));
  return hi == kNegInf ? kNegInf : r;
}

FASTKD_HD float abs_f(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return __builtin_fabsf(x);
#endif
}

// Probabilities below 2^-126 count as exactly 0: exp(x) is taken as 0 for x <= kLogMinProb.
// Guards test the log-probability (an input of the term), never the probability computed
// from it, so that 0 * log 0 = 0 also where the other log is -inf, and so that CPU compilers
// turn the guards into blends.
constexpr float kLogMinProb = -87.33654f;

// p * (lp - lq), 0 where p counts as 0 (even where lq = -inf).
FASTKD_HD float xlogx_ratio(float p, float lp, float lq) {
  return lp > kLogMinProb ? p * (lp - lq) : 0.0f;
}

// Stats-pass loss of fkl and rkl, in the shifted form that cancels no large numbers:
//   fkl = sum_i e_b,i ((b_i - mb) - (a_i - ma)) / sb - log sb + log sa,   e_b,i = exp(b_i - mb)
// (rkl swaps a and b). `shifted_kl_term` is one term of the sum; `finish` assembles the loss.
FASTKD_HD float shifted_kl_term(float e_x, float x_shift, float y_shift) {
  return x_shift > kLogMinProb ? e_x * (x_shift - y_shift) : 0.0f;
}
template <class Math>
FASTKD_HD float shifted_kl_finish(float acc, float sum_x, float sum_y) {
  return acc / sum_x - Math::log(sum_x) + Math::log(sum_y);
}

// sign(q - p) from the log-probabilities (exp is monotone).
FASTKD_HD float sign_of_difference(float lq, float lp) {
  const float s = lq > lp ? 1.0f : 0.0f;
  return lq < lp ? -1.0f : s;
}

// w / m = exp(lw - lm) for a mixture component w; 0 where w counts as 0 (then lm may be -inf,
// and exp(lw - lm) NaN).
template <class Math>
FASTKD_HD float mixture_ratio(float lw, float lm) {
  const float r = Math::exp(lw - lm);
  return lw > kLogMinProb ? r : 0.0f;
}

struct Terms {
  float loss;
  float dot;
};

// Terms-pass contribution of element i, given its log-probabilities and probabilities (the
// LSEs are final; p = exp(lp), q = exp(lq), however the caller obtained them).
template <int DIV, class Math>
FASTKD_HD Terms divergence_terms(float lp, float lq, float p, float q, const DivergenceCoefs& c) {
  if (DIV == kFKL) return {xlogx_ratio(p, lp, lq), 0.0f};
  if (DIV == kRKL) return {xlogx_ratio(q, lq, lp), 0.0f};
  if (DIV == kTVD) return {0.5f * abs_f(q - p), q * sign_of_difference(lq, lp)};
  const float lm = logaddexp<Math>(c.log_wp + lp, c.log_wq + lq);
  if (DIV == kJSD) {
    const float klq = xlogx_ratio(q, lq, lm);
    return {c.wp * xlogx_ratio(p, lp, lm) + c.wq * klq, klq};
  }
  // dot = sum q r with r = p/m (skl) or q/m (srkl).
  const float r = mixture_ratio<Math>(DIV == kSKL ? lp : lq, lm);
  const float dot = lq > kLogMinProb ? q * r : 0.0f;
  return {DIV == kSKL ? xlogx_ratio(p, lp, lm) : xlogx_ratio(q, lq, lm), dot};
}

template <int DIV, class Math>
FASTKD_HD Terms divergence_terms(float lp, float lq, const DivergenceCoefs& c) {
  return divergence_terms<DIV, Math>(lp, lq, Math::exp(lp), Math::exp(lq), c);
}

// dL/da_i of the soft loss (before 1/T, t2 and softcap factors), given the row's loss and dot.
//   fkl : q - p                       rkl : q (lq - lp - L)
//   jsd : wq q (lq - lm - dot)        tvd : q (sign(q-p) - dot) / 2
//   skl : -wq q (p/m - dot)           srkl: q ((lq - lm) - L - wq (q/m - dot))
template <int DIV, class Math>
FASTKD_HD float divergence_grad(float lp, float lq, float p, float q, float loss, float dot,
                                const DivergenceCoefs& c) {
  if (DIV == kFKL) return q - p;
  float g;
  if (DIV == kRKL) {
    g = lq - lp - loss;
  } else if (DIV == kTVD) {
    g = 0.5f * (sign_of_difference(lq, lp) - dot);
  } else {
    const float lm = logaddexp<Math>(c.log_wp + lp, c.log_wq + lq);
    if (DIV == kJSD) g = c.wq * (lq - lm - dot);
    else if (DIV == kSKL) g = -c.wq * (mixture_ratio<Math>(lp, lm) - dot);
    else g = (lq - lm) - loss - c.wq * (mixture_ratio<Math>(lq, lm) - dot);
  }
  return lq > kLogMinProb ? q * g : 0.0f;
}

template <int DIV, class Math>
FASTKD_HD float divergence_grad(float lp, float lq, float loss, float dot,
                                const DivergenceCoefs& c) {
  // p only enters fkl's gradient; the compiler drops the unused exp elsewhere.
  return divergence_grad<DIV, Math>(lp, lq, Math::exp(lp), Math::exp(lq), loss, dot, c);
}

// Row-level scalars of one call.
struct KdRowConfig {
  int divergence;
  float inv_temperature;
  float temperature;
  float softcap;          // <= 0: no softcap
  float soft_weight;      // (1 - hard_weight) * (T^2 if t2_scale else 1): scales the soft loss
  float soft_grad_scale;  // grad_scale * soft_weight / T: dL/dz = soft_grad_scale * dL_soft/da
  float hard_weight;      // weight of CE(student at T = 1, label) in the loss
  float hard_grad_weight; // grad_scale * hard_weight: its weight in the written gradient
  int64_t ignore_index;
  DivergenceCoefs coefs;
};

}  // namespace fastkd
