// Launcher interface of the CUDA Kalman step (kalman_cuda.cu), used by the
// torch-facing host code (kalman_cuda.cpp).  Plain C++ types only: no torch
// header and no CUDA device code, so both nvcc and the host compiler include it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace vlmkern::kalman::cuda {

// Parameter dtypes.  Any mix goes into one launch per pass (768 tensors per
// launch; one more launch per pass for every further 768).
enum ParamDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One tensor of the step: contiguous storage, `numel` > 0 elements each.
struct TensorPtrs {
  void* param;       // T[numel], updated in place
  const void* grad;  // T[numel]
  float* var;        // float[numel], updated in place
  int64_t numel;
  int32_t list_index;  // position in the caller's list (diagnostics only)
  ParamDtype dtype;    // T of param and grad
};

struct StepScalars {
  float q;           // process noise
  float inv_lambda;  // 1 / forgetting
  float var_floor;
  float gate_chi2;  // <= 0: no gate
};

// Number of float64 per-block partial sums pass 1 writes (the size of the
// `partials` buffer launch_step needs).  0 when every tensor is empty.
int64_t num_partials(const std::vector<TensorPtrs>& tensors);

// Pass 1 then pass 2 on `stream`: reads innovation / obs_noise (and, when not
// null, grad_scale / found_inf) from device memory, writes S (0-d float32) to
// s_out, or NaN when the step is skipped (kalman_math.h step_scalars: then
// nothing else is written).  No host synchronisation, no
// host<->device copies: capturable in a CUDA graph.  `launches` (optional)
// receives the number of kernel launches made.
cudaError_t launch_step(const std::vector<TensorPtrs>& tensors, const float* innovation,
                        const float* obs_noise, const float* grad_scale, const float* found_inf,
                        const StepScalars& c, double* partials, int64_t nparts, float* s_out,
                        cudaStream_t stream, int* launches);

}  // namespace vlmkern::kalman::cuda
