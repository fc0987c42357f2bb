// CUDA kernels of awp_perturb_ / awp_restore_ (SPEC §4), functors of the
// multi-tensor apply (common/multi_tensor_apply.cuh).  For up to 768 tensors
// of any mix of fp32 / bf16 / fp16 (the dtype is dispatched per chunk):
//   1. NormOp          : every chunk of kChunk elements writes its
//                        (sum w^2, sum d^2) partial (fp32 within the chunk);
//   2. finalize_kernel : one block per tensor adds its chunks' partials in a
//                        fixed order in double -> norms[index] = (||w||, ||d||);
//   3. PerturbOp       : reads the norms from device memory (no host sync),
//                        backup <- w, w <- round(w + scale * d).
// Skip rule (SPEC §4 "Bad input"): finalize sets a device flag when a norm is
// not finite; the perturb pass then (or when the caller's found_inf is set)
// writes backup <- w only, leaving w as it was, so the restore stays exact.
// So a perturb is 3 launches, and 3 more per further 768 tensors.  The restore
// is one bytewise copy launch (CopyOp) per 768 tensors of any dtypes.  Results
// are deterministic (no atomics).  16-byte vector loads when every pointer of
// the launch is 16-byte aligned; chunk starts are then aligned too (kChunk is
// a multiple of every vector width), tails run element by element.
#include "awp/awp_cuda.h"
#include "awp/awp_math.h"
#include "common/multi_tensor_apply.cuh"

namespace vlmkern::awp::cuda {
namespace {

using namespace vlmkern::dev;

constexpr int kThreads = 512;
constexpr int kFinalizeThreads = 256;
constexpr int64_t kCopyChunkBytes = 262144;  // bytes per chunk of the restore copy

struct AwpOp {
  static constexpr int kThreads = cuda::kThreads;
  static constexpr int kMinBlocks = 0;
  static constexpr int64_t kChunk = cuda::kChunk;
  __device__ __forceinline__ static int elem_bytes(int, DType dt) { return dtype_bytes(dt); }
  __device__ __forceinline__ void end_block() {}
};

// Lists: w, g (null in random mode).  partials[chunk] = (sum w^2, sum d^2).
template <int MODE, bool VEC>
struct NormOp : AwpOp {
  uint64_t seed;
  float2* partials;
  int* nonfinite;
  int zero_flag;  // the first norm launch clears the skip flag; finalize sets it

  __device__ __forceinline__ bool begin_block() {
    if (zero_flag && blockIdx.x == 0 && threadIdx.x == 0) *nonfinite = 0;
    return true;
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<2>& c) {
    __shared__ Pair<float> smem[kThreads / 32];
    const T* w = static_cast<const T*>(c.ptrs[0]);
    const T* g = static_cast<const T*>(c.ptrs[1]);
    const uint32_t key = MODE == kModeRandom ? tensor_key(seed, static_cast<uint32_t>(c.list_index)) : 0u;
    Pair<float> s{0.f, 0.f};
    int64_t i0 = 0;
    if (VEC) {
      constexpr int N = kVecWidth<T>;
      const int64_t nv = c.len / N;
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
        T wv[N], gv[N];
        load_vec(wv, w + j * N);
        if (MODE == kModeAdversarial) load_vec(gv, g + j * N);
#pragma unroll
        for (int q = 0; q < N; ++q) {
          const float x = to_float(wv[q]);
          s.x += x * x;
          const float d = MODE == kModeAdversarial ? to_float(gv[q]) : gaussian(key, c.start + j * N + q);
          s.y += d * d;
        }
      }
      i0 = nv * N;
    }
    for (int64_t i = i0 + threadIdx.x; i < c.len; i += kThreads) {
      const float x = to_float(w[i]);
      s.x += x * x;
      const float d = MODE == kModeAdversarial ? to_float(g[i]) : gaussian(key, c.start + i);
      s.y += d * d;
    }
    s = block_sum<kThreads>(s, smem);
    if (threadIdx.x == 0) partials[c.index] = make_float2(s.x, s.y);
  }
};

// One block per tensor of the launch: fixed-order double sum of its partials.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(mta::TensorListMeta<2> m, const float2* partials, float* norms, int* nonfinite) {
  __shared__ Pair<double> smem[kFinalizeThreads / 32];
  const int t = blockIdx.x;
  Pair<double> s{0.0, 0.0};
  for (int32_t c = m.chunk_start[t] + threadIdx.x; c < m.chunk_start[t + 1]; c += kFinalizeThreads) {
    const float2 p = partials[c];
    s.x += p.x;
    s.y += p.y;
  }
  s = block_sum<kFinalizeThreads>(s, smem);
  if (threadIdx.x == 0) {
    const int64_t row = m.list_index[t];
    const float nw = static_cast<float>(sqrt(s.x));
    const float nd = static_cast<float>(sqrt(s.y));
    norms[2 * row] = nw;
    norms[2 * row + 1] = nd;
    if (!finite_norm(nw) || !finite_norm(nd)) *nonfinite = 1;  // every writer writes 1: no race
  }
}

// Lists: w, g (null in random mode), backup.  backup <- w, w <- round(w + s * d);
// when skipped only backup <- w (SPEC §4 "Bad input").
template <int MODE, bool VEC>
struct PerturbOp : AwpOp {
  uint64_t seed;
  double gamma_signed, eps;
  const float* norms;
  const int* nonfinite;
  const float* found_inf;  // nullable
  bool skip;

  __device__ __forceinline__ bool begin_block() {
    skip = *nonfinite != 0 || (found_inf != nullptr && !(*found_inf == 0.f));
    return true;
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<3>& c) {
    T* w = static_cast<T*>(c.ptrs[0]);
    const T* g = static_cast<const T*>(c.ptrs[1]);
    T* bk = static_cast<T*>(c.ptrs[2]);
    const int64_t row = c.list_index;
    const float s = scale(norms[2 * row], norms[2 * row + 1], gamma_signed, eps);
    const uint32_t key = MODE == kModeRandom ? tensor_key(seed, static_cast<uint32_t>(row)) : 0u;
    int64_t i0 = 0;
    if (VEC) {
      constexpr int N = kVecWidth<T>;
      const int64_t nv = c.len / N;
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
        T wv[N], gv[N];
        load_vec(wv, w + j * N);
        if (MODE == kModeAdversarial) load_vec(gv, g + j * N);
        store_vec(bk + j * N, wv);
        if (skip) continue;
#pragma unroll
        for (int q = 0; q < N; ++q) {
          const float d = MODE == kModeAdversarial ? to_float(gv[q]) : gaussian(key, c.start + j * N + q);
          wv[q] = from_float<T>(perturbed(to_float(wv[q]), s, d));
        }
        store_vec(w + j * N, wv);
      }
      i0 = nv * N;
    }
    for (int64_t i = i0 + threadIdx.x; i < c.len; i += kThreads) {
      const T x = w[i];
      bk[i] = x;
      if (skip) continue;
      const float d = MODE == kModeAdversarial ? to_float(g[i]) : gaussian(key, c.start + i);
      w[i] = from_float<T>(perturbed(to_float(x), s, d));
    }
  }
};

// Lists: dst, src; "elements" are bytes, whatever the dtype.
template <bool VEC>
struct CopyOp : AwpOp {
  static constexpr int64_t kChunk = kCopyChunkBytes;
  __device__ __forceinline__ static int elem_bytes(int, DType) { return 1; }
  __device__ __forceinline__ bool begin_block() { return true; }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<2>& c) {
    char* dst = static_cast<char*>(c.ptrs[0]);
    const char* src = static_cast<const char*>(c.ptrs[1]);
    int64_t i0 = 0;
    if (VEC) {
      const int64_t nv = c.len / 16;
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
        reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(src)[j];
      }
      i0 = nv * 16;
    }
    for (int64_t i = i0 + threadIdx.x; i < c.len; i += kThreads) dst[i] = src[i];
  }
};

// Launches Op<true> (vector path) when every pointer of the lists in `mask`
// is 16-byte aligned in this table, else Op<false>.
template <template <bool> class Op, int NLists, typename... Args>
cudaError_t launch_vec(const mta::TensorListMeta<NLists>& m, int32_t chunks, unsigned mask,
                       cudaStream_t stream, const Args&... args) {
  bool aligned = true;
  for (int l = 0; l < NLists; ++l) aligned = aligned && (!(mask >> l & 1u) || mta::list_aligned(m, l));
  return aligned ? mta::launch(m, chunks, Op<true>{{}, args...}, stream)
                 : mta::launch(m, chunks, Op<false>{{}, args...}, stream);
}

template <int MODE>
struct Modes {
  template <bool VEC>
  using Norm = NormOp<MODE, VEC>;
  template <bool VEC>
  using Perturb = PerturbOp<MODE, VEC>;
};

template <int MODE>
cudaError_t run_perturb(const std::vector<TensorRef>& refs, uint64_t seed, double gamma_signed,
                        double eps, float* workspace, float* norms, const float* found_inf,
                        int* nonfinite, cudaStream_t stream) {
  // Aligned lists needed for the vector path: w (and g in adversarial mode); backup too when perturbing.
  const unsigned wg = MODE == kModeRandom ? 1u : 3u;
  float2* partials = reinterpret_cast<float2*>(workspace);
  int zero_flag = 1;
  cudaError_t err = mta::for_each_launch<2>(refs, kChunk, [&](const mta::TensorListMeta<2>& m, int32_t chunks) {
    cudaError_t e = launch_vec<Modes<MODE>::template Norm>(m, chunks, wg, stream, seed, partials, nonfinite,
                                                           zero_flag);
    zero_flag = 0;
    if (e == cudaSuccess) {
      finalize_kernel<<<m.ntensors, kFinalizeThreads, 0, stream>>>(m, partials, norms, nonfinite);
      e = cudaGetLastError();
    }
    partials += chunks;
    return e;
  });
  if (err != cudaSuccess) return err;
  return mta::for_each_launch<3>(refs, kChunk, [&](const mta::TensorListMeta<3>& m, int32_t chunks) {
    return launch_vec<Modes<MODE>::template Perturb>(m, chunks, wg | 4u, stream, seed, gamma_signed, eps,
                                                     norms, nonfinite, found_inf, false);
  });
}

}  // namespace

int64_t perturb_workspace_floats(const std::vector<TensorRef>& tensors) {
  int64_t chunks = 0;
  for (const TensorRef& t : tensors) chunks += (t.numel + kChunk - 1) / kChunk;
  return 2 * chunks;
}

cudaError_t launch_perturb(const std::vector<TensorRef>& tensors, int mode, uint64_t seed,
                           double gamma_signed, double eps, float* workspace, float* norms,
                           const float* found_inf, int* nonfinite, cudaStream_t stream) {
  if (tensors.empty()) return cudaSuccess;
  return mode == kModeRandom
             ? run_perturb<kModeRandom>(tensors, seed, gamma_signed, eps, workspace, norms, found_inf,
                                        nonfinite, stream)
             : run_perturb<kModeAdversarial>(tensors, seed, gamma_signed, eps, workspace, norms,
                                             found_inf, nonfinite, stream);
}

cudaError_t launch_restore(const std::vector<TensorRef>& tensors, cudaStream_t stream) {
  return mta::for_each_launch<2>(tensors, kCopyChunkBytes, [&](const mta::TensorListMeta<2>& m, int32_t chunks) {
    return launch_vec<CopyOp>(m, chunks, 3u, stream);
  });
}

}  // namespace vlmkern::awp::cuda
