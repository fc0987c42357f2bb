// Allocation of kernel outputs that a kernel must overwrite completely.
//
// empty_output() is at::empty(), except when the environment variable
// VLMKERN_DEBUG_POISON_OUTPUTS is set (and not "0") at the time of the call:
// then floating-point outputs come back filled with NaN, so an element a
// kernel forgets to write shows up as NaN in the result instead of as
// whatever the allocator handed out (often zeros, which hides the bug).
// The Python side has the same switch (vlmkern/kernels/outputs.py).  Only
// buffers whose every element the kernel writes go through here; buffers that
// start from a value (zero accumulators) are created with at::zeros.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <limits>

namespace vlmkern {

inline bool poison_outputs() {
  const char* v = std::getenv("VLMKERN_DEBUG_POISON_OUTPUTS");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

}  // namespace vlmkern
