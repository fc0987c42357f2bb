// Every vlmkern schema, in one place.  Kernels are registered per dispatch key
// next to their implementation (TORCH_LIBRARY_IMPL in <op>/<op>_cpu.cpp and
// <op>/<op>_cuda.cpp); fake (meta) kernels and autograd are registered from
// Python in vlmkern/ops/<op>.py.  See docs/ADDING_AN_OP.md.
#include <torch/library.h>

TORCH_LIBRARY(vlmkern, m) {
  // ---- SPEC §3: diagonal Kalman step (in place over tensor lists) ----------
  // Returns the innovation variance S = sum h^2 (p + q) + R as a 0-d float32
  // tensor on the parameters' device, or NaN when the step was skipped (found_inf
  // set, or a non-finite / invalid gradient, variance, innovation, obs_noise or
  // grad_scale: nothing is written).  No host synchronisation.  gate_chi2:
  // Mahalanobis gate, the innovation used is clamped to |e| <= sqrt(chi2 S).
  // grad_scale: the grads are scaled by it (GradScaler); found_inf != 0 skips.
  m.def(
      "kalman_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] variances, "
      "Tensor innovation, Tensor obs_noise, float process_noise, float forgetting, "
      "float var_floor, float? gate_chi2=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> Tensor");

  // ---- SPEC §4: layerwise-normalised weight perturbation -------------------
  // direction 0 = adversarial (d = grads), 1 = random (counter-based
  // Gaussian from seed; grads may be empty).  Saves params into backup, adds
  // v = sign * gamma * ||w|| * d / (||d|| + eps).  Returns the per-tensor norms
  // [n, 2] float32: (||w||, ||d||).  Skip rule: if any of those norms is not
  // finite, or found_inf (one-element float32 on the device) is non-zero, the
  // whole perturbation is skipped on the device: backup <- params, params
  // untouched (the restore stays exact).  (The argument is not called `mode`: under
  // torch.compile a mutable op's arguments travel as keyword arguments of the
  // auto_functionalized HOP, whose mode-redirect impl takes `mode` itself.)
  m.def(
      "awp_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, float gamma, "
      "float eps, float sign, int direction, int seed, Tensor? found_inf=None) -> Tensor");
  // Bitwise-exact restore: params <- backup.
  m.def("awp_restore_(Tensor(a!)[] params, Tensor[] backup) -> ()");

  // ---- SPEC §1: hinged / plain global contrastive loss ---------------------
  // Row and column sweeps: log Phi1 (image-anchored) and log Phi2
  // (text-anchored) for the local anchors, never materialising b x B.
  // all_img / all_txt = None means one process (the columns are img / txt,
  // offset must be 0); both or neither must be given.
  m.def(
      "hgcl_stats(Tensor img, Tensor txt, Tensor? all_img, Tensor? all_txt, int offset, "
      "float tau, float margin, bool hinge) -> (Tensor, Tensor)");
  // In-place log-domain state update for the anchors `index`; returns
  // log(eps + u_new) for the batch (the denominators of the estimator).
  m.def(
      "hgcl_state_update_(Tensor(a!) log_u, Tensor index, Tensor log_phi, float gamma, "
      "float eps) -> Tensor");
  // The compositional gradient estimator: gradients w.r.t. the local features
  // (positive-pair and row terms) and the global column sets.  With
  // all_img / all_txt = None (one process) the column terms are folded into
  // grad_img / grad_txt and grad_all_img / grad_all_txt are empty [0, d].
  m.def(
      "hgcl_grad(Tensor img, Tensor txt, Tensor? all_img, Tensor? all_txt, Tensor logden_img, "
      "Tensor logden_txt, Tensor grad_out, int offset, float tau, float margin, bool hinge) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
