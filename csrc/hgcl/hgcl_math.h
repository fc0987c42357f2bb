// Per-element math of the hinged / plain global contrastive loss (SPEC §1),
// shared by the CPU kernel (hgcl_cpu.cpp) and any CUDA kernel.  fp32 math,
// log domain throughout: no torch headers here.
//
//   l(x)  = x                    (GCL)
//   l(x)  = max(x + m, 0)^2      (HGCL)
//   z_ij  = l(s_ij - p_i) / tau
//   log Phi_i = logsumexp_{j != i} z_ij - log(B - 1)
//   w_ij  = exp(z_ij - logden_i) / (B - 1)       (<= 1 / gamma, never overflows)
//   lbar_i = sum_j exp(z_ij - max) l_ij / sum_j exp(z_ij - max)
//            (softmax-weighted mean of l over the negatives, for the tau gradient:
//             sum_j w_ij l_ij = exp(log Phi_i - logden_i) * lbar_i)
#pragma once
#include <math.h>

#include "common/vlmkern_common.h"

namespace vlmkern::hgcl {

// The pairwise surrogate l(x).
VLMKERN_HD float surrogate(float x, bool hinge, float margin) {
  if (!hinge) return x;
  float h = x + margin;
  h = h > 0.f ? h : 0.f;
  return h * h;
}

// Its derivative l'(x).
VLMKERN_HD float surrogate_grad(float x, bool hinge, float margin) {
  if (!hinge) return 1.f;
  const float h = x + margin;
  return h > 0.f ? 2.f * h : 0.f;
}

// z = l(s - p) / tau.
VLMKERN_HD float logit(float s, float p, bool hinge, float margin, float inv_tau) {
  return surrogate(s - p, hinge, margin) * inv_tau;
}

// Online log-sum-exp accumulator: value = max + log(sum), sum of exp(z - max).
struct LogSumExp {
  float max;
  float sum;
};

VLMKERN_HD LogSumExp lse_empty() { return LogSumExp{-INFINITY, 0.f}; }

// Merge a partial (m, s) = (max, sum exp(z - max)) into a.  -inf maxima
// (empty partials) never produce exp(-inf - -inf) = NaN.
VLMKERN_HD void lse_merge(LogSumExp& a, float m, float s) {
  if (m == -INFINITY) return;
  if (m > a.max) {
    a.sum = (a.max == -INFINITY ? 0.f : a.sum * expf(a.max - m)) + s;
    a.max = m;
  } else {
    a.sum += s * expf(m - a.max);
  }
}

// Merge a partial (m, s, ws) into (a, aw), where aw / a.sum is the
// softmax-weighted mean of l (ws = sum exp(z - m) l): both sums are rescaled
// by the same factor when the running maximum moves.
VLMKERN_HD void lse_merge_weighted(LogSumExp& a, float& aw, float m, float s, float ws) {
  if (m == -INFINITY) return;
  if (m > a.max) {
    const float r = a.max == -INFINITY ? 0.f : expf(a.max - m);
    a.sum = a.sum * r + s;
    aw = aw * r + ws;
    a.max = m;
  } else {
    const float r = expf(m - a.max);
    a.sum += s * r;
    aw += ws * r;
  }
}

// lbar = aw / a.sum (0 for an empty accumulator: no negatives).
VLMKERN_HD float lse_weighted_mean(const LogSumExp& a, float aw) {
  return a.max == -INFINITY ? 0.f : aw / a.sum;
}

VLMKERN_HD float lse_value(const LogSumExp& a) {
  return a.max == -INFINITY ? -INFINITY : a.max + logf(a.sum);
}

// log(exp(a) + exp(b)) with -inf handled.
VLMKERN_HD float logaddexp(float a, float b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const float mx = a > b ? a : b;
  const float d = a > b ? b - a : a - b;
  return mx + log1pf(expf(d));
}

// log u_new from log u_old and log Phi:
//   log((1 - gamma) u + gamma Phi),  or log Phi on a first visit (u_old = -inf).
// log1m_gamma = log(1 - gamma) (-inf for gamma = 1), log_gamma = log(gamma).
VLMKERN_HD float state_update(float log_u_old, float log_phi, float log1m_gamma, float log_gamma) {
  if (log_u_old == -INFINITY || log1m_gamma == -INFINITY) return log_phi;
  return logaddexp(log_u_old + log1m_gamma, log_phi + log_gamma);
}

// Estimator weight times l'(x): w * l'(x) with w = exp(z - logden) / (B - 1).
VLMKERN_HD float dsim(float s, float p, float logden, bool hinge, float margin, float inv_tau,
                      float inv_nm1) {
  const float x = s - p;
  const float z = surrogate(x, hinge, margin) * inv_tau;
  return expf(z - logden) * inv_nm1 * surrogate_grad(x, hinge, margin);
}

}  // namespace vlmkern::hgcl
