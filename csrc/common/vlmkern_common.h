// Shared by every kernel, host and device: qualifiers usable from both the C++
// (CPU) and the CUDA translation units, and the one dtype enum and dispatch.
// No torch header here, so that nvcc compiles the .cu files and the
// per-element math headers (<op>/<op>_math.h) without the torch include tree
// (the ScalarType -> DType mapping is in common/checks.h).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define VLMKERN_HD __host__ __device__ __forceinline__
#define VLMKERN_DEVICE __device__ __forceinline__
#else
#define VLMKERN_HD inline
#define VLMKERN_DEVICE inline
#endif

namespace vlmkern {

// The floating-point dtypes of every op's tensors (also the dtype tag of the
// multi-tensor apply table, common/multi_tensor_apply.cuh).
enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

VLMKERN_HD int dtype_bytes(DType dt) { return dt == DType::kF32 ? 4 : 2; }

namespace mta {
constexpr int kMaxLists = 4;

// One tensor of a multi-tensor apply launch (common/multi_tensor_apply.cuh):
// its pointer in each list (contiguous storage), elements, position in the
// caller's list and dtype.  Host code builds these and hands them to the
// launchers of <op>_cuda.cu.
struct TensorRef {
  void* ptrs[kMaxLists];
  int64_t numel;
  int32_t list_index;
  DType dtype;
};
}  // namespace mta

}  // namespace vlmkern

// Runs the statements `...` with `T` the storage type of `dt` among F32, BF16,
// F16 (each backend names its own: float / c10::BFloat16 / c10::Half on CPU,
// float / __nv_bfloat16 / __half on CUDA).  Any other value takes the F32
// branch: a DType comes from vlmkern::dtype_of(), which rejects other dtypes.
#define VLMKERN_DISPATCH_DTYPE(dt, F32, BF16, F16, T, ...) \
  switch (dt) {                                             \
    case ::vlmkern::DType::kBF16: {                         \
      using T = BF16;                                       \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::vlmkern::DType::kF16: {                          \
      using T = F16;                                        \
      __VA_ARGS__;                                          \
    } break;                                                \
    default: {                                              \
      using T = F32;                                        \
      __VA_ARGS__;                                          \
    } break;                                                \
  }
