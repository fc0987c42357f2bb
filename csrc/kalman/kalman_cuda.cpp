// Torch-facing host side of the CUDA kalman_step_ (SPEC §3): argument checks,
// contiguous working copies, the tensor table, the partials buffer, and the
// launch on the current stream.  Kernels: kalman_cuda.cu.
//
// Launch count: 2 (pass 1 + pass 2) for up to 768 non-empty tensors of any
// mix of fp32 / bf16 / fp16, 2 more per further 768; 1 when every tensor is
// empty.
//
// No host synchronisation: no .item(), no device->host copy, no stream sync; the
// partials buffer comes from the caching allocator (graph-safe).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/cuda_launch.h"
#include "kalman/kalman_cuda.h"
#include "kalman/kalman_host.h"

namespace vlmkern::kalman {
namespace {

cuda::ParamDtype dtype_of(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return cuda::kF32;
    case c10::kBFloat16: return cuda::kBF16;
    case c10::kHalf: return cuda::kF16;
    default: TORCH_CHECK(false, "vlmkern.kalman_step_: unsupported dtype ", t);
  }
}

at::Tensor kalman_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList variances,
                            const at::Tensor& innovation, const at::Tensor& obs_noise,
                            double process_noise, double forgetting, double var_floor,
                            std::optional<double> gate_chi2,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  check_args(params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor,
             gate_chi2, grad_scale, found_inf);
  const c10::cuda::CUDAGuard guard(innovation.device());
  const size_t n = params.size();

  // Non-contiguous tensors are worked on through contiguous copies that are
  // written back at the end (params and variances are updated in place).
  std::vector<at::Tensor> w(n), g(n), v(n);
  std::vector<cuda::TensorPtrs> tensors;
  tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
    v[i] = variances[i].contiguous();
    if (w[i].numel() == 0) continue;
    tensors.push_back(cuda::TensorPtrs{w[i].data_ptr(), g[i].const_data_ptr(),
                                       v[i].data_ptr<float>(), w[i].numel(),
                                       static_cast<int32_t>(i), dtype_of(w[i].scalar_type())});
  }

  const int64_t nparts = cuda::num_partials(tensors);
  at::Tensor partials =
      at::empty({nparts > 0 ? nparts : 1}, innovation.options().dtype(c10::kDouble));
  at::Tensor out = at::empty({}, innovation.options().dtype(c10::kFloat));
  // innovation / obs_noise are float32 one-element tensors (check_args).
  const at::Tensor e = innovation.contiguous();
  const at::Tensor R = obs_noise.contiguous();
  const at::Tensor gs = grad_scale.has_value() ? grad_scale->contiguous() : at::Tensor();
  const at::Tensor fi = found_inf.has_value() ? found_inf->contiguous() : at::Tensor();

  cuda::StepScalars c{};
  c.q = static_cast<float>(process_noise);
  c.inv_lambda = static_cast<float>(1.0 / forgetting);
  c.var_floor = static_cast<float>(var_floor);
  c.gate_chi2 = gate_chi2.has_value() ? static_cast<float>(*gate_chi2) : 0.0f;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(innovation.device().index()).stream();
  VLMKERN_CHECK_CUDA(cuda::launch_step(tensors, e.const_data_ptr<float>(), R.const_data_ptr<float>(),
                                       gs.defined() ? gs.const_data_ptr<float>() : nullptr,
                                       fi.defined() ? fi.const_data_ptr<float>() : nullptr, c, partials.data_ptr<double>(), nparts,
                                       out.data_ptr<float>(), stream, nullptr));

  // A skipped step leaves the working copies as they were: copying them back
  // writes the caller's own values (device-side decision, no sync).
  for (size_t i = 0; i < n; ++i) {
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
    if (!v[i].is_same(variances[i])) variances[i].copy_(v[i]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) { m.impl("kalman_step_", &kalman_step_cuda); }

}  // namespace vlmkern::kalman
