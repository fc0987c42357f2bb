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
//   restore pass : w <- backup (bit copy).
// Random mode regenerates the Gaussian direction (awp_math.h) in both passes;
// nothing is stored.  Non-contiguous tensors go through contiguous copies
// written back.
//
// Instruction sets (awp_cpu_simd.h): the kernels of awp_cpu_kernels.inc are
// compiled for baseline x86-64, AVX2 + F16C and AVX-512F, and the widest one
// the CPU has runs; VLMKERN_CPU_ISA=scalar|avx2|avx512 caps it (read at every
// call; for tests and comparisons).  All give the same bits.
// Lists of more than kStreamMinBytes write the backup (perturb) and the
// weights (restore) with non-temporal stores: neither is read again soon, and
// streaming them skips the read-for-ownership of the destination.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "awp/awp_cpu_simd.h"
#include "awp/awp_host.h"
#include "awp/awp_math.h"

namespace vlmkern::awp {
namespace {

constexpr int64_t kBlock = 1 << 15;    // elements per work item
constexpr int64_t kFlush = 1024;       // elements per fp32 lane sum before flushing to double
constexpr int64_t kSerialBelow = 1 << 16;          // fewer elements: one thread
constexpr int64_t kStreamMinBytes = int64_t{64} << 20;  // larger lists: non-temporal stores

// Kernels of one instruction set over one work item; dtype index 0 = float32,
// 1 = bfloat16, 2 = float16.
struct KernelTable {
  double (*sumsq[3])(const void* x, int64_t n);
  double (*sumsq_random)(uint32_t key, int64_t begin, int64_t end);
  void (*perturb[3])(void* w, const void* g, void* bk, int64_t n, float s, bool stream);
  void (*perturb_random[3])(void* w, void* bk, int64_t begin, int64_t end, float s, uint32_t key,
                            bool stream);
  void (*copy_bytes)(void* dst, const void* src, int64_t nbytes, bool stream);
};

namespace isa_scalar {
using V = simd::VScalar;
#include "awp/awp_cpu_kernels.inc"
}  // namespace isa_scalar

#if VLMKERN_AWP_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
namespace isa_avx2 {
using V = simd::VAvx2;
#include "awp/awp_cpu_kernels.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,f16c")
// GCC 12's avx512fintrin.h trips its own (un)initialised-variable warnings
// once its intrinsics are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_avx512 {
using V = simd::VAvx512;
#include "awp/awp_cpu_kernels.inc"
}  // namespace isa_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int supported_isa() {
#if VLMKERN_AWP_SIMD
  static const int isa = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return int{kScalar};
    return __builtin_cpu_supports("avx512f") ? int{kAvx512} : int{kAvx2};
  }();
  return isa;
#else
  return kScalar;
#endif
}

const KernelTable& kernels() {
  static const std::vector<KernelTable> tables = [] {
    std::vector<KernelTable> t(3);
    isa_scalar::fill_table(t[kScalar]);
#if VLMKERN_AWP_SIMD
    isa_avx2::fill_table(t[kAvx2]);
    isa_avx512::fill_table(t[kAvx512]);
#else
    t[kAvx2] = t[kAvx512] = t[kScalar];
#endif
    return t;
  }();
  int isa = supported_isa();
  if (const char* env = std::getenv("VLMKERN_CPU_ISA"); env != nullptr && *env != '\0') {
    const std::string v(env);
    int cap;
    if (v == "scalar" || v == "default") {
      cap = kScalar;
    } else if (v == "avx2") {
      cap = kAvx2;
    } else if (v == "avx512") {
      cap = kAvx512;
    } else {
      TORCH_CHECK(false, "vlmkern.awp: VLMKERN_CPU_ISA must be scalar, avx2 or avx512, got '", v,
                  "'");
    }
    isa = std::min(isa, cap);
  }
  return tables[isa];
}

int dtype_index(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return 0;
    case c10::kBFloat16: return 1;
    case c10::kHalf: return 2;
    default: TORCH_CHECK(false, "vlmkern.awp: unsupported dtype ", t);
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
void for_each_item(int64_t n_items, int64_t n_elems, bool stream, const Fn& fn) {
  if (n_items == 0) return;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t j = next.fetch_add(1, std::memory_order_relaxed); j < n_items;
         j = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(j);
    }
#if VLMKERN_AWP_SIMD
    if (stream) _mm_sfence();  // order this thread's non-temporal stores before the join
#endif
  };
  const int64_t nt = n_elems < kSerialBelow ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  if (nt <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nt, 1, worker);
  }
}

int64_t total_bytes(const std::vector<at::Tensor>& w) {
  int64_t b = 0;
  for (const auto& t : w) b += t.numel() * static_cast<int64_t>(t.element_size());
  return b;
}

int64_t total_elems(const std::vector<at::Tensor>& w) {
  int64_t n = 0;
  for (const auto& t : w) n += t.numel();
  return n;
}

at::Tensor awp_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backup,
                           double gamma, double eps, double sign, int64_t mode, int64_t seed,
                           const std::optional<at::Tensor>& found_inf) {
  check_perturb_args(params, grads, backup, gamma, eps, sign, mode, found_inf);
  const KernelTable& K = kernels();
  const bool random = mode == kModeRandom;
  const size_t n = params.size();
  std::vector<at::Tensor> w(n), g(random ? 0 : n), bk(n);
  std::vector<int> dt(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].contiguous();
    if (!random) g[i] = grads[i].contiguous();
    bk[i] = backup[i].is_contiguous() ? backup[i] : at::empty(w[i].sizes(), w[i].options());
    dt[i] = dtype_index(w[i].scalar_type());
  }
  const uint64_t useed = static_cast<uint64_t>(seed);
  std::vector<uint32_t> keys(n, 0u);
  if (random) {
    for (size_t i = 0; i < n; ++i) keys[i] = tensor_key(useed, static_cast<uint32_t>(i));
  }
  const std::vector<Item> items = make_items(w);
  const int64_t ni = static_cast<int64_t>(items.size());
  const int64_t ne = total_elems(w);
  const bool stream = total_bytes(w) >= kStreamMinBytes;

  // ---- norm pass -----------------------------------------------------------
  std::vector<double> part(2 * items.size(), 0.0);
  for_each_item(ni, ne, false, [&](int64_t j) {
    const Item& it = items[j];
    const int t = it.tensor;
    const int64_t es = w[t].element_size();
    const int64_t len = it.end - it.begin;
    part[2 * j] = K.sumsq[dt[t]](static_cast<const char*>(w[t].const_data_ptr()) + it.begin * es, len);
    part[2 * j + 1] =
        random ? K.sumsq_random(keys[t], it.begin, it.end)
               : K.sumsq[dt[t]](static_cast<const char*>(g[t].const_data_ptr()) + it.begin * es, len);
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
  for_each_item(ni, ne, stream, [&](int64_t j) {
    const Item& it = items[j];
    const int t = it.tensor;
    if (skip) {
      const int64_t es = w[t].element_size();
      K.copy_bytes(static_cast<char*>(bk[t].mutable_data_ptr()) + it.begin * es,
                   static_cast<const char*>(w[t].const_data_ptr()) + it.begin * es,
                   (it.end - it.begin) * es, stream);
    } else if (random) {
      K.perturb_random[dt[t]](w[t].mutable_data_ptr(), bk[t].mutable_data_ptr(), it.begin, it.end,
                              scales[t], keys[t], stream);
    } else {
      const int64_t es = w[t].element_size();
      K.perturb[dt[t]](static_cast<char*>(w[t].mutable_data_ptr()) + it.begin * es,
                       static_cast<const char*>(g[t].const_data_ptr()) + it.begin * es,
                       static_cast<char*>(bk[t].mutable_data_ptr()) + it.begin * es,
                       it.end - it.begin, scales[t], stream);
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
  const KernelTable& K = kernels();
  const size_t n = params.size();
  std::vector<at::Tensor> w(n), bk(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].is_contiguous() ? params[i] : at::empty(params[i].sizes(), params[i].options());
    bk[i] = backup[i].contiguous();
  }
  const std::vector<Item> items = make_items(w);
  const bool stream = total_bytes(w) >= kStreamMinBytes;
  for_each_item(static_cast<int64_t>(items.size()), total_elems(w), stream, [&](int64_t j) {
    const Item& it = items[j];
    const int64_t es = w[it.tensor].element_size();
    K.copy_bytes(static_cast<char*>(w[it.tensor].data_ptr()) + it.begin * es,
                 static_cast<const char*>(bk[it.tensor].const_data_ptr()) + it.begin * es,
                 (it.end - it.begin) * es, stream);
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
