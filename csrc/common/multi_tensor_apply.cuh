// Multi-tensor apply for optimizer-style ops (Kalman step, AWP): one kernel
// launch covers up to Capacity<NLists> tensors of ANY mix of dtypes (each
// tensor carries an op-defined dtype tag; kernels dispatch on it per chunk,
// which is uniform within a block), so a pass over a parameter list is one
// launch for up to 768 tensors with three lists (all of ViT-B/16, ViT-L/14
// or ViT-H/14 CLIP), and ceil(n / capacity) launches beyond.
//
// The tensor table travels BY VALUE as a kernel argument (up to ~31 KB:
// CUDA >= 12.1 allows 32,764 bytes of parameters on sm_70 and later), so there
// is no host -> device copy and a launch can be captured in a CUDA graph.
// Scalars that change per step (innovation, R, ...) must be read from device
// pointers, not passed by value.
//
// Work is split into chunks of `chunk_size` elements; chunk c of the launch
// belongs to tensor t with chunk_start[t] <= c < chunk_start[t+1] (binary
// search).  Blocks stride over chunks, so the grid can be capped.
//
// Host side: build a std::vector<TensorRef> (raw pointers + numel + dtype tag
// + the tensor's position in the caller's list), then
// for_each_launch<NLists>(refs, chunk, f) calls f(meta, total_chunks) once per
// launch.  This header includes no torch header: it is used from .cu files
// compiled by nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace vlmkern::mta {

constexpr int kMaxLists = 4;

// Tensors per launch: 41 bytes per tensor with three lists, 49 with four.
template <int NLists>
constexpr int Capacity = NLists <= 3 ? 768 : 640;

// Kernel parameters left for the ops' other arguments (scalars, pointers).
constexpr int kParamReserve = 1024;
constexpr int kMaxParamBytes = 32764;  // CUDA >= 12.1

template <int NLists>
struct TensorListMeta {
  static_assert(NLists >= 1 && NLists <= kMaxLists, "1..4 lists");
  static constexpr int kCapacity = Capacity<NLists>;
  void* ptrs[NLists][kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_start[kCapacity + 1];
  int32_t list_index[kCapacity];  // position of the tensor in the caller's list
  uint8_t dtype[kCapacity];       // op-defined dtype tag
  int32_t ntensors;
};
static_assert(sizeof(TensorListMeta<3>) + kParamReserve <= kMaxParamBytes, "table too large");
static_assert(sizeof(TensorListMeta<4>) + kParamReserve <= kMaxParamBytes, "table too large");

struct TensorRef {
  void* ptrs[kMaxLists];
  int64_t numel;
  int32_t list_index;
  uint8_t dtype;  // op-defined tag, copied to TensorListMeta::dtype
};

// Index of the tensor that owns `chunk` (chunk_start is sorted).
template <int NLists>
__device__ __forceinline__ int locate_tensor(const TensorListMeta<NLists>& m, int32_t chunk) {
  int lo = 0, hi = m.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (m.chunk_start[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Calls f(const TensorListMeta<NLists>& meta, int32_t total_chunks) for each
// launch.  Empty tensors are skipped.  Returns the number of launches.
template <int NLists, typename F>
int for_each_launch(const std::vector<TensorRef>& refs, int64_t chunk_size, F&& f) {
  TensorListMeta<NLists> meta;
  int n = 0;
  int64_t chunks = 0;
  int launches = 0;
  auto flush = [&]() {
    if (n == 0) return;
    meta.ntensors = n;
    meta.chunk_start[n] = static_cast<int32_t>(chunks);
    f(meta, static_cast<int32_t>(chunks));
    ++launches;
    n = 0;
    chunks = 0;
  };
  for (const TensorRef& r : refs) {
    if (r.numel == 0) continue;
    const int64_t c = (r.numel + chunk_size - 1) / chunk_size;
    if (n == Capacity<NLists> || chunks + c > INT32_MAX / 2) flush();
    for (int l = 0; l < NLists; ++l) meta.ptrs[l][n] = r.ptrs[l];
    meta.numel[n] = r.numel;
    meta.list_index[n] = r.list_index;
    meta.dtype[n] = r.dtype;
    meta.chunk_start[n] = static_cast<int32_t>(chunks);
    chunks += c;
    ++n;
  }
  flush();
  return launches;
}

}  // namespace vlmkern::mta
