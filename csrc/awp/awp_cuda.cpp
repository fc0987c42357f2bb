// Torch-facing host code of the CUDA kernels of awp_perturb_ / awp_restore_:
// checks the lists, builds one tensor table (any mix of dtypes), allocates
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
#include "awp/awp_math.h"
#include "common/checks.h"
#include "common/cuda_launch.h"
#include "common/host.h"

namespace vlmkern::awp {
namespace {

at::Tensor awp_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backup,
                            double gamma, double eps, double sign, int64_t mode, int64_t seed,
                            const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.awp_perturb_";
  TORCH_CHECK(mode == kModeAdversarial || mode == kModeRandom, op,
              ": direction must be 0 (adversarial) or 1 (random), got ", mode);
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const bool random = mode == kModeRandom;
  check_float_list(op, params, "params");
  if (!random) check_list_like(op, params, "params", grads, "grads");
  check_list_like(op, params, "params", backup, "backup");
  check_not_aliased(op, params, "params", backup, "backup");
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": params[0] must be a CUDA tensor, got ", dev);
  check_scalar_tensor(op, found_inf, "found_inf", dev);
  const c10::cuda::CUDAGuard guard(dev);

  WorkingCopies wc;
  const std::vector<at::Tensor> w = wc.inout(params), bk = wc.out(backup);
  const std::vector<at::Tensor> g = random ? std::vector<at::Tensor>{} : WorkingCopies::in(grads);
  std::vector<cuda::TensorRef> tensors;
  for (size_t i = 0; i < w.size(); ++i) {
    tensors.push_back({{w[i].data_ptr(), random ? nullptr : g[i].data_ptr(), bk[i].data_ptr()},
                       w[i].numel(),
                       static_cast<int32_t>(i),
                       dtype_of(w[i].scalar_type())});
  }
  const int64_t ws = cuda::perturb_workspace_floats(tensors);
  // workspace: the per-chunk partials, then one int32 of skip flag (cleared by the first launch).
  at::Tensor workspace = at::empty({ws + 1}, params[0].options().dtype(c10::kFloat));
  at::Tensor norms = at::zeros({static_cast<int64_t>(w.size()), 2}, params[0].options().dtype(c10::kFloat));
  VLMKERN_CHECK_CUDA(cuda::launch_perturb(
      tensors, static_cast<int>(mode), static_cast<uint64_t>(seed), sign * gamma, eps,
      workspace.data_ptr<float>(), norms.data_ptr<float>(),
      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr,
      reinterpret_cast<int*>(workspace.data_ptr<float>() + ws), c10::cuda::getCurrentCUDAStream()));
  wc.copy_back();
  return norms;
}

void awp_restore_cuda(at::TensorList params, at::TensorList backup) {
  constexpr const char* op = "vlmkern.awp_restore_";
  check_list_like(op, params, "params", backup, "backup");
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": params[0] must be a CUDA tensor, got ", dev);
  check_same_device(op, params, "params");
  const c10::cuda::CUDAGuard guard(dev);
  WorkingCopies wc;
  const std::vector<at::Tensor> w = wc.out(params), bk = WorkingCopies::in(backup);
  std::vector<cuda::TensorRef> tensors;
  for (size_t i = 0; i < w.size(); ++i) {
    tensors.push_back({{w[i].data_ptr(), bk[i].data_ptr()},
                       w[i].numel() * w[i].element_size(),
                       static_cast<int32_t>(i),
                       DType::kF32});
  }
  VLMKERN_CHECK_CUDA(cuda::launch_restore(tensors, c10::cuda::getCurrentCUDAStream()));
  wc.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CUDA, m) {
  m.impl("awp_perturb_", &awp_perturb_cuda);
  m.impl("awp_restore_", &awp_restore_cuda);
}

}  // namespace vlmkern::awp
