// CUDA kernels of kalman_step_ (SPEC §3), functors of the multi-tensor apply
// (common/multi_tensor_apply.cuh; table lists: 0 = params, 1 = grads,
// 2 = variances).
//
//   pass 1  every block strides over its chunks, accumulates h^2 (p + q)
//           (fp32 within a chunk, fp64 across chunks) and writes ONE float64
//           partial sum.  The grid is min(chunks, mta::kMaxBlocks): it depends
//           on the tensor sizes only, so the partials and S are bitwise
//           reproducible.
//   pass 2  every block first reduces all partials in the same fixed order
//           (so every block holds the same S bit for bit, and S needs no launch
//           of its own), S = s + R, gates the innovation, then updates
//           theta and p of its chunks.  Block 0 of the first pass-2 launch
//           writes S to the output.
// So a step is 2 launches for lists of up to 768 tensors (all of ViT-B/16 or
// ViT-L/14 CLIP, fp32/bf16/fp16 mixed), and 2 more per further 768.
//
// Scalars that change per step (innovation, R, grad_scale, found_inf) are read
// from device memory, and the skip rule (kalman_math.h step_scalars) is
// decided there, by every pass-2 block alike; nothing here synchronises with
// the host, so a step can be captured in a CUDA graph.  Loads and stores are
// 16-byte vectors when the chunk's pointers are 16-byte aligned (always true
// for tensors that own their storage; views at odd offsets take the scalar
// path).
#include "common/multi_tensor_apply.cuh"
#include "kalman/kalman_cuda.h"
#include "kalman/kalman_math.h"

namespace vlmkern::kalman::cuda {
namespace {

using namespace vlmkern::dev;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per chunk (a multiple of every vector width)

struct KalmanOp {
  static constexpr int kThreads = cuda::kThreads;
  static constexpr int64_t kChunk = cuda::kChunk;
  __device__ __forceinline__ static int elem_bytes(int list, DType dt) { return list == 2 ? 4 : dtype_bytes(dt); }
};

// Pass 1: this block's sum of h^2 (p + q) over its chunks -> partials[blockIdx.x].
struct Pass1 : KalmanOp {
  static constexpr int kMinBlocks = 0;  // none: a minimum of 1 costs 24 registers
  float q;
  double* partials;
  double acc;

  __device__ __forceinline__ bool begin_block() {
    acc = 0.0;
    return true;
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<3>& c) {
    constexpr int N = kVecWidth<T>;
    const T* h = static_cast<const T*>(c.ptrs[1]);
    const float* p = static_cast<const float*>(c.ptrs[2]);
    float local = 0.f;  // this thread's share, fp32
    int64_t scalar_from = 0;
    if (aligned16(h) && aligned16(p)) {
      const int64_t nvec = c.len / N;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        T hv[N];
        float pv[N];
        load_vec(hv, h + i * N);
        load_vec(pv, p + i * N);
#pragma unroll
        for (int k = 0; k < N; ++k) local += pass1_term(to_float(hv[k]), pv[k], q);
      }
      scalar_from = nvec * N;
    }
    for (int64_t i = scalar_from + threadIdx.x; i < c.len; i += kThreads) {
      local += pass1_term(to_float(h[i]), p[i], q);
    }
    acc += static_cast<double>(local);
  }
  __device__ __forceinline__ void end_block() {
    __shared__ double smem[kThreads / 32];
    const double s = block_sum<kThreads>(acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
  }
};

// Pass 2: S from the partials, then theta and p of this block's chunks.
// At least 5 resident blocks per SM (<= 51 registers): the dtype switch would
// otherwise take 62 registers and 4 blocks (ptxas, sm_90); no spills either way.
struct Pass2 : KalmanOp {
  static constexpr int kMinBlocks = 5;
  const double* partials;
  int32_t nparts;
  const float* innovation;
  const float* obs_noise;
  const float* grad_scale;  // nullable
  const float* found_inf;   // nullable
  StepScalars sc;
  float* s_out;
  int write_s;  // this launch writes S (the first one)
  Pass2Scalars c;

  __device__ __forceinline__ bool begin_block() {
    __shared__ double smem[kThreads / 32];
    __shared__ Pass2Scalars c_shared;
    __shared__ int ok_shared;
    // Every block reduces the partials in the same order -> identical bits,
    // and so every block takes the same skip decision.
    double acc = 0.0;
    for (int32_t i = threadIdx.x; i < nparts; i += kThreads) acc += partials[i];
    const double s = block_sum<kThreads>(acc, smem);
    if (threadIdx.x == 0) {
      float S;
      const bool ok = step_scalars(s, *obs_noise, *innovation, grad_scale ? *grad_scale : 1.0f,
                                   found_inf ? *found_inf : 0.0f, sc.gate_chi2, sc.q, sc.inv_lambda,
                                   sc.var_floor, c_shared, S);
      ok_shared = ok ? 1 : 0;
      if (write_s && blockIdx.x == 0) *s_out = ok ? S : NAN;
    }
    __syncthreads();
    c = c_shared;
    return ok_shared != 0;  // skipped: parameters and variances untouched
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<3>& ch) {
    constexpr int N = kVecWidth<T>;
    T* w = static_cast<T*>(ch.ptrs[0]);
    const T* h = static_cast<const T*>(ch.ptrs[1]);
    float* p = static_cast<float*>(ch.ptrs[2]);
    int64_t scalar_from = 0;
    if (aligned16(w) && aligned16(h) && aligned16(p)) {
      const int64_t nvec = ch.len / N;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        T wv[N], hv[N];
        float pv[N];
        load_vec(wv, w + i * N);
        load_vec(hv, h + i * N);
        load_vec(pv, p + i * N);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          float t = to_float(wv[k]);
          pass2(t, pv[k], to_float(hv[k]), c);
          wv[k] = from_float<T>(t);
        }
        store_vec(w + i * N, wv);
        store_vec(p + i * N, pv);
      }
      scalar_from = nvec * N;
    }
    for (int64_t i = scalar_from + threadIdx.x; i < ch.len; i += kThreads) {
      float t = to_float(w[i]);
      float pi = p[i];
      pass2(t, pi, to_float(h[i]), c);
      w[i] = from_float<T>(t);
      p[i] = pi;
    }
  }
  __device__ __forceinline__ void end_block() {}
};

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

}  // namespace

int64_t num_partials(const std::vector<TensorRef>& tensors) {
  int64_t n = 0;
  mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>&, int32_t chunks) {
    n += mta::grid_for(chunks);
    return cudaSuccess;
  });
  return n;
}

cudaError_t launch_step(const std::vector<TensorRef>& tensors, const float* innovation,
                        const float* obs_noise, const float* grad_scale, const float* found_inf,
                        const StepScalars& c, double* partials, int64_t nparts, float* s_out,
                        cudaStream_t stream) {
  if (nparts == 0) {
    kalman_empty_kernel<<<1, 1, 0, stream>>>(innovation, obs_noise, grad_scale, found_inf, c, s_out);
    return cudaGetLastError();
  }
  if (nparts > INT32_MAX) return cudaErrorInvalidValue;
  Pass1 p1{};
  p1.q = c.q;
  p1.partials = partials;
  cudaError_t err =
      mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>& m, int32_t chunks) {
        const cudaError_t e = mta::launch(m, chunks, p1, stream);
        p1.partials += mta::grid_for(chunks);
        return e;
      });
  if (err != cudaSuccess) return err;
  if (p1.partials - partials != nparts) return cudaErrorInvalidValue;  // sized by num_partials()

  Pass2 p2{};
  p2.partials = partials;
  p2.nparts = static_cast<int32_t>(nparts);
  p2.innovation = innovation;
  p2.obs_noise = obs_noise;
  p2.grad_scale = grad_scale;
  p2.found_inf = found_inf;
  p2.sc = c;
  p2.s_out = s_out;
  p2.write_s = 1;
  return mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>& m, int32_t chunks) {
    const cudaError_t e = mta::launch(m, chunks, p2, stream);
    p2.write_s = 0;
    return e;
  });
}

}  // namespace vlmkern::kalman::cuda
