// CUDA kernels of kalman_step_ (SPEC §3) on multi-tensor apply.
//
//   pass 1  (one launch for up to 768 tensors of any dtypes: the dtype is
//           dispatched per chunk): every block strides over its chunks, accumulates h^2 (p + q) (fp32 within a chunk,
//           fp64 across chunks) and writes ONE float64 partial sum.  The grid is
//           min(chunks, kMaxBlocks): it depends on the tensor sizes only, never
//           on the device, so the partials and S are bitwise reproducible.
//   pass 2  every block first reduces all partials in the same fixed order
//           (so every block holds the same S bit for bit, and S needs no launch
//           of its own), S = s + R, gates the innovation, then updates
//           theta and p of its chunks.  Block 0 of the first pass-2 launch
//           writes S to the output.
// So a step is 2 launches for lists of up to 768 tensors (all of ViT-B/16 or
// ViT-L/14 CLIP, fp32/bf16/fp16 mixed), and 2 more per further 768.
//
// Scalars that change per step (innovation, R, grad_scale, found_inf) are read
// from device memory, and the skip rule (kalman_math.h step_scalars: found_inf
// set, or a non-finite gradient / variance / innovation) is decided there, by
// every pass-2 block alike;
// nothing here synchronises with the host or copies to it, so a step can be
// captured in a CUDA graph.  Loads and stores are 16-byte vectors when the
// tensor's three pointers are 16-byte aligned (always true for tensors that
// own their storage; views at odd offsets take the scalar path).
//
// No torch header: launchers take raw pointers and a stream
// (common/cuda_launch.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/multi_tensor_apply.cuh"
#include "kalman/kalman_cuda.h"
#include "kalman/kalman_math.h"

namespace vlmkern::kalman::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16384;  // elements per chunk (a multiple of every vector width)
constexpr int kMaxBlocks = 1024;   // grid cap of each launch (pass 1 partials per launch)

// ---- dtype helpers ----------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Elements per 16-byte vector of T (4 for fp32, 8 for bf16/fp16).
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// 16-byte load/store of N values of T (sizeof(T) * N == 16); src/dst 16-byte aligned.
template <typename T, int N>
__device__ __forceinline__ void load16(T (&dst)[N], const T* src) {
  static_assert(sizeof(T) * N == 16, "16-byte vectors");
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  memcpy(&dst[0], &raw, 16);
}
template <typename T, int N>
__device__ __forceinline__ void store16(T* dst, const T (&src)[N]) {
  static_assert(sizeof(T) * N == 16, "16-byte vectors");
  uint4 raw;
  memcpy(&raw, &src[0], 16);
  *reinterpret_cast<uint4*>(dst) = raw;
}
// N floats (N = 4 or 8) as N/4 16-byte vectors.
template <int N>
__device__ __forceinline__ void load_f32(float (&dst)[N], const float* src) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const float4 v = reinterpret_cast<const float4*>(src)[k];
    dst[4 * k + 0] = v.x;
    dst[4 * k + 1] = v.y;
    dst[4 * k + 2] = v.z;
    dst[4 * k + 3] = v.w;
  }
}
template <int N>
__device__ __forceinline__ void store_f32(float* dst, const float (&src)[N]) {
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    reinterpret_cast<float4*>(dst)[k] =
        make_float4(src[4 * k + 0], src[4 * k + 1], src[4 * k + 2], src[4 * k + 3]);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Sum over the block in a fixed order (warp shuffles, then warp 0); the result
// is valid in thread 0.  `smem` holds kWarps doubles.
__device__ __forceinline__ double block_sum(double v, double* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    r = lane < kWarps ? smem[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  return r;
}

// Position of chunk c inside its tensor.
struct ChunkView {
  int t;          // tensor slot in the launch table
  int64_t start;  // first element of the chunk in the tensor
  int64_t n;      // elements in the chunk
};

__device__ __forceinline__ ChunkView chunk_view(const mta::TensorListMeta<3>& m, int32_t c) {
  ChunkView v;
  v.t = mta::locate_tensor(m, c);
  v.start = static_cast<int64_t>(c - m.chunk_start[v.t]) * kChunk;
  const int64_t left = m.numel[v.t] - v.start;
  v.n = left < kChunk ? left : kChunk;
  return v;
}

// ---- pass 1 -------------------------------------------------------------------
// Sum of h^2 (p + q) over one chunk, this thread's share (fp32).
template <typename T>
__device__ __forceinline__ float pass1_chunk(const void* h_base, const float* p, int64_t n, float q) {
  constexpr int N = VecWidth<T>::value;
  const T* h = static_cast<const T*>(h_base);
  float local = 0.f;
  int64_t scalar_from = 0;
  if (aligned16(h) && aligned16(p)) {
    const int64_t nvec = n / N;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      T hv[N];
      float pv[N];
      load16(hv, h + i * N);
      load_f32(pv, p + i * N);
#pragma unroll
      for (int k = 0; k < N; ++k) local += pass1_term(to_float(hv[k]), pv[k], q);
    }
    scalar_from = nvec * N;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads) {
    local += pass1_term(to_float(h[i]), p[i], q);
  }
  return local;
}

// Table lists: 0 = params (unused here), 1 = grads, 2 = variances.
__global__ void __launch_bounds__(kThreads)
    kalman_pass1_kernel(const mta::TensorListMeta<3> meta, int32_t total_chunks, float q,
                        double* __restrict__ partials) {
  __shared__ double smem[kWarps];
  double acc = 0.0;
  for (int32_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const ChunkView cv = chunk_view(meta, c);
    // The chunk's byte offset once, before the dtype dispatch: typed offsets in
    // each branch cost pass 1 ten more registers on sm_80 (ptxas: 44 vs 34).
    const size_t esize = meta.dtype[cv.t] == kF32 ? 4 : 2;
    const void* h = static_cast<const char*>(meta.ptrs[1][cv.t]) + cv.start * esize;
    const float* p = static_cast<const float*>(meta.ptrs[2][cv.t]) + cv.start;
    float local;
    switch (meta.dtype[cv.t]) {  // uniform across the block: one chunk at a time
      case kBF16: local = pass1_chunk<__nv_bfloat16>(h, p, cv.n, q); break;
      case kF16: local = pass1_chunk<__half>(h, p, cv.n, q); break;
      default: local = pass1_chunk<float>(h, p, cv.n, q); break;
    }
    acc += static_cast<double>(local);
  }
  const double s = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// ---- pass 2 -------------------------------------------------------------------
// theta and p of one chunk.
template <typename T>
__device__ __forceinline__ void pass2_chunk(void* w_base, const void* h_base, float* p, int64_t n,
                                            const Pass2Scalars& c) {
  constexpr int N = VecWidth<T>::value;
  T* w = static_cast<T*>(w_base);
  const T* h = static_cast<const T*>(h_base);
  int64_t scalar_from = 0;
  if (aligned16(w) && aligned16(h) && aligned16(p)) {
    const int64_t nvec = n / N;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      T wv[N], hv[N];
      float pv[N];
      load16(wv, w + i * N);
      load16(hv, h + i * N);
      load_f32(pv, p + i * N);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float t = to_float(wv[k]);
        pass2(t, pv[k], to_float(hv[k]), c);
        wv[k] = from_float<T>(t);
      }
      store16(w + i * N, wv);
      store_f32(p + i * N, pv);
    }
    scalar_from = nvec * N;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads) {
    float t = to_float(w[i]);
    float pi = p[i];
    pass2(t, pi, to_float(h[i]), c);
    w[i] = from_float<T>(t);
    p[i] = pi;
  }
}

// At least 5 resident blocks per SM (<= 51 registers): the dtype switch would
// otherwise take 62 registers and 4 blocks (ptxas, sm_90; the per-dtype
// kernels used 48-58); no spills either way.
__global__ void __launch_bounds__(kThreads, 5)
    kalman_pass2_kernel(const mta::TensorListMeta<3> meta, int32_t total_chunks,
                        const double* __restrict__ partials, int32_t nparts,
                        const float* __restrict__ innovation, const float* __restrict__ obs_noise,
                        const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                        StepScalars sc, float* __restrict__ s_out, int write_s) {
  __shared__ double smem[kWarps];
  __shared__ Pass2Scalars c_shared;
  __shared__ int ok_shared;

  // S: every block reduces the partials in the same order -> identical bits,
  // and so every block takes the same skip decision (step_scalars).
  double acc = 0.0;
  for (int32_t i = threadIdx.x; i < nparts; i += kThreads) acc += partials[i];
  const double s = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    Pass2Scalars c0;
    float S;
    const bool ok = step_scalars(s, *obs_noise, *innovation, grad_scale ? *grad_scale : 1.0f,
                                 found_inf ? *found_inf : 0.0f, sc.gate_chi2, sc.q, sc.inv_lambda,
                                 sc.var_floor, c0, S);
    c_shared = c0;
    ok_shared = ok ? 1 : 0;
    if (write_s && blockIdx.x == 0) *s_out = ok ? S : NAN;
  }
  __syncthreads();
  if (!ok_shared) return;  // skipped: parameters and variances untouched
  const Pass2Scalars c = c_shared;

  for (int32_t ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
    const ChunkView cv = chunk_view(meta, ch);
    const size_t esize = meta.dtype[cv.t] == kF32 ? 4 : 2;
    void* w = static_cast<char*>(meta.ptrs[0][cv.t]) + cv.start * esize;
    const void* h = static_cast<const char*>(meta.ptrs[1][cv.t]) + cv.start * esize;
    float* p = static_cast<float*>(meta.ptrs[2][cv.t]) + cv.start;
    switch (meta.dtype[cv.t]) {
      case kBF16: pass2_chunk<__nv_bfloat16>(w, h, p, cv.n, c); break;
      case kF16: pass2_chunk<__half>(w, h, p, cv.n, c); break;
      default: pass2_chunk<float>(w, h, p, cv.n, c); break;
    }
  }
}

// S when every tensor is empty: S = 0 + R (NaN when the step counts as skipped).
__global__ void kalman_empty_kernel(const float* __restrict__ innovation,
                                    const float* __restrict__ obs_noise,
                                    const float* __restrict__ grad_scale,
                                    const float* __restrict__ found_inf, StepScalars sc,
                                    float* __restrict__ s_out) {
  Pass2Scalars c;
  float S;
  const bool ok = step_scalars(0.0, *obs_noise, *innovation, grad_scale ? *grad_scale : 1.0f,
                               found_inf ? *found_inf : 0.0f, sc.gate_chi2, sc.q, sc.inv_lambda,
                               sc.var_floor, c, S);
  *s_out = ok ? S : NAN;
}

int grid_for(int32_t chunks) { return chunks < kMaxBlocks ? static_cast<int>(chunks) : kMaxBlocks; }

std::vector<mta::TensorRef> to_refs(const std::vector<TensorPtrs>& tensors) {
  std::vector<mta::TensorRef> refs;
  refs.reserve(tensors.size());
  for (const TensorPtrs& t : tensors) {
    mta::TensorRef r{};
    r.ptrs[0] = t.param;
    r.ptrs[1] = const_cast<void*>(t.grad);
    r.ptrs[2] = t.var;
    r.numel = t.numel;
    r.list_index = t.list_index;
    r.dtype = static_cast<uint8_t>(t.dtype);
    refs.push_back(r);
  }
  return refs;
}

}  // namespace

int64_t num_partials(const std::vector<TensorPtrs>& tensors) {
  int64_t n = 0;
  mta::for_each_launch<3>(to_refs(tensors), kChunk,
                          [&](const mta::TensorListMeta<3>&, int32_t chunks) { n += grid_for(chunks); });
  return n;
}

cudaError_t launch_step(const std::vector<TensorPtrs>& tensors, const float* innovation,
                        const float* obs_noise, const float* grad_scale, const float* found_inf,
                        const StepScalars& c, double* partials,
                        int64_t nparts, float* s_out, cudaStream_t stream, int* launches) {
  if (launches) *launches = 0;
  if (nparts == 0) {
    kalman_empty_kernel<<<1, 1, 0, stream>>>(innovation, obs_noise, grad_scale, found_inf, c, s_out);
    if (launches) *launches = 1;
    return cudaGetLastError();
  }
  if (nparts > INT32_MAX) return cudaErrorInvalidValue;
  const std::vector<mta::TensorRef> refs = to_refs(tensors);

  cudaError_t err = cudaSuccess;
  int nl = 0;
  int64_t offset = 0;
  nl += mta::for_each_launch<3>(refs, kChunk, [&](const mta::TensorListMeta<3>& meta, int32_t chunks) {
    const int grid = grid_for(chunks);
    kalman_pass1_kernel<<<grid, kThreads, 0, stream>>>(meta, chunks, c.q, partials + offset);
    offset += grid;
    const cudaError_t e = cudaGetLastError();
    if (err == cudaSuccess) err = e;
  });
  if (err != cudaSuccess) return err;
  if (offset != nparts) return cudaErrorInvalidValue;  // buffer sized by num_partials()

  const int32_t np = static_cast<int32_t>(nparts);
  bool s_written = false;
  nl += mta::for_each_launch<3>(refs, kChunk, [&](const mta::TensorListMeta<3>& meta, int32_t chunks) {
    const int write_s = s_written ? 0 : 1;
    kalman_pass2_kernel<<<grid_for(chunks), kThreads, 0, stream>>>(
        meta, chunks, partials, np, innovation, obs_noise, grad_scale, found_inf, c, s_out, write_s);
    s_written = true;
    const cudaError_t e = cudaGetLastError();
    if (err == cudaSuccess) err = e;
  });
  if (launches) *launches = nl;
  return err;
}

}  // namespace vlmkern::kalman::cuda
