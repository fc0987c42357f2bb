// Per-element math of the diagonal Kalman step (SPEC §3), shared by the CPU
// loop (kalman_cpu.cpp) and the CUDA kernel (kalman_cuda.cu).  fp32 math.
#pragma once
#include <cmath>

#include "common/vlmkern_common.h"

namespace vlmkern::kalman {

// Pass 1 term: h^2 * (p + q).
VLMKERN_HD float pass1_term(float h, float p, float q) {
  const float ph = p + q;
  return h * h * ph;
}

// Mahalanobis gate (SPEC §3), "clamp" form: the innovation used by the update
// is clamped to [-sqrt(chi2 S), sqrt(chi2 S)], so the normalised innovation
// e^2 / S never exceeds chi2 (a Huber-type robust filter).  chi2 <= 0 means
// "no gate".  Written with comparisons so that a NaN innovation stays NaN
// (fminf/fmaxf would silently replace it by the bound).
VLMKERN_HD float gate_innovation(float e, float S, float chi2) {
  if (!(chi2 > 0.f)) return e;
  const float bound = sqrtf(chi2 * S);
  return e > bound ? bound : (e < -bound ? -bound : e);
}

// Pass 2: theta += gain * p_hat * h;  p = max((p_hat - (p_hat h)^2 / S) / lambda, floor)
// with gain = e / S, inv_s = 1 / S, inv_lambda = 1 / lambda.
struct Pass2Scalars {
  float gain;
  float inv_s;
  float q;
  float inv_lambda;
  float floor;
};

VLMKERN_HD void pass2(float& theta, float& p, float h, const Pass2Scalars& c) {
  const float ph = p + c.q;
  const float k = ph * h;
  theta = theta + c.gain * k;
  float pn = (ph - k * k * c.inv_s) * c.inv_lambda;
  // `!(pn >= floor)` also catches NaN: the variance never leaves [floor, inf).
  p = (pn >= c.floor) ? pn : c.floor;
}

}  // namespace vlmkern::kalman
