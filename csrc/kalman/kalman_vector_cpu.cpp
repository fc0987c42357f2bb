// CPU kernel of kalman_vector_step_ (SPEC §3b): the diagonal Kalman step with
// M observations, fused over a list of tensors, in place.  grads[t] is the
// [M, *params[t].shape] block of the Jacobian H (row b = gradient of
// observation b), so the column h_i of element i of tensor t is
// grads[t].view(M, n_t)[:, i]: M values with stride n_t.
//
//   pass 1:  G = H diag(p + q) H^T          (M x M, over ALL tensors)
//   host:    S = G / gs^2 + diag(R);  S = L L^T (Cholesky, double);  c = S^-1 e;
//            d2 = e^T S^-1 e (returned, ungated);  gate: c *= sqrt(chi2 / d2) if d2 > chi2
//   pass 2:  theta_i += (p_hat_i / gs) c . h_i
//            p_i      = max((p_hat_i - p_hat_i^2 |L^-1 h_i|^2 / gs^2) / lambda, var_floor)
//
// Both passes walk a flat table of fixed-size chunks of every tensor (one
// parallel region per pass for the whole list, like kalman_cpu.cpp) and inside
// a chunk blocks of kBlock elements: the block's M rows are converted to fp32
// once into a small per-thread buffer (pass 1: transposed, [kBlock, M]; pass 2:
// [M, kBlock]), so there is no copy of H and no M x n temporary (only a
// non-contiguous grads tensor gets a contiguous working copy, host.h).  The
// inner loops are register tiles with compile-time trip counts (pass 1: 4 x 8
// Gram entries over the block's elements; pass 2: 4 rows of L^-1 x 8
// elements), which the compiler vectorises (no intrinsics, no -march: baseline
// x86-64, SSE2).
//
// Determinism: pass 1 sums fp32 block partial sums (kTA x kTB register tiles
// over kBlock elements) into double partial Grams, one per fixed group of chunks; the
// groups are summed in group order.  The groups do not depend on the thread
// count, so S, d2 and the update are bitwise identical for any number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/host.h"
#include "common/outputs.h"
#include "kalman/kalman_host.h"
#include "kalman/kalman_math.h"

namespace vlmkern::kalman {
namespace {

constexpr int64_t kBlock = 64;            // elements per block (inner loops)
constexpr int64_t kSub = 8;               // pass-2 register tile: kTA2 rows x kSub elements
constexpr int64_t kTA2 = 4;
constexpr int64_t kChunk = 32 * kBlock;   // elements per work item
constexpr int64_t kMaxGroups = 16;        // pass-1 partial Grams at most (>= threads for balance)
constexpr int64_t kGroupBytes = 16 << 20; // ... and at most this much memory for them

// Hb[m * kBlock + j] = h[m * n + start + j] as fp32 for j < len, 0 beyond.
template <typename T>
void load_block(float* Hb, const T* h, int64_t n, int64_t start, int64_t len, int64_t M) {
  for (int64_t m = 0; m < M; ++m) {
    const T* src = h + m * n + start;
    float* dst = Hb + m * kBlock;
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
    for (int64_t j = len; j < kBlock; ++j) dst[j] = 0.f;
  }
}

// Pass 1 register tile: kTA rows a x kTB columns b of the Gram.
constexpr int64_t kTA = 4;
constexpr int64_t kTB = 8;

// Pass-1 scratch of one thread: the block transposed, HT[j * Mp + m] = h_mj,
// and WT = HT * p_hat (Mp = M rounded up to kTB; the padding rows stay 0).
struct GramScratch {
  int64_t Mp;
  std::vector<float> HT, WT;
  explicit GramScratch(int64_t M)
      : Mp((M + kTB - 1) / kTB * kTB),
        HT(static_cast<size_t>(kBlock * Mp), 0.f),
        WT(static_cast<size_t>(kBlock * Mp), 0.f) {}
};

// Pass 1 on one block: G[a, b] += sum_j h_aj p_hat_j h_bj for b >= a (upper
// triangle; fp32 over the block's kBlock elements, then double).  p_hat_j =
// p_j + q, NaN for a negative/NaN p_j (pass1_term's rule: the Gram, hence S,
// becomes non-finite and the step is skipped).  Elements past `len` are 0.
template <typename T>
void gram_block(double* G, GramScratch& sc, const T* h, int64_t n, int64_t start, const float* p,
                int64_t len, float q, int64_t M) {
  const int64_t Mp = sc.Mp;
  float* HT = sc.HT.data();
  float* WT = sc.WT.data();
  alignas(64) float ph[kBlock];
  for (int64_t j = 0; j < len; ++j) ph[j] = p[j] >= 0.f ? p[j] + q : NAN;
  for (int64_t m = 0; m < M; ++m) {
    const T* src = h + m * n + start;
    for (int64_t j = 0; j < len; ++j) {
      const float x = static_cast<float>(src[j]);
      HT[j * Mp + m] = x;
      WT[j * Mp + m] = x * ph[j];
    }
  }
  for (int64_t j = len; j < kBlock; ++j) {
    for (int64_t m = 0; m < M; ++m) HT[j * Mp + m] = WT[j * Mp + m] = 0.f;
  }
  for (int64_t a0 = 0; a0 < M; a0 += kTA) {
    for (int64_t b0 = a0 / kTB * kTB; b0 < M; b0 += kTB) {
      float acc[kTA][kTB] = {};
      for (int64_t j = 0; j < kBlock; ++j) {
        const float* wj = WT + j * Mp + a0;
        const float* hj = HT + j * Mp + b0;
        for (int64_t r = 0; r < kTA; ++r)
          for (int64_t c = 0; c < kTB; ++c) acc[r][c] += wj[r] * hj[c];
      }
      for (int64_t r = 0; r < kTA && a0 + r < M; ++r) {
        double* Ga = G + (a0 + r) * M;
        for (int64_t c = 0; c < kTB && b0 + c < M; ++c) {
          if (b0 + c >= a0 + r) Ga[b0 + c] += static_cast<double>(acc[r][c]);
        }
      }
    }
  }
}

template <typename T>
void gram_chunk(double* G, GramScratch& sc, const T* h, const float* p, int64_t n, const Chunk& ch,
                float q, int64_t M) {
  for (int64_t s = 0; s < ch.len; s += kBlock) {
    const int64_t len = std::min(kBlock, ch.len - s);
    gram_block<T>(G, sc, h, n, ch.start + s, p + ch.start + s, len, q, M);
  }
}

// The scalars of pass 2: c (gated, times 1/gs) and L^-1 / gs (lower triangle,
// row-major M x M, zero rows appended up to a multiple of kTA2), fp32.
struct Pass2Vector {
  const float* c;
  const float* Linv;
  int64_t M;
  float q;
  float inv_lambda;
  float floor;
};

template <typename T>
void update_chunk(T* theta, float* p, float* Hb, const T* h, int64_t n, const Chunk& ch,
                  const Pass2Vector& k) {
  const int64_t M = k.M;
  for (int64_t s = 0; s < ch.len; s += kBlock) {
    const int64_t len = std::min(kBlock, ch.len - s);
    const int64_t i0 = ch.start + s;
    load_block<T>(Hb, h, n, i0, len, M);
    alignas(64) float dot[kBlock];  // c . h_j
    alignas(64) float hsh[kBlock];  // |L^-1 h_j|^2 / gs^2 = h_j^T S^-1 h_j
    for (int64_t j0 = 0; j0 < kBlock; j0 += kSub) {
      float d[kSub] = {};
      float qf[kSub] = {};
      for (int64_t a = 0; a < M; ++a) {
        const float* ha = Hb + a * kBlock + j0;
        const float ca = k.c[a];
        for (int64_t l = 0; l < kSub; ++l) d[l] += ca * ha[l];
      }
      // u = (L^-1 / gs) h for kTA2 rows at a time: each h_b load serves kTA2 rows
      for (int64_t a0 = 0; a0 < M; a0 += kTA2) {
        float u[kTA2][kSub] = {};
        const int64_t bend = std::min(a0 + kTA2, M);  // L^-1 is lower triangular
        for (int64_t b = 0; b < bend; ++b) {
          const float* hb = Hb + b * kBlock + j0;
          for (int64_t r = 0; r < kTA2; ++r) {
            const float lab = k.Linv[(a0 + r) * M + b];  // rows past M are 0
            for (int64_t l = 0; l < kSub; ++l) u[r][l] += lab * hb[l];
          }
        }
        for (int64_t r = 0; r < kTA2; ++r)
          for (int64_t l = 0; l < kSub; ++l) qf[l] += u[r][l] * u[r][l];
      }
      for (int64_t l = 0; l < kSub; ++l) {
        dot[j0 + l] = d[l];
        hsh[j0 + l] = qf[l];
      }
    }
    T* th = theta + i0;
    float* pp = p + i0;
    for (int64_t j = 0; j < len; ++j) {
      const float ph = pp[j] + k.q;
      th[j] = static_cast<T>(static_cast<float>(th[j]) + ph * dot[j]);
      const float pn = (ph - ph * ph * hsh[j]) * k.inv_lambda;
      pp[j] = (pn >= k.floor) ? pn : k.floor;  // !(pn >= floor) also catches NaN
    }
  }
}

// S = L L^T in double (lower L, row-major); false unless every pivot is finite and > 0.
bool cholesky(const std::vector<double>& S, std::vector<double>& L, int64_t M) {
  L.assign(static_cast<size_t>(M * M), 0.0);
  for (int64_t j = 0; j < M; ++j) {
    double d = S[j * M + j];
    for (int64_t k = 0; k < j; ++k) d -= L[j * M + k] * L[j * M + k];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    L[j * M + j] = ljj;
    for (int64_t i = j + 1; i < M; ++i) {
      double x = S[i * M + j];
      for (int64_t k = 0; k < j; ++k) x -= L[i * M + k] * L[j * M + k];
      L[i * M + j] = x / ljj;
    }
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> kalman_vector_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList variances,
    const at::Tensor& innovation, const at::Tensor& obs_noise, double process_noise,
    double forgetting, double var_floor, std::optional<double> gate_chi2,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "vlmkern.kalman_vector_step_";
  // Memory safety of a direct torch.ops call (values are checked in Python).
  const int64_t M =
      check_vector_step_args(op, params, grads, variances, innovation, obs_noise, grad_scale, found_inf).M;
  TORCH_CHECK(M <= (int64_t{1} << 15), op, ": M = ", M, " observations is more than this kernel handles");

  const float q = static_cast<float>(process_noise);
  const at::Tensor e_t = innovation.contiguous(), R_t = obs_noise.contiguous();
  const float* e = e_t.const_data_ptr<float>();
  const float* R = R_t.const_data_ptr<float>();

  ChunkedStep st(params, grads, variances, kChunk);
  const std::vector<at::Tensor> &w = st.w, &g = st.g, &v = st.v;
  const std::vector<DType>& dt = st.dt;
  const std::vector<Chunk>& chunks = st.chunks;
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t MM = M * M;

  // ---- pass 1: fixed groups of consecutive chunks, one double Gram each ----
  const int64_t ngroups =
      std::max<int64_t>(1, std::min({nchunks, kMaxGroups, kGroupBytes / (MM * 8)}));
  std::vector<double> partial(static_cast<size_t>(ngroups * MM), 0.0);
  if (nchunks > 0) {
    at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
      GramScratch sc(M);
      for (int64_t grp = gb; grp < ge; ++grp) {
        double* G = partial.data() + grp * MM;
        const int64_t cb = grp * nchunks / ngroups, ce = (grp + 1) * nchunks / ngroups;
        for (int64_t k = cb; k < ce; ++k) {
          const Chunk& ch = chunks[k];
          const int64_t n = w[ch.tensor].numel();
          const float* p = v[ch.tensor].const_data_ptr<float>();
          VLMKERN_DISPATCH_CPU(dt[ch.tensor], T,
                               gram_chunk<T>(G, sc, g[ch.tensor].const_data_ptr<T>(), p, n, ch, q, M));
        }
      }
    });
  }
  std::vector<double> G(static_cast<size_t>(MM), 0.0);
  for (int64_t grp = 0; grp < ngroups; ++grp) {  // fixed order
    const double* P = partial.data() + grp * MM;
    for (int64_t a = 0; a < M; ++a)
      for (int64_t b = a; b < M; ++b) G[a * M + b] += P[a * M + b];
  }

  // ---- the M x M system on the host (these are CPU tensors: no device sync) ----
  const float gs = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const float fi = found_inf.has_value() ? found_inf->item<float>() : 0.0f;
  const float inv = 1.0f / gs;
  const double inv_d = static_cast<double>(inv);
  at::Tensor S_out = empty_output({M, M}, innovation.options().dtype(c10::kFloat));
  at::Tensor d2_out = empty_output({}, innovation.options().dtype(c10::kFloat));
  float* Sf = S_out.mutable_data_ptr<float>();
  bool ok = fi == 0.f && finite_f(gs) && gs > 0.f && finite_f(inv);
  for (int64_t a = 0; a < M; ++a) {
    ok = ok && finite_f(e[a]) && finite_f(R[a]) && R[a] > 0.f;
    for (int64_t b = a; b < M; ++b) {
      // as the torch backend: (G / gs^2) rounded to fp32, plus R on the diagonal
      float x = static_cast<float>(G[a * M + b] * inv_d * inv_d);
      if (a == b) x += R[a];
      Sf[a * M + b] = x;
      Sf[b * M + a] = x;
      ok = ok && finite_f(x);
    }
  }
  std::vector<double> S(static_cast<size_t>(MM)), L;
  for (int64_t i = 0; i < MM; ++i) S[i] = static_cast<double>(Sf[i]);
  ok = ok && cholesky(S, L, M);
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (!ok) {  // skipped (SPEC §3 "Bad input"): nothing written, S and d2 reported as NaN
    S_out.fill_(kNaN);
    d2_out.fill_(kNaN);
    return {S_out, d2_out};
  }
  // c = S^-1 e: L y = e, L^T c = y;  d2 = e . c = |y|^2
  std::vector<double> y(static_cast<size_t>(M)), c(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) {
    double x = e[i];
    for (int64_t k = 0; k < i; ++k) x -= L[i * M + k] * y[k];
    y[i] = x / L[i * M + i];
  }
  for (int64_t i = M - 1; i >= 0; --i) {
    double x = y[i];
    for (int64_t k = i + 1; k < M; ++k) x -= L[k * M + i] * c[k];
    c[i] = x / L[i * M + i];
  }
  double d2 = 0.0;
  for (int64_t i = 0; i < M; ++i) d2 += static_cast<double>(e[i]) * c[i];
  double cscale = inv_d;
  if (gate_chi2.has_value() && d2 > *gate_chi2) cscale *= std::sqrt(*gate_chi2 / d2);
  // L^-1 (lower triangular), column by column
  std::vector<double> Li(static_cast<size_t>(MM), 0.0);
  for (int64_t j = 0; j < M; ++j) {
    Li[j * M + j] = 1.0 / L[j * M + j];
    for (int64_t i = j + 1; i < M; ++i) {
      double x = 0.0;
      for (int64_t k = j; k < i; ++k) x -= L[i * M + k] * Li[k * M + j];
      Li[i * M + j] = x / L[i * M + i];
    }
  }
  // L^-1 / gs in fp32, rows padded with zeros to a multiple of kTA2
  std::vector<float> cf(static_cast<size_t>(M)),
      Lf(static_cast<size_t>((M + kTA2 - 1) / kTA2 * kTA2 * M), 0.f);
  for (int64_t i = 0; i < M; ++i) cf[i] = static_cast<float>(c[i] * cscale);
  for (int64_t i = 0; i < MM; ++i) Lf[i] = static_cast<float>(Li[i] * inv_d);
  const Pass2Vector k2{cf.data(), Lf.data(), M, q, static_cast<float>(1.0 / forgetting),
                       static_cast<float>(var_floor)};

  // ---- pass 2 ----
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t en) {
    std::vector<float> Hb(static_cast<size_t>(M * kBlock));
    for (int64_t k = b; k < en; ++k) {
      const Chunk& ch = chunks[k];
      const int64_t n = w[ch.tensor].numel();
      float* p = v[ch.tensor].mutable_data_ptr<float>();
      VLMKERN_DISPATCH_CPU(dt[ch.tensor], T,
                           update_chunk<T>(w[ch.tensor].mutable_data_ptr<T>(), p, Hb.data(),
                                           g[ch.tensor].const_data_ptr<T>(), n, ch, k2));
    }
  });
  st.copy_back();
  d2_out.fill_(static_cast<float>(d2));
  return {S_out, d2_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlmkern, CPU, m) { m.impl("kalman_vector_step_", &kalman_vector_step_cpu); }

}  // namespace vlmkern::kalman
