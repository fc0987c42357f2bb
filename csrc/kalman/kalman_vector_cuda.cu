// CUDA kernels of kalman_vector_step_ (SPEC §3, M observations per step),
// functors of the multi-tensor apply (common/multi_tensor_apply.cuh; table
// lists: 0 = params [n], 1 = Jacobian rows H [M, n] read in place, 2 =
// variances [n]).
//
//   pass 1  (1 launch per 768 tensors)  Gram G = H diag(p + q) H^T.  The M x M
//           output is cut into 32 x 32 tiles; only the tiles on and above the
//           diagonal are computed, one per blockIdx.y.  Each block strides over
//           its chunks (4096 elements), stages 32 elements of its tile's 2 x 32
//           rows in shared memory, and each thread accumulates 4 entries of the
//           tile (fp32 within a chunk, fp64 across chunks); the block writes its
//           tile to its own slot of the workspace.  No atomics: the grid
//           (min(chunks, 1024 / tiles) x tiles) depends on the sizes only.
//   reduce  (1 launch)  S = G / grad_scale^2 + diag(R): every entry sums its
//           slots in block order (fp64), so S is bitwise reproducible and
//           exactly symmetric (entry (a, b) and (b, a) read the same slots).
//   solve   (1 launch, one block)  the skip rule (found_inf, grad_scale, e, R,
//           S finite, Cholesky), Cholesky of S in fp64, L^-1, S^-1 = L^-T L^-1,
//           c = S^-1 e, d2 = e^T c, the Mahalanobis gate (c *= sqrt(chi2 / d2)
//           when d2 > chi2); writes S^-1 / grad_scale^2 (packed lower triangle,
//           fp32), c / grad_scale, the skip flag, d2, and NaN over S when skipped.
//           A kernel of its own rather than ATen's cholesky_ex + cholesky_inverse:
//           those are several launches plus element-wise ops for the skip rule
//           and the gate, while one block does the whole M <= 256 system with
//           its decisions on the device, in a fixed order (bitwise
//           reproducible), and runs on the CPU emulator like the other kernels.
//   pass 2  (1 launch per 768 tensors)  per element i with column h_i (M
//           values, stride n): theta_i += p_hat_i (c . h_i),
//           p_i = max((p_hat_i - p_hat_i^2 h_i^T S^-1 h_i) / lambda, floor);
//           S^-1 (M(M+1)/2 floats) and c are staged in shared memory for
//           M <= 128 (33 KiB), read from the workspace (L1/L2) above.
// So a step is 4 launches for up to 768 tensors of any mix of fp32/bf16/fp16
// (2 more per further 768), 2 when every tensor is empty.  M <= 256.
// Nothing here synchronises with the host: every per-step value (e, R,
// grad_scale, found_inf) is read from device memory and every decision is
// taken on the device, so a step can be captured in a CUDA graph.
#include "common/multi_tensor_apply.cuh"
#include "kalman/kalman_math.h"
#include "kalman/kalman_vector_cuda.h"

namespace vlmkern::kalman::vcuda {
namespace {

using namespace vlmkern::dev;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per chunk (a multiple of kK)
constexpr int kTile = 32;         // Gram tile: kTile x kTile entries
constexpr int kK = 32;            // elements staged per step of pass 1
constexpr int kTileEntries = kTile * kTile;
constexpr int kGramBlocks = 1024;  // pass-1 blocks per launch (x * tiles), at most
constexpr int kSharedM = 128;      // pass 2 stages S^-1 in shared memory up to this M
constexpr int kSolveThreads = kMaxM;
static_assert(kThreads == kTile * kTile / 4, "pass 1: 4 tile entries per thread");
static_assert(kThreads % kK == 0 && kTile % (kThreads / kK) == 0, "pass 1 staging");
static_assert(kChunk % kK == 0, "chunk of whole staging steps");

__host__ __device__ __forceinline__ int tiles_1d(int M) { return (M + kTile - 1) / kTile; }
__host__ __device__ __forceinline__ int tiles_upper(int M) { return tiles_1d(M) * (tiles_1d(M) + 1) / 2; }
inline int gram_max_blocks(int M) {
  const int b = kGramBlocks / tiles_upper(M);
  return b > 0 ? b : 1;
}

// Tiles (ti, tj), ti <= tj, numbered row by row.
__host__ __device__ __forceinline__ int tile_index(int ti, int tj, int n1) {
  return ti * n1 - ti * (ti - 1) / 2 + (tj - ti);
}

struct VectorOp {
  static constexpr int kThreads = vcuda::kThreads;
  static constexpr int64_t kChunk = vcuda::kChunk;
  __device__ __forceinline__ static int elem_bytes(int list, DType dt) {
    return list == 2 ? 4 : dtype_bytes(dt);
  }
};

// Pass 1: this block's tile (blockIdx.y) of sum_i h_i (p_i + q) h_i^T over its chunks.
struct GramPass : VectorOp {
  static constexpr int kMinBlocks = 0;
  float q;
  int32_t M;
  int32_t n1;           // tiles per side
  int32_t ntiles;       // tiles on and above the diagonal
  int64_t part_offset;  // slot of this launch's block 0 (earlier launches' blocks come first)
  double* partials;     // [slots][ntiles][kTile * kTile]
  int row0, col0;       // first row of the tile's A side / B side
  float* sa;            // [kTile][kK + 1] h_a (p + q), shared
  float* sb;            // [kTile][kK + 1] h_b, shared
  double acc[4];

  __device__ __forceinline__ bool begin_block() {
    __shared__ float a_tile[kTile * (kK + 1)];
    __shared__ float b_tile[kTile * (kK + 1)];
    sa = a_tile;
    sb = b_tile;
    int ti = 0, tj = 0;
    for (int t = 0; t < n1; ++t) {  // blockIdx.y -> (ti, tj)
      for (int u = t; u < n1; ++u) {
        if (tile_index(t, u, n1) == static_cast<int>(blockIdx.y)) ti = t, tj = u;
      }
    }
    row0 = ti * kTile;
    col0 = tj * kTile;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = 0.0;
    return true;
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<3>& c) {
    const T* h = static_cast<const T*>(c.ptrs[1]);
    const float* p = static_cast<const float*>(c.ptrs[2]);
    const int64_t n = c.numel;
    const int k = threadIdx.x % kK;  // staging: element k of rows r0, r0 + 8, ...
    const int r0 = threadIdx.x / kK;
    const int r = threadIdx.x / 8;  // accumulation: entries (r, cb + 8 j)
    const int cb = threadIdx.x % 8;
    float f[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t k0 = 0; k0 < c.len; k0 += kK) {
      const int64_t i = k0 + k;
      const bool in = i < c.len;
      float ph = 0.f;
      if (in) {
        const float pv = p[i];
        ph = pv >= 0.f ? pv + q : NAN;  // a corrupt variance makes S NaN: the step is skipped
      }
#pragma unroll
      for (int rr = 0; rr < kTile; rr += kThreads / kK) {
        const int a = row0 + r0 + rr, b = col0 + r0 + rr;
        sa[(r0 + rr) * (kK + 1) + k] = (in && a < M) ? to_float(h[a * n + i]) * ph : 0.f;
        sb[(r0 + rr) * (kK + 1) + k] = (in && b < M) ? to_float(h[b * n + i]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kK; ++kk) {
        const float x = sa[r * (kK + 1) + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) f[j] += x * sb[(cb + 8 * j) * (kK + 1) + kk];
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(f[j]);
  }
  __device__ __forceinline__ void end_block() {
    const int r = threadIdx.x / 8, cb = threadIdx.x % 8;
    double* out = partials + ((part_offset + blockIdx.x) * ntiles + blockIdx.y) * kTileEntries;
#pragma unroll
    for (int j = 0; j < 4; ++j) out[r * kTile + cb + 8 * j] = acc[j];
  }
};

// S[a, b] = sum over slots of G's entry (min, max) / grad_scale^2 + (a == b) R[a].
__global__ void __launch_bounds__(kThreads)
    gram_reduce_kernel(const double* __restrict__ partials, int64_t nslots, int M,
                       const float* __restrict__ grad_scale, const float* __restrict__ obs_noise,
                       float* __restrict__ s_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(M) * M) return;
  const int a = static_cast<int>(idx / M), b = static_cast<int>(idx % M);
  const int lo = a < b ? a : b, hi = a < b ? b : a;
  const int n1 = tiles_1d(M), ntiles = tiles_upper(M);
  const int64_t off = static_cast<int64_t>(tile_index(lo / kTile, hi / kTile, n1)) * kTileEntries +
                      (lo % kTile) * kTile + hi % kTile;
  double s = 0.0;
  for (int64_t slot = 0; slot < nslots; ++slot) s += partials[slot * ntiles * kTileEntries + off];
  const float inv = 1.0f / (grad_scale ? *grad_scale : 1.0f);
  const double inv_d = static_cast<double>(inv);
  float S = static_cast<float>(s * inv_d * inv_d);
  if (a == b) S += obs_noise[a];
  s_out[idx] = S;
}

// One block: skip rule, Cholesky (fp64), S^-1, c = S^-1 e, d2, gate.
// A, Li: M x M fp64 scratch (row-major).  Outputs: sinv (packed lower, / gs^2),
// cvec (c / gs), flag (1 = take the step, 0 = skip), d2_out, and S <- NaN when skipped.
__global__ void __launch_bounds__(kSolveThreads)
    solve_kernel(int M, const float* __restrict__ innovation, const float* __restrict__ obs_noise,
                 const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                 float gate_chi2, double* __restrict__ A, double* __restrict__ Li,
                 float* __restrict__ sinv, float* __restrict__ cvec, float* __restrict__ flag,
                 float* __restrict__ d2_out, float* __restrict__ s_out) {
  __shared__ int ismem[kSolveThreads / 32];
  __shared__ double dsmem[kSolveThreads / 32];
  __shared__ double c_sh[kMaxM];
  __shared__ int ok_sh;    // the checks before the factorisation (never written after)
  __shared__ int fail_sh;  // the factorisation failed
  __shared__ double piv_sh;
  __shared__ double gate_sh;
  const int t = threadIdx.x;
  const int MM = M * M;
  const float gs = grad_scale ? *grad_scale : 1.0f;
  const float fi = found_inf ? *found_inf : 0.0f;
  const float inv = 1.0f / gs;
  const double inv_d = static_cast<double>(inv);

  // Skip rule, part 1: every value finite (and R > 0).
  int bad = 0;
  for (int idx = t; idx < MM; idx += kSolveThreads) {
    const float s = s_out[idx];
    bad += !finite_f(s);
    A[idx] = static_cast<double>(s);
  }
  if (t < M) {
    const float e = innovation[t], R = obs_noise[t];
    bad += !finite_f(e) + !finite_f(R) + !(R > 0.f);
  }
  bad = block_sum<kSolveThreads>(bad, ismem);
  if (t == 0) {
    ok_sh = bad == 0 && fi == 0.f && finite_f(gs) && gs > 0.f && finite_f(inv);
    fail_sh = 0;
  }
  __syncthreads();

  // Cholesky S = L L^T, right-looking, L in A's lower triangle.  A pivot that
  // is not > 0 (S not positive definite, or NaN) skips the step.
  if (ok_sh) {
    for (int j = 0; j < M; ++j) {
      if (t == 0) {
        const double d = A[j * M + j];
        if (d > 0.0) {
          piv_sh = sqrt(d);
          A[j * M + j] = piv_sh;
        } else {
          fail_sh = 1;
        }
      }
      __syncthreads();
      if (fail_sh) break;  // uniform: every thread reads the same flag after the barrier
      const double piv = piv_sh;
      for (int i = j + 1 + t; i < M; i += kSolveThreads) A[i * M + j] /= piv;
      __syncthreads();
      const int m = M - j - 1;  // trailing lower triangle: rows/cols j+1 .. M-1
      for (int idx = t; idx < m * m; idx += kSolveThreads) {
        const int i = j + 1 + idx / m, k = j + 1 + idx % m;
        if (k <= i) A[i * M + k] -= A[i * M + j] * A[k * M + j];
      }
      __syncthreads();
    }
  }
  const bool ok = ok_sh != 0 && fail_sh == 0;  // after the loop's last barrier

  if (ok) {
    // L^-1 (lower), one column per thread: L x = e_col by forward substitution.
    for (int col = t; col < M; col += kSolveThreads) {
      Li[col * M + col] = 1.0 / A[col * M + col];
      for (int i = col + 1; i < M; ++i) {
        double s = 0.0;
        for (int k = col; k < i; ++k) s += A[i * M + k] * Li[k * M + col];
        Li[i * M + col] = -s / A[i * M + i];
      }
    }
    __syncthreads();
    // S^-1 = L^-T L^-1: entry (a, b), b <= a, = sum_{k >= a} Li[k, a] Li[k, b].
    // L is no longer needed: S^-1 (both triangles) goes into A.
    for (int idx = t; idx < MM; idx += kSolveThreads) {
      const int a = idx / M, b = idx % M;
      if (b > a) continue;
      double s = 0.0;
      for (int k = a; k < M; ++k) s += Li[k * M + a] * Li[k * M + b];
      A[a * M + b] = s;
      A[b * M + a] = s;
      sinv[a * (a + 1) / 2 + b] = static_cast<float>(s * inv_d * inv_d);
    }
    __syncthreads();
  }
  // c = S^-1 e, d2 = e^T c (fixed-order block sum).
  double ec = 0.0;
  if (ok && t < M) {
    double s = 0.0;
    for (int b = 0; b < M; ++b) s += A[t * M + b] * static_cast<double>(innovation[b]);
    c_sh[t] = s;
    ec = static_cast<double>(innovation[t]) * s;
  }
  const double d2 = block_sum<kSolveThreads>(ec, dsmem);
  if (t == 0) {
    gate_sh = (gate_chi2 > 0.f && d2 > static_cast<double>(gate_chi2))
                  ? sqrt(static_cast<double>(gate_chi2) / d2)
                  : 1.0;
    *flag = ok ? 1.0f : 0.0f;
    *d2_out = ok ? static_cast<float>(d2) : NAN;
  }
  __syncthreads();
  if (ok) {
    if (t < M) cvec[t] = static_cast<float>(c_sh[t] * gate_sh * inv_d);
  } else {
    for (int idx = t; idx < MM; idx += kSolveThreads) s_out[idx] = NAN;
  }
}

// Pass 2: theta and p of this block's chunks (nothing when the step is skipped).
struct UpdatePass : VectorOp {
  static constexpr int kMinBlocks = 0;
  int32_t M;
  const float* sinv_g;  // packed lower triangle of S^-1 / gs^2 (workspace)
  const float* cvec_g;  // c / gs (workspace)
  const float* flag;
  float q, inv_lambda, floor;
  const float* sinv;  // shared copy (M <= kSharedM) or sinv_g
  const float* cs;    // shared copy of c

  __device__ __forceinline__ bool begin_block() {
    __shared__ float sinv_sh[kSharedM * (kSharedM + 1) / 2];
    __shared__ float c_sh[kMaxM];
    if (!(*flag != 0.f)) return false;  // skipped: every thread reads the same flag
    for (int a = threadIdx.x; a < M; a += kThreads) c_sh[a] = cvec_g[a];
    if (M <= kSharedM) {
      const int np = M * (M + 1) / 2;
      for (int k = threadIdx.x; k < np; k += kThreads) sinv_sh[k] = sinv_g[k];
      sinv = sinv_sh;
    } else {
      sinv = sinv_g;
    }
    cs = c_sh;
    __syncthreads();
    return true;
  }
  template <typename T>
  __device__ __forceinline__ void chunk(const mta::Chunk<3>& ch) {
    T* w = static_cast<T*>(ch.ptrs[0]);
    const T* h = static_cast<const T*>(ch.ptrs[1]);
    float* p = static_cast<float*>(ch.ptrs[2]);
    const int64_t n = ch.numel;
    for (int64_t i = threadIdx.x; i < ch.len; i += kThreads) {
      float hv[kMaxM];
      float dot = 0.f, quad = 0.f;
      for (int a = 0; a < M; ++a) {
        const float ha = to_float(h[a * n + i]);
        hv[a] = ha;
        dot += cs[a] * ha;
        const float* row = sinv + a * (a + 1) / 2;
        float s = 0.f;
        for (int b = 0; b < a; ++b) s += row[b] * hv[b];
        quad += ha * (2.f * s + row[a] * ha);
      }
      const float ph = p[i] + q;
      w[i] = from_float<T>(to_float(w[i]) + ph * dot);
      const float pn = (ph - ph * ph * quad) * inv_lambda;
      p[i] = pn >= floor ? pn : floor;  // also catches NaN
    }
  }
  __device__ __forceinline__ void end_block() {}
};

// Pass-1 slots (blocks along x, summed over the launches).
int64_t gram_slots(const std::vector<TensorRef>& tensors, int M) {
  int64_t n = 0;
  mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>&, int32_t chunks) {
    n += mta::grid_for(chunks, gram_max_blocks(M));
    return cudaSuccess;
  });
  return n;
}

}  // namespace

WorkspaceSize workspace_size(const std::vector<TensorRef>& tensors, int M) {
  const int64_t slots = gram_slots(tensors, M);
  WorkspaceSize w;
  w.doubles = slots * tiles_upper(M) * kTileEntries + 2 * static_cast<int64_t>(M) * M;
  w.floats = static_cast<int64_t>(M) * (M + 1) / 2 + M + 1;
  return w;
}

cudaError_t launch_vector_step(const std::vector<TensorRef>& tensors, int M,
                               const float* innovation, const float* obs_noise,
                               const float* grad_scale, const float* found_inf,
                               const VectorScalars& sc, double* ws_d, float* ws_f, float* s_out,
                               float* d2_out, cudaStream_t stream) {
  if (M < 1 || M > kMaxM) return cudaErrorInvalidValue;
  const int64_t slots = gram_slots(tensors, M);
  const int ntiles = tiles_upper(M);
  double* partials = ws_d;
  double* A = partials + slots * ntiles * kTileEntries;
  double* Li = A + static_cast<int64_t>(M) * M;
  float* sinv = ws_f;
  float* cvec = sinv + static_cast<int64_t>(M) * (M + 1) / 2;
  float* flag = cvec + M;

  GramPass p1{};
  p1.q = sc.q;
  p1.M = M;
  p1.n1 = tiles_1d(M);
  p1.ntiles = ntiles;
  p1.part_offset = 0;
  p1.partials = partials;
  cudaError_t err =
      mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>& m, int32_t chunks) {
        const cudaError_t e =
            mta::launch(m, chunks, p1, stream, gram_max_blocks(M), static_cast<unsigned>(ntiles));
        p1.part_offset += mta::grid_for(chunks, gram_max_blocks(M));
        return e;
      });
  if (err != cudaSuccess) return err;
  if (p1.part_offset != slots) return cudaErrorInvalidValue;

  const int64_t MM = static_cast<int64_t>(M) * M;
  gram_reduce_kernel<<<static_cast<unsigned>((MM + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partials, slots, M, grad_scale, obs_noise, s_out);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  solve_kernel<<<1, kSolveThreads, 0, stream>>>(M, innovation, obs_noise, grad_scale, found_inf,
                                                sc.gate_chi2, A, Li, sinv, cvec, flag, d2_out,
                                                s_out);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  UpdatePass p2{};
  p2.M = M;
  p2.sinv_g = sinv;
  p2.cvec_g = cvec;
  p2.flag = flag;
  p2.q = sc.q;
  p2.inv_lambda = sc.inv_lambda;
  p2.floor = sc.var_floor;
  return mta::for_each_launch<3>(tensors, kChunk, [&](const mta::TensorListMeta<3>& m, int32_t chunks) {
    return mta::launch(m, chunks, p2, stream);
  });
}

}  // namespace vlmkern::kalman::vcuda
