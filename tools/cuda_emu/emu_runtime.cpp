// State of the CPU CUDA emulator (cuda_emu.h) and its torch-facing controls:
// torch.ops.vlmkern_emu.{launch_count, set_schedule_seed, last_error_message,
// selftest}.  torch headers come first: cuda_emu.h defines device keywords as
// macros.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "cuda_emu.h"

#if VLMKERN_EMU_ASM_SWITCH
// void vlmkern_emu_switch(void** save_sp /* rdi */, void* load_sp /* rsi */)
asm(R"(
  .text
  .globl vlmkern_emu_switch
  .type vlmkern_emu_switch, @function
vlmkern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vlmkern_emu_switch, .-vlmkern_emu_switch
)");
#endif

namespace emu {

Globals& globals() {
  static Globals g;
  return g;
}
cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}
std::string& last_message() {
  static thread_local std::string msg;
  return msg;
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error();
  emu::last_error() = cudaSuccess;
  return err;
}

namespace vlmkern_emu_selftest {  // selftest.cu
cudaError_t block_sum(const float* x, int n, int threads, float* out);
cudaError_t divergent_shuffle(float* out);
cudaError_t neighbour(float* out, int blocks, bool barrier);
cudaError_t too_many_threads(float* out);
cudaError_t big_params(float* out);
}  // namespace vlmkern_emu_selftest

namespace {
// Runs one self-test kernel; returns its cudaError_t code (0 = success).
int64_t selftest(const std::string& name, const at::Tensor& x, const at::Tensor& out, int64_t arg) {
  namespace st = vlmkern_emu_selftest;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == c10::kFloat, "out: contiguous float32");
  float* o = out.data_ptr<float>();
  cudaError_t err;
  if (name == "block_sum") {
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == c10::kFloat, "x: contiguous float32");
    err = st::block_sum(x.data_ptr<float>(), static_cast<int>(x.numel()), static_cast<int>(arg), o);
  } else if (name == "divergent_shuffle") {
    err = st::divergent_shuffle(o);
  } else if (name == "neighbour") {
    err = st::neighbour(o, static_cast<int>(out.numel() / 256), arg != 0);
  } else if (name == "too_many_threads") {
    err = st::too_many_threads(o);
  } else if (name == "big_params") {
    err = st::big_params(o);
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return static_cast<int64_t>(err);
}

int64_t launch_count() { return emu::launch_count(); }
void set_schedule_seed(int64_t seed) { emu::set_schedule_seed(static_cast<uint64_t>(seed)); }
std::string last_error_message() { return emu::last_message(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmkern_emu, m) {
  m.def("launch_count() -> int", &launch_count);
  m.def("set_schedule_seed(int seed) -> ()", &set_schedule_seed);
  m.def("last_error_message() -> str", &last_error_message);
  m.def("selftest(str name, Tensor x, Tensor(a!) out, int arg) -> int", &selftest);
}
