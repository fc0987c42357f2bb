// Per-element math of the diagonal Kalman step (SPEC §3), shared by the CPU
// loop (kalman_cpu.cpp) and the CUDA kernel (kalman_cuda.cu).  fp32 math.
#pragma once
#include <cmath>

#include "common/vlmkern_common.h"

namespace vlmkern::kalman {

// Pass 1 term: h^2 * (p + q).  A variance that is negative or NaN makes the
// term NaN (and so S, and the step is skipped, see step_scalars): a corrupt
// covariance is never used.  One select per element: free in this
// bandwidth-bound loop.
VLMKERN_HD float pass1_term(float h, float p, float q) {
  const float ph = p + q;
  return p >= 0.f ? h * h * ph : NAN;
}

// |x| <= FLT_MAX: false for inf and NaN (no isfinite: same code on host,
// device and the emulator).
VLMKERN_HD bool finite_f(float x) { return fabsf(x) <= 3.40282347e+38f; }

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

// The scalars of pass 2 from the pass-1 sum `s_raw` = sum h_raw^2 (p + q),
// where h_raw = grad_scale * h (GradScaler's scaled gradients; grad_scale = 1
// without AMP), so that the kernels never unscale an element:
//   S     = s_raw / grad_scale^2 + R
//   gain  = gate(e, S) / S / grad_scale      (theta += gain * p_hat * h_raw)
//   inv_s = 1 / S / grad_scale^2             (p -= (p_hat h_raw)^2 * inv_s)
// With grad_scale a power of two this is bit for bit the step on the unscaled
// gradients (scaling by 2^k is exact).  Returns false -- the step must be
// skipped, nothing written -- unless found_inf == 0, grad_scale is finite and
// > 0, e is finite, R is finite and > 0, and S is finite and > 0 (a NaN/inf
// gradient, a NaN/inf/negative variance or an overflowing sum all make S
// non-finite).  The rule of SPEC §3 "Bad input", on every backend.
VLMKERN_HD bool step_scalars(double s_raw, float R, float e, float grad_scale, float found_inf,
                             float chi2, float q, float inv_lambda, float floor, Pass2Scalars& c,
                             float& S) {
  const float inv = 1.0f / grad_scale;
  const double inv_d = static_cast<double>(inv);
  S = static_cast<float>(s_raw * inv_d * inv_d) + R;
  const bool ok = found_inf == 0.f && finite_f(grad_scale) && grad_scale > 0.f && finite_f(inv) &&
                  finite_f(e) && finite_f(R) && R > 0.f && finite_f(S) && S > 0.f;
  const float eg = gate_innovation(e, S, chi2);
  c.gain = eg / S * inv;
  c.inv_s = 1.0f / S * inv * inv;
  c.q = q;
  c.inv_lambda = inv_lambda;
  c.floor = floor;
  return ok;
}

VLMKERN_HD void pass2(float& theta, float& p, float h, const Pass2Scalars& c) {
  const float ph = p + c.q;
  const float k = ph * h;
  theta = theta + c.gain * k;
  float pn = (ph - k * k * c.inv_s) * c.inv_lambda;
  // `!(pn >= floor)` also catches NaN: the variance never leaves [floor, inf).
  p = (pn >= c.floor) ? pn : c.floor;
}

}  // namespace vlmkern::kalman
