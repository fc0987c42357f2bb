// Torch-facing host code of the CUDA kernels of awp_perturb_ / awp_restore_:
// validates the lists, builds one tensor table (any mix of dtypes), allocates
// the norms output and the per-chunk workspace from the caching allocator, and
// calls the launchers of awp_cuda.cu on the current stream.  No host
// synchronisation (the perturb pass reads the norms from device memory), so a
// step can be graph-captured.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "awp/awp_cuda.h"
#include "awp/awp_host.h"
#include "common/cuda_launch.h"

namespace vlmkern::awp {
namespace {

cuda::DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return cuda::DType::kFloat;
    case c10::kBFloat16: return cuda::DType::kBFloat16;
    case c10::kHalf: return cuda::DType::kHalf;
    default: TORCH_CHECK(false, "vlmkern.awp: unsupported dtype ", t);
  }
}

void check_cuda(at::TensorList list, const char* name) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].is_cuda(), "vlmkern.awp: ", arg_name(name, i), " must be a CUDA tensor, got ",
                list[i].device());
  }
}

at::Tensor awp_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backup,
                            double gamma, double eps, double sign, int64_t mode, int64_t seed,
                            const std::optional<at::Tensor>& found_inf) {
  check_perturb_args(params, grads, backup, gamma, eps, sign, mode, found_inf);
  const bool random = mode == kModeRandom;
  check_cuda(params, "params");
  if (!random) check_cuda(grads, "grads");
  check_cuda(backup, "backup");
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "vlmkern.awp_perturb_: params is empty");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  std::vector<at::Tensor> w(n), g(random ? 0 : n), bk(n);
  std::vector<cuda::PerturbDesc> descs;
  descs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].contiguous();
    if (!random) g[i] = grads[i].contiguous();
    bk[i] = backup[i].is_contiguous() ? backup[i] : at::empty(w[i].sizes(), w[i].options());
    if (w[i].numel() == 0) continue;
    descs.push_back({w[i].data_ptr(), random ? nullptr : g[i].const_data_ptr(), bk[i].data_ptr(),
                     w[i].numel(), static_cast<int32_t>(i), to_dtype(w[i].scalar_type())});
  }
  const int nd = static_cast<int>(descs.size());
  const int64_t ws = cuda::perturb_workspace_floats(descs.data(), nd);
  // workspace: the per-chunk partials, then one int32 of skip flag (cleared by the first launch).
  at::Tensor workspace = at::empty({ws + 1}, params[0].options().dtype(c10::kFloat));
  const at::Tensor fi = found_inf.has_value() ? found_inf->contiguous() : at::Tensor();
  at::Tensor norms = at::zeros({static_cast<int64_t>(n), 2}, params[0].options().dtype(c10::kFloat));
  VLMKERN_CHECK_CUDA(cuda::launch_perturb(descs.data(), nd, static_cast<int>(mode),
                                          static_cast<uint64_t>(seed), sign * gamma, eps,
                                          workspace.data_ptr<float>(), norms.data_ptr<float>(),
                                          fi.defined() ? fi.const_data_ptr<float>() : nullptr,
                                          reinterpret_cast<int*>(workspace.data_ptr<float>() + ws),
                                          stream));
  for (size_t i = 0; i < n; ++i) {
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
    if (!bk[i].is_same(backup[i])) backup[i].copy_(bk[i]);
  }
  return norms;
}

void awp_restore_cuda(at::TensorList params, at::TensorList backup) {
  check_restore_args(params, backup);
  check_cuda(params, "params");
  check_cuda(backup, "backup");
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> w(n), bk(n);
  std::vector<cuda::CopyDesc> descs;
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].is_contiguous() ? params[i] : at::empty(params[i].sizes(), params[i].options());
    bk[i] = backup[i].contiguous();
    if (w[i].numel() == 0) continue;
    descs.push_back({w[i].data_ptr(), bk[i].const_data_ptr(),
                     static_cast<int64_t>(w[i].numel() * w[i].element_size())});
  }
  VLMKERN_CHECK_CUDA(cuda::launch_restore(descs.data(), static_cast<int>(descs.size()), stream));
  for (size_t i = 0; i < n; ++i) {
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("awp_perturb_", &awp_perturb_cuda);
  m.impl("awp_restore_", &awp_restore_cuda);
}

}  // namespace vlmkern::awp
