// CPU emulator shim of c10/cuda/CUDAStream.h: one null stream.
#pragma once
#include <c10/core/Device.h>

#include "../../cuda_runtime_api.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }  // NOLINT: as the real class
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace c10::cuda
