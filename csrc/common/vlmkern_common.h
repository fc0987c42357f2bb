// Shared helpers for vlmkern kernels: host/device qualifiers usable from both
// the C++ (CPU) and the CUDA translation units.  This header must not include
// any torch header, so that the per-element math headers (<op>/<op>_math.h)
// stay compilable by nvcc without the torch include tree.
#pragma once

#if defined(__CUDACC__)
#define VLMKERN_HD __host__ __device__ __forceinline__
#define VLMKERN_DEVICE __device__ __forceinline__
#else
#define VLMKERN_HD inline
#define VLMKERN_DEVICE inline
#endif
