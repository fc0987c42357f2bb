// Argument checks shared by the host side of every op.  Every message names
// the argument it is about, so a user sees e.g.
//   vlmkern.kalman_step_: variances[3] must be float32, got BFloat16
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <string>

namespace vlmkern {

inline std::string arg_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

// Same length, same shape, same device for two tensor lists.
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

inline void check_scalar_tensor(const char* op, const at::Tensor& t, const char* name,
                                const at::Device& dev) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 0-d (one element) tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c10::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
}

}  // namespace vlmkern
