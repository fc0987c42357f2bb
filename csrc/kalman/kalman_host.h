// Host-side argument validation of kalman_step_, shared by the CPU and CUDA
// registrations.
#pragma once
#include <cmath>
#include <optional>

#include "common/checks.h"

namespace vlmkern::kalman {

inline void check_args(at::TensorList params, at::TensorList grads, at::TensorList variances,
                       const at::Tensor& innovation, const at::Tensor& obs_noise,
                       double process_noise, double forgetting, double var_floor,
                       std::optional<double> gate_chi2,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_step_";
  check_lists_match(op, params, "params", grads, "grads");
  check_lists_match(op, params, "params", variances, "variances");
  TORCH_CHECK(forgetting > 0.0 && forgetting <= 1.0, op,
              ": forgetting must be in (0, 1], got ", forgetting);
  TORCH_CHECK(std::isfinite(var_floor) && var_floor >= 0.0, op,
              ": var_floor must be finite and >= 0, got ", var_floor);
  TORCH_CHECK(std::isfinite(process_noise) && process_noise >= 0.0, op,
              ": process_noise must be finite and >= 0, got ", process_noise);
  TORCH_CHECK(!gate_chi2.has_value() || *gate_chi2 > 0.0, op,
              ": gate_chi2 must be > 0 (or None for no gate), got ",
              gate_chi2.has_value() ? *gate_chi2 : 0.0);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(is_float_dtype(params[i].scalar_type()), op, ": ", arg_name("params", i),
                " must be float32, bfloat16 or float16, got ", params[i].scalar_type());
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), op, ": ",
                arg_name("grads", i), " must have the dtype of ", arg_name("params", i), " (",
                params[i].scalar_type(), "), got ", grads[i].scalar_type());
    TORCH_CHECK(variances[i].scalar_type() == c10::kFloat, op, ": ", arg_name("variances", i),
                " must be float32, got ", variances[i].scalar_type());
    TORCH_CHECK(params[i].device() == params[0].device(), op, ": ", arg_name("params", i),
                " is on ", params[i].device(), " but params[0] is on ", params[0].device());
  }
  const at::Device dev = params.empty() ? innovation.device() : params[0].device();
  check_scalar_tensor(op, innovation, "innovation", dev);
  check_scalar_tensor(op, obs_noise, "obs_noise", dev);
  if (grad_scale.has_value()) check_scalar_tensor(op, *grad_scale, "grad_scale", dev);
  if (found_inf.has_value()) check_scalar_tensor(op, *found_inf, "found_inf", dev);
}

}  // namespace vlmkern::kalman
