// CPU kernel of kalman_step_ (SPEC §3): two passes over all tensors.
// Pass 1 reduces s = sum h^2 (p+q) with double accumulation (deterministic for
// a given thread count), pass 2 updates parameters and variances in place.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kalman/kalman_host.h"
#include "kalman/kalman_math.h"

namespace vlmkern::kalman {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename T>
double pass1_tensor(const at::Tensor& g, const at::Tensor& v, float q) {
  const T* h = g.const_data_ptr<T>();
  const float* p = v.const_data_ptr<float>();
  return at::parallel_reduce(
      0, g.numel(), kGrain, 0.0,
      [&](int64_t b, int64_t e, double acc) {
        float local = 0.f;
        for (int64_t i = b; i < e; ++i) local += pass1_term(static_cast<float>(h[i]), p[i], q);
        return acc + static_cast<double>(local);
      },
      [](double a, double b) { return a + b; });
}

template <typename T>
void pass2_tensor(at::Tensor& w, const at::Tensor& g, at::Tensor& v, const Pass2Scalars& c) {
  T* theta = w.mutable_data_ptr<T>();
  const T* h = g.const_data_ptr<T>();
  float* p = v.mutable_data_ptr<float>();
  at::parallel_for(0, w.numel(), kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float t = static_cast<float>(theta[i]);
      float pi = p[i];
      pass2(t, pi, static_cast<float>(h[i]), c);
      theta[i] = static_cast<T>(t);
      p[i] = pi;
    }
  });
}

#define VLMKERN_FLOAT_SWITCH(dtype, T, ...)                                       \
  switch (dtype) {                                                                \
    case c10::kFloat: { using T = float; __VA_ARGS__; break; }                   \
    case c10::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }        \
    case c10::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                \
    default: TORCH_CHECK(false, "vlmkern: unsupported dtype ", dtype);           \
  }

at::Tensor kalman_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList variances,
                           const at::Tensor& innovation, const at::Tensor& obs_noise,
                           double process_noise, double forgetting, double var_floor,
                           std::optional<double> gate_chi2) {
  check_args(params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor,
             gate_chi2);
  const float q = static_cast<float>(process_noise);
  const size_t n = params.size();

  // Non-contiguous tensors are worked on through contiguous copies that are
  // written back at the end (params and variances are updated in place).
  std::vector<at::Tensor> w(n), g(n), v(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
    v[i] = variances[i].contiguous();
  }

  double s = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (w[i].numel() == 0) continue;
    VLMKERN_FLOAT_SWITCH(g[i].scalar_type(), T, s += pass1_tensor<T>(g[i], v[i], q));
  }
  const float R = obs_noise.item<float>();  // CPU tensor: no device sync involved
  const float S = static_cast<float>(s) + R;
  const float chi2 = gate_chi2.has_value() ? static_cast<float>(*gate_chi2) : 0.0f;
  const float e = gate_innovation(innovation.item<float>(), S, chi2);
  Pass2Scalars c{e / S, 1.0f / S, q, static_cast<float>(1.0 / forgetting),
                 static_cast<float>(var_floor)};
  for (size_t i = 0; i < n; ++i) {
    if (w[i].numel() == 0) continue;
    VLMKERN_FLOAT_SWITCH(w[i].scalar_type(), T, pass2_tensor<T>(w[i], g[i], v[i], c));
    if (!w[i].is_same(params[i])) params[i].copy_(w[i]);
    if (!v[i].is_same(variances[i])) variances[i].copy_(v[i]);
  }
  at::Tensor out = at::empty({}, innovation.options().dtype(c10::kFloat));
  out.fill_(S);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) { m.impl("kalman_step_", &kalman_step_cpu); }

}  // namespace vlmkern::kalman
