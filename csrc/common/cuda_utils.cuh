// Device helpers of the CUDA kernels: fp32 conversions of the storage types,
// 16-byte vector loads / stores and the fixed-order block reduction.  No torch
// header: the .cu files are compiled by nvcc alone.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/vlmkern_common.h"

// VLMKERN_DISPATCH_DTYPE with the CUDA storage types.
#define VLMKERN_DISPATCH_CUDA(dt, T, ...) \
  VLMKERN_DISPATCH_DTYPE(dt, float, __nv_bfloat16, __half, T, __VA_ARGS__)

namespace vlmkern::dev {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (sizeof(T) == 4) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Elements of T per 16-byte vector (4 for fp32, 8 for bf16 / fp16).
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// N values of T as 16-byte vectors; src / dst 16-byte aligned.  fp32 goes
// through float4 (as uint4 + memcpy it costs Kalman pass 1 two registers).
template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&dst)[N], const T* src) {
  static_assert(sizeof(T) * N % 16 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(T)) * N / 16; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      const float4 v = reinterpret_cast<const float4*>(src)[k];
      dst[4 * k] = v.x, dst[4 * k + 1] = v.y, dst[4 * k + 2] = v.z, dst[4 * k + 3] = v.w;
    } else {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[k];
      memcpy(&dst[k * kVecWidth<T>], &raw, 16);
    }
  }
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const T (&src)[N]) {
  static_assert(sizeof(T) * N % 16 == 0, "whole 16-byte vectors");
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(T)) * N / 16; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<float4*>(dst)[k] =
          make_float4(src[4 * k], src[4 * k + 1], src[4 * k + 2], src[4 * k + 3]);
    } else {
      uint4 raw;
      memcpy(&raw, &src[k * kVecWidth<T>], 16);
      reinterpret_cast<uint4*>(dst)[k] = raw;
    }
  }
}

// Two sums reduced together.
template <typename S>
struct Pair {
  S x, y;
};

template <typename S>
__device__ __forceinline__ S shfl_down(S v, int o) {
  return __shfl_down_sync(0xffffffffu, v, o);
}
template <typename S>
__device__ __forceinline__ Pair<S> shfl_down(Pair<S> v, int o) {
  return {shfl_down(v.x, o), shfl_down(v.y, o)};
}
template <typename S>
__device__ __forceinline__ S plus(S a, S b) {
  return a + b;
}
template <typename S>
__device__ __forceinline__ Pair<S> plus(Pair<S> a, Pair<S> b) {
  return {a.x + b.x, a.y + b.y};
}

// Sum over a block of kThreads threads in a fixed order (shuffle tree in each
// warp, then over the warps in warp 0), so the bits never depend on the
// schedule.  The result is valid in thread 0.  Every thread must call it;
// smem (kThreads / 32 values) may be reused once it returns.
template <int kThreads, typename V>
__device__ __forceinline__ V block_sum(V v, V* smem) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = plus(v, shfl_down(v, o));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  V r{};
  if (warp == 0) {
    if (lane < kWarps) r = smem[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r = plus(r, shfl_down(r, o));
  }
  __syncthreads();
  return r;
}

}  // namespace vlmkern::dev
