// Functor-style multi-tensor apply for optimizer-style ops (Kalman step, AWP):
// one kernel launch covers up to Capacity<NLists> tensors of ANY mix of
// dtypes, so a pass over a parameter list is one launch for up to 768 tensors
// with three lists (all of ViT-B/16, ViT-L/14 or ViT-H/14 CLIP), and
// ceil(n / capacity) launches beyond.  This header owns the bookkeeping: the
// tensor table, the (tensor, chunk) lookup of a block, chunk bounds, the
// per-chunk dtype dispatch and the grid; an op supplies a functor:
//
//   struct Op {
//     static constexpr int kThreads, kMinBlocks;  // __launch_bounds__ (0: no minimum)
//     static constexpr int64_t kChunk = ...;     // elements per chunk
//     __device__ static int elem_bytes(int list, DType dt);  // element size of list
//     __device__ bool begin_block();             // false: the block returns at once
//     template <typename T>                      // T: the chunk's storage type
//     __device__ void chunk(const mta::Chunk<NLists>& c);
//     __device__ void end_block();
//   };
//
// The tensor table travels BY VALUE as a kernel argument (up to ~31 KB:
// CUDA >= 12.1 allows 32,764 bytes of parameters on sm_70 and later), so there
// is no host -> device copy and a launch can be captured in a CUDA graph.
// Scalars that change per step (innovation, R, ...) must be read from device
// pointers, not passed by value.  Blocks stride over the chunks: the grid is
// min(chunks, kMaxBlocks), which depends on the tensor sizes only, never on
// the device.
//
// Host side: build a std::vector<TensorRef>, then for_each_launch<NLists>(refs,
// chunk, f) calls f(meta, total_chunks) once per table, and f calls
// launch(meta, total_chunks, op, stream).  No torch header here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "common/cuda_utils.cuh"

namespace vlmkern::mta {

// Tensors per launch: 41 bytes per tensor with three lists, 49 with four.
template <int NLists>
constexpr int Capacity = NLists <= 3 ? 768 : 640;

// Kernel parameters left for the functor (scalars, pointers).
constexpr int kParamReserve = 1024;
constexpr int kMaxParamBytes = 32764;  // CUDA >= 12.1
constexpr int kMaxBlocks = 1024;       // grid cap of every launch

template <int NLists>
struct TensorListMeta {
  static_assert(NLists >= 1 && NLists <= kMaxLists, "1..4 lists");
  static constexpr int kCapacity = Capacity<NLists>;
  void* ptrs[NLists][kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_start[kCapacity + 1];
  int32_t list_index[kCapacity];  // position of the tensor in the caller's list
  uint8_t dtype[kCapacity];       // DType
  int32_t ntensors;
};
static_assert(sizeof(TensorListMeta<3>) + kParamReserve <= kMaxParamBytes, "table too large");
static_assert(sizeof(TensorListMeta<4>) + kParamReserve <= kMaxParamBytes, "table too large");

// One chunk of one tensor, as the functor sees it.
template <int NLists>
struct Chunk {
  void* ptrs[NLists];  // each list's pointer at the chunk's first element
  int64_t start;       // index of that element in the tensor
  int64_t len;         // elements in the chunk
  int64_t numel;       // elements in the tensor (row stride of a [M, *shape] list)
  int32_t index;       // chunk number in the launch
  int32_t list_index;  // the tensor's position in the caller's list
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

template <int NLists, typename Op>
__global__ void __launch_bounds__(Op::kThreads, Op::kMinBlocks)
    apply_kernel(const TensorListMeta<NLists> meta, int32_t total_chunks, Op op) {
  if (!op.begin_block()) return;
  for (int32_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = locate_tensor(meta, c);
    const DType dt = static_cast<DType>(meta.dtype[t]);
    Chunk<NLists> ch;
    ch.start = static_cast<int64_t>(c - meta.chunk_start[t]) * Op::kChunk;
    const int64_t left = meta.numel[t] - ch.start;
    ch.len = left < Op::kChunk ? left : Op::kChunk;
    ch.numel = meta.numel[t];
    ch.index = c;
    ch.list_index = meta.list_index[t];
    // Byte offsets before the dtype dispatch: typed offsets in each branch cost
    // registers (Kalman pass 1 on sm_80: 44 vs 34).
#pragma unroll
    for (int l = 0; l < NLists; ++l) {
      ch.ptrs[l] = static_cast<char*>(meta.ptrs[l][t]) + ch.start * Op::elem_bytes(l, dt);
    }
    VLMKERN_DISPATCH_CUDA(dt, T, op.template chunk<T>(ch));  // uniform across the block
  }
  op.end_block();
}

inline int grid_for(int32_t chunks, int max_blocks = kMaxBlocks) {
  return chunks < max_blocks ? chunks : max_blocks;
}

// One launch of `op` over the table `meta` of `total_chunks` chunks.  The grid
// is grid_for(total_chunks, max_blocks) x grid_y: blockIdx.y (< grid_y) lets a
// functor split its work over a second axis (e.g. tiles of an output), every
// row of blocks striding over all the chunks.
template <int NLists, typename Op>
cudaError_t launch(const TensorListMeta<NLists>& meta, int32_t total_chunks, const Op& op,
                   cudaStream_t stream, int max_blocks = kMaxBlocks, unsigned grid_y = 1) {
  const dim3 grid(static_cast<unsigned>(grid_for(total_chunks, max_blocks)), grid_y);
  apply_kernel<NLists, Op><<<grid, Op::kThreads, 0, stream>>>(meta, total_chunks, op);
  return cudaGetLastError();
}

// Whether every pointer of list l in this table is 16-byte aligned.
template <int NLists>
bool list_aligned(const TensorListMeta<NLists>& m, int l) {
  for (int t = 0; t < m.ntensors; ++t) {
    if (reinterpret_cast<uintptr_t>(m.ptrs[l][t]) % 16 != 0) return false;
  }
  return true;
}

// Calls f(const TensorListMeta<NLists>& meta, int32_t total_chunks) for each
// table of up to Capacity<NLists> tensors; empty tensors are skipped.  Stops
// at the first error f returns, and returns it.
template <int NLists, typename F>
cudaError_t for_each_launch(const std::vector<TensorRef>& refs, int64_t chunk_size, F&& f) {
  TensorListMeta<NLists> meta;
  int n = 0;
  int64_t chunks = 0;
  cudaError_t err = cudaSuccess;
  auto flush = [&]() {
    if (n == 0) return;
    meta.ntensors = n;
    meta.chunk_start[n] = static_cast<int32_t>(chunks);
    if (err == cudaSuccess) err = f(meta, static_cast<int32_t>(chunks));
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
    meta.dtype[n] = static_cast<uint8_t>(r.dtype);
    meta.chunk_start[n] = static_cast<int32_t>(chunks);
    chunks += c;
    ++n;
  }
  flush();
  return err;
}

}  // namespace vlmkern::mta
