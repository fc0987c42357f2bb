// Launcher interface of the CUDA vector-observation Kalman step
// (kalman_vector_cuda.cu), used by the torch-facing host code
// (kalman_vector_cuda.cpp).  Plain C++ types only: no torch header and no CUDA
// device code, so both nvcc and the host compiler include it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "common/vlmkern_common.h"

namespace vlmkern::kalman::vcuda {

// Tensors: ptrs = {param (T, [n], updated in place), Jacobian rows H (T,
// [M, n] contiguous), variance (float32, [n], updated in place)}, numel = n,
// T = dtype; any mix of dtypes.
using mta::TensorRef;

// Largest number of observations M (pass 2 keeps a thread's column h_i, M
// floats, in a local array).  S^-1 is staged in shared memory for M <= 128.
constexpr int kMaxM = 256;

struct VectorScalars {
  float q;           // process noise
  float inv_lambda;  // 1 / forgetting
  float var_floor;
  float gate_chi2;  // <= 0: no gate
};

// Workspace sizes launch_vector_step needs, for these tensors and M.
struct WorkspaceSize {
  int64_t doubles;  // pass-1 partial Gram tiles, the Cholesky factor, its inverse
  int64_t floats;   // S^-1 (packed lower triangle), c = S^-1 e, the skip flag
};
WorkspaceSize workspace_size(const std::vector<TensorRef>& tensors, int M);

// The whole step on `stream`: reads innovation [M], obs_noise [M] (and, when
// not null, grad_scale / found_inf) from device memory; writes S (M x M
// float32) to s_out and e^T S^-1 e (ungated, float32) to d2_out, both NaN when
// the step is skipped (then params and variances are not written).  No host
// synchronisation, no host<->device copy: capturable in a CUDA graph.
cudaError_t launch_vector_step(const std::vector<TensorRef>& tensors, int M,
                               const float* innovation, const float* obs_noise,
                               const float* grad_scale, const float* found_inf,
                               const VectorScalars& sc, double* ws_d, float* ws_f, float* s_out,
                               float* d2_out, cudaStream_t stream);

}  // namespace vlmkern::kalman::vcuda
