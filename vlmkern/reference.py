"""Readable float64 reference implementations of every op in SPEC.md.

These are the oracle for the tests of every kernel and the baseline of the
benchmarks.  They favour clarity over speed: the contrastive loss materialises
the full ``b x B`` similarity matrices, the multi-tensor ops loop over tensors.
Every function here is *functional*: it returns new tensors and never mutates
its inputs, so a test can run the reference and the kernel on the same inputs.

Sections follow SPEC.md:

* §1  :func:`hgcl` - hinged / plain global contrastive loss, the per-sample
  ``log u`` state update and the compositional gradient estimator.
* §3  :func:`kalman_step` - one diagonal Kalman step over a list of tensors,
  plus :func:`kalman_noise_update` for the observation-noise EMA and the gate.
* §4  :func:`awp_perturb` / :func:`awp_restore` - layerwise-normalised weight
  perturbation, adversarial and random modes, and the exact restore;
  :func:`awp_random_direction` is the counter-based Gaussian generator shared by
  every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

# ----------------------------------------------------------------------------
# §1  Hinged global contrastive loss (HGCL) and GCL
# ----------------------------------------------------------------------------


@dataclass
class HGCLResult:
    """Everything the HGCL/GCL op produces, in float64.

    ``log_u_img`` / ``log_u_txt`` are the *whole* updated state buffers.
    ``grad_img`` / ``grad_txt`` are gradients of the estimator w.r.t. the local
    features; when ``all_img``/``all_txt`` are given, ``grad_all_img`` /
    ``grad_all_txt`` are the gradients w.r.t. the global column sets (which the
    caller routes back to the owning ranks); otherwise they are ``None`` and the
    column contributions are already folded into ``grad_img`` / ``grad_txt``.
    """

    loss: torch.Tensor
    log_u_img: torch.Tensor
    log_u_txt: torch.Tensor
    log_phi_img: torch.Tensor
    log_phi_txt: torch.Tensor
    grad_img: torch.Tensor
    grad_txt: torch.Tensor
    grad_all_img: Optional[torch.Tensor]
    grad_all_txt: Optional[torch.Tensor]
    # SPEC §1 "Learnable temperature": d/dtau of tau/b sum_i [log(eps+u1_i) + log(eps+u2_i)]
    # (the estimator: u held at the updated values; without rho, which adds rho)
    grad_tau: Optional[torch.Tensor] = None
    # softmax-weighted mean of l over each anchor's negatives (the stats' lmean outputs)
    lbar_img: Optional[torch.Tensor] = None
    lbar_txt: Optional[torch.Tensor] = None


def hinge(x: torch.Tensor, margin: Optional[float]) -> torch.Tensor:
    """The pairwise surrogate l(x): ``x`` for GCL, ``max(x + m, 0)^2`` for HGCL."""
    if margin is None:
        return x
    return torch.clamp(x + margin, min=0.0) ** 2


def hinge_grad(x: torch.Tensor, margin: Optional[float]) -> torch.Tensor:
    """l'(x): ``1`` for GCL, ``2 max(x + m, 0)`` for HGCL."""
    if margin is None:
        return torch.ones_like(x)
    return 2.0 * torch.clamp(x + margin, min=0.0)


def duplicate_log_mean(index: torch.Tensor, log_phi: torch.Tensor) -> torch.Tensor:
    """Per anchor, ``log`` of the mean ``Phi`` of the anchors sharing its index
    (``logsumexp(log Phi) - log k`` over the ``k`` of them), in float64."""
    out = log_phi.double().clone()
    for k in torch.unique(index).tolist():
        same = index == k
        out[same] = torch.logsumexp(log_phi.double()[same], 0) - math.log(int(same.sum()))
    return out


def update_log_state(old: torch.Tensor, log_phi: torch.Tensor, gamma: float) -> torch.Tensor:
    """``u <- (1-gamma) u + gamma Phi`` in the log domain; ``-inf`` = never visited.

    A never-visited entry takes ``log Phi`` directly (SogCLR's first-visit rule).
    """
    if gamma >= 1.0:
        blended = log_phi.clone()
    else:
        blended = torch.logaddexp(old + math.log1p(-gamma), log_phi + math.log(gamma))
    return torch.where(torch.isneginf(old), log_phi, blended)


def hgcl(
    img: torch.Tensor,
    txt: torch.Tensor,
    index: torch.Tensor,
    log_u_img: torch.Tensor,
    log_u_txt: torch.Tensor,
    *,
    tau: float,
    gamma: float,
    margin: Optional[float] = 0.1,
    eps: float = 1e-14,
    all_img: Optional[torch.Tensor] = None,
    all_txt: Optional[torch.Tensor] = None,
    offset: int = 0,
    update_state: bool = True,
    txt_index: Optional[torch.Tensor] = None,
) -> HGCLResult:
    """SPEC §1, materialised in float64.

    Per local anchor ``i`` (global column ``offset + i``), over the ``B - 1``
    negatives ``j != offset + i``::

        Phi1_i = mean_j exp(l(F_i.Gg_j - p_i) / tau)      image-anchored
        Phi2_i = mean_j exp(l(Fg_j.G_i - p_i) / tau)      text-anchored

    then the state update, the returned scalar
    ``tau/b * sum_i [log(eps+u1_i) + log(eps+u2_i)]`` and the gradient of the
    compositional estimator ``tau/b sum_i [grad Phi1_i/(eps+u1_i) + grad Phi2_i/(eps+u2_i)]``
    with the *updated* u.  With ``B == 1`` there are no negatives: ``Phi = 0``
    (``log Phi = -inf``) and the gradient is zero.

    Anchors sharing an index update their entry once, with the mean of their
    ``Phi``, and all read that updated ``u`` (:func:`duplicate_log_mean`).
    ``update_state=False``: the returned state is the input state, and each
    anchor reads its entry's ``u`` as it is (a never-visited entry: its mean ``Phi``).
    ``txt_index`` (default ``index``): the text anchors' entries of ``log_u_txt``.
    """
    F = img.detach().double()
    G = txt.detach().double()
    global_given = all_img is not None
    Fg = all_img.detach().double() if global_given else F
    Gg = all_txt.detach().double() if global_given else G
    b, B = F.shape[0], Fg.shape[0]
    cols = torch.arange(B)
    rows = torch.arange(b)
    neg = cols[None, :] != (rows[:, None] + offset)  # [b, B] mask of negatives

    p = (F * G).sum(1)  # positives
    S1 = F @ Gg.T  # image i vs text j
    S2 = G @ Fg.T  # text i vs image j
    X1 = S1 - p[:, None]
    X2 = S2 - p[:, None]
    Z1 = hinge(X1, margin) / tau
    Z2 = hinge(X2, margin) / tau
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    if B > 1:
        log_phi1 = torch.logsumexp(torch.where(neg, Z1, neg_inf), dim=1) - math.log(B - 1)
        log_phi2 = torch.logsumexp(torch.where(neg, Z2, neg_inf), dim=1) - math.log(B - 1)
    else:
        log_phi1 = torch.full((b,), -math.inf, dtype=torch.float64)
        log_phi2 = torch.full((b,), -math.inf, dtype=torch.float64)

    idx = index.long()
    tidx = idx if txt_index is None else txt_index.long()
    new_u1 = log_u_img.detach().double().clone()
    new_u2 = log_u_txt.detach().double().clone()
    mean_phi1 = duplicate_log_mean(idx, log_phi1)
    mean_phi2 = duplicate_log_mean(tidx, log_phi2)
    if update_state:
        lu1 = update_log_state(new_u1[idx], mean_phi1, gamma)
        lu2 = update_log_state(new_u2[tidx], mean_phi2, gamma)
        new_u1[idx] = lu1  # duplicates write the same value
        new_u2[tidx] = lu2
    else:
        lu1 = torch.where(torch.isneginf(new_u1[idx]), mean_phi1, new_u1[idx])
        lu2 = torch.where(torch.isneginf(new_u2[tidx]), mean_phi2, new_u2[tidx])

    log_eps = math.log(eps)
    logden1 = torch.logaddexp(lu1, torch.full_like(lu1, log_eps))  # log(eps + u1)
    logden2 = torch.logaddexp(lu2, torch.full_like(lu2, log_eps))
    loss = tau / b * (logden1 + logden2).sum()

    if B > 1:
        W1 = torch.where(neg, torch.exp(Z1 - logden1[:, None]), 0.0) / (B - 1)
        W2 = torch.where(neg, torch.exp(Z2 - logden2[:, None]), 0.0) / (B - 1)
    else:
        W1 = torch.zeros(b, B, dtype=torch.float64)
        W2 = torch.zeros(b, B, dtype=torch.float64)
    # dL/ds = (tau/b) * w * l'(x) / tau
    dS1 = W1 * hinge_grad(X1, margin) / b
    dS2 = W2 * hinge_grad(X2, margin) / b
    dp = -(dS1.sum(1) + dS2.sum(1))

    grad_img = dS1 @ Gg + dp[:, None] * G
    grad_txt = dS2 @ Fg + dp[:, None] * F
    # tau: 1/b sum_i (logden1_i + logden2_i) - 1/(b tau) sum_ij (w1_ij l(x_ij) + w2_ij l(x'_ij))
    L1 = torch.where(neg, hinge(X1, margin), 0.0)
    L2 = torch.where(neg, hinge(X2, margin), 0.0)
    grad_tau = (logden1 + logden2).sum() / b - ((W1 * L1).sum() + (W2 * L2).sum()) / (b * tau)
    if B > 1:
        lbar1 = (torch.softmax(torch.where(neg, Z1, neg_inf), dim=1) * L1).sum(1)
        lbar2 = (torch.softmax(torch.where(neg, Z2, neg_inf), dim=1) * L2).sum(1)
    else:
        lbar1 = lbar2 = torch.zeros(b, dtype=torch.float64)
    grad_all_txt = dS1.T @ F  # d/dGg
    grad_all_img = dS2.T @ G  # d/dFg
    if not global_given:
        grad_img = grad_img + grad_all_img
        grad_txt = grad_txt + grad_all_txt
        grad_all_img = grad_all_txt = None
    return HGCLResult(
        loss=loss,
        log_u_img=new_u1,
        log_u_txt=new_u2,
        log_phi_img=log_phi1,
        log_phi_txt=log_phi2,
        grad_img=grad_img,
        grad_txt=grad_txt,
        grad_all_img=grad_all_img,
        grad_all_txt=grad_all_txt,
        grad_tau=grad_tau,
        lbar_img=lbar1,
        lbar_txt=lbar2,
    )


def hgcl_tau_objective(
    img: torch.Tensor,
    txt: torch.Tensor,
    log_u_old_img: torch.Tensor,
    log_u_old_txt: torch.Tensor,
    tau: torch.Tensor,
    *,
    gamma: float,
    margin: Optional[float] = 0.1,
    eps: float = 1e-14,
    rho: float = 0.0,
    all_img: Optional[torch.Tensor] = None,
    all_txt: Optional[torch.Tensor] = None,
    offset: int = 0,
) -> torch.Tensor:
    """``F(tau) = tau/b sum_i [log(eps+u1_i) + log(eps+u2_i)] + rho tau`` as a float64
    function of the 0-d tensor ``tau``, built so that its *autograd* derivative in
    ``tau`` is the compositional estimator of SPEC §1 "Learnable temperature".

    ``log_u_old_*`` are the local anchors' state entries before the update
    (``-inf``: never visited); ``u_new = (1-gamma) u_old + gamma Phi(tau)`` (``Phi`` on a
    first visit).  Each anchor's term is ``log c + (Phi(tau) - Phi(tau).detach()) / c``
    with ``c = eps + u_new`` held constant: its value is ``log(eps + u_new)`` and its
    derivative ``Phi'(tau) / (eps + u_new)``, so autograd gives
    ``1/b sum_i log(eps+u_i) + tau/b sum_i Phi_i'(tau)/(eps+u_i) + rho``, the estimator
    (``Phi'`` itself, not the moving average's ``gamma Phi'``: u only tracks ``Phi``).
    With ``gamma = 1`` this equals autograd of ``tau/b sum log(eps + Phi(tau))`` exactly
    (the tests check both forms).
    """
    F = img.detach().double()
    G = txt.detach().double()
    Fg = F if all_img is None else all_img.detach().double()
    Gg = G if all_txt is None else all_txt.detach().double()
    b, B = F.shape[0], Fg.shape[0]
    neg = torch.arange(B)[None, :] != (torch.arange(b)[:, None] + offset)
    p = (F * G).sum(1)
    total = torch.zeros((), dtype=torch.float64)
    for A, C, old in ((F, Gg, log_u_old_img), (G, Fg, log_u_old_txt)):
        Z = hinge(A @ C.T - p[:, None], margin) / tau
        log_phi = torch.logsumexp(torch.where(neg, Z, -math.inf), dim=1) - math.log(B - 1)
        lu = update_log_state(old.detach().double(), log_phi.detach(), gamma)
        logden = torch.logaddexp(lu, torch.full_like(lu, math.log(eps)))  # log c, constant
        phi = torch.exp(log_phi)
        total = total + (logden + (phi - phi.detach()) * torch.exp(-logden)).sum()
    return tau * total / b + rho * tau


def hgcl_surrogate(
    img: torch.Tensor,
    txt: torch.Tensor,
    logden_img: torch.Tensor,
    logden_txt: torch.Tensor,
    *,
    tau: float,
    margin: Optional[float] = 0.1,
) -> torch.Tensor:
    """A differentiable scalar whose autograd gradient is the SPEC §1 estimator.

    ``tau/b * sum_i [Phi1_i / (eps+u1_i) + Phi2_i / (eps+u2_i)]`` with the
    denominators (``logden = log(eps + u_new)``) held constant.  Single process,
    so ``Fg = F`` and ``Gg = G``.  Used by the tests to check :func:`hgcl`'s
    closed-form gradient against autograd.
    """
    b = img.shape[0]
    p = (img * txt).sum(1)
    neg = ~torch.eye(b, dtype=torch.bool, device=img.device)
    Z1 = hinge(img @ txt.T - p[:, None], margin) / tau
    Z2 = hinge(txt @ img.T - p[:, None], margin) / tau
    phi1 = (torch.exp(Z1 - logden_img[:, None]) * neg).sum(1) / (b - 1)
    phi2 = (torch.exp(Z2 - logden_txt[:, None]) * neg).sum(1) / (b - 1)
    return tau / b * (phi1 + phi2).sum()


def fastclip_gamma(epoch: int, gamma: float, decay_epochs: int) -> float:
    """FastCLIP's gamma schedule (SPEC §1): 1 at epoch 0, cosine to ``gamma`` by ``decay_epochs``."""
    if epoch <= 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma
    return 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs)) * (1 - gamma) + gamma


# ----------------------------------------------------------------------------
# §3  Diagonal Kalman step
# ----------------------------------------------------------------------------


@dataclass
class KalmanResult:
    params: List[torch.Tensor]  # float64
    variances: List[torch.Tensor]  # float64
    S: torch.Tensor  # 0-d float64 innovation variance


def kalman_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    innovation: float | torch.Tensor,
    obs_noise: float | torch.Tensor,
    *,
    process_noise: float,
    forgetting: float = 1.0,
    var_floor: float = 1e-12,
    gate_chi2: Optional[float] = None,
) -> KalmanResult:
    """SPEC §3: one scalar-observation EKF step with diagonal covariance.

    ::

        p_hat = p + q
        S     = sum_i h_i^2 p_hat_i + R              (over *all* tensors)
        e     = clamp(e, -sqrt(chi2 S), sqrt(chi2 S))  (Mahalanobis gate, if gate_chi2)
        theta += (e / S) p_hat h
        p      = max((p_hat - (p_hat h)^2 / S) / lambda, floor)
    """
    e = torch.as_tensor(innovation, dtype=torch.float64)
    R = torch.as_tensor(obs_noise, dtype=torch.float64)
    p_hats = [v.detach().double() + process_noise for v in variances]
    hs = [g.detach().double() for g in grads]
    s = torch.zeros((), dtype=torch.float64)
    for h, ph in zip(hs, p_hats):
        s = s + (h * h * ph).sum()
    S = s + R
    if gate_chi2 is not None:
        bound = torch.sqrt(gate_chi2 * S)
        e = torch.clamp(e, -bound, bound)
    new_params, new_vars = [], []
    for theta, h, ph in zip(params, hs, p_hats):
        new_params.append(theta.detach().double() + (e / S) * ph * h)
        pnew = (ph - (ph * h) ** 2 / S) / forgetting
        new_vars.append(torch.clamp(pnew, min=var_floor))
    return KalmanResult(new_params, new_vars, S)


def kalman_step_vector(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    innovation: torch.Tensor,
    obs_noise: float | torch.Tensor,
    *,
    process_noise: float,
    forgetting: float = 1.0,
    var_floor: float = 1e-12,
    gate_chi2: Optional[float] = None,
) -> KalmanResult:
    """SPEC §3: one vector-observation EKF step with diagonal covariance, float64,
    with the whole Jacobian ``H`` [M, n] materialised (``grads[t]`` is
    ``[M, *params[t].shape]``; ``innovation`` is ``[M]``; ``obs_noise`` a number or
    ``[M]``)::

        p_hat = p + q
        S     = H diag(p_hat) H^T + diag(R)                      [M, M]
        e     = e * sqrt(chi2 / (e^T S^-1 e))   if e^T S^-1 e > chi2   (gate)
        theta += p_hat * H^T S^-1 e
        p      = max((p_hat - p_hat^2 * diag(H^T S^-1 H)) / lambda, floor)

    Returns ``S`` ([M, M]) in ``KalmanResult.S``.
    """
    e = torch.as_tensor(innovation, dtype=torch.float64).reshape(-1)
    M = e.shape[0]
    R = torch.as_tensor(obs_noise, dtype=torch.float64).expand(M)
    H = torch.cat([g.detach().double().reshape(M, -1) for g in grads], 1) if grads else torch.zeros(M, 0,
                                                                                                  dtype=torch.float64)
    ph = torch.cat([v.detach().double().reshape(-1) for v in variances]) + process_noise if variances else \
        torch.zeros(0, dtype=torch.float64)
    S = (H * ph) @ H.T + torch.diag(R)
    Sinv = torch.linalg.inv(S)
    if gate_chi2 is not None:
        d2 = e @ Sinv @ e
        if d2 > gate_chi2:
            e = e * math.sqrt(gate_chi2 / float(d2))
    dtheta = ph * (H.T @ (Sinv @ e))
    pnew = torch.clamp((ph - ph * ph * ((Sinv @ H) * H).sum(0)) / forgetting, min=var_floor)
    new_params, new_vars, o = [], [], 0
    for theta in params:
        n = theta.numel()
        new_params.append(theta.detach().double() + dtheta[o:o + n].reshape(theta.shape))
        new_vars.append(pnew[o:o + n].reshape(theta.shape))
        o += n
    return KalmanResult(new_params, new_vars, S)


def kalman_noise_update(
    obs_noise: float, innovation: float, S: float, *, beta: float, floor: float,
    gate_chi2: Optional[float] = None,
) -> tuple[float, bool]:
    """SPEC §3 noise EMA and Mahalanobis gate, on Python floats (reference only).

    Returns ``(R_next, gated)``.  The gate fires when ``e^2 / S > gate_chi2``;
    the EMA then takes the clamped ``chi2 * S`` instead of ``e^2`` (the same
    clamp :func:`kalman_step` applies to the innovation), so one outlier cannot
    blow up ``R``::

        R_next = max(beta R + (1 - beta) min(e^2, chi2 S), floor)
    """
    gated = gate_chi2 is not None and innovation * innovation / S > gate_chi2
    sq = innovation * innovation
    if gated:
        sq = min(sq, gate_chi2 * S)
    R_next = max(beta * obs_noise + (1 - beta) * sq, floor)
    return R_next, gated


# ----------------------------------------------------------------------------
# §4  Layerwise-normalised weight perturbation
# ----------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for uint32 values held in int64, without int64 overflow.

    ``x * 0x846CA68B`` can reach 2^64, past int64: it only gave the right low bits
    because torch's int64 multiply happens to wrap (signed overflow is undefined in
    the C++ underneath).  Splitting ``c`` into 16-bit halves keeps every product
    below 2^49.
    """
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def awp_tensor_key(seed: int, tensor_index: int) -> int:
    """Per-tensor 32-bit key of the counter-based generator (same in every backend)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    s32 = (s ^ (s >> 32)) & _M32
    t = torch.tensor([(tensor_index * 0x9E3779B9 + 1) & _M32], dtype=torch.int64)
    return int(_mix32(torch.tensor([s32], dtype=torch.int64) ^ _mix32(t))[0])


def awp_random_direction(seed: int, tensor_index: int, numel: int) -> torch.Tensor:
    """The standard-normal direction ``r`` of random mode, float64, flat.

    Element ``k`` of tensor ``t``: ``a = mix(2k ^ key_t)``, ``c = mix((2k+1) ^ key_t)``,
    ``u1 = ((a >> 8) + 1) / 2^24`` in (0, 1], ``u2 = (c >> 8) / 2^24`` in [0, 1),
    ``r = sqrt(-2 ln u1) cos(2 pi u2)`` (Box-Muller).  Nothing is stored: every
    backend regenerates the same numbers from ``(seed, t, k)``.
    """
    key = awp_tensor_key(seed, tensor_index)
    k = torch.arange(numel, dtype=torch.int64)
    a = _mix32(((2 * k) & _M32) ^ key)
    c = _mix32(((2 * k + 1) & _M32) ^ key)
    u1 = ((a >> 8) + 1).double() * 2.0**-24
    u2 = (c >> 8).double() * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def awp_perturbation(
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]],
    *,
    gamma: float,
    eps: float = 1e-12,
    sign: float = 1.0,
    mode: str = "adversarial",
    seed: Optional[int] = None,
) -> List[torch.Tensor]:
    """The float64 perturbations ``v_l`` of SPEC §4 (one per tensor)."""
    out = []
    for t, w in enumerate(params):
        w64 = w.detach().double()
        if mode == "adversarial":
            d = grads[t].detach().double()
        elif mode == "random":
            d = awp_random_direction(seed, t, w.numel()).reshape(w.shape)
        else:
            raise ValueError(f"mode must be 'adversarial' or 'random', got {mode!r}")
        scale = sign * gamma * torch.linalg.vector_norm(w64) / (torch.linalg.vector_norm(d) + eps)
        out.append(scale * d)
    return out


def awp_perturb(
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]],
    *,
    gamma: float,
    eps: float = 1e-12,
    sign: float = 1.0,
    mode: str = "adversarial",
    seed: Optional[int] = None,
) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Returns ``(perturbed_params, backup)``: ``w + v`` rounded to each tensor's
    dtype (computed in float64 first), and a bit-exact copy of the original weights."""
    vs = awp_perturbation(params, grads, gamma=gamma, eps=eps, sign=sign, mode=mode, seed=seed)
    perturbed = [(w.detach().double() + v).to(w.dtype) for w, v in zip(params, vs)]
    backup = [w.detach().clone() for w in params]
    return perturbed, backup


def awp_restore(backup: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The exact restore: the saved weights, bit for bit."""
    return [b.clone() for b in backup]
