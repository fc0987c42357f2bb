"""Hinged / plain global contrastive loss with per-sample ``log u`` state (SPEC §1).

Public API: :func:`hgcl_loss` and :class:`GlobalContrastiveLoss`.  The op's
whole contract is in this file (schemas and fakes of the compiled ops, argument
checks, autograd, PyTorch implementation, backend table).  Three steps per
call, each an op with a fake kernel (so the loss works under ``torch.compile``):

1. **stats** (no gradient): row and column sweeps giving ``log Phi1``
   (image-anchored) and ``log Phi2`` (text-anchored) for the local anchors; with a
   learnable ``tau`` also ``lbar`` (softmax-weighted mean of ``l`` over the negatives),
   from which the ``tau`` gradient takes O(b) work (``_tau_term``).
2. **state update** (in place, no gradient): ``log u <- logaddexp(log(1-gamma) + log u,
   log gamma + log Phi)`` (``log Phi`` on a first visit; anchors sharing an index
   use their mean ``Phi``); returns ``log(eps + u_new)``.  ``update_state=False``
   reads ``u`` and writes nothing.
3. **core** ``vlmkern::hgcl_loss_core`` (differentiable): forward
   ``tau/b * sum_i (logden1_i + logden2_i)``; backward the compositional
   estimator (``hgcl_grad``), **not** the autograd of that scalar (which would
   be zero: the logden are constants).

Backends: ``cpu`` (``csrc/hgcl/hgcl_cpu.cpp``), ``triton`` (``kernels/triton/hgcl.py``;
CUDA tensors, CPU under ``TRITON_INTERPRET=1``), ``torch`` (blocked over rows:
never ``B x B``).  Across ranks, ``group=`` gathers the batch inside the op.
The float64 oracle is :func:`vlmkern.reference.hgcl`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import backends
from ..kernels import outputs
from ._common import FLOAT_DTYPES

OP = "hgcl"
_INFO = backends.register_op(OP, triton=True, cuda=False)  # no CUDA kernels: CUDA tensors take Triton

try:  # the Triton kernels must import on machines without a GPU; record why not otherwise
    from ..kernels.triton import hgcl as _triton_hgcl  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    _INFO.triton_import_error = f"{type(exc).__name__}: {exc}"
    _triton_hgcl = None

_TORCH_BLOCK = 512  # rows per tile of the PyTorch fallback: memory O(512 * B)


# ----------------------------------------------------------------------------
# schemas and fake kernels of the compiled ops (csrc/hgcl/hgcl_cpu.cpp)
# ----------------------------------------------------------------------------

# all_img / all_txt = None: one process (the columns are img / txt, offset 0).
# Outputs (log Phi1, log Phi2, lbar1, lbar2); lbar_i is the softmax-weighted mean of l over
# anchor i's negatives (the tau gradient's per-row reduction, SPEC §1 "Learnable temperature"),
# float32 [b] with lmean=True, empty [0] (not computed) otherwise.
torch.library.define(
    "vlmkern::hgcl_stats",
    "(Tensor img, Tensor txt, Tensor? all_img, Tensor? all_txt, int offset, float tau, float margin, "
    "bool hinge, bool lmean=False) -> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "vlmkern::hgcl_state_update_",
    "(Tensor(a!) log_u, Tensor index, Tensor log_phi, float gamma, float eps) -> Tensor",
)
# With all_img / all_txt = None the column terms are folded into grad_img /
# grad_txt and grad_all_img / grad_all_txt are empty [0, d].
torch.library.define(
    "vlmkern::hgcl_grad",
    "(Tensor img, Tensor txt, Tensor? all_img, Tensor? all_txt, Tensor logden_img, Tensor logden_txt, "
    "Tensor grad_out, int offset, float tau, float margin, bool hinge) -> (Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.register_fake("vlmkern::hgcl_stats")
def _hgcl_stats_fake(img, txt, all_img, all_txt, offset, tau, margin, hinge, lmean=False):
    b = img.shape[0]
    nl = b if lmean else 0
    return (img.new_empty((b,), dtype=torch.float32), img.new_empty((b,), dtype=torch.float32),
            img.new_empty((nl,), dtype=torch.float32), img.new_empty((nl,), dtype=torch.float32))


@torch.library.register_fake("vlmkern::hgcl_state_update_")
def _hgcl_state_update_fake(log_u, index, log_phi, gamma, eps):
    return log_phi.new_empty(log_phi.shape, dtype=torch.float32)


@torch.library.register_fake("vlmkern::hgcl_grad")
def _hgcl_grad_fake(img, txt, all_img, all_txt, logden_img, logden_txt, grad_out, offset, tau, margin, hinge):
    b, d = img.shape
    B = 0 if all_img is None else all_img.shape[0]
    return img.new_empty((b, d)), txt.new_empty((b, d)), img.new_empty((B, d)), img.new_empty((B, d))


# ----------------------------------------------------------------------------
# PyTorch fallback (blocked over rows, fp32 math)
# ----------------------------------------------------------------------------


def _surrogate(x: Tensor, hinge: bool, margin: float) -> Tensor:
    return torch.clamp(x + margin, min=0.0).square() if hinge else x


def _surrogate_grad(x: Tensor, hinge: bool, margin: float) -> Tensor:
    return 2.0 * torch.clamp(x + margin, min=0.0) if hinge else torch.ones_like(x)


def _stats_torch(img, txt, all_img, all_txt, offset, tau, margin, hinge, lmean=False, block=_TORCH_BLOCK):
    F, G = img.float(), txt.float()
    Fg = F if all_img is None else all_img.float()
    Gg = G if all_txt is None else all_txt.float()
    b, B = F.shape[0], Fg.shape[0]
    out1 = outputs.empty((b,), dtype=torch.float32, device=F.device)  # every row block writes its rows
    out2 = outputs.empty((b,), dtype=torch.float32, device=F.device)
    nl = b if lmean else 0
    bar1 = outputs.empty((nl,), dtype=torch.float32, device=F.device)
    bar2 = outputs.empty((nl,), dtype=torch.float32, device=F.device)
    if B < 2 or b == 0:  # no negatives: log Phi = log(empty sum) = -inf, lbar = 0
        return out1.fill_(-math.inf), out2.fill_(-math.inf), bar1.zero_(), bar2.zero_()
    p = (F * G).sum(1)
    cols = torch.arange(B, device=F.device)
    log_nm1 = math.log(B - 1)
    for r0 in range(0, b, block):
        r1 = min(b, r0 + block)
        own = cols[None, :] == (torch.arange(r0, r1, device=F.device) + offset)[:, None]
        for A, C, out, bar in ((F, Gg, out1, bar1), (G, Fg, out2, bar2)):
            lv = _surrogate(A[r0:r1] @ C.T - p[r0:r1, None], hinge, margin)
            z = (lv / tau).masked_fill(own, -math.inf)
            lse = torch.logsumexp(z, dim=1)
            out[r0:r1] = lse - log_nm1
            if lmean:  # softmax-weighted mean of l over the negatives (exp(-inf) = 0 on the own column)
                bar[r0:r1] = (torch.exp(z - lse[:, None]) * lv).sum(1)
    return out1, out2, bar1, bar2


def _grad_torch(img, txt, all_img, all_txt, logden_img, logden_txt, grad_out, offset, tau, margin, hinge,
                block=_TORCH_BLOCK):
    F, G = img.float(), txt.float()
    local = all_img is None
    Fg = F if local else all_img.float()
    Gg = G if local else all_txt.float()
    b, d = F.shape
    B = Fg.shape[0]
    # gF, gG: written row block by row block; gFg, gGg: accumulated over the blocks
    gF = outputs.empty((b, d), dtype=torch.float32, device=F.device)
    gG = outputs.empty((b, d), dtype=torch.float32, device=F.device)
    gFg, gGg = torch.zeros_like(Fg), torch.zeros_like(Gg)
    if B < 2 or b == 0:
        gF.zero_(), gG.zero_()
    else:
        scale = grad_out.reshape(()).float() / b
        p = (F * G).sum(1)
        cols = torch.arange(B, device=F.device)
        inv_nm1 = 1.0 / (B - 1)
        dp = outputs.empty((b,), dtype=torch.float32, device=F.device)
        for r0 in range(0, b, block):
            r1 = min(b, r0 + block)
            own = cols[None, :] == (torch.arange(r0, r1, device=F.device) + offset)[:, None]
            ds = []
            for A, C, ld in ((F, Gg, logden_img), (G, Fg, logden_txt)):
                x = A[r0:r1] @ C.T - p[r0:r1, None]
                z = _surrogate(x, hinge, margin) / tau
                w = torch.exp((z - ld[r0:r1, None].float()).masked_fill(own, -math.inf)) * inv_nm1
                ds.append(w * _surrogate_grad(x, hinge, margin) * scale)
            D1, D2 = ds
            gF[r0:r1] = D1 @ Gg
            gG[r0:r1] = D2 @ Fg
            gGg += D1.T @ F[r0:r1]
            gFg += D2.T @ G[r0:r1]
            dp[r0:r1] = -(D1.sum(1) + D2.sum(1))
        gF = gF + dp[:, None] * G
        gG = gG + dp[:, None] * F
    if local:
        gF, gG = gF + gFg, gG + gGg
        gFg, gGg = gFg[:0], gGg[:0]
    dt = img.dtype
    return gF.to(dt), gG.to(dt), gFg.to(dt), gGg.to(dt)


def _state_update_torch(log_u: Tensor, index: Tensor, log_phi: Tensor, gamma: float, eps: float) -> Tensor:
    """In-place log-domain update of ``log_u[index]``; returns ``log(eps + u_new)``."""
    old = log_u.index_select(0, index)
    if gamma >= 1.0:
        new = log_phi.float()
    else:
        blended = torch.logaddexp(old + math.log1p(-gamma), log_phi.float() + math.log(gamma))
        new = torch.where(torch.isneginf(old), log_phi.float(), blended)
    log_u.index_copy_(0, index, new)
    return torch.logaddexp(new, torch.full_like(new, math.log(eps)))


# ----------------------------------------------------------------------------
# backend dispatch of the three steps
# ----------------------------------------------------------------------------


@torch._dynamo.assume_constant_result
def _choose(device: str, backend: Optional[str]) -> str:
    """The backend for ``device`` (a constant for ``torch.compile``: the choice
    is made once at trace time, the registry itself is not traced)."""
    return backends.choose(OP, torch.device(device), backend)


_stats = _INFO.step("stats", cpu="hgcl_stats", triton="hgcl_stats_triton", torch=_stats_torch)
_state_update = _INFO.step("state_update", cpu="hgcl_state_update_", torch=_state_update_torch)
_grad = _INFO.step("grad", cpu="hgcl_grad", triton="hgcl_grad_triton", torch=_grad_torch)


def _nonfinite_features(*ts: Optional[Tensor]) -> Tensor:
    """0-d bool on the device: some feature holds NaN/inf (no host sync)."""
    bad = None
    for t in ts:
        if t is not None:
            b = ~torch.isfinite(t).all()
            bad = b if bad is None else bad | b
    return bad


def _duplicate_log_mean(index: Tensor, log_phi: Tensor) -> Tensor:
    """Per anchor, the log of the mean ``Phi`` over the anchors sharing its index
    (``logsumexp(log Phi) - log k`` over the ``k`` of them; an unshared anchor
    keeps its own ``log Phi`` bit for bit).

    Device ops only (no host sync, no data-dependent shape): the anchors are
    sorted by ``(index, log Phi)`` (two stable sorts), each one finds the first
    and last position of its run with a running max, and the run's sum of
    ``exp(log Phi - max)`` is a difference of one float64 prefix sum.  The sorted
    sequence depends only on the multiset of ``(index, log Phi)`` pairs, so a
    permuted batch gives the permuted result bit for bit."""
    n = index.shape[0]
    x = log_phi.float()
    by_value = torch.argsort(x, stable=True)
    order = by_value[torch.argsort(index[by_value], stable=True)]
    si, sx = index[order], x[order]
    pos = torch.arange(n, device=x.device)
    first = torch.ones(n, dtype=torch.bool, device=x.device)
    first[1:] = si[1:] != si[:-1]
    last = torch.ones(n, dtype=torch.bool, device=x.device)
    last[:-1] = first[1:]
    start = torch.cummax(torch.where(first, pos, 0), 0).values
    end = (n - 1) - torch.cummax(torch.where(last, n - 1 - pos, 0).flip(0), 0).values.flip(0)
    top = sx[end].double()  # the run's max: its last element (ascending by value within a run)
    shifted = torch.where(torch.isneginf(top), 0.0, sx.double() - top)
    csum = torch.cat([shifted.new_zeros(1), torch.cumsum(torch.exp(shifted), 0)])
    count = (end - start + 1).double()
    mean = (top + torch.log(csum[end + 1] - csum[start]) - torch.log(count)).float()
    mean = torch.where(end == start, sx, mean)
    return torch.empty_like(x).index_copy_(0, order, mean)


def _guarded_state_update(backend, log_u_img, log_u_txt, index, lphi1, lphi2, gamma, eps, bad,
                          update_state=True, txt_index=None):
    """The two state updates under the duplicate and bad-input rules (SPEC §1).

    Duplicates: the anchors sharing an index make one update with the mean of
    their ``Phi`` (:func:`_duplicate_log_mean`) and all read the same new ``u``.
    The update runs on the gathered entries (one distinct position per anchor,
    so the compiled kernel never reads an entry a duplicate already wrote), and
    one ``index_copy_`` writes them back (duplicates write the same value).

    Bad input: when ``bad`` (non-finite features) or a touched state entry is
    NaN / +inf, both buffers are left bit for bit as they were and the returned
    ``logden`` are NaN (so the loss and every gradient entry are NaN).  Decided
    on the device with ``torch.where``: no host sync; costs O(b log b).

    ``update_state=False``: nothing is written; each anchor reads its current
    ``u`` (a never-visited entry reads its mean ``Phi``, as a first visit would
    write it).  ``txt_index`` (default ``index``): the text anchors' entries of ``log_u_txt``."""
    txt_index = index if txt_index is None else txt_index
    old1 = log_u_img.index_select(0, index)
    old2 = log_u_txt.index_select(0, txt_index)
    bad = bad | ~(old1 < math.inf).all() | ~(old2 < math.inf).all()  # NaN or +inf state
    lphi1, lphi2 = _duplicate_log_mean(index, lphi1), _duplicate_log_mean(txt_index, lphi2)
    nan = torch.full((), math.nan, dtype=torch.float32, device=old1.device)
    out = []
    for log_u, idx, old, lphi in ((log_u_img, index, old1, lphi1), (log_u_txt, txt_index, old2, lphi2)):
        if update_state:
            new = old.clone()
            ld = _state_update(backend, new, torch.arange(new.shape[0], device=new.device), lphi, gamma, eps)
            log_u.index_copy_(0, idx, torch.where(bad, old, new))
        else:
            cur = torch.where(torch.isneginf(old), lphi, old)
            ld = torch.logaddexp(cur, torch.full_like(cur, math.log(eps)))
        out.append(torch.where(bad, nan, ld))
    return out[0], out[1]


# ----------------------------------------------------------------------------
# the differentiable core
# ----------------------------------------------------------------------------


@torch.library.custom_op("vlmkern::hgcl_loss_core", mutates_args=())
def _loss_core(
    img: Tensor, txt: Tensor, all_img: Optional[Tensor], all_txt: Optional[Tensor],
    logden_img: Tensor, logden_txt: Tensor, offset: int, tau: float, margin: float, hinge: bool,
    backend: str,
) -> Tensor:
    """``tau/b * sum(logden_img + logden_txt)``; backward = the SPEC §1 estimator."""
    return (logden_img.float() + logden_txt.float()).sum() * (tau / img.shape[0])


@_loss_core.register_fake
def _(img, txt, all_img, all_txt, logden_img, logden_txt, offset, tau, margin, hinge, backend):
    return logden_img.new_empty((), dtype=torch.float32)


def _core_setup(ctx, inputs, output):
    img, txt, all_img, all_txt, ld1, ld2, offset, tau, margin, hinge, backend = inputs
    ctx.save_for_backward(img, txt, all_img, all_txt, ld1, ld2)
    ctx.args = (offset, tau, margin, hinge, backend)


def _core_backward(ctx, grad):
    img, txt, all_img, all_txt, ld1, ld2 = ctx.saved_tensors
    offset, tau, margin, hinge, backend = ctx.args
    with torch.autocast(img.device.type, enabled=False):
        gF, gG, gFg, gGg = _grad(backend, img, txt, all_img, all_txt, ld1, ld2, grad, offset, tau, margin, hinge)
    # Bad input (NaN logden, see _guarded_state_update): every entry of every
    # gradient is NaN, whatever the kernel's arithmetic does with it, so that any
    # inf/NaN check (GradScaler's included) sees it.
    bad = torch.isnan(ld1[:1].float().sum() + ld2[:1].float().sum())
    gF, gG = (torch.where(bad, torch.full_like(g, math.nan), g) for g in (gF, gG))
    if all_img is not None:
        gFg, gGg = (torch.where(bad, torch.full_like(g, math.nan), g) for g in (gFg, gGg))
    if all_img is None:
        gFg = gGg = None
    return gF, gG, gFg, gGg, None, None, None, None, None, None, None


torch.library.register_autograd("vlmkern::hgcl_loss_core", _core_backward, setup_context=_core_setup)


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------


def _fail(exc, msg):
    raise exc(f"vlmkern.hgcl_loss: {msg}")


def _check_args(img, txt, index, log_u_img, log_u_txt, tau, gamma, margin, eps, all_img, all_txt, offset,
                check_finite, validate, global_index=None, rho=0.0, txt_index=None, global_txt_index=None) -> float:
    """Raises on a bad argument (the message names it); returns ``tau`` as a float
    (reading a tensor ``tau`` is one host sync on CUDA)."""
    for name, t in (("img", img), ("txt", txt), ("index", index), ("log_u_img", log_u_img),
                    ("log_u_txt", log_u_txt)) + ((("txt_index", txt_index),) if txt_index is not None else ()):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(t).__name__}")
    if img.dim() != 2:
        _fail(ValueError, f"img must be 2-D [b, d], got shape {tuple(img.shape)}")
    if txt.shape != img.shape:
        _fail(ValueError, f"txt has shape {tuple(txt.shape)} but img has shape {tuple(img.shape)}")
    if img.shape[0] == 0:
        _fail(ValueError, "img is an empty batch (b = 0)")
    if img.dtype not in FLOAT_DTYPES:
        _fail(TypeError, f"img must be float32, bfloat16 or float16, got {img.dtype}")
    if txt.dtype != img.dtype:
        _fail(TypeError, f"txt has dtype {txt.dtype} but img has dtype {img.dtype}")
    dev = img.device
    if txt.device != dev:
        _fail(ValueError, f"txt is on {txt.device} but img is on {dev}")
    b, d = img.shape
    if (all_img is None) != (all_txt is None):
        _fail(ValueError, "give both all_img and all_txt or neither")
    if all_img is not None:
        for name, t in (("all_img", all_img), ("all_txt", all_txt)):
            if not isinstance(t, torch.Tensor):
                _fail(TypeError, f"{name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape[1] != d:
                _fail(ValueError, f"{name} must be [B, {d}] (the width of img), got shape {tuple(t.shape)}")
            if t.dtype != img.dtype:
                _fail(TypeError, f"{name} has dtype {t.dtype} but img has dtype {img.dtype}")
            if t.device != dev:
                _fail(ValueError, f"{name} is on {t.device} but img is on {dev}")
        if all_txt.shape != all_img.shape:
            _fail(ValueError, f"all_txt has shape {tuple(all_txt.shape)} but all_img has shape {tuple(all_img.shape)}")
        B = all_img.shape[0]
        if not (0 <= offset <= B - b):
            _fail(ValueError, f"offset must be in [0, B - b] = [0, {B - b}], got {offset}")
    elif offset != 0:
        _fail(ValueError, f"offset must be 0 when all_img/all_txt are not given, got {offset}")
    n_cols = b if all_img is None else all_img.shape[0]
    if n_cols < 2:
        what = "img has" if all_img is None else "all_img has"
        _fail(ValueError, f"{what} {n_cols} column(s); the loss needs at least 2 (B >= 2: every anchor "
                          "needs a negative)")
    for name, t in (("index", index),) + ((("txt_index", txt_index),) if txt_index is not None else ()):
        if t.dim() != 1 or t.shape[0] != b:
            _fail(ValueError, f"{name} must be 1-D of length b = {b}, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            _fail(TypeError, f"{name} must be int64 (or int32), got {t.dtype}")
        if t.device != dev:
            _fail(ValueError, f"{name} is on {t.device} but img is on {dev}")
    for name, t in (("log_u_img", log_u_img), ("log_u_txt", log_u_txt)):
        if t.dtype != torch.float32:
            _fail(TypeError, f"{name} must be float32 (log u state), got {t.dtype}")
        if t.dim() != 1:
            _fail(ValueError, f"{name} must be 1-D [num_samples], got shape {tuple(t.shape)}")
        if t.device != dev:
            _fail(ValueError, f"{name} is on {t.device} but img is on {dev}")
    if txt_index is None and log_u_txt.shape != log_u_img.shape:
        _fail(ValueError, f"log_u_txt has shape {tuple(log_u_txt.shape)} but log_u_img has {tuple(log_u_img.shape)}; "
                          "a text state of another length needs txt_index (the text anchors' own indices)")
    if isinstance(tau, torch.Tensor):
        if tau.dim() != 0:
            _fail(ValueError, f"tau must be a number or a 0-d tensor, got a tensor of shape {tuple(tau.shape)}")
        if not tau.dtype.is_floating_point:
            _fail(TypeError, f"tau must be a floating-point tensor, got {tau.dtype}")
        if tau.device != dev:
            _fail(ValueError, f"tau is on {tau.device} but img is on {dev}")
        tau_value = float(tau.detach())  # the kernels take tau as a number: one host sync on CUDA
    elif isinstance(tau, (int, float)) and not isinstance(tau, bool):
        tau_value = float(tau)
    else:
        _fail(TypeError, f"tau must be a number or a 0-d floating-point tensor, got {type(tau).__name__}")
    if not (math.isfinite(tau_value) and tau_value > 0):
        _fail(ValueError, f"tau must be a finite number > 0, got {tau_value}")
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho)):
        _fail(ValueError, f"rho must be a finite number, got {rho!r}")
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        _fail(ValueError, f"gamma must be in (0, 1], got {gamma}")
    if margin is not None and not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        _fail(ValueError, f"margin must be None (GCL) or a number >= 0, got {margin}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        _fail(ValueError, f"eps must be > 0, got {eps}")
    if validate:  # the checks below synchronise with the host
        checks = [("index", index if global_index is None else global_index, "num_samples", log_u_img)]
        if txt_index is not None:
            checks.append(("txt_index", txt_index if global_txt_index is None else global_txt_index,
                           "len(log_u_txt)", log_u_txt))
        for name, gi, what, state in checks:
            n = state.shape[0]
            lo, hi = int(gi.min()), int(gi.max())
            if lo < 0 or hi >= n:
                _fail(IndexError, f"{name} values must be in [0, {what}) = [0, {n}), got min {lo}, max {hi}")
    if check_finite:
        for name, t in (("img", img), ("txt", txt), ("all_img", all_img), ("all_txt", all_txt)):
            if t is not None and not bool(torch.isfinite(t).all()):
                _fail(ValueError, f"{name} contains NaN or inf")
    return tau_value


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def hgcl_loss(
    img: Tensor,
    txt: Tensor,
    index: Tensor,
    log_u_img: Tensor,
    log_u_txt: Tensor,
    *,
    tau: Union[float, Tensor],
    gamma: float,
    margin: Optional[float] = 0.1,
    eps: float = 1e-14,
    rho: float = 0.0,
    all_img: Optional[Tensor] = None,
    all_txt: Optional[Tensor] = None,
    offset: int = 0,
    group=None,
    backend: Optional[str] = None,
    check_finite: bool = False,
    validate: bool = True,
    update_state: bool = True,
    txt_index: Optional[Tensor] = None,
) -> Tensor:
    """Hinged (``margin`` given) or plain (``margin=None``) global contrastive loss, SPEC §1.

    For each local anchor ``i`` (global column ``offset + i``)::

        Phi1_i = 1/(B-1) sum_{j != i} exp(l(F_i.Gg_j - p_i) / tau)     image-anchored
        Phi2_i = 1/(B-1) sum_{j != i} exp(l(Fg_j.G_i - p_i) / tau)     text-anchored
        u[index_i] <- (1 - gamma) u[index_i] + gamma Phi_i             (Phi on a first visit)

    with ``l(x) = max(x + margin, 0)^2`` (HGCL) or ``l(x) = x`` (GCL), kept in
    the log domain.  Returns the float32 scalar
    ``F = tau/b * sum_i [log(eps + u1_i) + log(eps + u2_i)] + rho * tau`` (the tracked
    estimate of the objective, for logging; it can be negative) and updates
    ``log_u_img`` / ``log_u_txt`` in place.

    **Duplicate indices** (anchors of the batch sharing a dataset index; with
    ``group=`` the global batch, across ranks): they make *one* update of their
    entry with the mean of their ``Phi`` (in the log domain
    ``logsumexp(log Phi) - log k`` over the ``k`` of them), and all of them read
    that same updated ``u``.  The result does not depend on the anchors' order
    (a permuted batch gives the permuted result) and costs no host sync.

    **Stateless call** (``update_state=False``, for validation and for the 2nd..k-th
    loss call of a gradient-accumulation step): nothing is written; each anchor
    reads its entry's current ``u`` (an entry never visited reads the mean
    ``Phi`` a first visit would write).  Loss and gradient are those of the
    updating call whenever the state already holds the values that call writes.

    **Backward is the compositional estimator**
    ``tau/b * sum_i [grad Phi1_i/(eps + u1_i) + grad Phi2_i/(eps + u2_i)]`` with the
    updated ``u`` held constant - not the autograd of the returned scalar.

    **Learnable temperature** (FastCLIP-v3's RGCL-g, SPEC §1): when ``tau`` is a 0-d
    tensor that requires grad, it receives (through autograd, so ``tau = 1/logit_scale``
    or ``exp(-log_scale)`` chains to the parameter) the estimator of ``dF/dtau``::

        1/b sum_i [log(eps+u1_i) + log(eps+u2_i)] + rho
          - 1/(b tau) sum_i sum_{j != i} [w1_ij l(x_ij) + w2_ij l(x'_ij)]

    (``w`` the estimator weights, ``u`` at the updated values), from one more per-row
    reduction in the statistics sweeps and O(b) work after them (no extra pass over the
    ``b x B`` tiles).  A float ``tau`` (TuneCLIP's fixed temperature), or a tensor that
    does not require grad, runs the fixed-tau kernels unchanged (with ``rho = 0``: bit for
    bit the previous results).  The learned-tau sweep leaves ``log Phi`` bit for bit as well
    (CPU, torch, the Triton interpreter), except Triton fp32 on a GPU, whose ``lbar`` sweep
    uses a narrower tile (equal to rounding).  A tensor ``tau`` is read once as a number for the
    kernels: one host sync on CUDA (and a graph break under ``torch.compile``).  Under
    ``group=`` each rank's ``tau`` gradient is the mean over its *local* anchors, so
    DDP's gradient averaging gives the global-batch gradient - the same end result as the
    feature gradients (see :class:`GlobalContrastiveLoss`), with no ``world_size`` factor
    on ``tau`` itself (``tau`` is shared, not per rank).

    **Scale** (porting hyper-parameters; SPEC §1): the two directions are *summed*, so
    the feature gradient is 2x FastCLIP-v3's (which averages them) and ``2 tau`` x that of
    open_clip's ``ClipLoss`` / FastCLIP-v1 at ``logit_scale = 1/tau`` (exact for GCL,
    ``gamma = 1``, ``eps = 1/(B-1)``).  To reproduce a recipe tuned on ``ClipLoss`` with
    an SGD-type step, divide its learning rate (and gradient-clip threshold) by
    ``2 tau``; for FastCLIP-v3 divide by 2 and use ``rho = 2 * rho_FastCLIP``
    (FastCLIP's objective is ``tau * (mean(log u1 + log u2)/2 + rho)``, default
    ``rho = 8``: ours is twice it).  Adam-type optimisers are invariant to the scale
    (up to their ``eps``); clip thresholds are not.

    Args:
        img, txt: L2-normalised local features ``[b, d]`` (float32/bfloat16/float16,
            fp32 accumulation).
        index: ``[b]`` int64 dataset indices of the anchors.  Duplicates are
            allowed (see above).
        log_u_img, log_u_txt: float32 ``[num_samples]`` state, ``-inf`` = never visited.
        tau: temperature > 0: a number, or a 0-d floating-point tensor on the features'
            device (learned when it requires grad).  gamma: moving-average rate in (0, 1].
        margin: hinge margin >= 0, or ``None`` for GCL.  eps: > 0.
        rho: the RGCL-g temperature regulariser (``+ rho * tau``; a KL radius: at the
            optimum in ``tau`` the summed KL divergences of the two directions' weights from
            uniform equal ``rho``, so it must stay below ``2 log(B-1)``).  Default 0.
        all_img, all_txt: global column sets ``[B, d]`` (all ranks' features) whose
            rows ``offset .. offset+b`` are ``img``/``txt``; gradients w.r.t. them are
            returned through autograd (route them back to their owners).
        group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks): the op gathers every rank's ``img``/``txt``/``index``
            itself (``offset = rank * b``; every rank passes the same ``b``) and
            every rank applies the same update to the state of all global
            anchors.  Exclusive with ``all_img``/``all_txt``/``offset``.
        backend: ``"cpu"``, ``"triton"`` or ``"torch"`` (default: by device, see
            :mod:`vlmkern.backends`).
        check_finite: raise if a feature tensor holds NaN/inf (one host sync).
            Without it the rule is (every backend, no host sync): NaN/inf in any
            feature (or a NaN / +inf state entry of the batch) leaves
            ``log_u_img`` / ``log_u_txt`` bit for bit unchanged and returns a NaN
            loss whose backward gives NaN in every gradient entry, so
            ``GradScaler`` (or any finiteness check) skips the step.  A batch
            with fewer than 2 columns (``B < 2``: no negatives) is a
            ``ValueError``.
        validate: check that ``index`` is in ``[0, len(log_u_img))`` and ``txt_index`` in
            ``[0, len(log_u_txt))`` (one host sync); ``False`` skips it (e.g. inside
            ``torch.compile(fullgraph=True)`` or CUDA graphs).
        update_state: ``False`` for the stateless call (see above).
        txt_index: ``[b]`` indices of the text anchors into ``log_u_txt`` when they are
            not ``index`` (multi-caption sets: one state entry per caption, image
            anchors indexed by image); ``log_u_txt`` may then have its own length.
            Default: ``index`` (and ``log_u_txt`` as long as ``log_u_img``).
    """
    global_index = index
    global_txt_index = txt_index
    if group is not None:
        if all_img is not None or all_txt is not None or offset != 0:
            _fail(ValueError, "give group (the op gathers every rank's batch) or all_img/all_txt/offset, not both")
        all_img, all_txt, global_index, offset = _gather_batch(img, txt, index, group)
        if isinstance(txt_index, torch.Tensor):
            global_txt_index = _all_gather(txt_index.long(), group)
    tau_f = _check_args(img, txt, index, log_u_img, log_u_txt, tau, gamma, margin, eps, all_img, all_txt, offset,
                        check_finite, validate, global_index, rho, txt_index, global_txt_index)
    learn_tau = isinstance(tau, torch.Tensor) and tau.requires_grad and torch.is_grad_enabled()
    name = _choose(str(img.device), backend)
    hinge = margin is not None
    m = float(margin) if hinge else 0.0
    b = img.shape[0]
    # fp32 accumulation is the op's own business: an enclosing autocast region must not
    # re-type the matmuls inside the kernels (the CPU kernel's BLAS tiles)
    with torch.no_grad(), torch.autocast(img.device.type, enabled=False):
        # learn_tau: the stats sweeps also form lbar (one more per-row reduction)
        lphi1, lphi2, lbar1, lbar2 = _stats(name, img.detach(), txt.detach(),
                                            None if all_img is None else all_img.detach(),
                                            None if all_txt is None else all_txt.detach(),
                                            int(offset), tau_f, m, hinge, learn_tau)
        own1, own2 = lphi1, lphi2  # this rank's anchors
        if group is None:
            bad = _nonfinite_features(img, txt, all_img, all_txt)
        else:  # every rank updates the state of all global anchors and takes the same decision
            lphi1, lphi2 = _all_gather(lphi1, group), _all_gather(lphi2, group)
            bad = _nonfinite_features(all_img, all_txt)
        ld1, ld2 = _guarded_state_update(name, log_u_img, log_u_txt, global_index.long(), lphi1, lphi2,
                                         float(gamma), float(eps), bad, bool(update_state),
                                         None if global_txt_index is None else global_txt_index.long())
        if group is not None:
            ld1, ld2 = ld1[offset:offset + b].contiguous(), ld2[offset:offset + b].contiguous()
    loss = _loss_core(img, txt, all_img, all_txt, ld1, ld2, int(offset), tau_f, m, hinge, name)
    if learn_tau:
        return loss + _tau_term(tau, ld1, ld2, own1, own2, lbar1, lbar2, float(rho))
    if rho != 0.0:
        return loss + float(rho) * tau_f
    return loss


def _tau_term(tau: Tensor, ld1: Tensor, ld2: Tensor, lphi1: Tensor, lphi2: Tensor, lbar1: Tensor,
              lbar2: Tensor, rho: float) -> Tensor:
    """``rho * tau`` in value, and in ``tau`` the derivative of SPEC §1 "Learnable temperature"::

        dF/dtau = 1/b sum_i (ld1_i + ld2_i) + rho - 1/(b tau) sum_i sum_{j != i} (w1_ij l(x_ij) + w2_ij l(x'_ij))
        sum_j w_ij l_ij = exp(log Phi_i - ld_i) * lbar_i

    (the core op's value ``tau/b sum(ld1 + ld2)`` carries no ``tau`` gradient: it takes
    ``tau`` as a number).  Written as ``rho t + (t - t.detach()) A - C (log t - log t.detach())``:
    the added zeros are exact, so the returned scalar is unchanged, and autograd (or
    ``torch.compile``) differentiates it to ``A + rho - C / t``.  O(b) work; NaN ``ld`` (bad
    input) makes the ``tau`` gradient NaN, like every feature gradient."""
    b = ld1.shape[0]
    with torch.no_grad():
        a = (ld1 + ld2).sum() / b
        c = (torch.exp(lphi1 - ld1) * lbar1 + torch.exp(lphi2 - ld2) * lbar2).sum() / b
    t = tau.float()
    log_t = torch.log(t)
    return rho * t + (t - t.detach()) * a - c * (log_t - log_t.detach())


def _all_gather(t: Tensor, group) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 (no gradient)."""
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out, 0)


def _gather_batch(img: Tensor, txt: Tensor, index: Tensor, group):
    """``(all_img, all_txt, global_index, offset)`` over the ranks of ``group``.

    The features are gathered with ``torch.distributed.nn.functional.all_gather``,
    whose backward sums every rank's gradient into the owner's features."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    all_img = torch.cat(dist_nn.all_gather(img, group=group), 0)
    all_txt = torch.cat(dist_nn.all_gather(txt, group=group), 0)
    return all_img, all_txt, _all_gather(index.long(), group), dist.get_rank(group) * img.shape[0]


class GlobalContrastiveLoss(torch.nn.Module):
    """HGCL / GCL with its per-sample state as buffers (``state_dict`` saves it).

    ``forward(img, txt, index)`` returns this rank's loss, the mean over its
    local anchors (like open_clip's ``ClipLoss``), and updates the state;
    ``forward(img, txt, index, update_state=False)`` is the stateless call (reads
    ``u``, writes nothing: validation, the repeated calls of gradient accumulation).
    ``num_txt_samples`` (default ``num_samples``) sizes the text anchors' state, indexed
    by ``forward(..., txt_index=)`` (multi-caption sets: one entry per caption).

    Under ``torch.distributed`` (initialised, world size > 1) it calls
    :func:`hgcl_loss` with ``group=process_group`` (default: all ranks), so the
    state stays identical on all ranks.  Every rank must pass the same batch
    size ``b``.  Gradient convention: each rank's feature gradient is
    ``world_size`` times the gradient of the single-process loss over the
    concatenated batch, so DDP's gradient *averaging* yields exactly the
    global-batch parameter gradient.

    ``gamma`` is settable between steps (e.g. FastCLIP's cosine schedule, SPEC §1, which the
    TuneCLIP trainer sets every epoch).  ``margin=None`` gives GCL.

    Temperature: ``tau`` (the constructor's) is fixed, as in TuneCLIP.  To learn it, pass
    it to ``forward``: ``tau=`` a 0-d tensor (e.g. ``log_tau.exp()`` of your own
    parameter) or ``logit_scale=`` in open_clip's convention (the multiplier the model's
    forward returns, ``model.logit_scale.exp()``, 0-d or ``[1]``; ``tau = 1/logit_scale``).
    A tensor that requires grad receives ``dF/dtau`` (see :func:`hgcl_loss`); the returned
    loss includes ``rho * tau`` (``rho``: FastCLIP-v3's regulariser in our scale, twice
    FastCLIP's value; default 0, which leaves the fixed-tau loss as it was).  Under ``torch.distributed`` each rank's
    temperature gradient covers its local anchors, so DDP's averaging gives the
    global-batch gradient (like the feature gradients, without the ``world_size`` factor:
    the temperature is one shared parameter).

    **State in host memory** (``state_on_host=True``): ``log_u_img`` / ``log_u_txt`` stay in
    host memory (pinned when a CUDA runtime is present and ``pin_memory``), so the features'
    device holds none of the ``8 N`` bytes (3.2 GB per GPU at N = 400M).  Each call gathers the
    batch's distinct entries on the host into (pinned) staging, copies them to the features'
    device (``non_blocking``), runs :func:`hgcl_loss` on that batch-local state with the
    anchors' positions among the sorted distinct indices (a monotone relabelling: duplicates,
    the bad-input rule, the stateless call and ``txt_index`` behave exactly as on the device,
    and the loss, gradients and state are bit-identical), then copies the updated entries back
    on a side CUDA stream into pinned memory with a recorded event, so the copy overlaps the
    backward pass.  They are scattered into the host state by the next call, by
    ``state_dict()`` / ``load_state_dict()``, on reading ``log_u_img`` / ``log_u_txt``, or by
    :meth:`flush`.  Give the loader's CPU ``index`` (and ``txt_index``): a CUDA index costs a
    device-to-host copy, one host sync per call.  With features on the CPU it is the same code
    with plain copies.  ``.to(device)`` / ``.cuda()`` / ``.half()`` leave the state where and
    as it is (float32 on the host); ``state_dict`` holds the same keys and values as the
    on-device mode, so checkpoints load into either mode.  Under ``torch.distributed`` every
    rank holds the whole host state: the indices are gathered first (one more all-gather,
    on the features' device for NCCL, then a device-to-host copy) and every rank applies the
    same update.  Cost: O(b log b) host work per call (``unique``, gather, scatter), four
    small host-to-device copies (the local state and indices, O(b) bytes each) and two back;
    the device-memory saving is ``8 N`` bytes (``python -m vlmkern.app.bench.hgcl_state``;
    on the CPU the host work is 0.1-0.3 ms a step at B = 256-1024, bench/RESULTS_hgcl.md).
    The CUDA path (pinned staging, side-stream write-back) has not yet run on a GPU.
    """

    def __init__(self, num_samples: int, tau: float, gamma: float, margin: Optional[float] = 0.1,
                 eps: float = 1e-14, backend: Optional[str] = None, validate: bool = True, process_group=None,
                 rho: float = 0.0, num_txt_samples: Optional[int] = None, state_on_host: bool = False,
                 pin_memory: bool = True):
        super().__init__()
        num_txt = num_samples if num_txt_samples is None else num_txt_samples
        for name, n in (("num_samples", num_samples), ("num_txt_samples", num_txt)):
            if int(n) <= 0:
                raise ValueError(f"vlmkern.GlobalContrastiveLoss: {name} must be > 0, got {n}")
        if not isinstance(state_on_host, bool):
            raise TypeError(f"vlmkern.GlobalContrastiveLoss: state_on_host must be a bool, got {state_on_host!r}")
        self.state_on_host = state_on_host
        # pinned only where it helps (a CUDA runtime is present) and the state is on the host
        pin = bool(pin_memory) and state_on_host and torch.cuda.is_available()
        self._pending = None  # host mode: the last call's write-back not yet scattered into the state
        self._copy_stream = None
        for name, n in (("log_u_img", num_samples), ("log_u_txt", num_txt)):
            self.register_buffer(name, torch.empty((int(n),), dtype=torch.float32, pin_memory=pin).fill_(-math.inf))
        self.tau = float(tau)
        self.gamma = gamma
        self.margin = margin
        self.eps = float(eps)
        self.backend = backend
        self.validate = validate
        self.process_group = process_group
        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and math.isfinite(rho)):
            raise ValueError(f"vlmkern.GlobalContrastiveLoss: rho must be a finite number, got {rho!r}")
        self.rho = float(rho)

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not (0.0 < float(value) <= 1.0):
            raise ValueError(f"vlmkern.GlobalContrastiveLoss: gamma must be in (0, 1], got {value}")
        self._gamma = float(value)

    def extra_repr(self) -> str:
        txt = "" if self.log_u_txt.shape == self.log_u_img.shape else f"num_txt_samples={self.log_u_txt.shape[0]}, "
        return (f"num_samples={self.log_u_img.shape[0]}, {txt}tau={self.tau}, gamma={self.gamma}, "
                f"margin={self.margin}, eps={self.eps}, rho={self.rho}")

    def forward(self, img: Tensor, txt: Tensor, index: Tensor, update_state: bool = True,
                txt_index: Optional[Tensor] = None, *, tau: Union[float, Tensor, None] = None,
                logit_scale: Union[float, Tensor, None] = None) -> Tensor:
        """The loss of this batch; ``update_state=False`` is the stateless call and ``txt_index``
        the text anchors' own indices (see :func:`hgcl_loss`); ``tau`` / ``logit_scale`` (at
        most one) override the fixed ``self.tau`` for this call (see the class docstring)."""
        if tau is not None and logit_scale is not None:
            raise ValueError("vlmkern.GlobalContrastiveLoss: give tau or logit_scale, not both")
        if logit_scale is not None:
            if isinstance(logit_scale, torch.Tensor):
                if logit_scale.numel() != 1:
                    raise ValueError("vlmkern.GlobalContrastiveLoss: logit_scale must hold one value (0-d or [1]), "
                                     f"got shape {tuple(logit_scale.shape)}")
                tau = 1.0 / logit_scale.reshape(())
            else:
                if not float(logit_scale) > 0:
                    raise ValueError(f"vlmkern.GlobalContrastiveLoss: logit_scale must be > 0, got {logit_scale}")
                tau = 1.0 / float(logit_scale)
        elif tau is None:
            tau = self.tau
        dist = torch.distributed
        group = None
        if dist.is_available() and dist.is_initialized():
            g = self.process_group if self.process_group is not None else dist.group.WORLD
            group = g if dist.get_world_size(g) > 1 else None
        kw = dict(tau=tau, gamma=self.gamma, margin=self.margin, eps=self.eps, rho=self.rho, group=group,
                  backend=self.backend, validate=self.validate, update_state=update_state)
        if self.state_on_host:
            return self._forward_host(img, txt, index, txt_index, group, kw)
        return hgcl_loss(img, txt, index, self.log_u_img, self.log_u_txt, txt_index=txt_index, **kw)

    # ------------------------------------------------------------------
    # host-memory state (state_on_host=True)
    # ------------------------------------------------------------------

    def __getattr__(self, name: str):
        # reading the state (log_u_img / log_u_txt) first applies a pending write-back
        if name in ("log_u_img", "log_u_txt") and self.__dict__.get("_pending") is not None:
            self.flush()
        return super().__getattr__(name)

    def flush(self) -> None:
        """Host mode: wait for the last call's device-to-host copy of the updated entries and
        scatter them into ``log_u_img`` / ``log_u_txt``.  Called by the next ``forward``, by
        ``state_dict`` / ``load_state_dict`` and on reading either attribute; a no-op otherwise."""
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        self._pending = None
        event, writes = pending
        if event is not None:
            event.synchronize()
        buffers = self._buffers
        for key, uniq, values in writes:
            buffers[key].index_copy_(0, uniq, values)

    def _host_index(self, t: Tensor, name: str, n: int) -> Tensor:
        """``t`` as an int64 CPU tensor, range-checked against the state length ``n``."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vlmkern.GlobalContrastiveLoss: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"vlmkern.GlobalContrastiveLoss: {name} must be int64 (or int32), got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"vlmkern.GlobalContrastiveLoss: {name} must be 1-D, got shape {tuple(t.shape)}")
        h = t.detach().to("cpu", torch.int64)  # a CUDA index: one device-to-host copy (a host sync)
        if self.validate and h.numel() and (int(h.min()) < 0 or int(h.max()) >= n):
            raise IndexError(f"vlmkern.GlobalContrastiveLoss: {name} must be in [0, {n}) (the state length), "
                             f"got values in [{int(h.min())}, {int(h.max())}]")
        return h

    def _to_device(self, t: Tensor, device: torch.device) -> Tensor:
        """Host ``t`` on ``device``: through pinned memory and an asynchronous copy on CUDA."""
        if device.type == "cpu":
            return t
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    def _forward_host(self, img: Tensor, txt: Tensor, index: Tensor, txt_index: Optional[Tensor], group,
                      kw: dict) -> Tensor:
        """One call with the state in host memory: gather the batch's distinct entries into a
        batch-local state on the features' device, run :func:`hgcl_loss` on it with local indices
        (the sorted order of the distinct indices, so duplicates and every rule are unchanged),
        and start the copy of the updated entries back to the host."""
        self.flush()
        lu_img, lu_txt, loc_index, loc_txt, writes = self._gather_local(img, index, txt_index, group)
        # the local indices are in range by construction (the global ones were checked on the host,
        # without a device sync): the op's own range check (a host sync on CUDA) is skipped
        kw = dict(kw, validate=False)
        loss = hgcl_loss(img, txt, loc_index, lu_img, lu_txt, txt_index=loc_txt, **kw)
        if kw["update_state"]:
            self._start_write_back(writes, dev=img.device)
        return loss

    def _gather_local(self, img: Tensor, index: Tensor, txt_index: Optional[Tensor], group):
        """``(log_u_img, log_u_txt, index, txt_index, writes)`` of the batch-local state on the
        features' device; ``writes`` = ``[(buffer name, distinct indices, local state)]`` for
        :meth:`_start_write_back`."""
        if not isinstance(img, torch.Tensor) or img.dim() != 2:
            raise ValueError("vlmkern.GlobalContrastiveLoss: img must be a 2-D [b, d] Tensor")
        dev, b = img.device, img.shape[0]
        n_img, n_txt = self._buffers["log_u_img"].shape[0], self._buffers["log_u_txt"].shape[0]
        if txt_index is None and n_txt != n_img:
            raise ValueError(f"vlmkern.GlobalContrastiveLoss: log_u_txt has {n_txt} entries but log_u_img has "
                             f"{n_img}; a text state of another length needs txt_index (the text anchors' own "
                             "indices)")
        idx = {"index": index} if txt_index is None else {"index": index, "txt_index": txt_index}
        for name, t in idx.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"vlmkern.GlobalContrastiveLoss: {name} must be a Tensor, got {type(t).__name__}")
            if t.shape != (b,):
                raise ValueError(f"vlmkern.GlobalContrastiveLoss: {name} must be 1-D of length b = {b}, "
                                 f"got shape {tuple(t.shape)}")
        rank_slice = slice(None)
        if group is not None:  # every rank holds the whole state: gather the indices, same update everywhere
            import torch.distributed as dist

            r = dist.get_rank(group)
            rank_slice = slice(r * b, (r + 1) * b)
            comm_dev = torch.device("cpu") if dist.get_backend(group) == "gloo" else dev
            idx = {name: _all_gather(t.detach().to(comm_dev, torch.int64), group) for name, t in idx.items()}
        # distinct (sorted) indices and each anchor's position among them: a monotone relabelling,
        # so the op sorts, averages duplicates and updates exactly as with the global indices
        host = {name: self._host_index(t, name, n_img if name == "index" else n_txt) for name, t in idx.items()}
        uniq, inv = {}, {}
        for name, h in host.items():
            uniq[name], inv[name] = torch.unique(h, sorted=True, return_inverse=True)
        txt_name = "index" if txt_index is None else "txt_index"
        local = {}
        for key, name in (("log_u_img", "index"), ("log_u_txt", txt_name)):
            state = self._buffers[key]
            staged = torch.empty(uniq[name].shape, dtype=torch.float32, pin_memory=state.is_pinned())
            torch.index_select(state, 0, uniq[name], out=staged)  # host gather into (pinned) staging
            local[key] = self._to_device(staged, dev)
        loc_index = self._to_device(inv["index"][rank_slice].contiguous(), dev)
        loc_txt = None if txt_index is None else self._to_device(inv["txt_index"][rank_slice].contiguous(), dev)
        writes = [("log_u_img", uniq["index"], local["log_u_img"]), ("log_u_txt", uniq[txt_name], local["log_u_txt"])]
        return local["log_u_img"], local["log_u_txt"], loc_index, loc_txt, writes

    def _start_write_back(self, writes, dev: torch.device) -> None:
        """Copy the updated local entries to the host: on CUDA asynchronously (a side stream
        that waits for the update, into pinned memory, with a recorded event), so the copy
        overlaps the backward pass; scattered into the state by :meth:`flush`."""
        if dev.type != "cuda":
            self._pending = (None, [(key, uniq, lu) for key, uniq, lu in writes])
            return
        if self._copy_stream is None or self._copy_stream.device != dev:
            self._copy_stream = torch.cuda.Stream(device=dev)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(dev))
        out = []
        with torch.cuda.stream(stream):
            for key, uniq, lu in writes:
                host = torch.empty(lu.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(lu, non_blocking=True)
                lu.record_stream(stream)
                out.append((key, uniq, host))
            event = torch.cuda.Event()
            event.record(stream)
        self._pending = (event, out)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .half(): the host state stays where it is (pinned, float32)
        if not self.__dict__.get("state_on_host", False):
            return super()._apply(fn, recurse)
        self.flush()
        kept = {k: self._buffers.pop(k) for k in ("log_u_img", "log_u_txt")}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.flush()  # a pending write-back must not land on top of the loaded state
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
