// Launcher interface between the torch-facing host code (awp_cuda.cpp) and the
// CUDA kernels (awp_cuda.cu).  No torch header and no device code: both the C++
// compiler and nvcc include this.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace vlmkern::awp::cuda {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Elements per chunk of the multi-tensor launches (a multiple of every vector width).
constexpr int64_t kChunk = 65536;
// Bytes per chunk of the (dtype-agnostic) restore copy.
constexpr int64_t kCopyChunkBytes = 262144;

// One tensor of a perturb call: params (w), direction source (g, null in random
// mode), backup, all of `dtype`; numel > 0; index = position in the caller's
// list (selects the row of the norms output and the random-mode key).
struct PerturbDesc {
  void* w;
  const void* g;
  void* backup;
  int64_t numel;
  int32_t index;
  DType dtype;
};

struct CopyDesc {
  void* dst;
  const void* src;
  int64_t nbytes;
};

// Floats of workspace launch_perturb needs for these tensors (2 per chunk).
int64_t perturb_workspace_floats(const PerturbDesc* descs, int n);

// Every tensor, any mix of dtypes: norm pass (per-chunk partials into
// `workspace`), fixed-order per-tensor reduction into norms[2*index + {0,1}]
// (||w||, ||d||), perturb pass reading those norms from device memory.
// 3 launches per 768 tensors; no host synchronisation; deterministic.
// Skip rule: if any norm is not finite, or found_inf (nullable, device) is
// non-zero, the perturb pass only writes backup <- w.  `nonfinite`: one device
// int of scratch (cleared and set by the launches).
cudaError_t launch_perturb(const PerturbDesc* descs, int n, int mode, uint64_t seed,
                           double gamma_signed, double eps, float* workspace, float* norms,
                           const float* found_inf, int* nonfinite, cudaStream_t stream);

// dst <- src bytewise for every tensor (any dtypes mixed): 1 launch per 768 tensors.
cudaError_t launch_restore(const CopyDesc* descs, int n, cudaStream_t stream);

}  // namespace vlmkern::awp::cuda
