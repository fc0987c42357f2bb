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
#include "kalman/kalman_vector_cuda.h"

namespace vlmkern::kalman {
namespace {

// An [M] float32 vector on dev.
void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t M,
                  const at::Device& dev) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M, op, ": ", name, " must have shape [", M,
              "] (M = innovation.shape[0]), got ", t.sizes());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c10::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> kalman_vector_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList variances,
    const at::Tensor& innovation, const at::Tensor& obs_noise, double process_noise,
    double forgetting, double var_floor, std::optional<double> gate_chi2,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_vector_step_";
  check_float_list(op, params, "params");
  check_list_like(op, params, "params", variances, "variances", /*f32=*/true);
  TORCH_CHECK(grads.size() == params.size(), op, ": grads has ", grads.size(),
              " tensors but params has ", params.size());
  TORCH_CHECK(innovation.dim() == 1 && innovation.size(0) >= 1, op,
              ": innovation must have shape [M] with M >= 1, got ", innovation.sizes());
  const int64_t M = innovation.size(0);
  TORCH_CHECK(M <= vcuda::kMaxM, op, ": at most ", vcuda::kMaxM,
              " observations on CUDA, got M = ", M);
  const at::Device dev = params.empty() ? innovation.device() : params[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": the tensors must be on a CUDA device, got ", dev);
  for (size_t i = 0; i < grads.size(); ++i) {
    std::vector<int64_t> want{M};
    for (const int64_t s : params[i].sizes()) want.push_back(s);
    TORCH_CHECK(grads[i].sizes() == at::IntArrayRef(want), op, ": ", arg_name("grads", i),
                " must have shape [M, *params[", i, "].shape] = ", at::IntArrayRef(want), ", got ",
                grads[i].sizes());
    TORCH_CHECK(grads[i].device() == dev, op, ": ", arg_name("grads", i), " is on ",
                grads[i].device(), " but params are on ", dev);
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), op, ": ",
                arg_name("grads", i), " must have the dtype of ", arg_name("params", i), " (",
                params[i].scalar_type(), "), got ", grads[i].scalar_type());
  }
  check_vector(op, innovation, "innovation", M, dev);
  check_vector(op, obs_noise, "obs_noise", M, dev);
  check_scalar_tensor(op, grad_scale, "grad_scale", dev);
  check_scalar_tensor(op, found_inf, "found_inf", dev);
  const c10::cuda::CUDAGuard guard(dev);

  WorkingCopies wc;
  const std::vector<at::Tensor> w = wc.inout(params), g = WorkingCopies::in(grads),
                                v = wc.inout(variances);
  const at::Tensor e = innovation.contiguous(), R = obs_noise.contiguous();  // e.g. R expanded from one value
  std::vector<vcuda::TensorRef> tensors;
  for (size_t i = 0; i < w.size(); ++i) {
    tensors.push_back({{w[i].data_ptr(), g[i].data_ptr(), v[i].data_ptr()},
                       w[i].numel(),
                       static_cast<int32_t>(i),
                       dtype_of(w[i].scalar_type())});
  }
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
  wc.copy_back();
  return {S, d2};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("kalman_vector_step_", &kalman_vector_step_cuda); }

}  // namespace vlmkern::kalman
