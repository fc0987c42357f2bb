// CUDA kernels of awp_perturb_ / awp_restore_ (SPEC §4) on multi-tensor apply
// (common/multi_tensor_apply.cuh).  For up to 768 tensors of any mix of
// fp32 / bf16 / fp16 (the dtype is dispatched per chunk, uniform in a block):
//   1. norm_kernel     : one block per chunk of kChunk elements writes the
//                        chunk's (sum w^2, sum d^2) partial (fp32 within the chunk);
//   2. finalize_kernel : one block per tensor adds its chunks' partials in a
//                        fixed order in double -> norms[index] = (||w||, ||d||);
//   3. perturb_kernel  : reads the norms from device memory (no host sync),
//                        backup <- w, w <- round(w + scale * d).
// Skip rule (SPEC §4 "Bad input"): finalize sets a device flag when a norm is
// not finite; the perturb kernel then (or when the caller's found_inf is set)
// writes backup <- w only, leaving w as it was, so the restore stays exact.
// So a perturb is 3 launches, and 3 more per further 768 tensors.  The restore
// is one bytewise copy launch per 768 tensors of any dtypes.  Results are
// deterministic (no atomics).  16-byte vector loads when every pointer of the
// launch is 16-byte aligned; chunk starts are then aligned too (kChunk is a
// multiple of every vector width), tails run element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

#include "awp/awp_cuda.h"
#include "awp/awp_math.h"
#include "common/multi_tensor_apply.cuh"

namespace vlmkern::awp::cuda {
namespace {

using mta::TensorListMeta;
using mta::TensorRef;

constexpr int kThreads = 512;
constexpr int kFinalizeThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Deterministic block sum of two floats (fixed shuffle tree, fixed warp order).
__device__ __forceinline__ void block_sum2(float& a, float& b, float2* smem) {
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    float2 p = lane < nw ? smem[lane] : make_float2(0.f, 0.f);
    a = p.x;
    b = p.y;
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, o);
      b += __shfl_down_sync(0xffffffffu, b, o);
    }
  }
  __syncthreads();  // smem is reused by the next chunk
}

// This thread's share of (sum w^2, sum d^2) over one chunk of a tensor.
template <typename T, int MODE, bool VEC>
__device__ __forceinline__ void norm_chunk(const void* w_base, const void* g_base, int64_t start,
                                           int64_t len, uint32_t key, float& sw, float& sd) {
  const T* w = static_cast<const T*>(w_base) + start;
  const T* g = MODE == kModeAdversarial ? static_cast<const T*>(g_base) + start : nullptr;
  int64_t i0 = 0;
  if (VEC) {
    constexpr int N = Vec<T>::N;
    const int64_t nv = len / N;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      const Vec<T> wv = reinterpret_cast<const Vec<T>*>(w)[j];
      Vec<T> gv;
      if (MODE == kModeAdversarial) gv = reinterpret_cast<const Vec<T>*>(g)[j];
#pragma unroll
      for (int q = 0; q < N; ++q) {
        const float x = to_f(wv.v[q]);
        sw += x * x;
        const float d = MODE == kModeAdversarial ? to_f(gv.v[q]) : gaussian(key, start + j * N + q);
        sd += d * d;
      }
    }
    i0 = nv * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x) {
    const float x = to_f(w[i]);
    sw += x * x;
    const float d = MODE == kModeAdversarial ? to_f(g[i]) : gaussian(key, start + i);
    sd += d * d;
  }
}

template <int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(TensorListMeta<2> m, int32_t total_chunks, uint64_t seed, float2* partials,
                int* nonfinite, int zero_flag) {
  __shared__ float2 smem[kThreads / 32];
  // The first norm launch clears the skip flag; the finalize launches after it
  // (same stream) set it.
  if (zero_flag && blockIdx.x == 0 && threadIdx.x == 0) *nonfinite = 0;
  for (int32_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = mta::locate_tensor(m, c);
    const int64_t start = static_cast<int64_t>(c - m.chunk_start[t]) * kChunk;
    const int64_t len = min(kChunk, m.numel[t] - start);
    const uint32_t key = MODE == kModeRandom ? tensor_key(seed, static_cast<uint32_t>(m.list_index[t])) : 0u;
    float sw = 0.f, sd = 0.f;
    switch (static_cast<DType>(m.dtype[t])) {  // uniform across the block
      case DType::kBFloat16:
        norm_chunk<__nv_bfloat16, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], start, len, key, sw, sd);
        break;
      case DType::kHalf:
        norm_chunk<__half, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], start, len, key, sw, sd);
        break;
      default:
        norm_chunk<float, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], start, len, key, sw, sd);
        break;
    }
    block_sum2(sw, sd, smem);
    if (threadIdx.x == 0) partials[c] = make_float2(sw, sd);
  }
}

// One block per tensor of the launch: fixed-order double sum of its partials.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(TensorListMeta<2> m, const float2* partials, float* norms, int* nonfinite) {
  __shared__ double sw_s[kFinalizeThreads], sd_s[kFinalizeThreads];
  const int t = blockIdx.x;
  double sw = 0.0, sd = 0.0;
  for (int32_t c = m.chunk_start[t] + threadIdx.x; c < m.chunk_start[t + 1]; c += blockDim.x) {
    const float2 p = partials[c];
    sw += p.x;
    sd += p.y;
  }
  sw_s[threadIdx.x] = sw;
  sd_s[threadIdx.x] = sd;
  __syncthreads();
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sw_s[threadIdx.x] += sw_s[threadIdx.x + s];
      sd_s[threadIdx.x] += sd_s[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t row = m.list_index[t];
    const float nw = static_cast<float>(sqrt(sw_s[0]));
    const float nd = static_cast<float>(sqrt(sd_s[0]));
    norms[2 * row] = nw;
    norms[2 * row + 1] = nd;
    if (!finite_norm(nw) || !finite_norm(nd)) *nonfinite = 1;  // every writer writes 1: no race
  }
}

// backup <- w, w <- round(w + s * d) over one chunk of a tensor; with `skip`
// only backup <- w (the whole perturbation is skipped, SPEC §4 "Bad input").
template <typename T, int MODE, bool VEC>
__device__ __forceinline__ void perturb_chunk(void* w_base, const void* g_base, void* bk_base,
                                              int64_t start, int64_t len, float s, uint32_t key,
                                              bool skip) {
  T* w = static_cast<T*>(w_base) + start;
  const T* g = MODE == kModeAdversarial ? static_cast<const T*>(g_base) + start : nullptr;
  T* bk = static_cast<T*>(bk_base) + start;
  int64_t i0 = 0;
  if (VEC) {
    constexpr int N = Vec<T>::N;
    const int64_t nv = len / N;
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      Vec<T> wv = reinterpret_cast<const Vec<T>*>(w)[j];
      Vec<T> gv;
      if (MODE == kModeAdversarial) gv = reinterpret_cast<const Vec<T>*>(g)[j];
      reinterpret_cast<Vec<T>*>(bk)[j] = wv;
      if (skip) continue;
#pragma unroll
      for (int q = 0; q < N; ++q) {
        const float d = MODE == kModeAdversarial ? to_f(gv.v[q]) : gaussian(key, start + j * N + q);
        wv.v[q] = from_f<T>(perturbed(to_f(wv.v[q]), s, d));
      }
      reinterpret_cast<Vec<T>*>(w)[j] = wv;
    }
    i0 = nv * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x) {
    const T x = w[i];
    bk[i] = x;
    if (skip) continue;
    const float d = MODE == kModeAdversarial ? to_f(g[i]) : gaussian(key, start + i);
    w[i] = from_f<T>(perturbed(to_f(x), s, d));
  }
}

template <int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(TensorListMeta<3> m, int32_t total_chunks, uint64_t seed, double gamma_signed,
                   double eps, const float* norms, const int* nonfinite, const float* found_inf) {
  const bool skip = *nonfinite != 0 || (found_inf != nullptr && !(*found_inf == 0.f));
  for (int32_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = mta::locate_tensor(m, c);
    const int64_t start = static_cast<int64_t>(c - m.chunk_start[t]) * kChunk;
    const int64_t len = min(kChunk, m.numel[t] - start);
    const int64_t row = m.list_index[t];
    const float s = scale(norms[2 * row], norms[2 * row + 1], gamma_signed, eps);
    const uint32_t key = MODE == kModeRandom ? tensor_key(seed, static_cast<uint32_t>(row)) : 0u;
    switch (static_cast<DType>(m.dtype[t])) {
      case DType::kBFloat16:
        perturb_chunk<__nv_bfloat16, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], m.ptrs[2][t], start, len, s, key,
                                                 skip);
        break;
      case DType::kHalf:
        perturb_chunk<__half, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], m.ptrs[2][t], start, len, s, key,
                                                 skip);
        break;
      default:
        perturb_chunk<float, MODE, VEC>(m.ptrs[0][t], m.ptrs[1][t], m.ptrs[2][t], start, len, s, key,
                                                 skip);
        break;
    }
  }
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) copy_kernel(TensorListMeta<2> m, int32_t total_chunks) {
  for (int32_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int t = mta::locate_tensor(m, c);
    const int64_t start = static_cast<int64_t>(c - m.chunk_start[t]) * kCopyChunkBytes;
    const int64_t len = min(kCopyChunkBytes, m.numel[t] - start);
    char* dst = static_cast<char*>(m.ptrs[0][t]) + start;
    const char* src = static_cast<const char*>(m.ptrs[1][t]) + start;
    int64_t i0 = 0;
    if (VEC) {
      const int64_t nv = len / 16;
      for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
        reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(src)[j];
      }
      i0 = nv * 16;
    }
    for (int64_t i = i0 + threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
  }
}

// Whether every pointer of list l in this launch is 16-byte aligned.
template <int NLists>
bool list_aligned(const TensorListMeta<NLists>& m, int l) {
  for (int t = 0; t < m.ntensors; ++t) {
    if (reinterpret_cast<uintptr_t>(m.ptrs[l][t]) % 16 != 0) return false;
  }
  return true;
}

// Blocks stride over chunks; a few waves of resident blocks are plenty.
inline int grid_for(int32_t chunks) { return chunks < 65535 ? (chunks > 0 ? chunks : 1) : 65535; }

template <int MODE>
cudaError_t run_perturb(const PerturbDesc* descs, int n, uint64_t seed, double gamma_signed,
                        double eps, float* workspace, float* norms, const float* found_inf,
                        int* nonfinite, cudaStream_t stream) {
  std::vector<TensorRef> refs(n);
  for (int i = 0; i < n; ++i) {
    refs[i].ptrs[0] = descs[i].w;
    refs[i].ptrs[1] = const_cast<void*>(descs[i].g);
    refs[i].ptrs[2] = descs[i].backup;
    refs[i].ptrs[3] = nullptr;
    refs[i].numel = descs[i].numel;
    refs[i].list_index = descs[i].index;
    refs[i].dtype = static_cast<uint8_t>(descs[i].dtype);
  }
  cudaError_t err = cudaSuccess;
  float2* partials = reinterpret_cast<float2*>(workspace);
  int zero_flag = 1;
  mta::for_each_launch<2>(refs, kChunk, [&](const TensorListMeta<2>& m, int32_t chunks) {
    if (err != cudaSuccess) return;
    const int grid = grid_for(chunks);
    const bool aligned = list_aligned(m, 0) && (MODE == kModeRandom || list_aligned(m, 1));
    if (aligned) {
      norm_kernel<MODE, true><<<grid, kThreads, 0, stream>>>(m, chunks, seed, partials, nonfinite, zero_flag);
    } else {
      norm_kernel<MODE, false><<<grid, kThreads, 0, stream>>>(m, chunks, seed, partials, nonfinite, zero_flag);
    }
    zero_flag = 0;
    finalize_kernel<<<m.ntensors, kFinalizeThreads, 0, stream>>>(m, partials, norms, nonfinite);
    err = cudaGetLastError();
    partials += chunks;
  });
  if (err != cudaSuccess) return err;
  mta::for_each_launch<3>(refs, kChunk, [&](const TensorListMeta<3>& m, int32_t chunks) {
    if (err != cudaSuccess) return;
    const int grid = grid_for(chunks);
    const bool aligned =
        list_aligned(m, 0) && list_aligned(m, 2) && (MODE == kModeRandom || list_aligned(m, 1));
    if (aligned) {
      perturb_kernel<MODE, true><<<grid, kThreads, 0, stream>>>(m, chunks, seed, gamma_signed, eps, norms,
                                                                nonfinite, found_inf);
    } else {
      perturb_kernel<MODE, false><<<grid, kThreads, 0, stream>>>(m, chunks, seed, gamma_signed, eps, norms,
                                                                 nonfinite, found_inf);
    }
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

int64_t perturb_workspace_floats(const PerturbDesc* descs, int n) {
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) chunks += (descs[i].numel + kChunk - 1) / kChunk;
  return 2 * chunks;
}

cudaError_t launch_perturb(const PerturbDesc* descs, int n, int mode, uint64_t seed,
                           double gamma_signed, double eps, float* workspace, float* norms,
                           const float* found_inf, int* nonfinite, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return mode == kModeRandom
             ? run_perturb<kModeRandom>(descs, n, seed, gamma_signed, eps, workspace, norms, found_inf,
                                        nonfinite, stream)
             : run_perturb<kModeAdversarial>(descs, n, seed, gamma_signed, eps, workspace, norms,
                                             found_inf, nonfinite, stream);
}

cudaError_t launch_restore(const CopyDesc* descs, int n, cudaStream_t stream) {
  std::vector<TensorRef> refs;
  refs.reserve(n);
  for (int i = 0; i < n; ++i) {
    TensorRef r{};
    r.ptrs[0] = descs[i].dst;
    r.ptrs[1] = const_cast<void*>(descs[i].src);
    r.numel = descs[i].nbytes;
    r.list_index = i;
    refs.push_back(r);
  }
  cudaError_t err = cudaSuccess;
  mta::for_each_launch<2>(refs, kCopyChunkBytes, [&](const TensorListMeta<2>& m, int32_t chunks) {
    if (err != cudaSuccess) return;
    const int grid = grid_for(chunks);
    if (list_aligned(m, 0) && list_aligned(m, 1)) {
      copy_kernel<true><<<grid, kThreads, 0, stream>>>(m, chunks);
    } else {
      copy_kernel<false><<<grid, kThreads, 0, stream>>>(m, chunks);
    }
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace vlmkern::awp::cuda
