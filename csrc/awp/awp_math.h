// Per-element math of the layerwise-normalised weight perturbation (SPEC §4),
// shared by the CPU kernels (awp_cpu.cpp) and the CUDA kernels (awp_cuda.cu).
// No torch header here: nvcc compiles this without the torch include tree.
//
//   v_l = sign * gamma * ||w_l|| * d_l / (||d_l|| + eps)
//   d_l = g_l (adversarial) or r_l ~ N(0, I) (random, counter-based, never stored)
//
// The counter-based generator is defined by vlmkern.reference.awp_random_direction:
//   key_t = mix(s32 ^ mix(t * 0x9E3779B9 + 1)),  s32 = lo32(seed) ^ hi32(seed)
//   a = mix(2k ^ key_t), c = mix((2k+1) ^ key_t)           (k: flat element index, mod 2^32)
//   u1 = ((a >> 8) + 1) / 2^24  in (0, 1],  u2 = (c >> 8) / 2^24  in [0, 1)
//   r = sqrt(-2 ln u1) cos(2 pi u2)                         (Box-Muller, fp32 here)
// with mix = lowbias32.  u1 and u2 are exact in fp32; r agrees with the float64
// reference to a few fp32 ulps (logf / cosf), not bit for bit.
#pragma once
#include <cmath>
#include <cstdint>

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

// Standard-normal sample for element k of the tensor with key `key`.
VLMKERN_HD float gaussian(uint32_t key, uint64_t k) {
  const uint32_t k2 = static_cast<uint32_t>(k) * 2u;  // (2k) mod 2^32, as the reference
  const uint32_t a = mix32(k2 ^ key);
  const uint32_t c = mix32((k2 + 1u) ^ key);
  const float u1 = static_cast<float>((a >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = static_cast<float>(c >> 8) * 5.9604644775390625e-08f;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}

// Per-tensor multiplier of the direction: sign * gamma * ||w|| / (||d|| + eps),
// from the fp32 norms, computed in double and rounded once (identical on every
// backend given the same norms).  gamma_signed = sign * gamma.
VLMKERN_HD float scale(float norm_w, float norm_d, double gamma_signed, double eps) {
  return static_cast<float>(gamma_signed * static_cast<double>(norm_w) /
                            (static_cast<double>(norm_d) + eps));
}

// w + scale * d in fp32: one rounding for the product, one for the sum.  The
// CUDA side forbids FMA contraction explicitly; the CPU build targets baseline
// x86-64 flags (no FMA instructions), where the compiler cannot contract this
// expression, so both backends and the torch fallback round identically; on
// aarch64 or -march=native builds the CPU may fuse it (last-bit differences).
// Tests compare across backends with one-ulp tolerances either way.
VLMKERN_HD float perturbed(float w, float s, float d) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(w, __fmul_rn(s, d));
#else
  return w + s * d;
#endif
}

}  // namespace vlmkern::awp
