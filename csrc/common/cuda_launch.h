// Conventions for CUDA launchers (see docs/ADDING_AN_OP.md):
// * kernels and their launchers live in <op>/<op>_cuda.cu, compiled by nvcc
//   WITHOUT torch headers (fast to compile); launchers take raw pointers, a
//   cudaStream_t and return cudaError_t (cudaGetLastError() after the launch);
// * the torch-facing host code lives in <op>/<op>_cuda.cpp (compiled by the C++
//   compiler, only when CUDA is enabled): it validates tensors, gets the current
//   stream with c10::cuda::getCurrentCUDAStream(), calls the launcher and turns a
//   returned error into an exception with VLMKERN_CHECK_CUDA.
#pragma once
#include <cuda_runtime_api.h>

#define VLMKERN_CHECK_CUDA(expr)                                                       \
  do {                                                                                 \
    const cudaError_t _err = (expr);                                                   \
    TORCH_CHECK(_err == cudaSuccess, "vlmkern CUDA error: ", cudaGetErrorString(_err), \
                " (", #expr, ")");                                                     \
  } while (0)
