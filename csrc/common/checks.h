// The preconditions the compiled ops need for memory safety when they are
// called directly (torch.ops.vlmkern.<op>): list lengths, shapes, dtypes and
// devices.  Value ranges (forgetting in (0, 1], gamma >= 0, ...) are checked
// with user-facing messages by the Python wrappers (vlmkern/ops/*.py).  Every
// message names the argument, e.g.
//   vlmkern.kalman_step_: variances[3] must be float32, got BFloat16
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "common/vlmkern_common.h"

namespace vlmkern {

inline std::string arg_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

inline DType dtype_of(c10::ScalarType t) {
  TORCH_CHECK(is_float_dtype(t), "vlmkern: unsupported dtype ", t);
  return t == c10::kFloat ? DType::kF32 : (t == c10::kBFloat16 ? DType::kBF16 : DType::kF16);
}

// b has a's length, and b[i] a[i]'s shape and device.
inline void check_lists_match(const char* op, at::TensorList a, const char* an,
                              at::TensorList b, const char* bn) {
  TORCH_CHECK(a.size() == b.size(), op, ": ", bn, " has ", b.size(), " tensors but ", an,
              " has ", a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), op, ": ", arg_name(bn, i), " has shape ",
                b[i].sizes(), " but ", arg_name(an, i), " has shape ", a[i].sizes());
    TORCH_CHECK(a[i].device() == b[i].device(), op, ": ", arg_name(bn, i), " is on ",
                b[i].device(), " but ", arg_name(an, i), " is on ", a[i].device());
  }
}

// Every a[i] is on a[0]'s device.
inline void check_same_device(const char* op, at::TensorList a, const char* an) {
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].device() == a[0].device(), op, ": ", arg_name(an, i), " is on ",
                a[i].device(), " but ", an, "[0] is on ", a[0].device());
  }
}

// Every a[i] is float32 / bfloat16 / float16 and on a[0]'s device.
inline void check_float_list(const char* op, at::TensorList a, const char* an) {
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(is_float_dtype(a[i].scalar_type()), op, ": ", arg_name(an, i),
                " must be float32, bfloat16 or float16, got ", a[i].scalar_type());
  }
  check_same_device(op, a, an);
}

// b matches a tensor by tensor: length, shape, device, and dtype (a[i]'s, or
// float32 with f32).
inline void check_list_like(const char* op, at::TensorList a, const char* an, at::TensorList b,
                            const char* bn, bool f32 = false) {
  check_lists_match(op, a, an, b, bn);
  for (size_t i = 0; i < a.size(); ++i) {
    if (f32) {
      TORCH_CHECK(b[i].scalar_type() == c10::kFloat, op, ": ", arg_name(bn, i),
                  " must be float32, got ", b[i].scalar_type());
    } else {
      TORCH_CHECK(b[i].scalar_type() == a[i].scalar_type(), op, ": ", arg_name(bn, i),
                  " must have the dtype of ", arg_name(an, i), " (", a[i].scalar_type(),
                  "), got ", b[i].scalar_type());
    }
  }
}

// No b[i] is a[i] itself.
inline void check_not_aliased(const char* op, at::TensorList a, const char* an, at::TensorList b,
                              const char* bn) {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    TORCH_CHECK(!b[i].is_same(a[i]), op, ": ", arg_name(bn, i), " is ", arg_name(an, i),
                " itself; it must be a separate buffer");
  }
}

// A one-element float32 tensor on dev (read by the kernels as a float).
inline void check_scalar_tensor(const char* op, const at::Tensor& t, const char* name,
                                const at::Device& dev) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-d (one element) tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c10::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
}
inline void check_scalar_tensor(const char* op, const std::optional<at::Tensor>& t,
                                const char* name, const at::Device& dev) {
  if (t.has_value()) check_scalar_tensor(op, *t, name, dev);
}

}  // namespace vlmkern
