"""Triton kernels of the hinged / plain global contrastive loss (SPEC §1).

No kernel ever holds the ``b x B`` similarity matrix: every sweep recomputes
``[BLOCK_M, BLOCK_N]`` similarity tiles with ``tl.dot`` over a K-loop on ``d``
and reduces them on the fly (memory O(B d)).  Generic form: anchors ``A``
``[M, d]`` against columns ``C`` ``[N, d]`` with positives ``p`` ``[M]``; the
column ``offset + i`` is anchor ``i``'s own pair and is excluded.

* :func:`_stats_kernel` (row grid): ``log Phi_i = logsumexp_{j != i} l(s_ij - p_i)/tau - log(N-1)``
  with a running max (online log-sum-exp).  Run twice: ``(F, Gg)`` gives the
  image-anchored term, ``(G, Fg)`` the text-anchored one ("column sweep").
* :func:`_row_grad_kernel` (row grid, dF/dG sweep): forms the ``dS`` tile
  ``w_ij l'(x_ij)`` with ``w_ij = exp(z_ij - logden_i)/(N-1)`` and accumulates
  ``dS @ C`` and the row sums (the positive-pair term).
* :func:`_col_grad_kernel` (column grid): accumulates ``dS^T @ A``, the
  gradient of the column set.

Cost per call: stats 4 B^2 d FLOPs, gradient 4 sweeps x (1 + ceil(d / BLOCK_DO))
x 2 B^2 d (with ``d <= BLOCK_DO``: 16 B^2 d).  The one-process case could share
one similarity tile between the two directions (s'_ij = s_ji: 12 B^2 d in all,
SPEC's figure; the CPU kernel shares tiles and needs 8 B^2 d); these kernels
do not yet: 20 B^2 d for d <= BLOCK_DO.  Block sizes for the GPU are
untuned defaults: no GPU was available when they were written.

All accumulation is fp32 for fp32 / bf16 / fp16 inputs (fp32 ``tl.dot`` in
IEEE precision, not TF32; see :func:`_ieee` for an interpreter workaround).
The ops ``vlmkern::hgcl_stats_triton`` and ``vlmkern::hgcl_grad_triton`` are
registered with ``torch.library.triton_op`` so they trace into ``torch.compile`` graphs.  This module imports without a
GPU; on CPU tensors it runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

NEG_INF = float("-inf")


@triton.jit
def _surrogate(x, HINGE: tl.constexpr, margin):
    if HINGE:
        h = tl.maximum(x + margin, 0.0)
        return h * h
    else:
        return x


@triton.jit
def _surrogate_grad(x, HINGE: tl.constexpr, margin):
    if HINGE:
        return 2.0 * tl.maximum(x + margin, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def _sim_tile(A, C, offs_m, offs_n, M, N, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """s[m, n] = A[m] . C[n] for a [BLOCK_M, BLOCK_N] tile, fp32 accumulation (rows contiguous)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        a = tl.load(A + offs_m[:, None].to(tl.int64) * D + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        c = tl.load(C + offs_n[None, :].to(tl.int64) * D + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & kmask[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, c, acc)
    return acc


@triton.jit
def _stats_kernel(A, C, P, OUT, M, N, D, offset, inv_tau, margin, log_nm1,
                  HINGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m < M
    p = tl.load(P + offs_m, mask=mrow, other=0.0)
    run_max = tl.full([BLOCK_M], NEG_INF, tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _sim_tile(A, C, offs_m, offs_n, M, N, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        z = _surrogate(s - p[:, None], HINGE, margin) * inv_tau
        valid = (offs_n[None, :] < N) & (offs_n[None, :] != offs_m[:, None] + offset)
        z = tl.where(valid, z, NEG_INF)
        new_max = tl.maximum(run_max, tl.max(z, 1))
        safe = tl.where(new_max == NEG_INF, 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(z - safe[:, None]), 1)
        run_max = new_max
    empty = run_max == NEG_INF  # B = 1: no negatives, log Phi = -inf
    out = tl.where(empty, NEG_INF, run_max + tl.log(tl.where(empty, 1.0, run_sum)) - log_nm1)
    tl.store(OUT + offs_m, out, mask=mrow)


@triton.jit
def _dsim(s, p, ld, valid, inv_tau, margin, inv_nm1, HINGE: tl.constexpr):
    """w * l'(x), zero outside `valid`; w = exp(z - logden) / (N - 1) <= 1 / gamma."""
    x = s - p
    z = _surrogate(x, HINGE, margin) * inv_tau
    e = tl.exp(tl.where(valid, z - ld, NEG_INF))
    return e * inv_nm1 * _surrogate_grad(x, HINGE, margin)


@triton.jit
def _row_grad_kernel(A, C, P, LD, SCALE, GA, RSUM, M, N, D, offset, inv_tau, margin, inv_nm1,
                     HINGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m < M
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = offs_do < D
    p = tl.load(P + offs_m, mask=mrow, other=0.0)
    ld = tl.load(LD + offs_m, mask=mrow, other=float("inf"))
    scale = tl.load(SCALE)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    rsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _sim_tile(A, C, offs_m, offs_n, M, N, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        valid = mrow[:, None] & (offs_n[None, :] < N) & (offs_n[None, :] != offs_m[:, None] + offset)
        ds = _dsim(s, p[:, None], ld[:, None], valid, inv_tau, margin, inv_nm1, HINGE)
        rsum += tl.sum(ds, 1)
        c = tl.load(C + offs_n[:, None].to(tl.int64) * D + offs_do[None, :],
                    mask=(offs_n[:, None] < N) & dmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(ds, c.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(ds.to(c.dtype), c, acc)
    out = acc * scale
    tl.store(GA + offs_m[:, None].to(tl.int64) * D + offs_do[None, :],
             out.to(GA.dtype.element_ty), mask=mrow[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(RSUM + offs_m, rsum * scale, mask=mrow)


@triton.jit
def _col_grad_kernel(A, C, P, LD, SCALE, GC, M, N, D, offset, inv_tau, margin, inv_nm1,
                     HINGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ncol = offs_n < N
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = offs_do < D
    scale = tl.load(SCALE)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mrow = offs_m < M
        p = tl.load(P + offs_m, mask=mrow, other=0.0)
        ld = tl.load(LD + offs_m, mask=mrow, other=float("inf"))
        s = _sim_tile(A, C, offs_m, offs_n, M, N, D, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        valid = mrow[:, None] & ncol[None, :] & (offs_n[None, :] != offs_m[:, None] + offset)
        ds = _dsim(s, p[:, None], ld[:, None], valid, inv_tau, margin, inv_nm1, HINGE)
        a = tl.load(A + offs_m[:, None].to(tl.int64) * D + offs_do[None, :],
                    mask=mrow[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(ds), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(ds.to(a.dtype)), a, acc)
    out = acc * scale
    tl.store(GC + offs_n[:, None].to(tl.int64) * D + offs_do[None, :],
             out.to(GC.dtype.element_ty), mask=ncol[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 operands and IEEE fp32 ``tl.dot`` (no TF32) for fp32 inputs.  bf16 /
    fp16 use the native tensor-core dot with fp32 accumulation, except bf16 under
    the interpreter: triton 3.8's interpreter computes ``tl.dot`` on bf16 operands
    wrongly (garbage of order 1e10), so there the operands are upcast first."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpret())


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _config(device: torch.device, d: int) -> dict:
    """Block sizes.  The interpreter (CPU tensors) prefers few, large numpy
    blocks; the GPU numbers are a reasonable default, not tuned on hardware."""
    if device.type != "cuda" or _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=_pow2(d, 16, 64), BLOCK_DO=_pow2(d, 16, 64))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_DO=_pow2(d, 16, 256), num_warps=8)


def _columns(img, txt, all_img, all_txt):
    if (all_img is None) != (all_txt is None):
        raise ValueError("vlmkern.hgcl: give both all_img and all_txt or neither")
    if all_img is None:
        return img, txt
    return all_img.contiguous(), all_txt.contiguous()


def _launch_stats(A, C, p, out, offset, tau, margin, hinge):
    M, D = A.shape
    N = C.shape[0]
    cfg = _config(A.device, D)
    nw = cfg.pop("num_warps", 4)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    log_nm1 = math.log(N - 1) if N > 1 else 0.0
    wrap_triton(_stats_kernel)[grid](
        A, C, p, out, M, N, D, offset, 1.0 / tau, margin, log_nm1,
        HINGE=hinge, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        IEEE=_ieee(A.dtype), num_warps=nw,
    )


@triton_op("vlmkern::hgcl_stats_triton", mutates_args=())
def hgcl_stats_triton(
    img: torch.Tensor, txt: torch.Tensor, all_img: Optional[torch.Tensor], all_txt: Optional[torch.Tensor],
    offset: int, tau: float, margin: float, hinge: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton ``hgcl_stats``: ``(log Phi1, log Phi2)`` float32 ``[b]`` (same contract as the C++ op)."""
    img = img.contiguous()
    txt = txt.contiguous()
    Fg, Gg = _columns(img, txt, all_img, all_txt)
    b = img.shape[0]
    p = (img.float() * txt.float()).sum(1)
    lphi1 = torch.empty(b, dtype=torch.float32, device=img.device)
    lphi2 = torch.empty(b, dtype=torch.float32, device=img.device)
    if b > 0:
        _launch_stats(img, Gg, p, lphi1, offset, tau, margin, hinge)
        _launch_stats(txt, Fg, p, lphi2, offset, tau, margin, hinge)
    return lphi1, lphi2


@hgcl_stats_triton.register_fake
def _(img, txt, all_img, all_txt, offset, tau, margin, hinge):
    b = img.shape[0]
    return img.new_empty((b,), dtype=torch.float32), img.new_empty((b,), dtype=torch.float32)


@triton_op("vlmkern::hgcl_grad_triton", mutates_args=())
def hgcl_grad_triton(
    img: torch.Tensor, txt: torch.Tensor, all_img: Optional[torch.Tensor], all_txt: Optional[torch.Tensor],
    logden_img: torch.Tensor, logden_txt: torch.Tensor, grad_out: torch.Tensor,
    offset: int, tau: float, margin: float, hinge: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``hgcl_grad`` (same contract as the C++ op: with ``all_img = None``
    the column terms are folded into ``grad_img``/``grad_txt`` and the last two
    outputs are empty ``[0, d]``)."""
    img = img.contiguous()
    txt = txt.contiguous()
    local = all_img is None
    Fg, Gg = _columns(img, txt, all_img, all_txt)
    b, D = img.shape
    B = Fg.shape[0]
    dev = img.device
    p = (img.float() * txt.float()).sum(1)
    scale = (grad_out.reshape(()).to(torch.float32) / max(b, 1)).reshape(1).contiguous()
    ld1 = logden_img.contiguous().float()
    ld2 = logden_txt.contiguous().float()
    f32 = dict(dtype=torch.float32, device=dev)  # fp32 accumulators, cast once at the end
    gF = torch.empty((b, D), **f32)
    gG = torch.empty((b, D), **f32)
    gGg = torch.empty((B, D), **f32)
    gFg = torch.empty((B, D), **f32)
    r1 = torch.empty(b, dtype=torch.float32, device=dev)
    r2 = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0 or B < 2:
        gF.zero_(), gG.zero_(), gFg.zero_(), gGg.zero_()
    else:
        cfg = _config(dev, D)
        nw = cfg.pop("num_warps", 4)
        common = dict(HINGE=hinge, IEEE=_ieee(img.dtype), num_warps=nw, **cfg)
        inv_tau, inv_nm1 = 1.0 / tau, 1.0 / (B - 1)
        grid_r = (triton.cdiv(b, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_DO"]))
        grid_c = (triton.cdiv(B, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_DO"]))
        # image anchors F vs text columns Gg: dF (rows), dGg (columns)
        wrap_triton(_row_grad_kernel)[grid_r](img, Gg, p, ld1, scale, gF, r1, b, B, D, offset,
                                              inv_tau, margin, inv_nm1, **common)
        wrap_triton(_col_grad_kernel)[grid_c](img, Gg, p, ld1, scale, gGg, b, B, D, offset,
                                              inv_tau, margin, inv_nm1, **common)
        # text anchors G vs image columns Fg: dG (rows), dFg (columns)
        wrap_triton(_row_grad_kernel)[grid_r](txt, Fg, p, ld2, scale, gG, r2, b, B, D, offset,
                                              inv_tau, margin, inv_nm1, **common)
        wrap_triton(_col_grad_kernel)[grid_c](txt, Fg, p, ld2, scale, gFg, b, B, D, offset,
                                              inv_tau, margin, inv_nm1, **common)
        # positive pairs p_i = F_i . G_i: dL/dp_i = -(r1_i + r2_i)
        dp = -(r1 + r2)[:, None]
        gF = gF + dp * txt.float()
        gG = gG + dp * img.float()
    if local:
        gF = gF + gFg
        gG = gG + gGg
        gFg = gFg[:0]
        gGg = gGg[:0]
    dt = img.dtype
    return gF.to(dt), gG.to(dt), gFg.to(dt).clone(), gGg.to(dt).clone()


@hgcl_grad_triton.register_fake
def _(img, txt, all_img, all_txt, logden_img, logden_txt, grad_out, offset, tau, margin, hinge):
    b, d = img.shape
    B = 0 if all_img is None else all_img.shape[0]
    return (img.new_empty((b, d)), txt.new_empty((b, d)), img.new_empty((B, d)), img.new_empty((B, d)))
