// CPU kernels of the hinged / plain global contrastive loss (SPEC §1).
//
// Blocked over anchor rows: each block of kBlock rows computes its similarity
// tile [kBlock, B] with at::mm (BLAS) on fp32-upcast features, then the
// log-sum-exp or the estimator weights in fp32 with at::parallel_for.  Extra
// memory is O(kBlock * B + B * d), never B x B.
//
// One process (all_img / all_txt = None): the text-anchored similarities are
// the transpose of the image-anchored ones (s'_ij = s_ji), so one tile serves
// both terms: rows give Phi1 (image anchors), columns give Phi2 (text
// anchors).  Cost: 2 B^2 d FLOPs for the stats, 6 B^2 d for the gradient.
// Several processes: the local rows against the global columns, two tiles per
// block (s = F Gg^T, s' = G Fg^T).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/outputs.h"
#include "hgcl/hgcl_math.h"

namespace vlmkern::hgcl {
namespace {

constexpr int64_t kBlock = 256;      // anchor rows per tile
constexpr int64_t kColGrain = 512;   // columns per parallel_for task

struct Cfg {
  bool hinge;
  float margin;
  float inv_tau;
};

// Checks shapes, dtypes and devices of the features (value ranges: the Python
// wrapper) and returns (b, B, d).
std::tuple<int64_t, int64_t, int64_t> check_features(const char* op, const at::Tensor& img,
                                                     const at::Tensor& txt,
                                                     const std::optional<at::Tensor>& all_img,
                                                     const std::optional<at::Tensor>& all_txt,
                                                     int64_t offset) {
  TORCH_CHECK(img.dim() == 2, op, ": img must be 2-D [b, d], got shape ", img.sizes());
  TORCH_CHECK(txt.sizes() == img.sizes(), op, ": txt has shape ", txt.sizes(),
              " but img has shape ", img.sizes());
  TORCH_CHECK(is_float_dtype(img.scalar_type()), op,
              ": img must be float32, bfloat16 or float16, got ", img.scalar_type());
  TORCH_CHECK(txt.scalar_type() == img.scalar_type(), op, ": txt has dtype ", txt.scalar_type(),
              " but img has dtype ", img.scalar_type());
  TORCH_CHECK(img.device().is_cpu() && txt.device().is_cpu(), op,
              ": img and txt must be CPU tensors");
  TORCH_CHECK(all_img.has_value() == all_txt.has_value(), op,
              ": give both all_img and all_txt or neither");
  const int64_t b = img.size(0), d = img.size(1);
  int64_t B = b;
  if (all_img.has_value()) {
    const at::Tensor& ai = *all_img;
    const at::Tensor& at_ = *all_txt;
    TORCH_CHECK(ai.dim() == 2 && ai.size(1) == d, op, ": all_img must be [B, ", d,
                "], got shape ", ai.sizes());
    TORCH_CHECK(at_.sizes() == ai.sizes(), op, ": all_txt has shape ", at_.sizes(),
                " but all_img has shape ", ai.sizes());
    TORCH_CHECK(ai.scalar_type() == img.scalar_type() && at_.scalar_type() == img.scalar_type(),
                op, ": all_img and all_txt must have the dtype of img (", img.scalar_type(), ")");
    TORCH_CHECK(ai.device().is_cpu() && at_.device().is_cpu(), op,
                ": all_img and all_txt must be CPU tensors");
    B = ai.size(0);
    TORCH_CHECK(offset >= 0 && offset + b <= B, op, ": offset must be in [0, B - b] = [0, ",
                B - b, "], got ", offset);
  } else {
    TORCH_CHECK(offset == 0, op, ": offset must be 0 without all_img / all_txt, got ", offset);
  }
  return {b, B, d};
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Log-sum-exp over one tile row t[0..n) of z = l(t_j - p) / tau, skipping column `skip`.
// With ws != nullptr also *ws = sum_j exp(z_j - max) l_j (the tau-gradient
// reduction: one more multiply-add per element in the second pass).
LogSumExp row_lse(const float* t, int64_t n, float p, int64_t skip, const Cfg& c, float* ws) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (j == skip) continue;
    mx = std::max(mx, logit(t[j], p, c.hinge, c.margin, c.inv_tau));
  }
  if (ws != nullptr) *ws = 0.f;
  if (mx == -INFINITY) return lse_empty();
  float s = 0.f;
  if (ws == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      if (j == skip) continue;
      s += std::exp(logit(t[j], p, c.hinge, c.margin, c.inv_tau) - mx);
    }
  } else {
    float w = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      if (j == skip) continue;
      const float l = surrogate(t[j] - p, c.hinge, c.margin);
      const float e = std::exp(l * c.inv_tau - mx);
      s += e;
      w += e * l;
    }
    *ws = w;
  }
  return LogSumExp{mx, s};
}

// Row log-sum-exps of a tile [nb, n]; row i skips column i + diag.  ws: see row_lse
// (nullptr: not wanted).
void tile_row_lse(const at::Tensor& T, const float* p, int64_t diag, const Cfg& c,
                  LogSumExp* out, float* ws) {
  const int64_t nb = T.size(0), n = T.size(1);
  const float* t = T.const_data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      out[i] = row_lse(t + i * n, n, p[i], i + diag, c, ws == nullptr ? nullptr : ws + i);
  });
}

// Column log-sum-exps of a tile [nb, n] (rows r0..r0+nb of the square one-process
// matrix), anchored at the column: z = l(t_ij - p_j) / tau, skipping i + r0 == j;
// merged into acc[j] (and, with wacc != nullptr, the l-weighted sums into wacc[j]).
void tile_col_lse(const at::Tensor& T, const float* p, int64_t r0, const Cfg& c,
                  LogSumExp* acc, float* wacc) {
  const int64_t nb = T.size(0), n = T.size(1);
  const float* t = T.const_data_ptr<float>();
  at::parallel_for(0, n, kColGrain, [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    std::vector<float> mx(w, -INFINITY), sm(w, 0.f), ws(w, 0.f);
    for (int64_t i = 0; i < nb; ++i) {
      const float* row = t + i * n;
      for (int64_t j = j0; j < j1; ++j) {
        if (j == i + r0) continue;
        mx[j - j0] = std::max(mx[j - j0], logit(row[j], p[j], c.hinge, c.margin, c.inv_tau));
      }
    }
    for (int64_t i = 0; i < nb; ++i) {
      const float* row = t + i * n;
      for (int64_t j = j0; j < j1; ++j) {
        if (j == i + r0 || mx[j - j0] == -INFINITY) continue;
        if (wacc == nullptr) {
          sm[j - j0] += std::exp(logit(row[j], p[j], c.hinge, c.margin, c.inv_tau) - mx[j - j0]);
        } else {
          const float l = surrogate(row[j] - p[j], c.hinge, c.margin);
          const float e = std::exp(l * c.inv_tau - mx[j - j0]);
          sm[j - j0] += e;
          ws[j - j0] += e * l;
        }
      }
    }
    if (wacc == nullptr) {
      for (int64_t j = j0; j < j1; ++j) lse_merge(acc[j], mx[j - j0], sm[j - j0]);
    } else {
      for (int64_t j = j0; j < j1; ++j)
        lse_merge_weighted(acc[j], wacc[j], mx[j - j0], sm[j - j0], ws[j - j0]);
    }
  });
}

// (log Phi1, log Phi2, lbar1, lbar2); lbar = the softmax-weighted mean of l over
// the negatives (hgcl_math.h), [b] when lmean else [0] (not computed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hgcl_stats_cpu(
    const at::Tensor& img, const at::Tensor& txt, const std::optional<at::Tensor>& all_img,
    const std::optional<at::Tensor>& all_txt, int64_t offset, double tau, double margin,
    bool hinge, bool lmean) {
  constexpr const char* op = "vlmkern.hgcl_stats";
  auto [b, B, d] = check_features(op, img, txt, all_img, all_txt, offset);
  const Cfg c{hinge, static_cast<float>(margin), static_cast<float>(1.0 / tau)};
  auto opts = img.options().dtype(at::kFloat);
  at::Tensor lphi1 = empty_output({b}, opts), lphi2 = empty_output({b}, opts);
  const int64_t nl = lmean ? b : 0;
  at::Tensor lbar1 = empty_output({nl}, opts), lbar2 = empty_output({nl}, opts);
  if (b == 0) return {lphi1, lphi2, lbar1, lbar2};
  at::Tensor F = f32(img), G = f32(txt);
  at::Tensor p = F.mul(G).sum(1).contiguous();
  const float* pp = p.const_data_ptr<float>();
  std::vector<LogSumExp> r1(b, lse_empty()), r2(b, lse_empty());
  std::vector<float> w1(nl, 0.f), w2(nl, 0.f);  // sum exp(z - max) l
  float* pw1 = lmean ? w1.data() : nullptr;
  float* pw2 = lmean ? w2.data() : nullptr;
  if (!all_img.has_value()) {
    at::Tensor Gt = G.t();
    for (int64_t r0 = 0; r0 < b; r0 += kBlock) {
      const int64_t nb = std::min(kBlock, b - r0);
      at::Tensor T = at::mm(F.narrow(0, r0, nb), Gt).contiguous();  // s_ij, rows r0..
      tile_row_lse(T, pp + r0, r0, c, r1.data() + r0, pw1 == nullptr ? nullptr : pw1 + r0);
      tile_col_lse(T, pp, r0, c, r2.data(), pw2);
    }
  } else {
    at::Tensor Fg = f32(*all_img), Gg = f32(*all_txt);
    at::Tensor Ggt = Gg.t(), Fgt = Fg.t();
    for (int64_t r0 = 0; r0 < b; r0 += kBlock) {
      const int64_t nb = std::min(kBlock, b - r0);
      at::Tensor T1 = at::mm(F.narrow(0, r0, nb), Ggt).contiguous();
      tile_row_lse(T1, pp + r0, offset + r0, c, r1.data() + r0, pw1 == nullptr ? nullptr : pw1 + r0);
      at::Tensor T2 = at::mm(G.narrow(0, r0, nb), Fgt).contiguous();
      tile_row_lse(T2, pp + r0, offset + r0, c, r2.data() + r0, pw2 == nullptr ? nullptr : pw2 + r0);
    }
  }
  const float log_nm1 = B > 1 ? std::log(static_cast<float>(B - 1)) : 0.f;
  float* o1 = lphi1.mutable_data_ptr<float>();
  float* o2 = lphi2.mutable_data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) {
    o1[i] = lse_value(r1[i]) - log_nm1;
    o2[i] = lse_value(r2[i]) - log_nm1;
  }
  if (lmean) {
    float* m1 = lbar1.mutable_data_ptr<float>();
    float* m2 = lbar2.mutable_data_ptr<float>();
    for (int64_t i = 0; i < b; ++i) {
      m1[i] = lse_weighted_mean(r1[i], w1[i]);
      m2[i] = lse_weighted_mean(r2[i], w2[i]);
    }
  }
  return {lphi1, lphi2, lbar1, lbar2};
}

at::Tensor hgcl_state_update_cpu(at::Tensor& log_u, const at::Tensor& index,
                                 const at::Tensor& log_phi, double gamma, double eps) {
  constexpr const char* op = "vlmkern.hgcl_state_update_";
  TORCH_CHECK(log_u.dim() == 1 && log_u.scalar_type() == at::kFloat, op,
              ": log_u must be a 1-D float32 tensor, got ", log_u.scalar_type(), " of shape ",
              log_u.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op,
              ": index must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(log_phi.dim() == 1 && log_phi.size(0) == index.size(0) &&
                  log_phi.scalar_type() == at::kFloat,
              op, ": log_phi must be float32 [", index.size(0), "], got ", log_phi.scalar_type(),
              " of shape ", log_phi.sizes());
  const int64_t n = index.size(0), N = log_u.size(0);
  at::Tensor logden = empty_output({n}, log_phi.options());
  auto u = log_u.accessor<float, 1>();
  auto idx = index.accessor<int64_t, 1>();
  auto ph = log_phi.accessor<float, 1>();
  float* out = logden.mutable_data_ptr<float>();
  const float l1mg = static_cast<float>(std::log1p(-gamma));
  const float lg = static_cast<float>(std::log(gamma));
  const float leps = static_cast<float>(std::log(eps));
  // Sequential on purpose: with repeated indices each occurrence reads what the
  // previous one wrote, deterministically.  The Python API calls it on the
  // gathered entries (one distinct position per anchor) after merging the
  // duplicates' Phi (SPEC §1 "Duplicate indices").
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    TORCH_CHECK(k >= 0 && k < N, op, ": index[", i, "] = ", k, " is outside [0, ", N, ")");
    const float nu = state_update(u[k], ph[i], l1mg, lg);
    u[k] = nu;
    out[i] = logaddexp(nu, leps);
  }
  return logden;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hgcl_grad_cpu(
    const at::Tensor& img, const at::Tensor& txt, const std::optional<at::Tensor>& all_img,
    const std::optional<at::Tensor>& all_txt, const at::Tensor& logden_img,
    const at::Tensor& logden_txt, const at::Tensor& grad_out, int64_t offset, double tau,
    double margin, bool hinge) {
  constexpr const char* op = "vlmkern.hgcl_grad";
  auto [b, B, d] = check_features(op, img, txt, all_img, all_txt, offset);
  TORCH_CHECK(logden_img.dim() == 1 && logden_img.size(0) == b &&
                  logden_img.scalar_type() == at::kFloat,
              op, ": logden_img must be float32 [", b, "]");
  TORCH_CHECK(logden_txt.dim() == 1 && logden_txt.size(0) == b &&
                  logden_txt.scalar_type() == at::kFloat,
              op, ": logden_txt must be float32 [", b, "]");
  TORCH_CHECK(grad_out.numel() == 1, op, ": grad_out must have one element");
  const Cfg c{hinge, static_cast<float>(margin), static_cast<float>(1.0 / tau)};
  auto fopts = img.options().dtype(at::kFloat);
  const int64_t Bcols = all_img.has_value() ? B : 0;
  // gF is written block by block in both paths; gG too with global columns,
  // while the one-process path accumulates it (addmm_), as both paths do gFg, gGg.
  at::Tensor gF = empty_output({b, d}, fopts);
  at::Tensor gG = all_img.has_value() ? empty_output({b, d}, fopts) : at::zeros({b, d}, fopts);
  at::Tensor gFg = at::zeros({Bcols, d}, fopts), gGg = at::zeros({Bcols, d}, fopts);
  auto finish = [&]() {
    return std::make_tuple(gF.to(img.scalar_type()), gG.to(img.scalar_type()),
                           gFg.to(img.scalar_type()), gGg.to(img.scalar_type()));
  };
  if (b == 0 || B < 2) {
    gF.zero_();
    gG.zero_();
    return finish();
  }
  const float scale = grad_out.to(at::kFloat).item<float>() / static_cast<float>(b);
  const float inv_nm1 = 1.f / static_cast<float>(B - 1);
  at::Tensor F = f32(img), G = f32(txt);
  at::Tensor p = F.mul(G).sum(1).contiguous();
  at::Tensor ld1 = logden_img.contiguous(), ld2 = logden_txt.contiguous();
  const float* pp = p.const_data_ptr<float>();
  const float* l1 = ld1.const_data_ptr<float>();
  const float* l2 = ld2.const_data_ptr<float>();
  std::vector<float> rsum(b, 0.f), csum(b, 0.f);  // sum_j dS1_ij, sum_j dS2_ij

  if (!all_img.has_value()) {
    at::Tensor Gt = G.t();
    for (int64_t r0 = 0; r0 < b; r0 += kBlock) {
      const int64_t nb = std::min(kBlock, b - r0);
      at::Tensor Fb = F.narrow(0, r0, nb);
      at::Tensor T = at::mm(Fb, Gt).contiguous();  // s_ij = F_i . G_j
      at::Tensor D = empty_output({nb, b}, fopts);  // dL/ds_ij (both terms)
      const float* t = T.const_data_ptr<float>();
      float* dd = D.mutable_data_ptr<float>();
      // Text anchors j (columns): s'_ji = s_ij, term dS2_ji.
      at::parallel_for(0, b, kColGrain, [&](int64_t j0, int64_t j1) {
        for (int64_t i = 0; i < nb; ++i) {
          const float* row = t + i * b;
          float* drow = dd + i * b;
          for (int64_t j = j0; j < j1; ++j) {
            float v = 0.f;
            if (j != i + r0) v = scale * dsim(row[j], pp[j], l2[j], c.hinge, c.margin, c.inv_tau, inv_nm1);
            drow[j] = v;
            csum[j] += v;
          }
        }
      });
      // Image anchors i (rows): dS1_ij.
      at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const float* row = t + i * b;
          float* drow = dd + i * b;
          const float pi = pp[r0 + i], li = l1[r0 + i];
          float acc = 0.f;
          for (int64_t j = 0; j < b; ++j) {
            if (j == i + r0) continue;
            const float v = scale * dsim(row[j], pi, li, c.hinge, c.margin, c.inv_tau, inv_nm1);
            drow[j] += v;
            acc += v;
          }
          rsum[r0 + i] = acc;
        }
      });
      gF.narrow(0, r0, nb).copy_(at::mm(D, G));
      gG.addmm_(D.t(), Fb);
    }
  } else {
    at::Tensor Fg = f32(*all_img), Gg = f32(*all_txt);
    at::Tensor Ggt = Gg.t(), Fgt = Fg.t();
    for (int64_t r0 = 0; r0 < b; r0 += kBlock) {
      const int64_t nb = std::min(kBlock, b - r0);
      at::Tensor Fb = F.narrow(0, r0, nb), Gb = G.narrow(0, r0, nb);
      at::Tensor D1 = at::mm(Fb, Ggt).contiguous();  // s_ij -> dS1_ij in place
      at::Tensor D2 = at::mm(Gb, Fgt).contiguous();  // s'_ij -> dS2_ij in place
      float* d1 = D1.mutable_data_ptr<float>();
      float* d2 = D2.mutable_data_ptr<float>();
      at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t a = r0 + i, skip = offset + a;
          float* x1 = d1 + i * B;
          float* x2 = d2 + i * B;
          float acc1 = 0.f, acc2 = 0.f;
          for (int64_t j = 0; j < B; ++j) {
            if (j == skip) {
              x1[j] = 0.f;
              x2[j] = 0.f;
              continue;
            }
            x1[j] = scale * dsim(x1[j], pp[a], l1[a], c.hinge, c.margin, c.inv_tau, inv_nm1);
            x2[j] = scale * dsim(x2[j], pp[a], l2[a], c.hinge, c.margin, c.inv_tau, inv_nm1);
            acc1 += x1[j];
            acc2 += x2[j];
          }
          rsum[a] = acc1;
          csum[a] = acc2;
        }
      });
      gF.narrow(0, r0, nb).copy_(at::mm(D1, Gg));
      gG.narrow(0, r0, nb).copy_(at::mm(D2, Fg));
      gGg.addmm_(D1.t(), Fb);
      gFg.addmm_(D2.t(), Gb);
    }
  }
  // Positive pairs: p_i = F_i . G_i, dL/dp_i = -(sum_j dS1_ij + sum_j dS2_ij).
  at::Tensor dp = empty_output({b, 1}, fopts);
  float* dpp = dp.mutable_data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) dpp[i] = -(rsum[i] + csum[i]);
  gF.add_(dp.mul(G));
  gG.add_(dp.mul(F));
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) {
  m.impl("hgcl_stats", &hgcl_stats_cpu);
  m.impl("hgcl_state_update_", &hgcl_state_update_cpu);
  m.impl("hgcl_grad", &hgcl_grad_cpu);
}

}  // namespace vlmkern::hgcl
