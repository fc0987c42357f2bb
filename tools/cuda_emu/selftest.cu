// Kernels that test the CPU CUDA emulator itself (python_tests/test_cuda_emu.py):
// a correct block reduction, and the mistakes the emulator must catch -- a
// divergent warp shuffle, a missing __syncthreads, an invalid launch
// configuration, oversized kernel parameters.  Built only for the emulator.
#include <cuda_runtime.h>

#include <cstdint>

namespace vlmkern_emu_selftest {
namespace {

// Sum of x over each block's slice: shuffles within warps, then warp 0.
__global__ void block_sum_kernel(const float* x, int n, float* out) {
  __shared__ float warp_sums[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Only half of the warp reaches the shuffle: undefined on a device.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Each thread reads its neighbour's shared slot; without the barrier the read
// may come before the neighbour's write.
__global__ void neighbour_kernel(float* out, int barrier) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t + 1);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
  if (barrier) __syncthreads();
  s[t] = -1.f;  // leave the slot stale for the next block / launch
}

struct Big {
  float v[10000];  // 40 KB: over the 32,764-byte parameter limit
};
__global__ void big_param_kernel(Big b, float* out) { out[0] = b.v[0]; }

}  // namespace

cudaError_t block_sum(const float* x, int n, int threads, float* out) {
  const int blocks = (n + threads - 1) / threads;
  block_sum_kernel<<<blocks, threads>>>(x, n, out);
  return cudaGetLastError();
}
cudaError_t divergent_shuffle(float* out) {
  divergent_shuffle_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
cudaError_t neighbour(float* out, int blocks, bool barrier) {
  neighbour_kernel<<<blocks, 256>>>(out, barrier ? 1 : 0);
  return cudaGetLastError();
}
cudaError_t too_many_threads(float* out) {
  block_sum_kernel<<<1, 2048>>>(out, 0, out);
  return cudaGetLastError();
}
cudaError_t big_params(float* out) {
  static Big b{};
  big_param_kernel<<<1, 1>>>(b, out);
  return cudaGetLastError();
}

}  // namespace vlmkern_emu_selftest
