// CPU kernel of kalman_step_ (SPEC §3): two passes over all tensors, each ONE
// parallel region over a flat table of fixed-size chunks of every tensor (the
// CPU analogue of multi-tensor apply: a list of many small tensors, e.g. LoRA
// adapters, costs two parallel regions, not two per tensor).
//
// Pass 1 writes one partial sum per chunk (fp32 lanes inside the chunk, so the
// loop vectorises; double per chunk) and sums the partials in chunk order in
// double: S is bitwise identical for any thread count.  Pass 2 updates
// parameters and variances in place.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/host.h"
#include "kalman/kalman_host.h"
#include "kalman/kalman_math.h"

namespace vlmkern::kalman {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per chunk (and per parallel work item)
constexpr int kLanes = 16;           // independent fp32 accumulators in pass 1

template <typename T>
double pass1_chunk(const T* h, const float* p, int64_t n, float q) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += pass1_term(static_cast<float>(h[i + l]), p[i + l], q);
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += pass1_term(static_cast<float>(h[i]), p[i], q);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

template <typename T>
void pass2_chunk(T* theta, const T* h, float* p, int64_t n, const Pass2Scalars& c) {
  for (int64_t i = 0; i < n; ++i) {
    float t = static_cast<float>(theta[i]);
    float pi = p[i];
    pass2(t, pi, static_cast<float>(h[i]), c);
    theta[i] = static_cast<T>(t);
    p[i] = pi;
  }
}

at::Tensor kalman_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList variances,
                           const at::Tensor& innovation, const at::Tensor& obs_noise,
                           double process_noise, double forgetting, double var_floor,
                           std::optional<double> gate_chi2,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_step_";
  check_float_list(op, params, "params");
  check_list_like(op, params, "params", grads, "grads");
  check_list_like(op, params, "params", variances, "variances", /*f32=*/true);
  const at::Device dev = params.empty() ? innovation.device() : params[0].device();
  check_scalar_tensor(op, innovation, "innovation", dev);
  check_scalar_tensor(op, obs_noise, "obs_noise", dev);
  check_scalar_tensor(op, grad_scale, "grad_scale", dev);
  check_scalar_tensor(op, found_inf, "found_inf", dev);
  const float q = static_cast<float>(process_noise);

  ChunkedStep st(params, grads, variances, kChunk);
  const std::vector<at::Tensor> &w = st.w, &g = st.g, &v = st.v;
  const std::vector<DType>& dt = st.dt;
  const std::vector<Chunk>& chunks = st.chunks;
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Chunk& ch = chunks[k];
      const float* p = v[ch.tensor].const_data_ptr<float>() + ch.start;
      VLMKERN_DISPATCH_CPU(dt[ch.tensor], T,
                           partial[k] = pass1_chunk<T>(g[ch.tensor].const_data_ptr<T>() + ch.start, p,
                                                       ch.len, q));
    }
  });
  double s = 0.0;
  for (double x : partial) s += x;  // fixed order: independent of the thread count

  // CPU tensors: reading them involves no device sync.
  const float R = obs_noise.item<float>();
  const float gs = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float fi = found_inf.has_value() ? found_inf->item<float>() : 0.0f;
  const float chi2 = gate_chi2.has_value() ? static_cast<float>(*gate_chi2) : 0.0f;
  Pass2Scalars c{};
  float S = 0.f;
  const bool ok = step_scalars(s, R, innovation.item<float>(), gs, fi, chi2, q,
                               static_cast<float>(1.0 / forgetting), static_cast<float>(var_floor),
                               c, S);
  at::Tensor out = at::empty({}, innovation.options().dtype(c10::kFloat));
  if (!ok) {  // skipped (SPEC §3 "Bad input"): nothing written, S reported as NaN
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return out;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Chunk& ch = chunks[k];
      float* p = v[ch.tensor].mutable_data_ptr<float>() + ch.start;
      VLMKERN_DISPATCH_CPU(dt[ch.tensor], T,
                           pass2_chunk<T>(w[ch.tensor].mutable_data_ptr<T>() + ch.start,
                                          g[ch.tensor].const_data_ptr<T>() + ch.start, p, ch.len, c));
    }
  });
  st.copy_back();
  out.fill_(S);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) { m.impl("kalman_step_", &kalman_step_cpu); }

}  // namespace vlmkern::kalman
