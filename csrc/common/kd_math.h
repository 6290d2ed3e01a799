// Per-element math of the fused softmax-divergence losses, shared by the CPU and CUDA kernels.
//
// Notation (docs/math.md): a = cap(z_s)/T, b = cap(z_t)/T, q = softmax(a), p = softmax(b),
// lq = a - LSE(a), lp = b - LSE(b). Every divergence is evaluated in the same row schedule:
//   stats pass  : max and sum-of-exp of a and b (online), plus the loss of fkl/rkl;
//   terms pass  : (loss, dot) sums for divergences whose terms need normalized log-probs;
//   grad pass   : dL/da_i = q_i * G_i(loss, dot), written to the gradient buffer.
// `Math` supplies exp and log (a vectorizable polynomial on CPU, the hardware units on CUDA).
// The mixtures of jsd, skl and srkl (m = wp p + wq q) go through `mixture`, which the CPU
// kernel evaluates once per element in its terms pass, keeping what the grad pass needs.
#pragma once

#include "dtype.h"

namespace fastkd {

// The divergences, one X(enumerator, name, code) each: the only list of them in C++. The enum,
// the CPU and CUDA dispatch, the range check of the bindings and fastkd._C's divergence_codes()
// expand it, and CMakeLists.txt reads its entries as text to generate one CUDA translation unit
// per divergence (so write each as X(kEnumerator, name, code), one per line). Codes are what
// Python passes to the kernels (fastkd.DIVERGENCES, checked against these at import).
#define FASTKD_DIVERGENCES(X) \
  X(kFKL, fkl, 0)             \
  X(kRKL, rkl, 1)             \
  X(kJSD, jsd, 2)             \
  X(kTVD, tvd, 3)             \
  X(kSKL, skl, 4)             \
  X(kSRKL, srkl, 5)           \
  X(kHellinger, hellinger, 6)

#define FASTKD_DIVERGENCE_ENUMERATOR(id, name, code) id = code,
enum Divergence : int { FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_ENUMERATOR) };
#undef FASTKD_DIVERGENCE_ENUMERATOR

FASTKD_HD constexpr bool is_divergence_code(int code) {
#define FASTKD_DIVERGENCE_CODE_MATCHES(id, name, id_code) code == id_code ||
  return FASTKD_DIVERGENCES(FASTKD_DIVERGENCE_CODE_MATCHES) false;
#undef FASTKD_DIVERGENCE_CODE_MATCHES
}

// Divergences whose loss is known after the stats pass (no terms pass needed).
FASTKD_HD constexpr bool loss_in_stats_pass(int div) { return div == kFKL || div == kRKL; }

// Divergences built on the mixture m = wp p + wq q (see `mixture`); all others are evaluated
// per element by plain_terms and plain_grad.
FASTKD_HD constexpr bool is_mixture(int div) { return div == kJSD || div == kSKL || div == kSRKL; }

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
  const float series =
      x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const float t = (1.0f - e) / (1.0f + e);
  const float big = x < 0.0f ? -t : t;
  return cap * (ax < 0.125f ? series : big);
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

struct Terms {
  float loss;
  float dot;
};

// Squared Hellinger distance H^2 = 1 - S, S = sum_i sqrt(p_i q_i). Its terms are taken as
// (sqrt p_i - sqrt q_i)^2 / 2, which sum to the same (sum p = sum q = 1) without cancelling
// against 1: H^2 keeps its digits as q -> p and is exactly 0 at q = p. The square roots are
// exp(l / 2) of the log-probabilities (the kernels' exp, which vectorizes on CPU), 0 where the
// probability counts as 0. The dot is S.
template <class Math>
FASTKD_HD float sqrt_prob(float l) {
  return l > kLogMinProb ? Math::exp(0.5f * l) : 0.0f;
}
template <class Math>
FASTKD_HD Terms hellinger_terms(float lp, float lq) {
  const float rp = sqrt_prob<Math>(lp);
  const float rq = sqrt_prob<Math>(lq);
  const float d = rp - rq;
  return {0.5f * d * d, rp * rq};
}

// Terms-pass contribution of an element of a divergence that is not a mixture (fkl, rkl, tvd,
// hellinger), given its log-probabilities and probabilities (the LSEs are final; p = exp(lp),
// q = exp(lq), however the caller obtained them).
template <int DIV, class Math>
FASTKD_HD Terms plain_terms(float lp, float lq, float p, float q) {
  if (DIV == kFKL) return {xlogx_ratio(p, lp, lq), 0.0f};
  if (DIV == kRKL) return {xlogx_ratio(q, lq, lp), 0.0f};
  if (DIV == kHellinger) return hellinger_terms<Math>(lp, lq);
  return {0.5f * abs_f(q - p), q * sign_of_difference(lq, lp)};
}

// dL/da_i of an element of a divergence that is not a mixture (before 1/T, t2 and softcap
// factors), given the row's loss and dot:
//   fkl : q - p     rkl : q (lq - lp - L)     tvd : q (sign(q-p) - dot) / 2
//   hellinger : -(sqrt(p q) - q S) / 2 = q (S - sqrt(p / q)) / 2
// (hellinger from d sqrt(q_j) / da_i = sqrt(q_j) ([i == j] - q_i) / 2; sqrt(p / q) is
// exp((lp - lq) / 2) <= exp(-kLogMinProb / 2) where q counts, 0 where p counts as 0).
template <int DIV, class Math>
FASTKD_HD float plain_grad(float lp, float lq, float p, float q, float loss, float dot) {
  if (DIV == kFKL) return q - p;
  if (DIV == kHellinger) {
    const float sqrt_ratio = lp > kLogMinProb ? Math::exp(0.5f * (lp - lq)) : 0.0f;
    return lq > kLogMinProb ? q * (0.5f * (dot - sqrt_ratio)) : 0.0f;
  }
  const float g = DIV == kRKL ? lq - lp - loss : 0.5f * (sign_of_difference(lq, lp) - dot);
  return lq > kLogMinProb ? q * g : 0.0f;
}

// log(1 + t) for t in [0, 1], within 1.4 ulp also where t is small (forming 1 + t first would
// cost t its low bits, an absolute error of 2^-25 in the result): the Cephes logf polynomial in
// f = t, or in f = (1 + t) / 2 - 1 = (t - 1) / 2 plus ln 2 above sqrt(2) - 1. The polynomial is
// evaluated by Estrin's scheme (four dependent FMAs instead of Horner's eight): the CPU terms
// pass is bound by latency, and this took 6 % off its jsd at V = 32000.
FASTKD_HD float log1p_unit(float t) {
  const bool high = t > 0.41421356f;
  const float f = high ? 0.5f * (t - 1.0f) : t;
  const float e = high ? 1.0f : 0.0f;
  const float z = f * f;
  const float p01 = -2.4999993993e-1f * f + 3.3333331174e-1f;
  const float p23 = -1.6668057665e-1f * f + 2.0000714765e-1f;
  const float p45 = -1.2420140846e-1f * f + 1.4249322787e-1f;
  const float p67 = -1.1514610310e-1f * f + 1.1676998740e-1f;
  const float p4567 = (7.0376836292e-2f * z + p67) * z + p45;
  const float poly = (p23 * z + p01) + p4567 * (z * z);
  const float y = f * z * poly + e * -2.12194440e-4f - 0.5f * z;
  return f + y + e * 0.693359375f;
}

// The mixture m = wp p + wq q of jsd, skl and srkl at one element, in terms of
//   lam = log(wp p / (wq q)) = d + log wp - log wq,   d = lp - lq,
// whose sign says which weighted term leads, and tau = exp(-|lam|) in [0, 1], the lesser term
// over the greater. With l1 = log(1 + tau), lm = log(greater term) + l1: the only log of the
// element is l1 (m itself may underflow where both terms are tiny), and no exp of a difference
// of logs is needed once tau is known (the CPU kernel forms tau from its stored exponentials by
// one division, the GPU by one exp).
struct Mixture {
  float dq;       // lq - lm
  float dp;       // lp - lm
  float p_share;  // wp p / m
  float q_share;  // wq q / m
  float g;        // log(m / (wq q)) - wp p / m >= 0 (srkl's gradient term, see mixture_grad)
};

FASTKD_HD float mixture_log_ratio(float d, const DivergenceCoefs& c) {
  return d + (c.log_wp - c.log_wq);
}

// The mixture from d and tau as the caller formed it. tau is NaN where neither model has mass
// at the element (all its terms are then discarded) and may exceed 1 by rounding where lam is
// near 0: both read as 1, so that every field stays finite.
FASTKD_HD Mixture mixture(float d, float tau, const DivergenceCoefs& c) {
  const float lam = mixture_log_ratio(d, c);
  const bool p_leads = lam > 0.0f;
  const float t = tau < 1.0f ? tau : 1.0f;
  const float l1 = log1p_unit(t);
  const float lead_share = 1.0f / (1.0f + t);
  const float minor_share = t * lead_share;
  Mixture x;
  x.dq = (p_leads ? -(d + c.log_wp) : -c.log_wq) - l1;
  x.dp = (p_leads ? -c.log_wp : d - c.log_wq) - l1;
  x.p_share = p_leads ? lead_share : minor_share;
  x.q_share = p_leads ? minor_share : lead_share;
  // Where q's term leads, g = -log(1 - u) - u with u = minor_share in [0, 1/2]. As l1 - u it
  // would lose its digits as u -> 0 (srkl at alpha -> 1, where the gradient is this
  // second-order term), so below u = 1/8 it is the series sum_{k>=2} u^k / k to k = 9 (the rest
  // is below 2^-26 of the sum).
  const float u = minor_share;
  const float series =
      u * u *
      (0.5f + u * (1.0f / 3.0f +
                   u * (0.25f + u * (0.2f + u * (1.0f / 6.0f +
                                                 u * (1.0f / 7.0f + u * (0.125f + u / 9.0f)))))));
  x.g = p_leads ? lam + l1 - lead_share : (u < 0.125f ? series : l1 - u);
  return x;
}

// What the gradient of a mixture element needs besides q and the row's dot, which is the sum of
// q_i times it: jsd: lq - lm; skl: the share of the lighter-weighted model in m (skl's p/m - dot,
// written with the share that is small for most elements so that the difference keeps its
// digits); srkl: g.
template <int DIV>
FASTKD_HD float mixture_keep(const Mixture& x, const DivergenceCoefs& c) {
  if (DIV == kJSD) return x.dq;
  if (DIV == kSKL) return c.wp < c.wq ? x.p_share : x.q_share;
  return x.g;
}

// Terms-pass contribution (loss, q keep) of a mixture element.
template <int DIV>
FASTKD_HD Terms mixture_terms(float lp, float lq, float p, float q, const Mixture& x,
                              const DivergenceCoefs& c) {
  const bool has_p = lp > kLogMinProb;
  const bool has_q = lq > kLogMinProb;
  const float dot = has_q ? q * mixture_keep<DIV>(x, c) : 0.0f;
  if (DIV == kJSD) return {c.wp * (has_p ? p * x.dp : 0.0f) + c.wq * dot, dot};
  if (DIV == kSKL) return {has_p ? p * x.dp : 0.0f, dot};
  return {has_q ? q * x.dq : 0.0f, dot};
}

// dL/da_i of a mixture element, k q (keep - dot):
//   jsd : wq q (lq - lm - dot)
//   skl : -wq q (p/m - sum q p/m) = -(wq/wp) q (p_share - dot) = (wq/wp) q (q_share - dot)
//   srkl: q ((lq - lm) - L - wq (q/m - sum q q/m)) = q (dot - g)
// The last forms use sum q = 1 to cancel, exactly, what the elements have in common (skl's
// p_share -> 1 as wp -> 1; srkl's first-order terms in wp as wp -> 0), leaving the small
// differences the gradient is made of: formed from the first forms, they lost up to all their
// digits (srkl at alpha = 0.999 had up to 13x torch's own float32 error).
template <int DIV>
FASTKD_HD float mixture_grad(float lq, float q, float keep, float dot, const DivergenceCoefs& c) {
  float k = -1.0f;
  if (DIV == kJSD) k = c.wq;
  if (DIV == kSKL) k = c.wp < c.wq ? -c.wq / c.wp : c.wq / c.wp;
  return lq > kLogMinProb ? k * q * (keep - dot) : 0.0f;
}

// The mixture of an element from its log-probabilities alone (tau by one exp).
template <class Math>
FASTKD_HD Mixture mixture_from_logs(float lp, float lq, const DivergenceCoefs& c) {
  const float d = lp - lq;
  return mixture(d, Math::exp(-abs_f(mixture_log_ratio(d, c))), c);
}

// Terms-pass contribution of element i from its log-probabilities (the LSEs are final).
template <int DIV, class Math>
FASTKD_HD Terms divergence_terms(float lp, float lq, const DivergenceCoefs& c) {
  const float p = Math::exp(lp);
  const float q = Math::exp(lq);
  if (!is_mixture(DIV)) return plain_terms<DIV, Math>(lp, lq, p, q);
  return mixture_terms<DIV>(lp, lq, p, q, mixture_from_logs<Math>(lp, lq, c), c);
}

// dL/da_i of element i (before 1/T, t2 and softcap factors), given the row's loss and dot.
template <int DIV, class Math>
FASTKD_HD float divergence_grad(float lp, float lq, float loss, float dot,
                                const DivergenceCoefs& c) {
  // p only enters fkl's gradient; the compiler drops the unused exp elsewhere.
  const float q = Math::exp(lq);
  if (!is_mixture(DIV)) return plain_grad<DIV, Math>(lp, lq, Math::exp(lp), q, loss, dot);
  const float keep = mixture_keep<DIV>(mixture_from_logs<Math>(lp, lq, c), c);
  return mixture_grad<DIV>(lq, q, keep, dot, c);
}

// Row-level scalars of one call.
struct KdRowConfig {
  int divergence;
  float inv_temperature;
  float temperature;
  float softcap;           // <= 0: no softcap
  float soft_weight;       // (1 - hard_weight) * (T^2 if t2_scale else 1): scales the soft loss
  float soft_grad_scale;   // grad_scale * soft_weight / T: dL/dz = soft_grad_scale * dL_soft/da
  float hard_weight;       // weight of CE(student at T = 1, label) in the loss
  float hard_grad_weight;  // grad_scale * hard_weight: its weight in the written gradient
  int64_t ignore_index;
  DivergenceCoefs coefs;
};

}  // namespace fastkd
