// Host-side helpers of the torch-facing code: the CPU dtype dispatch and the
// contiguous working copies of the tensors an op reads or updates in place.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <utility>
#include <vector>

#include "common/vlmkern_common.h"

// VLMKERN_DISPATCH_DTYPE with the CPU storage types.
#define VLMKERN_DISPATCH_CPU(dt, T, ...) \
  VLMKERN_DISPATCH_DTYPE(dt, float, c10::BFloat16, c10::Half, T, __VA_ARGS__)

namespace vlmkern {

// The kernels work on contiguous storage.  A contiguous tensor is used as is;
// any other goes through a contiguous working copy, and copy_back() writes the
// copies of the updated tensors back into the caller's tensors.
class WorkingCopies {
 public:
  // Read only.
  static std::vector<at::Tensor> in(at::TensorList ts) {
    std::vector<at::Tensor> w;
    w.reserve(ts.size());
    for (const at::Tensor& t : ts) w.push_back(t.contiguous());
    return w;
  }
  // Read and updated in place.
  std::vector<at::Tensor> inout(at::TensorList ts) { return track(ts, true); }
  // Every element overwritten, none read.
  std::vector<at::Tensor> out(at::TensorList ts) { return track(ts, false); }
  void copy_back() {
    for (auto& [dst, w] : pending_) dst.copy_(w);
  }

 private:
  std::vector<at::Tensor> track(at::TensorList ts, bool read) {
    std::vector<at::Tensor> w;
    w.reserve(ts.size());
    for (const at::Tensor& t : ts) {
      if (t.is_contiguous()) {
        w.push_back(t);
      } else {
        w.push_back(read ? t.contiguous() : at::empty(t.sizes(), t.options()));
        pending_.emplace_back(t, w.back());
      }
    }
    return w;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
};

}  // namespace vlmkern
