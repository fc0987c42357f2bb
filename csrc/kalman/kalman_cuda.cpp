// Torch-facing host side of the CUDA kalman_step_ (SPEC §3): argument checks,
// contiguous working copies, the tensor table, the partials buffer, and the
// launch on the current stream.  Kernels: kalman_cuda.cu.
//
// Launch count: 2 (pass 1 + pass 2) for up to 768 non-empty tensors of any
// mix of fp32 / bf16 / fp16, 2 more per further 768; 1 when every tensor is
// empty.  No host synchronisation: no .item(), no device->host copy, no
// stream sync; the partials buffer comes from the caching allocator
// (graph-safe).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/host.h"
#include "kalman/kalman_cuda.h"
#include "kalman/kalman_host.h"

namespace vlmkern::kalman {
namespace {

at::Tensor kalman_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList variances,
                            const at::Tensor& innovation, const at::Tensor& obs_noise,
                            double process_noise, double forgetting, double var_floor,
                            std::optional<double> gate_chi2,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_step_";
  check_float_list(op, params, "params");
  check_list_like(op, params, "params", grads, "grads");
  check_list_like(op, params, "params", variances, "variances", /*f32=*/true);
  const at::Device dev = params.empty() ? innovation.device() : params[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": the tensors must be on a CUDA device, got ", dev);
  check_scalar_tensor(op, innovation, "innovation", dev);
  check_scalar_tensor(op, obs_noise, "obs_noise", dev);
  check_scalar_tensor(op, grad_scale, "grad_scale", dev);
  check_scalar_tensor(op, found_inf, "found_inf", dev);
  const c10::cuda::CUDAGuard guard(dev);

  StepTensors st(params, grads, variances);
  const std::vector<cuda::TensorRef> tensors = tensor_refs(st);
  const int64_t nparts = cuda::num_partials(tensors);
  at::Tensor partials = at::empty({nparts > 0 ? nparts : 1}, innovation.options().dtype(c10::kDouble));
  at::Tensor out = at::empty({}, innovation.options().dtype(c10::kFloat));
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;  // one element: contiguous
  };
  const cuda::StepScalars c{static_cast<float>(process_noise), static_cast<float>(1.0 / forgetting),
                            static_cast<float>(var_floor),
                            gate_chi2.has_value() ? static_cast<float>(*gate_chi2) : 0.0f};
  VLMKERN_CHECK_CUDA(cuda::launch_step(tensors, innovation.const_data_ptr<float>(),
                                       obs_noise.const_data_ptr<float>(), ptr(grad_scale),
                                       ptr(found_inf), c, partials.data_ptr<double>(), nparts,
                                       out.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  // A skipped step leaves the working copies as they were: copying them back
  // writes the caller's own values (device-side decision, no sync).
  st.copy_back();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("kalman_step_", &kalman_step_cuda); }

}  // namespace vlmkern::kalman
