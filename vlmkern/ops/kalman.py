"""Fused diagonal Kalman step (SPEC §3), in place over lists of tensors.

Schema (csrc/registration.cpp)::

    vlmkern::kalman_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] variances,
                          Tensor innovation, Tensor obs_noise, float process_noise,
                          float forgetting, float var_floor, float? gate_chi2=None) -> Tensor

Kernels: ``csrc/kalman/kalman_cpu.cpp`` (CPU), ``csrc/kalman/kalman_cuda.cu``
(CUDA, multi-tensor apply: 2 launches per step for up to 768 tensors of any
mix of fp32/bf16/fp16, 2 more per further 768), the per-element math in ``csrc/kalman/kalman_math.h``;
the PyTorch fallback is :func:`_kalman_step_torch` below; the oracle is
:func:`vlmkern.reference.kalman_step`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backends
from ._common import FLOAT_DTYPES, as_list, check_same_shapes, device_of, scalar_tensor

OP = "kalman"
backends.register_op(OP, compiled=("vlmkern::kalman_step_",), doc="diagonal Kalman step (SPEC §3)")

_DEFAULT_VAR_FLOOR = 1e-12


if hasattr(torch.ops, "vlmkern") and hasattr(torch.ops.vlmkern, "kalman_step_"):

    @torch.library.register_fake("vlmkern::kalman_step_")
    def _kalman_step_fake(
        params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor, gate_chi2=None
    ):
        return innovation.new_empty((), dtype=torch.float32)


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


def _kalman_step_torch(
    params, grads, variances, innovation, obs_noise, process_noise, forgetting, var_floor, gate_chi2=None
):
    """Plain-PyTorch implementation (fp32 math, same two passes, no host sync)."""
    q = float(process_noise)
    s = innovation.new_zeros((), dtype=torch.float32)
    for g, v in zip(grads, variances):
        if g.numel():
            h = g.float()
            s = s + (h * h * (v + q)).sum()
    S = s + obs_noise.float()
    gain = gate_innovation(innovation.float(), S, gate_chi2) / S
    inv_s = 1.0 / S
    for w, g, v in zip(params, grads, variances):
        if w.numel() == 0:
            continue
        h = g.float()
        ph = v + q
        k = ph * h
        w.copy_((w.float() + gain * k).to(w.dtype))
        pn = (ph - k * k * inv_s) * (1.0 / forgetting)
        v.copy_(torch.where(pn >= var_floor, pn, torch.full_like(pn, var_floor)))
    return S


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
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One diagonal Kalman step over lists of tensors, in place (SPEC §3).

    ::

        p_hat = p + q                                  (q = process_noise)
        S     = sum_i h_i^2 p_hat_i + R                (one reduction over all tensors)
        e     = clamp(e, -sqrt(chi2 S), sqrt(chi2 S))  (only with gate_chi2)
        theta += (e / S) p_hat h                       (e = innovation)
        p      = max((p_hat - (p_hat h)^2 / S) / lambda, var_floor)

    Args:
        params: parameters ``theta`` (float32 / bfloat16 / float16), updated in place.
        grads: Jacobians ``h`` of the observation, same shapes and dtypes as ``params``.
        variances: diagonal covariance ``p`` (float32), updated in place.
        innovation: ``e`` (e.g. ``0 - loss``), a 0-d float32 tensor on the
            parameters' device (a Python number is converted).
        obs_noise: ``R > 0``, 0-d float32 tensor on the device.
        process_noise: ``q >= 0`` added to ``p`` before the update.
        forgetting: ``lambda`` in (0, 1]; 1 means no forgetting.
        var_floor: lower clamp of ``p`` (keeps it positive).
        gate_chi2: Mahalanobis gate threshold ``> 0``, or ``None`` (no gate):
            when ``e^2 / S > gate_chi2`` the innovation used for the update is
            clamped to ``sign(e) sqrt(gate_chi2 S)`` (the variance update does
            not depend on ``e`` and is unchanged).  Decided on the device.
        backend: force ``"cuda"``, ``"cpu"`` or ``"torch"`` (default: by device).

    Returns:
        the innovation variance ``S`` as a 0-d float32 tensor on the device.
        The step never synchronises with the host on CUDA.
    """
    op = "kalman_step_"
    params = as_list(params, "params", op)
    grads = as_list(grads, "grads", op)
    variances = as_list(variances, "variances", op)
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
    if process_noise < 0:
        raise ValueError(f"vlmkern.{op}: process_noise must be >= 0, got {process_noise}")
    if var_floor < 0:
        raise ValueError(f"vlmkern.{op}: var_floor must be >= 0, got {var_floor}")
    if gate_chi2 is not None and not gate_chi2 > 0:
        raise ValueError(f"vlmkern.{op}: gate_chi2 must be > 0 (or None for no gate), got {gate_chi2}")
    e = scalar_tensor(innovation, "innovation", op, dev)
    R = scalar_tensor(obs_noise, "obs_noise", op, dev)
    name = backends.choose(OP, dev, backend)
    if name == "torch":
        with torch.no_grad():
            return _kalman_step_torch(params, grads, variances, e, R, process_noise, forgetting, var_floor, gate_chi2)
    return torch.ops.vlmkern.kalman_step_(
        params,
        grads,
        variances,
        e,
        R,
        float(process_noise),
        float(forgetting),
        float(var_floor),
        None if gate_chi2 is None else float(gate_chi2),
    )
