// Host code shared by the CPU and CUDA Kalman ops (kalman_*_cpu.cpp,
// kalman_*_cuda.cpp): the memory-safety checks of kalman_vector_step_, the
// contiguous working copies of (params, grads, variances), and the per-tensor
// tables the kernels walk.  No CUDA headers: the CPU files include it too.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/host.h"
#include "common/vlmkern_common.h"

namespace vlmkern::kalman {

struct VectorStepShape {
  int64_t M;       // observations: innovation.shape[0]
  at::Device dev;  // the device of every tensor
};

// The checks of kalman_vector_step_ that hold on every backend: params /
// variances lists, grads count and [M, *params[i].shape] shapes, devices and
// dtypes, innovation / obs_noise [M] float32, grad_scale / found_inf.  The
// backend's own limits (device type, largest M) are checked by its caller.
inline VectorStepShape check_vector_step_args(const char* op, at::TensorList params,
                                              at::TensorList grads, at::TensorList variances,
                                              const at::Tensor& innovation,
                                              const at::Tensor& obs_noise,
                                              const std::optional<at::Tensor>& grad_scale,
                                              const std::optional<at::Tensor>& found_inf) {
  check_float_list(op, params, "params");
  check_list_like(op, params, "params", variances, "variances", /*f32=*/true);
  TORCH_CHECK(grads.size() == params.size(), op, ": grads has ", grads.size(),
              " tensors but params has ", params.size());
  const at::Device dev = params.empty() ? innovation.device() : params[0].device();
  TORCH_CHECK(innovation.dim() == 1 && innovation.numel() >= 1, op,
              ": innovation must be [M] with M >= 1, got shape ", innovation.sizes());
  TORCH_CHECK(innovation.scalar_type() == c10::kFloat, op, ": innovation must be float32, got ",
              innovation.scalar_type());
  TORCH_CHECK(innovation.device() == dev, op, ": innovation must be on ", dev, ", got ",
              innovation.device());
  const int64_t M = innovation.numel();
  TORCH_CHECK(obs_noise.dim() == 1 && obs_noise.numel() == M, op, ": obs_noise must be [M] = [", M,
              "], got shape ", obs_noise.sizes());
  TORCH_CHECK(obs_noise.scalar_type() == c10::kFloat, op, ": obs_noise must be float32, got ",
              obs_noise.scalar_type());
  TORCH_CHECK(obs_noise.device() == dev, op, ": obs_noise must be on ", dev, ", got ",
              obs_noise.device());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.scalar_type() == w.scalar_type(), op, ": ", arg_name("grads", i),
                " must have the dtype of ", arg_name("params", i), " (", w.scalar_type(), "), got ",
                g.scalar_type());
    TORCH_CHECK(g.device() == w.device(), op, ": ", arg_name("grads", i), " is on ", g.device(),
                " but ", arg_name("params", i), " is on ", w.device());
    TORCH_CHECK(g.dim() == w.dim() + 1 && g.size(0) == M && g.sizes().slice(1) == w.sizes(), op,
                ": ", arg_name("grads", i), " must have shape [M, *", arg_name("params", i),
                ".shape] with M = ", M, ", got ", g.sizes(), " for ", arg_name("params", i), " of shape ",
                w.sizes());
  }
  check_scalar_tensor(op, grad_scale, "grad_scale", dev);
  check_scalar_tensor(op, found_inf, "found_inf", dev);
  return {M, dev};
}

// Contiguous storage of the three lists of a Kalman step (host.h): w and v are
// updated in place (copy_back() after the kernels), g is read only.
struct StepTensors {
  WorkingCopies wc;  // first: w and v are built through it
  std::vector<at::Tensor> w, g, v;
  StepTensors(at::TensorList params, at::TensorList grads, at::TensorList variances)
      : w(wc.inout(params)), g(WorkingCopies::in(grads)), v(wc.inout(variances)) {}
  void copy_back() { wc.copy_back(); }
};

// CUDA launchers: one TensorRef per tensor, {param, grad, variance} pointers.
inline std::vector<mta::TensorRef> tensor_refs(const StepTensors& t) {
  std::vector<mta::TensorRef> refs;
  refs.reserve(t.w.size());
  for (size_t i = 0; i < t.w.size(); ++i) {
    refs.push_back({{t.w[i].data_ptr(), t.g[i].data_ptr(), t.v[i].data_ptr()},
                    t.w[i].numel(),
                    static_cast<int32_t>(i),
                    dtype_of(t.w[i].scalar_type())});
  }
  return refs;
}

// CPU kernels: a flat table of fixed-size chunks of every tensor (one
// parallel work item each), and the dtype of each tensor.
struct Chunk {
  int32_t tensor;
  int64_t start;
  int64_t len;
};

// The working copies of a CPU step with the chunk table of w (chunks of at
// most `chunk` elements, tensor by tensor) and each tensor's dtype.
struct ChunkedStep : StepTensors {
  std::vector<DType> dt;
  std::vector<Chunk> chunks;
  ChunkedStep(at::TensorList params, at::TensorList grads, at::TensorList variances, int64_t chunk)
      : StepTensors(params, grads, variances) {
    for (size_t i = 0; i < w.size(); ++i) {
      dt.push_back(dtype_of(w[i].scalar_type()));
      const int64_t numel = w[i].numel();
      for (int64_t s = 0; s < numel; s += chunk) {
        chunks.push_back(Chunk{static_cast<int32_t>(i), s, std::min(chunk, numel - s)});
      }
    }
  }
};

}  // namespace vlmkern::kalman
