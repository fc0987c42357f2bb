// Launcher interface of the CUDA Kalman step (kalman_cuda.cu), used by the
// torch-facing host code (kalman_cuda.cpp).  Plain C++ types only: no torch
// header and no CUDA device code, so both nvcc and the host compiler include it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "common/vlmkern_common.h"

namespace vlmkern::kalman::cuda {

// Tensors: ptrs = {param (T, updated in place), grad (T), variance (float32,
// updated in place)}, T = dtype; any mix of dtypes.
using mta::TensorRef;

struct StepScalars {
  float q;           // process noise
  float inv_lambda;  // 1 / forgetting
  float var_floor;
  float gate_chi2;  // <= 0: no gate
};

// Number of float64 per-block partial sums pass 1 writes (the size of the
// `partials` buffer launch_step needs).  0 when every tensor is empty.
int64_t num_partials(const std::vector<TensorRef>& tensors);

// Pass 1 then pass 2 on `stream`: reads innovation / obs_noise (and, when not
// null, grad_scale / found_inf) from device memory, writes S (0-d float32) to
// s_out, or NaN when the step is skipped (kalman_math.h step_scalars: then
// nothing else is written).  No host synchronisation, no host<->device
// copies: capturable in a CUDA graph.
cudaError_t launch_step(const std::vector<TensorRef>& tensors, const float* innovation,
                        const float* obs_noise, const float* grad_scale, const float* found_inf,
                        const StepScalars& c, double* partials, int64_t nparts, float* s_out,
                        cudaStream_t stream);

}  // namespace vlmkern::kalman::cuda
