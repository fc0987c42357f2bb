// Host-side CUDA runtime API subset of the CPU emulator (tools/cuda_emu/cuda_emu.h):
// the types and error functions the torch-facing host code and the launchers
// use.  No device emulation here, so torch headers can share a translation
// unit with it.
#pragma once

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;

namespace emu {
cudaError_t& last_error();
}

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated)";
  }
  return "unknown error (emulated)";
}

// Returns and clears the error of the last failed launch, as on a device.
cudaError_t cudaGetLastError();
