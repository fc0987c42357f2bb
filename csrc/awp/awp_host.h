// Host-side argument validation of awp_perturb_ / awp_restore_, shared by the
// CPU and CUDA registrations.  Messages name the argument.
#pragma once
#include <cmath>
#include <optional>

#include "awp/awp_math.h"
#include "common/checks.h"

namespace vlmkern::awp {

inline void check_restore_args(at::TensorList params, at::TensorList backup) {
  constexpr const char* op = "vlmkern.awp_restore_";
  check_lists_match(op, params, "params", backup, "backup");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(backup[i].scalar_type() == params[i].scalar_type(), op, ": ",
                arg_name("backup", i), " must have the dtype of ", arg_name("params", i), " (",
                params[i].scalar_type(), "), got ", backup[i].scalar_type());
    TORCH_CHECK(params[i].device() == params[0].device(), op, ": ", arg_name("params", i),
                " is on ", params[i].device(), " but params[0] is on ", params[0].device());
  }
}

inline void check_perturb_args(at::TensorList params, at::TensorList grads, at::TensorList backup,
                               double gamma, double eps, double sign, int64_t mode,
                               const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.awp_perturb_";
  TORCH_CHECK(mode == kModeAdversarial || mode == kModeRandom, op,
              ": direction must be 0 (adversarial) or 1 (random), got ", mode);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be finite and >= 0, got ",
              gamma);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(sign == 1.0 || sign == -1.0, op, ": sign must be +1 or -1, got ", sign);
  const bool use_grads = mode == kModeAdversarial || !grads.empty();
  if (use_grads) check_lists_match(op, params, "params", grads, "grads");
  check_lists_match(op, params, "params", backup, "backup");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(is_float_dtype(params[i].scalar_type()), op, ": ", arg_name("params", i),
                " must be float32, bfloat16 or float16, got ", params[i].scalar_type());
    if (use_grads) {
      TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), op, ": ",
                  arg_name("grads", i), " must have the dtype of ", arg_name("params", i), " (",
                  params[i].scalar_type(), "), got ", grads[i].scalar_type());
    }
    TORCH_CHECK(backup[i].scalar_type() == params[i].scalar_type(), op, ": ",
                arg_name("backup", i), " must have the dtype of ", arg_name("params", i), " (",
                params[i].scalar_type(), "), got ", backup[i].scalar_type());
    TORCH_CHECK(params[i].device() == params[0].device(), op, ": ", arg_name("params", i),
                " is on ", params[i].device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK(!backup[i].is_same(params[i]), op, ": ", arg_name("backup", i), " is ",
                arg_name("params", i), " itself; it must be a separate buffer");
  }
  if (found_inf.has_value() && !params.empty()) {
    check_scalar_tensor(op, *found_inf, "found_inf", params[0].device());
  }
}

}  // namespace vlmkern::awp
