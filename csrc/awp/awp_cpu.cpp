// CPU kernels of awp_perturb_ / awp_restore_ (SPEC §4).
//
// Every tensor is cut into blocks of kBlock elements; the blocks of the whole
// list form one work list, so each pass is a single at::parallel_for whatever
// the number of tensors (the CPU analogue of multi-tensor apply).
//   norm pass    : per-block sums of w^2 and d^2 (fp32 lanes, flushed to double
//                  every kFlush elements), then a fixed-order double reduction
//                  per tensor -> deterministic, independent of the thread count;
//   perturb pass : backup <- w (bit copy), w <- round(w + scale * d);
//   restore pass : w <- backup (bit copy).
// Random mode regenerates the Gaussian direction in both passes; nothing is
// stored.  Non-contiguous tensors go through contiguous copies written back.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLMKERN_AWP_F16C 1
#endif

#include "awp/awp_host.h"
#include "awp/awp_math.h"

namespace vlmkern::awp {
namespace {

constexpr int64_t kBlock = 1 << 15;  // elements per work item
constexpr int kLanes = 16;           // independent fp32 accumulators (vectorisable)
constexpr int64_t kFlush = 1024;     // elements per lane sum before flushing to double

struct Item {
  int32_t tensor;
  int64_t begin, end;
};

std::vector<Item> make_items(const std::vector<at::Tensor>& w) {
  std::vector<Item> items;
  for (size_t t = 0; t < w.size(); ++t) {
    const int64_t n = w[t].numel();
    for (int64_t b = 0; b < n; b += kBlock) {
      items.push_back({static_cast<int32_t>(t), b, std::min(n, b + kBlock)});
    }
  }
  return items;
}

// Sum of squares of x[0..n) as float, n <= kFlush (16 fp32 lanes).
template <typename T>
inline float sumsq_f(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[i + l]);
      acc[l] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[0] += v * v;
  }
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
double sumsq(const T* x, int64_t n) {
  double s = 0.0;
  for (int64_t b = 0; b < n; b += kFlush) s += sumsq_f(x + b, std::min(kFlush, n - b));
  return s;
}

double sumsq_random(uint32_t key, int64_t begin, int64_t end) {
  double s = 0.0;
  for (int64_t b = begin; b < end; b += kFlush) {
    const int64_t e = std::min(end, b + kFlush);
    float f = 0.f;
    for (int64_t k = b; k < e; ++k) {
      const float r = gaussian(key, static_cast<uint64_t>(k));
      f += r * r;
    }
    s += f;
  }
  return s;
}

#if defined(VLMKERN_AWP_F16C)
bool cpu_has_f16c();
void perturb_half_f16c(c10::Half* w, const c10::Half* g, int64_t begin, int64_t end, float s);
#endif

template <typename T>
void perturb_block(T* w, const T* g, T* backup, int64_t begin, int64_t end, float s,
                   bool random, uint32_t key) {
  std::memcpy(backup + begin, w + begin, sizeof(T) * (end - begin));
#if defined(VLMKERN_AWP_F16C)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (!random && cpu_has_f16c()) {
      perturb_half_f16c(w, g, begin, end, s);
      return;
    }
  }
#endif
  if (random) {
    for (int64_t k = begin; k < end; ++k) {
      const float d = gaussian(key, static_cast<uint64_t>(k));
      w[k] = static_cast<T>(perturbed(static_cast<float>(w[k]), s, d));
    }
  } else {
    for (int64_t k = begin; k < end; ++k) {
      w[k] = static_cast<T>(perturbed(static_cast<float>(w[k]), s, static_cast<float>(g[k])));
    }
  }
}

// float16 on x86-64: the build targets baseline x86-64, where c10::Half
// converts in software (~6 ns per element: compute-bound).  These F16C paths
// are chosen at run time when the CPU has F16C; same math, same rounding (RNE
// conversions; fp32 multiply then add, never fused) -> identical bits.
#if defined(VLMKERN_AWP_F16C)
bool cpu_has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}

__attribute__((target("avx,f16c"))) double sumsq_half_f16c(const c10::Half* xh, int64_t n) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xh);
  double s = 0.0;
  for (int64_t b = 0; b < n; b += kFlush) {
    const int64_t e = std::min(n, b + kFlush);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
      const __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i + 8)));
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
    float f = 0.f;
    for (int l = 0; l < 8; ++l) f += lanes[l];
    for (; i < e; ++i) {
      const float v = _cvtsh_ss(x[i]);
      f += v * v;
    }
    s += f;
  }
  return s;
}

__attribute__((target("avx,f16c"))) void perturb_half_f16c(c10::Half* wh, const c10::Half* gh,
                                                            int64_t begin, int64_t end, float s) {
  uint16_t* w = reinterpret_cast<uint16_t*>(wh);
  const uint16_t* g = reinterpret_cast<const uint16_t*>(gh);
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 wf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256 gf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i)));
    const __m256 r = _mm256_add_ps(wf, _mm256_mul_ps(sv, gf));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w + i), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < end; ++i) {
    const float p = s * _cvtsh_ss(g[i]);
    w[i] = _cvtss_sh(_cvtsh_ss(w[i]) + p, _MM_FROUND_TO_NEAREST_INT);
  }
}
#endif

template <typename T>
double sumsq_dispatch(const T* x, int64_t n) {
#if defined(VLMKERN_AWP_F16C)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (cpu_has_f16c()) return sumsq_half_f16c(x, n);
  }
#endif
  return sumsq(x, n);
}

#define VLMKERN_AWP_FLOAT_SWITCH(dtype, T, ...)                            \
  switch (dtype) {                                                         \
    case c10::kFloat: { using T = float; __VA_ARGS__; break; }            \
    case c10::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; } \
    case c10::kHalf: { using T = c10::Half; __VA_ARGS__; break; }         \
    default: TORCH_CHECK(false, "vlmkern.awp: unsupported dtype ", dtype); \
  }

at::Tensor awp_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backup,
                           double gamma, double eps, double sign, int64_t mode, int64_t seed) {
  check_perturb_args(params, grads, backup, gamma, eps, sign, mode);
  const bool random = mode == kModeRandom;
  const size_t n = params.size();
  std::vector<at::Tensor> w(n), g(random ? 0 : n), bk(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].contiguous();
    if (!random) g[i] = grads[i].contiguous();
    bk[i] = backup[i].is_contiguous() ? backup[i] : at::empty(w[i].sizes(), w[i].options());
  }
  const uint64_t useed = static_cast<uint64_t>(seed);
  std::vector<uint32_t> keys(n, 0u);
  if (random) {
    for (size_t i = 0; i < n; ++i) keys[i] = tensor_key(useed, static_cast<uint32_t>(i));
  }
  const std::vector<Item> items = make_items(w);
  const int64_t ni = static_cast<int64_t>(items.size());

  // ---- norm pass -----------------------------------------------------------
  std::vector<double> part(2 * items.size(), 0.0);
  at::parallel_for(0, ni, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Item& it = items[j];
      const int64_t len = it.end - it.begin;
      VLMKERN_AWP_FLOAT_SWITCH(w[it.tensor].scalar_type(), T, {
        part[2 * j] = sumsq_dispatch(w[it.tensor].const_data_ptr<T>() + it.begin, len);
        part[2 * j + 1] = random ? sumsq_random(keys[it.tensor], it.begin, it.end)
                                 : sumsq_dispatch(g[it.tensor].const_data_ptr<T>() + it.begin, len);
      });
    }
  });
  at::Tensor norms = at::zeros({static_cast<int64_t>(n), 2}, params.empty()
                                                              ? at::TensorOptions().dtype(c10::kFloat)
                                                              : params[0].options().dtype(c10::kFloat));
  float* nrm = norms.mutable_data_ptr<float>();
  {
    std::vector<double> acc(2 * n, 0.0);
    for (int64_t j = 0; j < ni; ++j) {  // fixed order
      acc[2 * items[j].tensor] += part[2 * j];
      acc[2 * items[j].tensor + 1] += part[2 * j + 1];
    }
    for (size_t i = 0; i < 2 * n; ++i) nrm[i] = static_cast<float>(std::sqrt(acc[i]));
  }
  std::vector<float> scales(n);
  const double gs = sign * gamma;
  for (size_t i = 0; i < n; ++i) scales[i] = scale(nrm[2 * i], nrm[2 * i + 1], gs, eps);

  // ---- perturb pass --------------------------------------------------------
  at::parallel_for(0, ni, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Item& it = items[j];
      const int32_t t = it.tensor;
      VLMKERN_AWP_FLOAT_SWITCH(w[t].scalar_type(), T, {
        perturb_block<T>(w[t].mutable_data_ptr<T>(),
                         random ? nullptr : g[t].const_data_ptr<T>(),
                         bk[t].mutable_data_ptr<T>(), it.begin, it.end, scales[t], random,
                         keys[t]);
      });
    }
  });
  for (size_t i = 0; i < n; ++i) {
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
    if (!bk[i].is_same(backup[i])) backup[i].copy_(bk[i]);
  }
  return norms;
}

void awp_restore_cpu(at::TensorList params, at::TensorList backup) {
  check_restore_args(params, backup);
  const size_t n = params.size();
  std::vector<at::Tensor> w(n), bk(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].is_contiguous() ? params[i] : at::empty(params[i].sizes(), params[i].options());
    bk[i] = backup[i].contiguous();
  }
  const std::vector<Item> items = make_items(w);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Item& it = items[j];
      const size_t es = w[it.tensor].element_size();
      std::memcpy(static_cast<char*>(w[it.tensor].data_ptr()) + it.begin * es,
                  static_cast<const char*>(bk[it.tensor].const_data_ptr()) + it.begin * es,
                  (it.end - it.begin) * es);
    }
  });
  for (size_t i = 0; i < n; ++i) {
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("awp_perturb_", &awp_perturb_cpu);
  m.impl("awp_restore_", &awp_restore_cpu);
}

}  // namespace vlmkern::awp
