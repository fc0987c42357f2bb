// A CPU emulator for vlmkern's CUDA kernels (tests only; never part of the
// wheel).  It lets the real kernel sources of csrc/*/*_cuda.cu, and the
// torch-facing host code of csrc/*/*_cuda.cpp, run on a machine without a GPU,
// so that chunking, tensor tables, vector paths, block reductions, launch
// counts and the device-side math are exercised by the test suite long before
// a GPU is available (python_tests/cuda_emu.py builds it, test_cuda_emu.py
// uses it).
//
// Model:
//   * each CUDA thread is a fiber with its own stack (a switch of the six
//     callee-saved registers on x86-64, ucontext elsewhere); the blocks of a
//     grid run one after another, the threads of a block interleave only at
//     __syncthreads() and at warp shuffles (cooperative scheduling);
//   * __syncthreads() waits until every live thread of the block is there
//     (threads that returned count as arrived, as on Volta and later);
//   * __shfl_*_sync() is a warp-level rendezvous: every lane of the warp must
//     take part (full mask) -- a divergent shuffle, or one that mixes with a
//     block barrier, is reported as an error instead of hanging;
//   * __shared__ variables are function statics (one block at a time);
//   * the order in which threads (within a round) and blocks run is a seeded
//     permutation (set_schedule_seed): results that depend on it betray a
//     missing barrier or a race on global memory between blocks;
//   * a launch checks its configuration (grid and block limits, the 32 KiB
//     kernel-parameter limit of CUDA >= 12.1) and the error is returned by the
//     next cudaGetLastError(), as on a device;
//   * every launch is counted (launch_count()).
// Not modelled: memory ordering, atomics (not provided: code using them does
// not build), warp-synchronous code without *_sync, the timing of anything.  Device code sees __CUDA_ARCH__ undefined, so the shared
// math headers take their host branches (the same IEEE operations).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_emu_api.h"

// ---- qualifiers ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- vector types -------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// CUDA's device min/max overloads (mixed integer widths promote as in C++).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}

#if defined(__x86_64__) && defined(__ELF__) && !defined(VLMKERN_EMU_UCONTEXT)
#define VLMKERN_EMU_ASM_SWITCH 1
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, loads load_sp and pops the registers saved there
// (emu_runtime.cpp).  glibc's swapcontext also saves the signal mask: a system
// call per switch, several times slower.
extern "C" void vlmkern_emu_switch(void** save_sp, void* load_sp);
#else
#define VLMKERN_EMU_ASM_SWITCH 0
#endif

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxParamBytes = 32764;  // CUDA >= 12.1 kernel parameter limit

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Context {
#if VLMKERN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void context_switch(Context& from, Context& to) {
#if VLMKERN_EMU_ASM_SWITCH
  vlmkern_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Thread {
  Context ctx;
  dim3 idx;
  unsigned lane = 0, warp = 0;
  unsigned shuffles = 0;  // shuffles done so far: selects the slot buffer
  State state = State::kReady;
};

struct Exec {
  dim3 grid, block, bidx;
  std::vector<Thread> threads;
  char* stacks = nullptr;  // kStackBytes per thread (stack_pool())
  Thread* cur = nullptr;
  Context sched;
  std::vector<uint64_t> shfl;  // 2 x 32 slots per warp (double-buffered)
  const std::function<void()>* body = nullptr;
  std::string error;  // first error raised inside a kernel
};

inline Exec*& current() {
  static thread_local Exec* e = nullptr;
  return e;
}

struct Globals {
  uint64_t schedule_seed = 0;  // 0: natural order
  int64_t launches = 0;
};
Globals& globals();  // emu_runtime.cpp
inline void set_schedule_seed(uint64_t s) { globals().schedule_seed = s; }
inline int64_t launch_count() { return globals().launches; }

// An error inside a kernel: vlmkern_emu_fiber_main catches it and records the
// message as the launch's error.
[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

inline void yield_as(State s) {
  Exec* e = current();
  Thread* t = e->cur;
  t->state = s;
  context_switch(t->ctx, e->sched);
}

// First frame of every fiber: runs the kernel body, then hands control back to
// the scheduler for good (never returns).
extern "C" inline void vlmkern_emu_fiber_main() {
  Exec* e = current();
  try {
    (*e->body)();
  } catch (const std::exception& ex) {
    if (e->error.empty()) e->error = ex.what();
  } catch (...) {
    if (e->error.empty()) e->error = "unknown exception in a kernel";
  }
  e->cur->state = State::kDone;
  context_switch(e->cur->ctx, e->sched);
  std::abort();  // a finished fiber is never resumed
}

inline void context_start(Context& c, char* stack, size_t bytes) {
#if VLMKERN_EMU_ASM_SWITCH
  // Frame popped by vlmkern_emu_switch: r15 r14 r13 r12 rbx rbp, then the
  // "return address" vlmkern_emu_fiber_main, entered with rsp = 8 (mod 16) as
  // after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes - 64) & ~static_cast<uintptr_t>(15);
  void** frame = reinterpret_cast<void**>(top) - 6;
  for (int k = 0; k < 6; ++k) frame[k] = nullptr;
  *reinterpret_cast<void**>(top) = reinterpret_cast<void*>(&vlmkern_emu_fiber_main);
  c.sp = frame;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, &vlmkern_emu_fiber_main, 0);
#endif
}

inline unsigned lanes_in_warp(const Exec& e, unsigned warp) {
  const unsigned n = e.block.x * e.block.y * e.block.z;
  const unsigned first = warp * 32;
  return std::min(32u, n - first);
}

// Runs one block to completion; returns false (with e.error set) on an error.
inline bool run_block(Exec& e, std::mt19937_64* rng) {
  const unsigned n = static_cast<unsigned>(e.threads.size());
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.idx = dim3(i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y));
    t.lane = i & 31u;
    t.warp = i >> 5;
    t.state = State::kReady;
    t.shuffles = 0;
    context_start(t.ctx, e.stacks + static_cast<size_t>(i) * kStackBytes, kStackBytes);
  }
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  const unsigned nwarps = (n + 31) / 32;
  for (;;) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    for (unsigned i : order) {
      Thread& t = e.threads[i];
      if (t.state != State::kReady) continue;
      e.cur = &t;
      context_switch(e.sched, t.ctx);
      e.cur = nullptr;
    }
    if (!e.error.empty()) return false;
    // Every thread now waits at a barrier or has finished.
    unsigned done = 0, at_block = 0;
    for (const Thread& t : e.threads) {
      done += t.state == State::kDone;
      at_block += t.state == State::kBlockBarrier;
    }
    if (done == n) return true;
    bool released = false;
    for (unsigned w = 0; w < nwarps; ++w) {
      unsigned waiting = 0;
      for (unsigned l = 0; l < lanes_in_warp(e, w); ++l) {
        waiting += e.threads[w * 32 + l].state == State::kWarpBarrier;
      }
      if (waiting == 0) continue;
      if (waiting != lanes_in_warp(e, w)) {
        e.error = "warp shuffle in warp " + std::to_string(w) + " of block " +
                  std::to_string(e.bidx.x) + ": only " + std::to_string(waiting) + " of " +
                  std::to_string(lanes_in_warp(e, w)) +
                  " lanes arrived (divergent shuffle, or lanes at __syncthreads / returned)";
        return false;
      }
      for (unsigned l = 0; l < lanes_in_warp(e, w); ++l) e.threads[w * 32 + l].state = State::kReady;
      released = true;
    }
    if (released) continue;
    if (at_block + done == n) {
      for (Thread& t : e.threads) {
        if (t.state == State::kBlockBarrier) t.state = State::kReady;
      }
      continue;
    }
    e.error = "deadlock in block " + std::to_string(e.bidx.x);
    return false;
  }
}

std::string& last_message();  // emu_runtime.cpp (last_error: cuda_emu_api.h)
inline void set_error(cudaError_t err, const std::string& msg) {
  if (last_error() == cudaSuccess) {
    last_error() = err;
    last_message() = msg;
  }
}

// Fiber stacks, kept across launches (a fresh allocation per launch would
// page-fault every stack in again); grown on demand, never zero-filled.
inline char* stack_pool(size_t bytes) {
  static thread_local std::unique_ptr<char[]> pool;
  static thread_local size_t size = 0;
  if (size < bytes) {
    pool.reset(new char[bytes]);
    size = bytes;
  }
  return pool.get();
}

inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  Exec e;
  e.grid = grid;
  e.block = block;
  const unsigned n = block.x * block.y * block.z;
  e.threads.resize(n);
  e.stacks = stack_pool(static_cast<size_t>(n) * kStackBytes);
  e.shfl.assign(static_cast<size_t>((n + 31) / 32) * 64, 0);
  e.body = &body;
  Exec* const saved = current();
  current() = &e;
  const uint64_t seed = globals().schedule_seed;
  std::mt19937_64 rng(seed);
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) order[b] = b;
  if (seed) std::shuffle(order.begin(), order.end(), rng);
  for (uint64_t b : order) {
    e.bidx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                  static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y)));
    if (!run_block(e, seed ? &rng : nullptr)) {
      set_error(cudaErrorLaunchFailure, "emulated kernel failed: " + e.error);
      break;
    }
  }
  current() = saved;
}

// kernel<<<grid, block, smem, stream>>>(args...)  ==  Launch(grid, block, smem, stream)(kernel, args...)
struct Launch {
  dim3 grid, block;
  // Dynamic shared memory (extern __shared__) is not modelled: no kernel here uses it.
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}

  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), Args&&... args) const {
    static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel argument count");
    ++globals().launches;
    size_t param_bytes = 0;
    ((param_bytes = (param_bytes + alignof(std::decay_t<KArgs>) - 1) / alignof(std::decay_t<KArgs>) *
                        alignof(std::decay_t<KArgs>) +
                    sizeof(std::decay_t<KArgs>)),
     ...);
    const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u ||
        grid.z > 65535u || threads == 0 || threads > 1024 || block.z > 64) {
      set_error(cudaErrorInvalidConfiguration,
                "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " +
                    std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                    std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                    std::to_string(block.z) + ")");
      return;
    }
    if (param_bytes > kMaxParamBytes) {
      set_error(cudaErrorInvalidValue, "kernel parameters take " + std::to_string(param_bytes) +
                                           " bytes, more than CUDA's " +
                                           std::to_string(kMaxParamBytes));
      return;
    }
    // Kernel parameters are copied at launch, as on a device.
    std::tuple<std::decay_t<KArgs>...> params(static_cast<std::decay_t<KArgs>>(args)...);
    const std::function<void()> body = [&]() { std::apply(kernel, params); };
    run_grid(grid, block, body);
  }
};

}  // namespace emu

// ---- built-in variables and intrinsics --------------------------------------
#define threadIdx (::emu::current()->cur->idx)
#define blockIdx (::emu::current()->bidx)
#define blockDim (::emu::current()->block)
#define gridDim (::emu::current()->grid)

inline void __syncthreads() { ::emu::yield_as(::emu::State::kBlockBarrier); }

namespace emu {
template <typename T, typename SrcLane>
inline T shuffle(unsigned mask, T v, SrcLane src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a <= 8-byte value");
  Exec* e = current();
  Thread* t = e->cur;
  const unsigned lanes = lanes_in_warp(*e, t->warp);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if ((mask & full) != full) {
    fail("shuffle with a partial mask (" + std::to_string(mask) + "): not modelled");
  }
  // Shuffle k of a warp uses slot buffer k % 2: a lane can only write buffer
  // k % 2 again at shuffle k + 2, after the rendezvous of shuffle k + 1, which
  // every lane reaches after its read of shuffle k.  One rendezvous per shuffle.
  uint64_t* slots = &e->shfl[(t->warp * 2 + (t->shuffles++ & 1u)) * 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[t->lane] = bits;
  yield_as(State::kWarpBarrier);
  const int src = src_lane(static_cast<int>(t->lane));
  T r = v;
  if (src >= 0 && src < static_cast<int>(lanes)) std::memcpy(&r, &slots[src], sizeof(T));
  return r;
}
}  // namespace emu

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, [=](int lane) {
    const int seg = lane % width, src = seg + static_cast<int>(delta);
    return src < width ? lane + static_cast<int>(delta) : lane;
  });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, [=](int lane) {
    const int seg = lane % width;
    return seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shuffle(mask, v, [=](int lane) {
    const int src = lane ^ lane_mask;
    return (src / width) == (lane / width) ? src : lane;
  });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::emu::shuffle(mask, v, [=](int lane) { return (lane / width) * width + (src_lane % width); });
}
