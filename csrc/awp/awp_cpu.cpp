// CPU kernels of awp_perturb_ / awp_restore_ (SPEC §4).
//
// Every tensor is cut into blocks of kBlock elements; the blocks of the whole
// list form one work list, and each pass is one parallel region whose threads
// take blocks from a shared counter (dynamic: balanced whatever the tensor
// sizes, and when a core is busy with something else), so the number of
// tensors costs nothing per pass (the CPU analogue of multi-tensor apply).
//   norm pass    : per-block sums of w^2 and d^2 (16 fp32 lanes, flushed to
//                  double every kFlush elements), then a fixed-order double
//                  reduction per tensor -> deterministic, independent of the
//                  thread count and of the instruction set;
//   perturb pass : backup <- w (bit copy), w <- round(w + scale * d), one sweep;
//   restore pass : w <- backup (bit copy, memcpy).
// Random mode regenerates the Gaussian direction (awp_math.h) in both passes,
// kFlush elements at a time into a stack buffer; nothing is stored.
// Non-contiguous tensors go through contiguous working copies (common/host.h).
//
// Instruction sets: the kernels are plain element loops (no intrinsics) that
// the compiler vectorizes for baseline x86-64 (SSE2), like the rest of the
// library, so they run on every x86-64 CPU; bf16 and fp16 are converted with
// integer code that vectorizes too.  Compiling them also for AVX2 and AVX-512
// (GCC target_clones) was measured and bought nothing: the passes are
// memory-bound, and fp16 is limited by its conversion in every version
// (bench/RESULTS_awp.md).  Nothing is contracted into an FMA
// (-ffp-contract=off for this file), so the CPU and CUDA kernels give the same
// bits (python_tests/test_qemu_cpus.py runs them on CPUs without AVX-512 / AVX2).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "awp/awp_math.h"
#include "common/checks.h"
#include "common/host.h"

// flatten inlines every helper (conversions, the Gaussian) into the kernel, so
// the whole loop body is visible to the vectorizer.
#define VLMKERN_AWP_KERNEL __attribute__((flatten))

namespace vlmkern::awp {
namespace {

constexpr int64_t kBlock = 1 << 15;    // elements per work item
constexpr int64_t kFlush = 1024;       // elements per fp32 lane sum before flushing to double
constexpr int64_t kSerialBelow = 1 << 16;  // fewer elements: one thread

// ---- storage types: bits <-> fp32 (exact / round to nearest even) ----------
inline uint32_t bits_of(float x) { return f_bits(x); }
inline float float_of(uint32_t u) { return f_from_bits(u); }

struct F32 {
  using S = float;
  static float load(S x) { return x; }
  static S store(float f) { return f; }
};

struct BF16 {  // as c10::BFloat16: round to nearest even, NaN -> 0x7FC0
  using S = uint16_t;
  static float load(S x) { return float_of(uint32_t{x} << 16); }
  static S store(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<S>(f != f ? 0x7FC0u : r);
  }
};

struct FP16 {  // IEEE binary16, as c10::Half / F16C (checked on all 2^32 inputs)
  using S = uint16_t;
  static float load(S h) {
    const uint32_t em = h & 0x7FFFu, sign = (uint32_t{h} & 0x8000u) << 16;
    // normal: rebias the exponent (inf / NaN: once more, to 255); subnormal: em * 2^-24
    const float nrm = float_of((em << 13) + 0x38000000u + (em >= 0x7C00u ? 0x38000000u : 0u));
    const float sub = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;
    return float_of(bits_of(em < 0x400u ? sub : nrm) | sign);
  }
  static S store(float f) {
    uint32_t u = bits_of(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    const uint32_t inf_nan = u > 0x7F800000u ? 0x7E00u : 0x7C00u;  // |f| >= 65536
    const uint32_t sub = bits_of(float_of(u) + 0.5f) - 0x3F000000u;  // |f| < 2^-14: the fp32 add rounds
    const uint32_t nrm = (u + 0xC8000FFFu + ((u >> 13) & 1u)) >> 13;  // rebias, round to nearest even
    const uint32_t r = u >= 0x47800000u ? inf_nan : (u < 0x38800000u ? sub : nrm);
    return static_cast<S>(r | (sign >> 16));
  }
};

// ---- kernels over one work item --------------------------------------------

// Sum of squares of n <= kFlush elements: 16 fp32 lanes (lane l takes elements
// 16 i + l), the < 16 leftover elements added to lane 0 in order, the lanes
// added in order 0..15.  Lanes are independent, so the vectorized loop gives
// the same bits whatever the vector width.
template <typename E>
inline float sumsq_block(const typename E::S* x, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) {
      const float v = E::load(x[i + l]);
      lane[l] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = E::load(x[i]);
    lane[0] += v * v;
  }
  float f = 0.f;
  for (int l = 0; l < 16; ++l) f += lane[l];
  return f;
}

// r[j] = gaussian(key, k + j), j < n.
inline void gaussians(uint32_t key, int64_t k, int64_t n, float* r) {
  for (int64_t j = 0; j < n; ++j) r[j] = gaussian(key, static_cast<uint64_t>(k + j));
}

// Sum of squares of x[0 .. n), flushed to double every kFlush elements.
template <typename E>
VLMKERN_AWP_KERNEL double sumsq(const void* xv, int64_t n) {
  const auto* x = static_cast<const typename E::S*>(xv);
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kFlush) total += sumsq_block<E>(x + b, std::min(kFlush, n - b));
  return total;
}

// Sum of squares of the Gaussians of elements [begin, end).
VLMKERN_AWP_KERNEL double sumsq_random(uint32_t key, int64_t begin, int64_t end) {
  float r[kFlush];
  double total = 0.0;
  for (int64_t b = begin; b < end; b += kFlush) {
    const int64_t m = std::min(kFlush, end - b);
    gaussians(key, b, m, r);
    total += sumsq_block<F32>(r, m);
  }
  return total;
}

// Adversarial: bk <- w (bits), w <- round(w + s * g); n elements from the
// item's first one.
template <typename E>
VLMKERN_AWP_KERNEL void perturb(void* wv, const void* gv, void* bkv, int64_t n, float s) {
  using S = typename E::S;
  S* w = static_cast<S*>(wv);
  const S* g = static_cast<const S*>(gv);
  S* bk = static_cast<S*>(bkv);
  for (int64_t i = 0; i < n; ++i) {
    const S x = w[i];
    bk[i] = x;
    w[i] = E::store(perturbed(E::load(x), s, E::load(g[i])));
  }
}

// Random: w, bk point at the tensor's element 0; elements [begin, end).
template <typename E>
VLMKERN_AWP_KERNEL void perturb_random(void* wv, void* bkv, int64_t begin, int64_t end, float s,
                                       uint32_t key) {
  using S = typename E::S;
  S* w = static_cast<S*>(wv);
  S* bk = static_cast<S*>(bkv);
  float r[kFlush];
  for (int64_t b = begin; b < end; b += kFlush) {
    const int64_t m = std::min(kFlush, end - b);
    gaussians(key, b, m, r);
    for (int64_t j = 0; j < m; ++j) {
      const S x = w[b + j];
      bk[b + j] = x;
      w[b + j] = E::store(perturbed(E::load(x), s, r[j]));
    }
  }
}

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

// fn(j) for every item j, in one parallel region; threads take items from a
// shared counter.  Results may depend only on j, never on the thread.
template <typename Fn>
void for_each_item(int64_t n_items, int64_t n_elems, const Fn& fn) {
  if (n_items == 0) return;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t j = next.fetch_add(1, std::memory_order_relaxed); j < n_items;
         j = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(j);
    }
  };
  const int64_t nt = n_elems < kSerialBelow ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  if (nt <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nt, 1, worker);
  }
}

int64_t total_elems(const std::vector<at::Tensor>& w) {
  int64_t n = 0;
  for (const auto& t : w) n += t.numel();
  return n;
}

at::Tensor awp_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backup,
                           double gamma, double eps, double sign, int64_t mode, int64_t seed,
                           const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.awp_perturb_";
  TORCH_CHECK(mode == kModeAdversarial || mode == kModeRandom, op,
              ": direction must be 0 (adversarial) or 1 (random), got ", mode);
  const bool random = mode == kModeRandom;
  check_float_list(op, params, "params");
  if (!random) check_list_like(op, params, "params", grads, "grads");
  check_list_like(op, params, "params", backup, "backup");
  check_not_aliased(op, params, "params", backup, "backup");
  if (!params.empty()) check_scalar_tensor(op, found_inf, "found_inf", params[0].device());
  const size_t n = params.size();
  WorkingCopies wc;
  const std::vector<at::Tensor> w = wc.inout(params), bk = wc.out(backup);
  const std::vector<at::Tensor> g = random ? std::vector<at::Tensor>{} : WorkingCopies::in(grads);
  std::vector<DType> dt;
  for (const at::Tensor& t : w) dt.push_back(dtype_of(t.scalar_type()));
  const uint64_t useed = static_cast<uint64_t>(seed);
  std::vector<uint32_t> keys(n, 0u);
  if (random) {
    for (size_t i = 0; i < n; ++i) keys[i] = tensor_key(useed, static_cast<uint32_t>(i));
  }
  const std::vector<Item> items = make_items(w);
  const int64_t ni = static_cast<int64_t>(items.size());
  const int64_t ne = total_elems(w);

  // ---- norm pass -----------------------------------------------------------
  std::vector<double> part(2 * items.size(), 0.0);
  for_each_item(ni, ne, [&](int64_t j) {
    const Item& it = items[j];
    const int t = it.tensor;
    const int64_t es = w[t].element_size();
    const int64_t len = it.end - it.begin;
    VLMKERN_DISPATCH_DTYPE(dt[t], F32, BF16, FP16, E, {
      part[2 * j] = sumsq<E>(static_cast<const char*>(w[t].const_data_ptr()) + it.begin * es, len);
      part[2 * j + 1] =
          random ? sumsq_random(keys[t], it.begin, it.end)
                 : sumsq<E>(static_cast<const char*>(g[t].const_data_ptr()) + it.begin * es, len);
    });
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
  // Skip rule (SPEC §4 "Bad input", the same on every backend): a non-finite
  // norm anywhere, or found_inf set, skips the whole perturbation: backup <- w
  // (so the restore stays exact), w untouched.  CPU tensors: reading is free.
  bool skip = found_inf.has_value() && !(found_inf->item<float>() == 0.0f);
  for (size_t i = 0; i < 2 * n; ++i) skip = skip || !finite_norm(nrm[i]);

  // ---- perturb pass --------------------------------------------------------
  for_each_item(ni, ne, [&](int64_t j) {
    const Item& it = items[j];
    const int t = it.tensor;
    if (skip) {
      const int64_t es = w[t].element_size();
      std::memcpy(static_cast<char*>(bk[t].mutable_data_ptr()) + it.begin * es,
                  static_cast<const char*>(w[t].const_data_ptr()) + it.begin * es,
                  (it.end - it.begin) * es);
    } else if (random) {
      VLMKERN_DISPATCH_DTYPE(dt[t], F32, BF16, FP16, E,
                             perturb_random<E>(w[t].mutable_data_ptr(), bk[t].mutable_data_ptr(),
                                               it.begin, it.end, scales[t], keys[t]));
    } else {
      const int64_t es = w[t].element_size();
      VLMKERN_DISPATCH_DTYPE(dt[t], F32, BF16, FP16, E,
                             perturb<E>(static_cast<char*>(w[t].mutable_data_ptr()) + it.begin * es,
                                        static_cast<const char*>(g[t].const_data_ptr()) + it.begin * es,
                                        static_cast<char*>(bk[t].mutable_data_ptr()) + it.begin * es,
                                        it.end - it.begin, scales[t]));
    }
  });
  wc.copy_back();
  return norms;
}

void awp_restore_cpu(at::TensorList params, at::TensorList backup) {
  constexpr const char* op = "vlmkern.awp_restore_";
  check_list_like(op, params, "params", backup, "backup");
  check_same_device(op, params, "params");
  WorkingCopies wc;
  const std::vector<at::Tensor> w = wc.out(params), bk = WorkingCopies::in(backup);
  const std::vector<Item> items = make_items(w);
  for_each_item(static_cast<int64_t>(items.size()), total_elems(w), [&](int64_t j) {
    const Item& it = items[j];
    const int64_t es = w[it.tensor].element_size();
    std::memcpy(static_cast<char*>(w[it.tensor].data_ptr()) + it.begin * es,
                static_cast<const char*>(bk[it.tensor].const_data_ptr()) + it.begin * es,
                static_cast<size_t>((it.end - it.begin) * es));
  });
  wc.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("awp_perturb_", &awp_perturb_cpu);
  m.impl("awp_restore_", &awp_restore_cpu);
}

}  // namespace vlmkern::awp
