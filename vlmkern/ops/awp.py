"""Layerwise-normalised weight perturbation with an exact restore (SPEC §4).

The op's whole contract is in this file (schemas, fakes, argument checks,
PyTorch implementation, backend table).  Kernels: ``csrc/awp/awp_cpu.cpp`` (plain
loops for baseline x86-64: wider instruction sets measured to buy nothing,
bench/RESULTS_awp.md) and ``csrc/awp/awp_cuda.cu`` (multi-tensor apply: 3
launches per perturb and 1 per restore for up to 768 tensors of any dtype
mix), the per-element math in ``csrc/awp/awp_math.h``; the oracle is
:func:`vlmkern.reference.awp_perturb`.

Every backend computes ``scale = sign * gamma * ||w|| / (||d|| + eps)`` in double
from fp32 norms (accumulated in double, fixed order), rounded once to fp32,
then ``w <- round_to_dtype(fp32(w) + scale * fp32(d))``.  ``backup`` receives the
weights bit for bit and :func:`awp_restore_` copies them back bit for bit.

The random direction is one counter-based generator (``awp_math.h``: a hash of
(seed, tensor, element) and a fixed sequence of fp32 operations for ``ln`` and
``cos``), so every backend draws the same bits; the PyTorch port below
(``_gaussian``) is also the bit-level check of the C++ on every CPU.

Bad input (SPEC §4): arguments are checked here (errors name the argument).
Values are checked on the device: if any returned norm is not finite, or
``found_inf`` is non-zero, the whole perturbation is skipped (``backup`` still
receives the weights, the weights stay as they were); :func:`perturb_skipped`
gives that decision as a device bool, with no host sync.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import backends
from ._common import FLOAT_DTYPES, as_list, check_same_shapes, device_of

OP = "awp"
_INFO = backends.register_op(OP)

MODES = {"adversarial": 0, "random": 1}
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GEN_CHUNK = 1 << 20  # elements of the random direction generated at once by the fallback

# direction 0 = adversarial (d = grads), 1 = random (grads may be empty).
# Returns the per-tensor norms [n, 2] float32: (||w||, ||d||).  (The argument
# is not called `mode`: under torch.compile a mutable op's arguments travel as
# keyword arguments of the auto_functionalized HOP, which takes `mode` itself.)
torch.library.define(
    "vlmkern::awp_perturb_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, float gamma, float eps, float sign, "
    "int direction, int seed, Tensor? found_inf=None) -> Tensor",
)
torch.library.define("vlmkern::awp_restore_", "(Tensor(a!)[] params, Tensor[] backup) -> ()")


@torch.library.register_fake("vlmkern::awp_perturb_")
def _awp_perturb_fake(params, grads, backup, gamma, eps, sign, direction, seed, found_inf=None):
    if len(params) == 0:
        return torch.empty((0, 2), dtype=torch.float32)
    return params[0].new_empty((len(params), 2), dtype=torch.float32)


@torch.library.register_fake("vlmkern::awp_restore_")
def _awp_restore_fake(params, backup):
    return None


# ---------------------------------------------------------------------------
# PyTorch fallback
# ---------------------------------------------------------------------------


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without int64 overflow (products stay below 2^49)
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _tensor_key(seed: int, index: int) -> int:
    s = int(seed) & _M64
    s32 = (s ^ (s >> 32)) & _M32
    return _mix32_int(s32 ^ _mix32_int(index * 0x9E3779B9 + 1))


def _f32(hex_literal: str) -> float:
    return float.fromhex(hex_literal)  # exactly representable in fp32 (see awp_math.h)


# the constants of awp_math.h (gconst), bit for bit
_L3, _L5, _L7, _L9 = _f32("0x1.555556p-2"), _f32("0x1.99999ap-3"), _f32("0x1.24924ap-3"), _f32("0x1.c71c72p-4")
_LN2_HI, _LN2_LO = _f32("0x1.62e4p-1"), _f32("0x1.7f7d1cp-20")
_SQRT2_BITS = 0x3FB504F3
_C2, _C4, _C6, _C8, _C10 = (_f32("-0x1p-1"), _f32("0x1.555556p-5"), _f32("-0x1.6c16c2p-10"),
                            _f32("0x1.a01a02p-16"), _f32("-0x1.27e4fcp-22"))
_S3, _S5, _S7, _S9 = _f32("-0x1.555556p-3"), _f32("0x1.111112p-7"), _f32("-0x1.a01a02p-13"), _f32("0x1.71de3ap-19")
_TWO_PI_2M24 = _f32("0x1.921fb6p-22")


def _bits_f32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> its bits as non-negative int64."""
    return x.view(torch.int32).to(torch.int64) & _M32


def _f32_from_bits(b: torch.Tensor) -> torch.Tensor:
    """non-negative int64 < 2^32 -> the fp32 with those bits."""
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _gauss_log(ja: torch.Tensor) -> torch.Tensor:
    """ln(ja 2^-24), ja int64 in [1, 2^24]: awp_math.h gauss_log, the same fp32 operations
    (each torch op on fp32 tensors rounds once; none is fused)."""
    b = _bits_f32(ja.to(torch.float32))
    mb = (b & 0x7FFFFF) | 0x3F800000
    adj = ((_SQRT2_BITS - mb) & _M32) >> 31
    mb = mb - (adj << 23)
    e = ((b >> 23) + adj - 151).to(torch.float32)
    m = _f32_from_bits(mb)
    f = m + (-1.0)
    s = f / (m + 1.0)
    s2 = s + s
    t = s * s
    q = t * _L9 + _L7
    q = q * t + _L5
    q = q * t + _L3
    lnm = s2 + s2 * (t * q)
    return e * _LN2_HI + (lnm + e * _LN2_LO)


def _gauss_cos(jc: torch.Tensor) -> torch.Tensor:
    """cos(2 pi jc 2^-24), jc int64 in [0, 2^24): awp_math.h gauss_cos."""
    q = (jc + 0x200000) >> 22
    x = (jc - (q << 22)).to(torch.float32) * _TWO_PI_2M24
    z = x * x
    pc = z * _C10 + _C8
    pc = pc * z + _C6
    pc = pc * z + _C4
    pc = pc * z + _C2
    c = z * pc + 1.0
    ps = z * _S9 + _S7
    ps = ps * z + _S5
    ps = ps * z + _S3
    s = x + x * (z * ps)
    v = torch.where((q & 1) == 1, s, c)
    return torch.where(((q + 1) & 2) != 0, -v, v)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root of x >= 0 (IEEE sqrt, as the kernels use).

    ``torch.sqrt`` is not correctly rounded on every backend (on CPU with MKL,
    torch 2.14, 17% of fp32 results are off by an ulp, and float64 ones too), so
    take a candidate and fix it with an exact test: the midpoints between fp32
    neighbours have 25 bits, their squares are exact in float64."""
    y = torch.sqrt(x.double()).to(torch.float32)
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    dn = torch.nextafter(y, torch.zeros_like(y))
    xd, yd = x.double(), y.double()
    m_hi = (yd + up.double()) * 0.5
    m_lo = (yd + dn.double()) * 0.5
    y = torch.where(xd > m_hi * m_hi, up, y)
    return torch.where(xd < m_lo * m_lo, dn, y)


def _gaussian(key: int, begin: int, end: int, device) -> torch.Tensor:
    """fp32 standard normals for flat elements [begin, end) of a tensor: the
    operations of awp_math.h ``gaussian``, so the same bits as the compiled kernels."""
    k = torch.arange(begin, end, dtype=torch.int64, device=device)
    k2 = (2 * k) & _M32
    a = _mix32_t(k2 ^ key)
    c = _mix32_t((k2 + 1) ^ key)
    ln_u1 = _gauss_log((a >> 8) + 1)
    return _sqrt_rn(ln_u1 * -2.0) * _gauss_cos(c >> 8)


def _random_sumsq(key: int, numel: int, device) -> torch.Tensor:
    s = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(0, numel, _GEN_CHUNK):
        r = _gaussian(key, b, min(numel, b + _GEN_CHUNK), device)
        s = s + (r.double() * r.double()).sum()
    return s


_NORM_ROW = 1024


def _norm_f32(t: torch.Tensor) -> torch.Tensor:
    """||t|| as fp32, accurate to ~1e-7 on tensors of any size: fp32 norms of
    1024-element rows combined in double.  (torch's own fp32 norm drifts on large
    CPU tensors: 1.3e-4 relative error on 5M elements with torch 2.14.)"""
    flat = t.reshape(-1)
    n = flat.numel()
    m = n // _NORM_ROW
    s = torch.zeros((), dtype=torch.float64, device=t.device)
    if m:
        rows = torch.linalg.vector_norm(flat[: m * _NORM_ROW].view(m, _NORM_ROW), dim=1, dtype=torch.float32)
        s = s + rows.double().square().sum()
    if n > m * _NORM_ROW:
        s = s + torch.linalg.vector_norm(flat[m * _NORM_ROW :], dtype=torch.float32).double().square()
    return s.sqrt().to(torch.float32)


def _awp_perturb_torch(params, grads, backup, gamma, eps, sign, mode, seed, found_inf=None):
    """Plain PyTorch, same math and skip rule as the kernels (no host synchronisation)."""
    n = len(params)
    dev = params[0].device
    live = [i for i in range(n) if params[i].numel() > 0]
    nw = [torch.zeros((), dtype=torch.float32, device=dev) for _ in range(n)]
    nd = [torch.zeros((), dtype=torch.float32, device=dev) for _ in range(n)]
    if live:
        for i in live:
            nw[i] = _norm_f32(params[i])
        if mode == 0:
            for i in live:
                nd[i] = _norm_f32(grads[i])
        else:
            keys = {i: _tensor_key(seed, i) for i in live}
            for i in live:
                nd[i] = _random_sumsq(keys[i], params[i].numel(), dev).sqrt().to(torch.float32)
    gs = float(sign) * float(gamma)
    norms = torch.stack([torch.stack(nw), torch.stack(nd)], dim=1) if n else torch.empty((0, 2))
    keep = perturb_skipped(norms, found_inf)  # 0-d bool on the device: keep w as it is
    for i in live:
        w = params[i]
        s = (gs * nw[i].double() / (nd[i].double() + eps)).to(torch.float32)
        s = torch.where(keep, torch.zeros_like(s), s)
        backup[i].copy_(w)
        if mode == 0:
            d = grads[i].to(torch.float32)
            w.copy_(torch.where(keep, w, (w.to(torch.float32) + d * s).to(w.dtype)))
        else:
            flat = w.reshape(-1) if w.is_contiguous() else None
            if flat is None:  # non-contiguous: work on a contiguous copy
                tmp = w.contiguous()
                flat = tmp.reshape(-1)
            for b in range(0, w.numel(), _GEN_CHUNK):
                e = min(w.numel(), b + _GEN_CHUNK)
                d = _gaussian(keys[i], b, e, dev)
                flat[b:e] = torch.where(keep, flat[b:e], (flat[b:e].to(torch.float32) + d * s).to(w.dtype))
            if not w.is_contiguous():
                w.copy_(flat.reshape(w.shape))
    return norms


_FLT_MAX = 3.4028234663852886e38


def perturb_skipped(norms: torch.Tensor, found_inf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Whether :func:`awp_perturb_` skipped the perturbation, from the norms it
    returned (and the ``found_inf`` it was given): a 0-d bool tensor on their
    device, computed there (no host sync).  True iff a norm is not finite or
    ``found_inf != 0`` (the rule of SPEC §4 "Bad input")."""
    bad = ~(norms.abs() <= _FLT_MAX).all()
    if found_inf is not None:
        bad = bad | (found_inf.reshape(()) != 0)
    return bad


def _awp_restore_torch(params, backup):
    live = [i for i in range(len(params)) if params[i].numel() > 0]
    if live:
        torch._foreach_copy_([params[i] for i in live], [backup[i] for i in live])


_perturb = _INFO.step("perturb", cpu="awp_perturb_", cuda="awp_perturb_", torch=_awp_perturb_torch)
_restore = _INFO.step("restore", cpu="awp_restore_", cuda="awp_restore_", torch=_awp_restore_torch)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def _check_dtypes_devices(op, params, others):
    dev = device_of(params)
    for i, w in enumerate(params):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"vlmkern.{op}: params[{i}] must be a Tensor, got {type(w).__name__}")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"vlmkern.{op}: params[{i}] must be float32, bfloat16 or float16, got {w.dtype}")
        if w.device != dev:
            raise ValueError(f"vlmkern.{op}: params[{i}] is on {w.device} but params[0] is on {dev}")
        for name, lst in others:
            if lst[i].dtype != w.dtype:
                raise TypeError(f"vlmkern.{op}: {name}[{i}] must have the dtype of params[{i}] ({w.dtype}), got {lst[i].dtype}")
    return dev


def _signed64(seed: int) -> int:
    s = int(seed) & _M64
    return s - (1 << 64) if s >= (1 << 63) else s


def awp_perturb_(
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[torch.Tensor]],
    backup: Sequence[torch.Tensor],
    *,
    gamma: float,
    eps: float = 1e-12,
    sign: float = +1,
    mode: str = "adversarial",
    seed: Optional[int] = None,
    found_inf: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Save ``params`` into ``backup`` and perturb them in place (SPEC §4)::

        v_l = sign * gamma * ||w_l|| * d_l / (||d_l|| + eps)
        backup_l <- w_l   (bit copy);   w_l <- round(w_l + v_l)

    with ``d_l = grads[l]`` (``mode="adversarial"``) or ``d_l = r_l``, a standard
    Gaussian drawn inside the kernel from ``(seed, l, element index)``
    (``mode="random"``: counter-based, nothing stored, the same fp32 bits on every
    backend and CPU instruction set: ``ln`` and ``cos`` are evaluated by one fixed
    sequence of IEEE fp32 operations, see ``csrc/awp/awp_math.h``; within 6e-7 of
    the float64 definition :func:`vlmkern.reference.awp_random_direction`).

    Args:
        params: weights (float32 / bfloat16 / float16, any mix), updated in place.
        grads: directions, same shapes and dtypes as ``params``; ignored (may be
            ``None`` or empty) in random mode.
        backup: buffers of the same shapes and dtypes as ``params``; overwritten
            with the unperturbed weights.
        gamma: relative size ``||v_l|| / ||w_l||`` (>= 0).
        eps: added to ``||d_l||`` (zero gradients give ``v = 0``, never NaN, when eps > 0).
        sign: ``+1`` ascends the loss (AWP/WRF4CIR), ``-1`` descends (the sign
            printed in WRF4CIR's Algorithm 1).
        mode: ``"adversarial"`` or ``"random"``.
        seed: required in random mode (any Python int; its low 64 bits are used).
        found_inf: optional one-element float32 tensor on the parameters'
            device (e.g. GradScaler's flag): non-zero skips the perturbation.
        backend: force ``"cuda"``, ``"cpu"`` or ``"torch"`` (default: by device).

    Skip rule (device-side, every backend): if any returned norm is not finite
    (a NaN/inf gradient or weight) or ``found_inf`` is non-zero, nothing is
    perturbed: ``backup`` receives the weights and the weights stay bit for bit
    as they were; :func:`perturb_skipped` ``(norms, found_inf)`` says so.

    Returns:
        ``[len(params), 2]`` float32 on the parameters' device: ``(||w_l||, ||d_l||)``.
        On CUDA nothing synchronises with the host.
    """
    op = "awp_perturb_"
    params = as_list(params, "params", op)
    backup = as_list(backup, "backup", op)
    if mode not in MODES:
        raise ValueError(f"vlmkern.{op}: mode must be 'adversarial' or 'random', got {mode!r}")
    m = MODES[mode]
    if m == 0:
        if grads is None:
            raise ValueError(f"vlmkern.{op}: grads is required in adversarial mode")
        grads = as_list(grads, "grads", op)
        check_same_shapes(op, params, "params", grads, "grads")
    else:
        if seed is None:
            raise ValueError(f"vlmkern.{op}: seed is required in random mode")
        grads = []
    if m == 1 and not isinstance(seed, int):
        raise TypeError(f"vlmkern.{op}: seed must be an int, got {type(seed).__name__}")
    check_same_shapes(op, params, "params", backup, "backup")
    others = [("backup", backup)] + ([("grads", grads)] if m == 0 else [])
    dev = _check_dtypes_devices(op, params, others)
    for i, (w, b) in enumerate(zip(params, backup)):
        if b is w or (b.numel() > 0 and b.data_ptr() == w.data_ptr()):
            raise ValueError(f"vlmkern.{op}: backup[{i}] is params[{i}] itself; it must be a separate buffer")
    gamma = float(gamma)
    eps = float(eps)
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"vlmkern.{op}: gamma must be finite and >= 0, got {gamma}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"vlmkern.{op}: eps must be finite and >= 0, got {eps}")
    if sign not in (1, -1):
        raise ValueError(f"vlmkern.{op}: sign must be +1 or -1, got {sign}")
    if found_inf is not None:
        if not isinstance(found_inf, torch.Tensor):
            raise TypeError(f"vlmkern.{op}: found_inf must be a one-element float32 tensor, got {type(found_inf).__name__}")
        if found_inf.numel() != 1:
            raise ValueError(f"vlmkern.{op}: found_inf must have one element, got shape {tuple(found_inf.shape)}")
        if found_inf.dtype != torch.float32:
            raise TypeError(f"vlmkern.{op}: found_inf must be float32, got {found_inf.dtype}")
        if found_inf.device != dev:
            raise ValueError(f"vlmkern.{op}: found_inf is on {found_inf.device} but params are on {dev}")
        found_inf = found_inf.reshape(())
    if len(params) == 0:
        return torch.empty((0, 2), dtype=torch.float32, device=dev)
    s64 = _signed64(seed) if m == 1 else 0
    with torch.no_grad():
        return _perturb(backends.choose(OP, dev, backend), params, grads, backup, gamma, eps, float(sign), m, s64,
                        found_inf)


def awp_restore_(
    params: Sequence[torch.Tensor],
    backup: Sequence[torch.Tensor],
    *,
    backend: Optional[str] = None,
) -> None:
    """``params <- backup`` bit for bit (the exact restore of SPEC §4: the saved
    weights are copied back, ``v`` is never subtracted)."""
    op = "awp_restore_"
    params = as_list(params, "params", op)
    backup = as_list(backup, "backup", op)
    check_same_shapes(op, params, "params", backup, "backup")
    dev = _check_dtypes_devices(op, params, [("backup", backup)])
    if len(params) == 0:
        return None
    with torch.no_grad():
        _restore(backends.choose(OP, dev, backend), params, backup)
    return None
