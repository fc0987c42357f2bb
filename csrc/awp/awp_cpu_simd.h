// SIMD vocabulary of the AWP CPU kernels (awp_cpu_kernels.inc): one struct per
// instruction set with the same static members, so that the kernels are
// written once and compiled for each:
//   VScalar  W = 1   baseline x86-64 / any CPU (plain C++)
//   VAvx2    W = 8   AVX2 + F16C          (x86-64, GCC only)
//   VAvx512  W = 16  AVX-512F + AVX2 + F16C (x86-64, GCC only)
// The AVX structs are compiled under `#pragma GCC target`, so the library keeps
// baseline x86-64 flags and picks the instruction set at run time
// (awp_cpu.cpp).  None of them enables FMA contraction (awp_cpu.cpp is built
// with -ffp-contract=off): every lane computes exactly what the scalar code
// computes, bit for bit.
//
// Members (F: W floats, I: W uint32 lanes, Raw<T>: W elements of T as bits):
//   setf, seti, add, mul, div, sqrt, iadd, isub, ixor, iand, ior,
//   andnot(m, x) = ~m & x, srl<N>, sll<N>, mullo (low 32 bits), i2f (int32 -> float,
//   exact below 2^24 here), fbits / ffrom (bit casts), iota2 = (0, 2, 4, ...),
//   load_raw<T> / store_raw<T> / stream_raw<T> (non-temporal; needs
//   kRawBytes<T> alignment), to_f<T> (exact), from_f<T> (round to nearest even;
//   bf16: NaN -> 0x7FC0 like c10::BFloat16), lanes (store W floats).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define VLMKERN_AWP_SIMD 1
#else
#define VLMKERN_AWP_SIMD 0
#endif

namespace vlmkern::awp::simd {

template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;

struct VScalar {
  static constexpr int W = 1;
  using F = float;
  using I = uint32_t;
  template <typename T>
  using Raw = Bits<T>;
  template <typename T>
  static constexpr int kRawBytes = sizeof(T);

  static F setf(float x) { return x; }
  static I seti(uint32_t x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
  static I iadd(I a, I b) { return a + b; }
  static I isub(I a, I b) { return a - b; }
  static I ixor(I a, I b) { return a ^ b; }
  static I iand(I a, I b) { return a & b; }
  static I ior(I a, I b) { return a | b; }
  static I andnot(I m, I x) { return ~m & x; }
  template <int N>
  static I srl(I a) { return a >> N; }
  template <int N>
  static I sll(I a) { return a << N; }
  static I mullo(I a, I b) { return a * b; }
  static F i2f(I a) { return static_cast<float>(static_cast<int32_t>(a)); }
  static I fbits(F x) {
    I u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
  }
  static F ffrom(I u) {
    F x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
  static I iota2() { return 0u; }
  template <typename T>
  static Raw<T> load_raw(const T* p) {
    Raw<T> r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  template <typename T>
  static void store_raw(T* p, Raw<T> r) { std::memcpy(p, &r, sizeof(r)); }
  template <typename T>
  static void stream_raw(T* p, Raw<T> r) { std::memcpy(p, &r, sizeof(r)); }
  template <typename T>
  static F to_f(Raw<T> r) {
    T x;
    std::memcpy(&x, &r, sizeof(x));
    return static_cast<float>(x);
  }
  template <typename T>
  static Raw<T> from_f(F x) {
    const T y = static_cast<T>(x);  // c10: round to nearest even
    Raw<T> r;
    std::memcpy(&r, &y, sizeof(r));
    return r;
  }
  static void lanes(float* out, F x) { out[0] = x; }
};

#if VLMKERN_AWP_SIMD

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

struct VAvx2 {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  template <size_t S>
  struct RawOf {
    using type = __m128i;  // 8 x 16 bits
  };
  template <typename T>
  using Raw = typename RawOf<sizeof(T)>::type;
  template <typename T>
  static constexpr int kRawBytes = 8 * sizeof(T);

  static F setf(float x) { return _mm256_set1_ps(x); }
  static I seti(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  static I andnot(I m, I x) { return _mm256_andnot_si256(m, x); }
  template <int N>
  static I srl(I a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static I sll(I a) { return _mm256_slli_epi32(a, N); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static F i2f(I a) { return _mm256_cvtepi32_ps(a); }
  static I fbits(F x) { return _mm256_castps_si256(x); }
  static F ffrom(I u) { return _mm256_castsi256_ps(u); }
  static I iota2() { return _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14); }

  template <typename T>
  static Raw<T> load_raw(const T* p) {
    if constexpr (sizeof(T) == 4) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else {
      return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
  }
  template <typename T>
  static void store_raw(T* p, Raw<T> r) {
    if constexpr (sizeof(T) == 4) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
    }
  }
  template <typename T>
  static void stream_raw(T* p, Raw<T> r) {
    if constexpr (sizeof(T) == 4) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
    } else {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), r);
    }
  }
  template <typename T>
  static F to_f(Raw<T> r) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_castsi256_ps(r);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      return _mm256_cvtph_ps(r);
    }
  }
  template <typename T>
  static Raw<T> from_f(F x) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_castps_si256(x);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i u = _mm256_castps_si256(x);
      const __m256i bias =
          _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                           _mm256_set1_epi32(0x7FFF));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
      return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    }
  }
  static void lanes(float* out, F x) { _mm256_storeu_ps(out, x); }
};
template <>
struct VAvx2::RawOf<4> {
  using type = __m256i;  // 8 x 32 bits
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,f16c")

struct VAvx512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  template <size_t S>
  struct RawOf {
    using type = __m256i;  // 16 x 16 bits
  };
  template <typename T>
  using Raw = typename RawOf<sizeof(T)>::type;
  template <typename T>
  static constexpr int kRawBytes = 16 * sizeof(T);

  static F setf(float x) { return _mm512_set1_ps(x); }
  static I seti(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  static I andnot(I m, I x) { return _mm512_andnot_si512(m, x); }
  template <int N>
  static I srl(I a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static I sll(I a) { return _mm512_slli_epi32(a, N); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static F i2f(I a) { return _mm512_cvtepi32_ps(a); }
  static I fbits(F x) { return _mm512_castps_si512(x); }
  static F ffrom(I u) { return _mm512_castsi512_ps(u); }
  static I iota2() {
    return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  }

  template <typename T>
  static Raw<T> load_raw(const T* p) {
    if constexpr (sizeof(T) == 4) {
      return _mm512_loadu_si512(p);
    } else {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    }
  }
  template <typename T>
  static void store_raw(T* p, Raw<T> r) {
    if constexpr (sizeof(T) == 4) {
      _mm512_storeu_si512(p, r);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
    }
  }
  template <typename T>
  static void stream_raw(T* p, Raw<T> r) {
    if constexpr (sizeof(T) == 4) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), r);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), r);
    }
  }
  template <typename T>
  static F to_f(Raw<T> r) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_castsi512_ps(r);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      return _mm512_cvtph_ps(r);
    }
  }
  template <typename T>
  static Raw<T> from_f(F x) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_castps_si512(x);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i u = _mm512_castps_si512(x);
      const __m512i bias =
          _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                           _mm512_set1_epi32(0x7FFF));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
      return _mm512_cvtepi32_epi16(r);
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    }
  }
  static void lanes(float* out, F x) { _mm512_storeu_ps(out, x); }
};
template <>
struct VAvx512::RawOf<4> {
  using type = __m512i;  // 16 x 32 bits
};

#pragma GCC pop_options

#endif  // VLMKERN_AWP_SIMD

}  // namespace vlmkern::awp::simd
