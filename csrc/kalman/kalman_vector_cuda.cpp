// Torch-facing host side of the CUDA kalman_vector_step_ (SPEC §3, M
// observations): memory-safety checks, contiguous working copies, the tensor
// table, the workspace, and the launch on the current stream.  Kernels and
// design: kalman_vector_cuda.cu.
//
// Launch count: 4 (Gram pass, Gram reduction + S, Cholesky/solve, update pass)
// for up to 768 non-empty tensors of any mix of fp32 / bf16 / fp16, 2 more per
// further 768; 2 when every tensor is empty.  No host synchronisation: no
// .item(), no device->host copy, no stream sync; the workspace comes from the
// caching allocator (graph-safe).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/host.h"
#include "kalman/kalman_host.h"
#include "kalman/kalman_vector_cuda.h"

namespace vlmkern::kalman {
namespace {

std::tuple<at::Tensor, at::Tensor> kalman_vector_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList variances,
    const at::Tensor& innovation, const at::Tensor& obs_noise, double process_noise,
    double forgetting, double var_floor, std::optional<double> gate_chi2,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_vector_step_";
  const VectorStepShape shape =
      check_vector_step_args(op, params, grads, variances, innovation, obs_noise, grad_scale, found_inf);
  const int64_t M = shape.M;
  const at::Device dev = shape.dev;
  TORCH_CHECK(M <= vcuda::kMaxM, op, ": at most ", vcuda::kMaxM,
              " observations on CUDA, got M = ", M);
  TORCH_CHECK(dev.is_cuda(), op, ": the tensors must be on a CUDA device, got ", dev);
  const c10::cuda::CUDAGuard guard(dev);

  StepTensors st(params, grads, variances);
  const at::Tensor e = innovation.contiguous(), R = obs_noise.contiguous();  // e.g. R expanded from one value
  const std::vector<vcuda::TensorRef> tensors = tensor_refs(st);
  const vcuda::WorkspaceSize ws = vcuda::workspace_size(tensors, static_cast<int>(M));
  at::Tensor ws_d = at::empty({ws.doubles}, e.options().dtype(c10::kDouble));
  at::Tensor ws_f = at::empty({ws.floats}, e.options().dtype(c10::kFloat));
  at::Tensor S = at::empty({M, M}, e.options().dtype(c10::kFloat));
  at::Tensor d2 = at::empty({}, e.options().dtype(c10::kFloat));
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;  // one element: contiguous
  };
  const vcuda::VectorScalars sc{static_cast<float>(process_noise),
                                static_cast<float>(1.0 / forgetting), static_cast<float>(var_floor),
                                gate_chi2.has_value() ? static_cast<float>(*gate_chi2) : 0.0f};
  VLMKERN_CHECK_CUDA(vcuda::launch_vector_step(
      tensors, static_cast<int>(M), e.const_data_ptr<float>(), R.const_data_ptr<float>(),
      ptr(grad_scale), ptr(found_inf), sc, ws_d.data_ptr<double>(), ws_f.data_ptr<float>(),
      S.data_ptr<float>(), d2.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  // A skipped step leaves the working copies as they were: copying them back
  // writes the caller's own values (device-side decision, no sync).
  st.copy_back();
  return {S, d2};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("kalman_vector_step_", &kalman_vector_step_cuda); }

}  // namespace vlmkern::kalman
