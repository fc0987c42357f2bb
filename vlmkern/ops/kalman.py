"""Fused diagonal Kalman step (SPEC §3), in place over lists of tensors.

The op's whole contract is in this file: the schema of the compiled op, its
fake kernel, the argument checks, the PyTorch implementation and the backend
table.  Kernels: ``csrc/kalman/kalman_cpu.cpp`` (CPU) and
``csrc/kalman/kalman_cuda.cu`` (CUDA, multi-tensor apply: 2 launches per step
for up to 768 tensors of any mix of fp32/bf16/fp16), the per-element math in
``csrc/kalman/kalman_math.h``; the oracle is :func:`vlmkern.reference.kalman_step`.
M observations (SPEC §3b): ``vlmkern::kalman_vector_step_``, CPU kernel
``csrc/kalman/kalman_vector_cpu.cpp``, CUDA kernel ``csrc/kalman/kalman_vector_cuda.cu``
(4 launches per step, M <= 256); oracle :func:`vlmkern.reference.kalman_step_vector`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import backends
from ._common import FLOAT_DTYPES, as_list, check_same_shapes, device_of, scalar_tensor

OP = "kalman"
_INFO = backends.register_op(OP)
_DEFAULT_VAR_FLOOR = 1e-12

# Returns the innovation variance S = sum h^2 (p + q) + R (0-d float32 on the
# parameters' device), NaN when the step was skipped.  No host synchronisation.
torch.library.define(
    "vlmkern::kalman_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] variances, Tensor innovation, Tensor obs_noise, "
    "float process_noise, float forgetting, float var_floor, float? gate_chi2=None, Tensor? grad_scale=None, "
    "Tensor? found_inf=None) -> Tensor",
)


@torch.library.register_fake("vlmkern::kalman_step_")
def _kalman_step_fake(params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor,
                      gate_chi2=None, grad_scale=None, found_inf=None):
    return innovation.new_empty((), dtype=torch.float32)


# M observations (SPEC §3): grads[t] is [M, *params[t].shape], innovation and
# obs_noise are [M].  Returns (S [M, M] float32, d2 = e^T S^-1 e of the ungated
# innovation, 0-d float32), both NaN when the step was skipped.  No host sync.
torch.library.define(
    "vlmkern::kalman_vector_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] variances, Tensor innovation, Tensor obs_noise, "
    "float process_noise, float forgetting, float var_floor, float? gate_chi2=None, Tensor? grad_scale=None, "
    "Tensor? found_inf=None) -> (Tensor, Tensor)",
)


@torch.library.register_fake("vlmkern::kalman_vector_step_")
def _kalman_vector_step_fake(params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor,
                             gate_chi2=None, grad_scale=None, found_inf=None):
    M = innovation.shape[0]
    return innovation.new_empty((M, M), dtype=torch.float32), innovation.new_empty((), dtype=torch.float32)


def gate_innovation(e: torch.Tensor, S: torch.Tensor, gate_chi2: Optional[float]) -> torch.Tensor:
    """The Mahalanobis gate of SPEC §3 in its "clamp" form (device tensors, no sync).

    Returns ``e`` clamped to ``[-sqrt(chi2 S), sqrt(chi2 S)]``, i.e. the
    normalised innovation ``e^2 / S`` is capped at ``chi2``; ``gate_chi2=None``
    returns ``e`` unchanged.  Same rule as ``gate_innovation`` in
    ``csrc/kalman/kalman_math.h``.
    """
    if gate_chi2 is None:
        return e
    bound = torch.sqrt(S * float(gate_chi2))
    return torch.where(e > bound, bound, torch.where(e < -bound, -bound, e))


_FLT_MAX = 3.4028234663852886e38


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() <= _FLT_MAX  # False for inf and NaN (kalman_math.h finite_f)


@torch.no_grad()
def _kalman_step_torch(
    params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor, gate_chi2=None,
    grad_scale=None, found_inf=None,
):
    """Plain-PyTorch implementation (fp32 math, same two passes and the same
    skip rule as kalman_math.h ``step_scalars``, decided with ``torch.where``:
    no host sync)."""
    q = float(process_noise)
    s = innovation.new_zeros((), dtype=torch.float32)
    for g, v in zip(grads, variances):
        if g.numel():
            h = g.float()
            s = s + torch.where(v >= 0, h * h * (v + q), torch.full_like(v, math.nan)).sum()
    R = obs_noise.float()
    e = innovation.float()
    gs = torch.ones((), device=R.device) if grad_scale is None else grad_scale.reshape(()).float()
    fi = torch.zeros((), device=R.device) if found_inf is None else found_inf.reshape(()).float()
    inv = 1.0 / gs
    S = (s.double() * inv.double() * inv.double()).float() + R
    ok = (fi == 0) & _finite(gs) & (gs > 0) & _finite(inv) & _finite(e) & _finite(R) & (R > 0) & _finite(S) & (S > 0)
    gain = gate_innovation(e, S, gate_chi2) / S * inv
    inv_s = 1.0 / S * inv * inv
    for w, g, v in zip(params, grads, variances):
        if w.numel() == 0:
            continue
        h = g.float()
        ph = v + q
        k = ph * h
        w.copy_(torch.where(ok, (w.float() + gain * k).to(w.dtype), w))
        pn = (ph - k * k * inv_s) * (1.0 / forgetting)
        v.copy_(torch.where(ok, torch.where(pn >= var_floor, pn, torch.full_like(pn, var_floor)), v))
    return torch.where(ok, S, torch.full_like(S, math.nan))


@torch.no_grad()
def _kalman_vector_torch(
    params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor, gate_chi2=None,
    grad_scale=None, found_inf=None,
):
    """M observations (SPEC §3): ``grads[t]`` is ``[M, *params[t].shape]``, ``innovation``
    and ``obs_noise`` are ``[M]``.  The M x M system is solved by a Cholesky
    factorisation on the device (``cholesky_ex``: no host sync); the skip rule
    is the scalar one, plus a factorisation failure (``S`` not positive definite)."""
    e = innovation.float()
    M = e.shape[0]
    dev = e.device
    R = obs_noise.float()
    q = float(process_noise)
    gs = torch.ones((), device=dev) if grad_scale is None else grad_scale.reshape(()).float()
    fi = torch.zeros((), device=dev) if found_inf is None else found_inf.reshape(()).float()
    inv = 1.0 / gs
    live = [(w, g.reshape(M, -1), v) for w, g, v in zip(params, grads, variances) if w.numel()]
    gram = torch.zeros((M, M), dtype=torch.float64, device=dev)
    for _, g, v in live:  # pass 1: H diag(p_hat) H^T over all tensors
        h = g.float()
        ph = torch.where(v >= 0, v + q, torch.full_like(v, math.nan)).reshape(-1)
        gram += ((h * ph) @ h.T).double()
    S = (gram * inv.double() * inv.double()).float() + torch.diag(R)
    L, info = torch.linalg.cholesky_ex(S)
    ok = ((fi == 0) & _finite(gs) & (gs > 0) & _finite(inv) & _finite(e).all() & _finite(R).all() & (R > 0).all()
          & _finite(S).all() & (info == 0))
    L = torch.where(ok, L, torch.eye(M, device=dev))  # a skipped step must not leak NaN into the where() below
    c = torch.cholesky_solve(e[:, None], L)[:, 0]
    d2 = (e * c).sum()  # Mahalanobis distance^2 of the ungated innovation, returned
    if gate_chi2 is not None:  # Mahalanobis gate: e^T S^-1 e capped at chi2 by scaling e
        c = c * torch.where(d2 > gate_chi2, torch.sqrt(gate_chi2 / d2), torch.ones_like(d2))
    for w, g, v in live:  # pass 2
        h = g.float() * inv
        ph = (v + q).reshape(-1)
        dtheta = (ph * (c @ h)).reshape(w.shape)
        w.copy_(torch.where(ok, (w.float() + dtheta).to(w.dtype), w))
        hsh = (torch.cholesky_solve(h, L) * h).sum(0)  # h_i^T S^-1 h_i for every element i
        pn = ((ph - ph * ph * hsh) * (1.0 / forgetting)).reshape(v.shape)
        v.copy_(torch.where(ok, torch.clamp(pn, min=var_floor), v))
    nan = torch.full((), math.nan, device=dev)
    return torch.where(ok, S, nan), torch.where(ok, d2, nan)


_step = _INFO.step("step", cpu="kalman_step_", cuda="kalman_step_", torch=_kalman_step_torch)
# M observations: the compiled kernels (csrc/kalman/kalman_vector_cpu.cpp, kalman_vector_cuda.cu), both
# returning (S, d2); the torch backend is the third implementation.
_vector_step = _INFO.step("vector_step", cpu="kalman_vector_step_", cuda="kalman_vector_step_",
                          torch=_kalman_vector_torch)
_CUDA_MAX_M = 256  # vcuda::kMaxM (csrc/kalman/kalman_vector_cuda.h); larger M runs the PyTorch step


def kalman_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    innovation: torch.Tensor | float,
    obs_noise: torch.Tensor | float,
    *,
    process_noise: float,
    forgetting: float = 1.0,
    var_floor: float = _DEFAULT_VAR_FLOOR,
    gate_chi2: Optional[float] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    return_mahalanobis: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One diagonal Kalman step over lists of tensors, in place (SPEC §3).

    ::

        p_hat = p + q                                  (q = process_noise)
        S     = sum_i h_i^2 p_hat_i + R                (one reduction over all tensors)
        e     = clamp(e, -sqrt(chi2 S), sqrt(chi2 S))  (only with gate_chi2)
        theta += (e / S) p_hat h                       (e = innovation)
        p      = max((p_hat - (p_hat h)^2 / S) / lambda, var_floor)

    **Bad input** (SPEC §3): shapes, dtypes, devices and Python-number
    scalars are checked on the host (``ValueError``/``TypeError`` naming the
    argument; ``innovation``/``obs_noise`` given as numbers must be finite, and
    ``obs_noise > 0``).  Values inside tensors are checked on the device,
    without a host synchronisation, by one rule on every backend: **the step is
    skipped** -- params and variances left bit for bit as they were, and the
    returned ``S`` is NaN -- when ``found_inf != 0``, or ``grad_scale`` is not
    finite and > 0, or the innovation is not finite, or ``obs_noise`` is not
    finite and > 0, or ``S`` is not finite and > 0 (a NaN/inf gradient, a
    NaN/inf/negative variance, or a sum of squares that overflows fp32).
    ``torch.isfinite(S)`` tells the caller whether the step was taken.

    Args:
        params: parameters ``theta`` (float32 / bfloat16 / float16), updated in place.
        grads: Jacobians ``h`` of the observation, same shapes and dtypes as ``params``.
        variances: diagonal covariance ``p`` (float32), updated in place.
        innovation: ``e`` (e.g. ``0 - loss``), a 0-d float32 tensor on the
            parameters' device (a Python number is converted); or ``[M]``: M
            observations (e.g. ``0 - per-sample losses``), the vector-observation
            filter of SPEC §3 (``grads[t]`` then ``[M, *params[t].shape]``, the
            rows of the Jacobian).  The compiled CPU kernel forms the Gram
            ``H diag(p_hat) H^T`` in one pass over all tensors (bf16/fp16 rows
            converted on the fly, no copy of ``H``), factorises the M x M ``S``
            (Cholesky) and updates every element in a second pass; the gate
            scales ``e`` so that ``e^T S^-1 e`` is at most ``gate_chi2``.  A
            failed factorisation also skips the step.  On CUDA the fused kernel
            of ``csrc/kalman/kalman_vector_cuda.cu`` (4 launches, no host sync)
            for M <= 256, the PyTorch one above.
        obs_noise: ``R > 0``, 0-d float32 tensor on the device (``[M]`` or one
            value for all with M observations).
        process_noise: ``q >= 0`` added to ``p`` before the update.
        forgetting: ``lambda`` in (0, 1]; 1 means no forgetting.
        var_floor: lower clamp of ``p`` (keeps it positive).
        gate_chi2: Mahalanobis gate threshold ``> 0``, or ``None`` (no gate):
            when ``e^2 / S > gate_chi2`` the innovation used for the update is
            clamped to ``sign(e) sqrt(gate_chi2 S)`` (the variance update does
            not depend on ``e`` and is unchanged).  Decided on the device.
        grad_scale: optional one-element float32 device tensor: the ``grads``
            are scaled by it (``torch.amp.GradScaler``); the step uses
            ``grads / grad_scale`` without writing unscaled copies (exact for a
            power-of-two scale).  ``None`` = 1.
        found_inf: optional one-element float32 device tensor (GradScaler's
            flag): non-zero skips the step.
        backend: force ``"cuda"``, ``"cpu"`` or ``"torch"`` (default: by device).
        return_mahalanobis: also return ``d2 = e^T S^-1 e``, the squared
            Mahalanobis distance of the **ungated** innovation (0-d float32 on
            the device; ``e^2 / S`` in the scalar form), e.g. for a gate flag
            (``d2 > gate_chi2``) or an innovation-based noise estimate without
            factorising ``S`` again.  NaN when the step was skipped.

    Returns:
        the innovation variance ``S`` as a 0-d float32 tensor on the device
        (``[M, M]`` with M observations; NaN when the step was skipped), or
        ``(S, d2)`` with ``return_mahalanobis=True``.  The step never
        synchronises with the host on CUDA.
    """
    op = "kalman_step_"
    params = as_list(params, "params", op)
    grads = as_list(grads, "grads", op)
    variances = as_list(variances, "variances", op)
    vector = isinstance(innovation, torch.Tensor) and innovation.dim() == 1
    M = innovation.shape[0] if vector else None
    if vector:
        if M == 0:
            raise ValueError(f"vlmkern.{op}: innovation has 0 observations; give [M] with M >= 1 (or a scalar)")
        if len(grads) != len(params):
            raise ValueError(f"vlmkern.{op}: grads has {len(grads)} tensors but params has {len(params)}")
        for i, (w, g) in enumerate(zip(params, grads)):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"vlmkern.{op}: grads[{i}] must be a Tensor, got {type(g).__name__}")
            if tuple(g.shape) != (M, *w.shape):
                raise ValueError(f"vlmkern.{op}: grads[{i}] must have shape [M, *params[{i}].shape] = "
                                 f"{[M, *w.shape]} (M = innovation.shape[0]), got {list(g.shape)}")
            if g.device != w.device:
                raise ValueError(f"vlmkern.{op}: grads[{i}] is on {g.device} but params[{i}] is on {w.device}")
    else:
        check_same_shapes(op, params, "params", grads, "grads")
    check_same_shapes(op, params, "params", variances, "variances")
    dev = device_of(params, innovation.device if isinstance(innovation, torch.Tensor) else None)
    for i, (w, g, v) in enumerate(zip(params, grads, variances)):
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"vlmkern.{op}: params[{i}] must be float32, bfloat16 or float16, got {w.dtype}")
        if g.dtype != w.dtype:
            raise TypeError(f"vlmkern.{op}: grads[{i}] must have the dtype of params[{i}] ({w.dtype}), got {g.dtype}")
        if v.dtype != torch.float32:
            raise TypeError(f"vlmkern.{op}: variances[{i}] must be float32, got {v.dtype}")
        if w.device != dev:
            raise ValueError(f"vlmkern.{op}: params[{i}] is on {w.device} but params[0] is on {dev}")
    if not (0.0 < forgetting <= 1.0):
        raise ValueError(f"vlmkern.{op}: forgetting must be in (0, 1], got {forgetting}")
    if not (math.isfinite(process_noise) and process_noise >= 0):
        raise ValueError(f"vlmkern.{op}: process_noise must be finite and >= 0, got {process_noise}")
    if not (math.isfinite(var_floor) and var_floor >= 0):
        raise ValueError(f"vlmkern.{op}: var_floor must be finite and >= 0, got {var_floor}")
    if gate_chi2 is not None and not gate_chi2 > 0:
        raise ValueError(f"vlmkern.{op}: gate_chi2 must be > 0 (or None for no gate), got {gate_chi2}")
    if not isinstance(innovation, torch.Tensor) and not math.isfinite(float(innovation)):
        raise ValueError(f"vlmkern.{op}: innovation must be finite, got {innovation}")
    if not isinstance(obs_noise, torch.Tensor) and not (math.isfinite(float(obs_noise)) and float(obs_noise) > 0):
        raise ValueError(f"vlmkern.{op}: obs_noise must be finite and > 0, got {obs_noise}")
    gs = None if grad_scale is None else _flag_tensor(grad_scale, "grad_scale", op, dev)
    fi = None if found_inf is None else _flag_tensor(found_inf, "found_inf", op, dev)
    args = (float(process_noise), float(forgetting), float(var_floor), None if gate_chi2 is None else float(gate_chi2),
            gs, fi)
    name = backends.choose(OP, dev, backend)
    if vector:
        e = _vector_tensor(innovation, "innovation", op, dev, M)
        R = _vector_tensor(obs_noise, "obs_noise", op, dev, M)
        if name == "cuda" and M > _CUDA_MAX_M:
            name = "torch"
        S, d2 = _vector_step(name, params, grads, variances, e, R, *args)
        return (S, d2) if return_mahalanobis else S
    e = scalar_tensor(innovation, "innovation", op, dev)
    R = scalar_tensor(obs_noise, "obs_noise", op, dev)
    S = _step(name, params, grads, variances, e, R, *args)
    if not return_mahalanobis:
        return S
    ef = e.float()
    return S, ef * ef / S  # e^2 / S of the ungated innovation; NaN with S when skipped


def _vector_tensor(x, name: str, op: str, dev: torch.device, M: int) -> torch.Tensor:
    """``[M]`` float32 on ``dev`` from a number, a one-element tensor or an ``[M]`` tensor."""
    if not isinstance(x, torch.Tensor):
        return torch.full((M,), float(x), dtype=torch.float32, device=dev)
    if x.device != dev:
        raise ValueError(f"vlmkern.{op}: {name} is on {x.device} but the tensors are on {dev}")
    if x.numel() == 1:
        return x.reshape(1).to(torch.float32).expand(M)
    if tuple(x.shape) != (M,):
        raise ValueError(f"vlmkern.{op}: {name} must be a number, a one-element tensor or [M] = [{M}], "
                         f"got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def _flag_tensor(t, name: str, op: str, dev: torch.device) -> torch.Tensor:
    """A one-element float32 tensor on ``dev`` (GradScaler's scale / found_inf)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"vlmkern.{op}: {name} must be a one-element float32 tensor, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"vlmkern.{op}: {name} must have one element, got shape {tuple(t.shape)}")
    if t.device != dev:
        raise ValueError(f"vlmkern.{op}: {name} is on {t.device} but the tensors are on {dev}")
    if t.dtype != torch.float32:
        raise TypeError(f"vlmkern.{op}: {name} must be float32, got {t.dtype}")
    return t.reshape(())
