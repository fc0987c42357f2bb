// Launcher interface between the torch-facing host code (awp_cuda.cpp) and the
// CUDA kernels (awp_cuda.cu).  No torch header and no device code: both the C++
// compiler and nvcc include this.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "common/vlmkern_common.h"

namespace vlmkern::awp::cuda {

using mta::TensorRef;

// Elements per chunk of the multi-tensor launches (a multiple of every vector width).
constexpr int64_t kChunk = 65536;

// Floats of workspace launch_perturb needs for these tensors (2 per chunk).
int64_t perturb_workspace_floats(const std::vector<TensorRef>& tensors);

// Tensors: ptrs = {params (w), direction source (g, null in random mode),
// backup}, all of `dtype`, any mix of dtypes; list_index selects the row of
// the norms output and the random-mode key.  Norm pass (per-chunk partials
// into `workspace`), fixed-order per-tensor reduction into
// norms[2*index + {0,1}] (||w||, ||d||), perturb pass reading those norms from
// device memory.  3 launches per 768 tensors; no host synchronisation;
// deterministic.  Skip rule: if any norm is not finite, or found_inf
// (nullable, device) is non-zero, the perturb pass only writes backup <- w.
// `nonfinite`: one device int of scratch (cleared and set by the launches).
cudaError_t launch_perturb(const std::vector<TensorRef>& tensors, int mode, uint64_t seed,
                           double gamma_signed, double eps, float* workspace, float* norms,
                           const float* found_inf, int* nonfinite, cudaStream_t stream);

// ptrs = {dst, src}, numel = bytes: dst <- src bytewise for every tensor (any
// dtypes mixed): 1 launch per 768 tensors.
cudaError_t launch_restore(const std::vector<TensorRef>& tensors, cudaStream_t stream);

}  // namespace vlmkern::awp::cuda
