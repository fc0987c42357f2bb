// Per-element math of the layerwise-normalised weight perturbation (SPEC §4),
// shared by the CPU kernels (awp_cpu.cpp) and the CUDA
// kernels (awp_cuda.cu).  No torch header here: nvcc compiles this without the
// torch include tree.
//
//   v_l = sign * gamma * ||w_l|| * d_l / (||d_l|| + eps)
//   d_l = g_l (adversarial) or r_l ~ N(0, I) (random, counter-based, never stored)
//
// The counter-based generator is defined by vlmkern.reference.awp_random_direction:
//   key_t = mix(s32 ^ mix(t * 0x9E3779B9 + 1)),  s32 = lo32(seed) ^ hi32(seed)
//   a = mix(2k ^ key_t), c = mix((2k+1) ^ key_t)           (k: flat element index, mod 2^32)
//   u1 = ((a >> 8) + 1) / 2^24  in (0, 1],  u2 = (c >> 8) / 2^24  in [0, 1)
//   r = sqrt(-2 ln u1) cos(2 pi u2)                         (Box-Muller)
// with mix = lowbias32.  u1 and u2 are exact in fp32.  ln and cos are NOT the C
// library's: gaussian() below evaluates them with a fixed sequence of IEEE fp32
// operations (+ - * / sqrt, each rounded once, never fused; integer bit
// manipulation for the exponent and the quadrant), so every implementation of
// that sequence gives the same bits: the CPU kernels (this function, in loops
// the compiler vectorizes for baseline x86-64, AVX2 and AVX-512: the same
// sequence lane-wise), the CUDA kernels and the PyTorch fallback (vlmkern/ops/awp.py,
// _gaussian, the same sequence as fp32 tensor ops).  Accuracy against the
// float64 definition (all 2^24 values of each input checked):
//   ln u1        : <= 1.7 ulp   (exponent + 2 atanh(s) series, s = (m-1)/(m+1))
//   cos(2 pi u2) : <= 1.9 ulp   (quadrant from the integer (c >> 8), exact
//                                reduction, Taylor cos / sin on [-pi/4, pi/4])
//   r            : <= 6e-7 absolute, <= 3e-7 relative for |r| > 1e-3.
// (libm logf / cosf of fl(2 pi u2), used before, was off by up to 1.7e-6
// absolute: the rounding of 2 pi u2 in fp32.)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/vlmkern_common.h"

namespace vlmkern::awp {

constexpr int kModeAdversarial = 0;
constexpr int kModeRandom = 1;

// lowbias32 (Chris Wellons' hash prospector): a bijection on uint32.
VLMKERN_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-tensor key from the 64-bit seed and the tensor's position in the list.
VLMKERN_HD uint32_t tensor_key(uint64_t seed, uint32_t tensor_index) {
  const uint32_t s32 = static_cast<uint32_t>(seed ^ (seed >> 32));
  return mix32(s32 ^ mix32(tensor_index * 0x9E3779B9u + 1u));
}

// fp32 operations rounded once each (no contraction into FMA: the CPU file is
// compiled with -ffp-contract=off, CUDA uses the _rn intrinsics, which nvcc
// never fuses).
VLMKERN_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
VLMKERN_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
VLMKERN_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
VLMKERN_HD float f_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
VLMKERN_HD uint32_t f_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}
VLMKERN_HD float f_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Constants of gaussian(): fp32 values (correctly rounded from the exact
// rationals), written in hex so that every backend uses the same bits.
namespace gconst {
// ln(m) = 2 s (1 + t/3 + t^2/5 + t^3/7 + t^4/9), t = s^2 <= 0.0295
constexpr float kL3 = 0x1.555556p-2f, kL5 = 0x1.99999ap-3f, kL7 = 0x1.24924ap-3f,
                kL9 = 0x1.c71c72p-4f;
constexpr float kLn2Hi = 0x1.62e4p-1f;     // 17 bits: e * kLn2Hi is exact for |e| <= 64
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;  // ln 2 - kLn2Hi
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;  // fp32 sqrt(2)
// cos x = 1 + z (-1/2 + z (1/24 + z (-1/720 + z (1/8! - z / 10!)))), z = x^2 <= 0.617
constexpr float kC2 = -0x1p-1f, kC4 = 0x1.555556p-5f, kC6 = -0x1.6c16c2p-10f,
                kC8 = 0x1.a01a02p-16f, kC10 = -0x1.27e4fcp-22f;
// sin x = x + x z (-1/6 + z (1/120 + z (-1/5040 + z / 9!)))
constexpr float kS3 = -0x1.555556p-3f, kS5 = 0x1.111112p-7f, kS7 = -0x1.a01a02p-13f,
                kS9 = 0x1.71de3ap-19f;
constexpr float kTwoPiOver2p24 = 0x1.921fb6p-22f;  // fp32(2 pi) * 2^-24
}  // namespace gconst

// ln(ja * 2^-24) for ja in [1, 2^24].
VLMKERN_HD float gauss_log(uint32_t ja) {
  using namespace gconst;
  const uint32_t b = f_bits(static_cast<float>(static_cast<int32_t>(ja)));  // exact
  uint32_t mb = (b & 0x7FFFFFu) | 0x3F800000u;                  // mantissa m in [1, 2)
  const uint32_t adj = (kSqrt2Bits - mb) >> 31;                 // 1 iff m > sqrt(2)
  mb -= adj << 23;                                              // m in (sqrt(1/2), sqrt(2)]
  const int32_t e = static_cast<int32_t>((b >> 23) + adj) - 151;  // 127 bias + 24
  const float m = f_from_bits(mb);
  const float f = f_add(m, -1.0f);  // exact
  const float s = f_div(f, f_add(m, 1.0f));
  const float s2 = f_add(s, s);
  const float t = f_mul(s, s);
  float q = f_add(f_mul(kL9, t), kL7);
  q = f_add(f_mul(q, t), kL5);
  q = f_add(f_mul(q, t), kL3);
  const float lnm = f_add(s2, f_mul(s2, f_mul(t, q)));
  const float ef = static_cast<float>(e);
  return f_add(f_mul(ef, kLn2Hi), f_add(lnm, f_mul(ef, kLn2Lo)));
}

// cos(2 pi jc 2^-24) for jc in [0, 2^24).
VLMKERN_HD float gauss_cos(uint32_t jc) {
  using namespace gconst;
  const uint32_t q = (jc + 0x200000u) >> 22;  // nearest quarter turn, 0..4
  const int32_t ri = static_cast<int32_t>(jc - (q << 22));  // [-2^21, 2^21): exact remainder
  const float x = f_mul(static_cast<float>(ri), kTwoPiOver2p24);  // [-pi/4, pi/4)
  const float z = f_mul(x, x);
  float pc = f_add(f_mul(kC10, z), kC8);
  pc = f_add(f_mul(pc, z), kC6);
  pc = f_add(f_mul(pc, z), kC4);
  pc = f_add(f_mul(pc, z), kC2);
  const float c = f_add(1.0f, f_mul(z, pc));
  float ps = f_add(f_mul(kS9, z), kS7);
  ps = f_add(f_mul(ps, z), kS5);
  ps = f_add(f_mul(ps, z), kS3);
  const float s = f_add(x, f_mul(x, f_mul(z, ps)));
  // cos(q pi/2 + x) = cos x, -sin x, -cos x, sin x, cos x for q = 0..4
  const uint32_t odd = 0u - (q & 1u);
  const uint32_t v = (f_bits(s) & odd) | (f_bits(c) & ~odd);
  return f_from_bits(v ^ (((q + 1u) & 2u) << 30));
}

// Standard-normal sample for element k of the tensor with key `key`.
VLMKERN_HD float gaussian(uint32_t key, uint64_t k) {
  const uint32_t k2 = static_cast<uint32_t>(k) * 2u;  // (2k) mod 2^32, as the reference
  const uint32_t a = mix32(k2 ^ key);
  const uint32_t c = mix32((k2 + 1u) ^ key);
  const float ln_u1 = gauss_log((a >> 8) + 1u);
  return f_mul(f_sqrt(f_mul(ln_u1, -2.0f)), gauss_cos(c >> 8));
}

// Per-tensor multiplier of the direction: sign * gamma * ||w|| / (||d|| + eps),
// from the fp32 norms, computed in double and rounded once (identical on every
// backend given the same norms).  gamma_signed = sign * gamma.
VLMKERN_HD float scale(float norm_w, float norm_d, double gamma_signed, double eps) {
  return static_cast<float>(gamma_signed * static_cast<double>(norm_w) /
                            (static_cast<double>(norm_d) + eps));
}

// |x| <= FLT_MAX: false for inf and NaN.  The skip rule of awp_perturb_ (SPEC
// §4 "Bad input"): when any returned norm fails this, or found_inf is set,
// the whole perturbation is skipped (backup <- w, w unchanged).
VLMKERN_HD bool finite_norm(float x) { return fabsf(x) <= 3.40282347e+38f; }

// w + scale * d in fp32: one rounding for the product, one for the sum, never
// fused (CUDA: _rn intrinsics; CPU: awp_cpu.cpp is compiled with
// -ffp-contract=off, so none of its baseline / AVX2 / AVX-512 versions, whose
// targets may have FMA instructions, contracts it), so the backends
// and the torch fallback round identically.
VLMKERN_HD float perturbed(float w, float s, float d) { return f_add(w, f_mul(s, d)); }

}  // namespace vlmkern::awp
