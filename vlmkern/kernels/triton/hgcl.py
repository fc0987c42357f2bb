"""Triton kernels of the hinged / plain global contrastive loss (SPEC §1).

No kernel ever holds the ``b x B`` similarity matrix: every sweep recomputes
similarity tiles with ``tl.dot`` over a K-loop on ``d`` and reduces them on the
fly (memory O(B d)).  Two kernels, each written for an *owned* index set (the
program's rows) against a *looped* set:

* :func:`_lse_kernel` (the statistics; "row sweep" and "column sweep")::

      log Phi_o = logsumexp_{l != o} l(X_o . Y_l - p_o) / tau - log(N - 1)

  with a running max (online log-sum-exp).  Launched for ``(X, Y) = (F, Gg)``
  (image anchors, ``log Phi1``) and ``(G, Fg)`` (text anchors, ``log Phi2``).
  ``LMEAN`` (a learnable tau) adds one running sum, ``sum_l exp(z_ol - max) l_ol``,
  and stores ``lbar_o`` = that / the log-sum-exp's sum (SPEC §1 "Learnable temperature").

* :func:`_grad_kernel` (the gradient sweeps): forms the tile
  ``t_ol = X_o . Y_l`` once, then the tile of ``dL/dt``::

      dS_ol = [OWN]  w(t_ol; p_o, logden_o) l'(t_ol - p_o)     anchor = owned o
            + [LOOP] w(t_ol; p_l, logden_l) l'(t_ol - p_l)     anchor = looped l
      w(t; p, ld) = exp(l(t - p)/tau - ld) / (N - 1)            (<= 1/gamma)

  and accumulates ``acc_o += sum_l dS_ol Y_l`` (all of ``d``, in up to ``ND``
  register accumulators of ``BLOCK_DO`` columns) and ``sum_l`` of the OWN term
  (the positive-pair term of the owned anchors).  An optional epilogue adds the
  positive pairs ``p_i = F_i . G_i``.

One process (``all_img = None``, ``B = b``): ``s'_ij = G_i . F_j = s_ji``, so one
tile ``s_ij = F_i . G_j`` carries *both* directions' terms of ``dL/ds_ij``
(image anchor i: OWN in the row sweep; text anchor j: LOOP).  Launches:

    ======================  ==================  ===================================  ===========
    launch                  grid (owned)        work per tile                        FLOPs
    ======================  ==================  ===================================  ===========
    lse (F, G)              rows i of F         S tile                               2 B^2 d
    lse (G, F)              rows j of G         S^T tile                             2 B^2 d
    grad (F, G) OWN+LOOP    rows i of F         S tile, dS, dS @ G       -> dF       4 B^2 d
    grad (G, F) OWN+LOOP    rows j of G         S^T tile, dS^T, dS^T @ F -> dG,      4 B^2 d
                                                epilogue: positive pairs of dF, dG
    ======================  ==================  ===================================  ===========

**12 B^2 d** in all (SPEC §1 "Cost").  The ``ND * BLOCK_DO`` columns of one
program cover ``d <= 768`` (bf16 / fp16) or ``d <= 512`` (fp32) on the GPU; wider
features split ``d`` over ``G = ceil(d / (ND BLOCK_DO))`` program groups, each
recomputing ``S``: ``(8 + 4 G) B^2 d`` (:func:`flop_count`).  Nothing beyond
``O(B d)`` inputs / outputs and ``O(B)`` vectors is allocated.

Global columns (``all_img``/``all_txt`` given, ``b`` local rows of ``B``): the
image-anchored tiles ``F Gg^T`` and the text-anchored ``G Fg^T`` are different
matrices (a row strip and a column strip of ``Fg Gg^T``), so nothing is shared:
lse twice (``4 b B d``), then four gradient sweeps of ``4 b B d``: ``(F, Gg)`` OWN
-> dF, ``(G, Fg)`` OWN -> dG (+ positive pairs), ``(Gg, F)`` LOOP -> dGg,
``(Fg, G)`` LOOP -> dFg: **20 b B d** per rank.

Precision: every accumulation is fp32.  fp32 inputs: ``tl.dot`` with
``input_precision="ieee"`` (no TF32: the tests hold fp32 results to 2e-5 of a
float64 reference, TF32's 10-bit mantissa gives ~1e-3).  bf16 / fp16 inputs:
the similarity tile is a native bf16 x bf16 (fp16 x fp16) tensor-core ``tl.dot``
with fp32 accumulator; for ``dS @ Y`` the fp32 ``dS`` tile is rounded to the input
dtype (both operands of every ``tl.dot`` have the same 16-bit type, as Ampere and
Hopper MMA require).  bf16 has fp32's exponent range; fp16 does not (weights
``~ 1/(B-1)`` fall into fp16 subnormals for B > 16k), so for fp16 each tile row
is divided by its maximum before the cast and the product multiplied back in
fp32.  Under ``TRITON_INTERPRET=1`` bf16 operands are upcast (triton 3.8's
interpreter multiplies bf16 operands as raw integers) and the ``dS`` tile is
rounded through bf16 to keep the GPU path's rounding.

Launch configuration: :func:`_default_config`, overridden by the table
``hgcl_tuned.json`` beside this file (written on a GPU by ``tools/hgcl_tune.py``;
applied only on the architecture it was tuned on) and by
``VLMKERN_HGCL_TRITON_CONFIG`` (JSON, e.g. ``{"grad": {"BLOCK_L": 64, "num_stages": 2}}``).
``tools/triton_sm90_check.py`` compiles every launch variant for sm_90 on a CPU.
The ops ``vlmkern::hgcl_stats_triton`` / ``hgcl_grad_triton`` are ``triton_op`` ops
(they trace into ``torch.compile`` graphs); on CPU tensors they run only under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import outputs

# Globals read inside @triton.jit functions must be constexpr (the GPU compiler
# rejects plain Python floats; the interpreter does not notice).
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
MAX_ND = 4  # register accumulators of BLOCK_DO columns per program


# ----------------------------------------------------------------------------
# device functions
# ----------------------------------------------------------------------------


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
def _load_rows(ptr, rows, R, cols, D):
    """Tile ``ptr[rows, cols]`` of a row-major ``[R, D]`` matrix, zeros outside."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                   mask=(rows[:, None] < R) & (cols[None, :] < D), other=0.0)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator.  IEEE: fp32 operands, no TF32."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _sim_tile(X, Y, offs_o, offs_l, NO, NL, D, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr,
              BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """``t[o, l] = X[o] . Y[l]`` for a ``[BLOCK_O, BLOCK_L]`` tile: 2 BLOCK_O BLOCK_L d FLOPs."""
    acc = tl.zeros((BLOCK_O, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(X, offs_o, NO, offs_k, D)
        y = _load_rows(Y, offs_l, NL, offs_k, D)
        acc = _mma(x, tl.trans(y), acc, IEEE)
    return acc


@triton.jit
def _dsim(t, p, ld, valid, inv_tau, margin, inv_nm1, HINGE: tl.constexpr):
    """``w l'(x)`` with ``x = t - p``, ``w = exp(l(x)/tau - ld) / (N - 1)``; 0 outside ``valid``."""
    x = t - p
    z = _surrogate(x, HINGE, margin) * inv_tau
    e = tl.exp(tl.where(valid, z - ld, NEG_INF))
    return e * inv_nm1 * _surrogate_grad(x, HINGE, margin)


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit
def _lse_kernel(X, Y, P, OUT, WOUT, NO, NL, D, off_o, inv_tau, margin, log_nm1,
                HINGE: tl.constexpr, LMEAN: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr,
                BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """``OUT[o] = log Phi_o`` over ``l != o + off_o`` (row grid over ``o``): 2 NO NL d FLOPs.

    LMEAN: also ``WOUT[o] = sum_l exp(z_ol - max) l_ol / sum_l exp(z_ol - max)`` (the
    softmax-weighted mean of the surrogate over the negatives, for the tau gradient):
    one more running sum, rescaled with the log-sum-exp's own factor."""
    pid = tl.program_id(0)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = offs_o < NO
    p = tl.load(P + offs_o, mask=mo, other=0.0)
    run_max = tl.full([BLOCK_O], NEG_INF, tl.float32)
    run_sum = tl.zeros([BLOCK_O], dtype=tl.float32)
    run_w = tl.zeros([BLOCK_O], dtype=tl.float32)
    for l0 in range(0, NL, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        t = _sim_tile(X, Y, offs_o, offs_l, NO, NL, D, BLOCK_O, BLOCK_L, BLOCK_K, IEEE)
        z = _surrogate(t - p[:, None], HINGE, margin) * inv_tau
        valid = (offs_l[None, :] < NL) & (offs_l[None, :] != offs_o[:, None] + off_o)
        z = tl.where(valid, z, NEG_INF)
        new_max = tl.maximum(run_max, tl.max(z, 1))
        safe = tl.where(new_max == NEG_INF, 0.0, new_max)
        r = tl.exp(run_max - safe)
        e = tl.exp(z - safe[:, None])
        run_sum = run_sum * r + tl.sum(e, 1)
        if LMEAN:  # weighted by z = l / tau (no second tile of l kept live: fp32 spilled with it)
            run_w = run_w * r + tl.sum(e * tl.where(valid, z, 0.0), 1)
        run_max = new_max
    empty = run_max == NEG_INF  # N = 1: no negatives, log Phi = -inf
    out = tl.where(empty, NEG_INF, run_max + tl.log(tl.where(empty, 1.0, run_sum)) - log_nm1)
    tl.store(OUT + offs_o, out, mask=mo)
    if LMEAN:
        tl.store(WOUT + offs_o, tl.where(empty, 0.0, run_w / tl.where(empty, 1.0, run_sum) / inv_tau), mask=mo)


@triton.jit
def _accumulate(acc, ds, r, Y, offs_l, NL, D, c0, BLOCK_DO: tl.constexpr, IEEE: tl.constexpr,
                RESCALE: tl.constexpr):
    """``acc += dS @ Y[offs_l, c0:c0+BLOCK_DO]`` (``r``: the per-row factor of a rescaled ``dS``)."""
    y = _load_rows(Y, offs_l, NL, c0 + tl.arange(0, BLOCK_DO), D)
    if RESCALE:
        return acc + r[:, None] * tl.dot(ds, y, out_dtype=tl.float32)
    else:
        return _mma(ds, y, acc, IEEE)


@triton.jit
def _store(acc, scale, dp, OUT, X, PARTNER, OTHER, offs_o, NO, D, c0, BLOCK_DO: tl.constexpr,
           POS: tl.constexpr):
    """``OUT[o, cols] = scale acc (+ dp_o PARTNER_o)``; with POS also ``OTHER[o, cols] += dp_o X_o``."""
    cols = c0 + tl.arange(0, BLOCK_DO)
    ptr = offs_o[:, None].to(tl.int64) * D + cols[None, :]
    mask = (offs_o[:, None] < NO) & (cols[None, :] < D)
    g = acc * scale
    if POS:
        g += dp[:, None] * _load_rows(PARTNER, offs_o, NO, cols, D).to(tl.float32)
        x = _load_rows(X, offs_o, NO, cols, D).to(tl.float32)
        other = tl.load(OTHER + ptr, mask=mask, other=0.0)
        tl.store(OTHER + ptr, other + dp[:, None] * x, mask=mask)
    tl.store(OUT + ptr, g, mask=mask)


@triton.jit
def _grad_kernel(X, Y, P, LD_O, LD_L, SCALE, OUT, OSUM, PREV, PARTNER, OTHER,
                 NO, NL, D, off_o, off_l, inv_tau, margin, inv_nm1,
                 HINGE: tl.constexpr, OWN: tl.constexpr, LOOP: tl.constexpr, STORE_OSUM: tl.constexpr,
                 POS: tl.constexpr, IEEE: tl.constexpr, ROUND_BF16: tl.constexpr, RESCALE: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_DO: tl.constexpr, ND: tl.constexpr):
    """One gradient sweep (grid: owned blocks x d-groups); see the module docstring.

    Pair ``(o, l)`` is excluded when ``o + off_o == l + off_l``.  ``P`` holds the
    positives of the anchors: indexed by ``o`` for the OWN term, by ``l`` for LOOP
    (whichever side is local); ``LD_O`` / ``LD_L`` their ``log(eps + u)``.
    ``OUT[o] = scale * sum_l dS_ol Y_l`` (fp32); ``OSUM[o] = scale * sum_l OWN_ol``.
    POS epilogue (owned = local anchors): ``dp_o = -(scale sum_l OWN_ol + PREV[o])``,
    ``OUT[o] += dp_o PARTNER[o]`` and ``OTHER[o] += dp_o X[o]``.
    FLOPs: 2 NO NL d (the tile) + 2 NO NL (ND BLOCK_DO) per d-group.
    """
    pid_o = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = offs_o < NO
    c0 = pid_g * (ND * BLOCK_DO)
    if OWN:
        p_o = tl.load(P + offs_o, mask=mo, other=0.0)
        ld_o = tl.load(LD_O + offs_o, mask=mo, other=POS_INF)
    acc0 = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    if ND > 1:
        acc1 = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    if ND > 2:
        acc2 = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    if ND > 3:
        acc3 = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    osum = tl.zeros([BLOCK_O], dtype=tl.float32)
    for l0 in range(0, NL, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        ml = offs_l < NL
        t = _sim_tile(X, Y, offs_o, offs_l, NO, NL, D, BLOCK_O, BLOCK_L, BLOCK_K, IEEE)
        valid = mo[:, None] & ml[None, :] & ((offs_o[:, None] + off_o) != (offs_l[None, :] + off_l))
        ds = tl.zeros((BLOCK_O, BLOCK_L), dtype=tl.float32)
        if OWN:
            d_own = _dsim(t, p_o[:, None], ld_o[:, None], valid, inv_tau, margin, inv_nm1, HINGE)
            osum += tl.sum(d_own, 1)
            ds += d_own
        if LOOP:
            p_l = tl.load(P + offs_l, mask=ml, other=0.0)
            ld_l = tl.load(LD_L + offs_l, mask=ml, other=POS_INF)
            ds += _dsim(t, p_l[None, :], ld_l[None, :], valid, inv_tau, margin, inv_nm1, HINGE)
        r = tl.full([BLOCK_O], 1.0, tl.float32)
        if IEEE:
            if ROUND_BF16:  # interpreter stand-in for the GPU's bf16 dS operand
                ds = ds.to(tl.bfloat16).to(tl.float32)
            op = ds
        elif RESCALE:  # fp16: rows scaled to max 1 before the cast (no subnormals / overflow)
            mx = tl.max(ds, 1)
            r = tl.where(mx > 0.0, mx, 1.0)
            op = (ds * (1.0 / r)[:, None]).to(Y.dtype.element_ty)
        else:
            op = ds.to(Y.dtype.element_ty)
        acc0 = _accumulate(acc0, op, r, Y, offs_l, NL, D, c0, BLOCK_DO, IEEE, RESCALE)
        if ND > 1:
            acc1 = _accumulate(acc1, op, r, Y, offs_l, NL, D, c0 + BLOCK_DO, BLOCK_DO, IEEE, RESCALE)
        if ND > 2:
            acc2 = _accumulate(acc2, op, r, Y, offs_l, NL, D, c0 + 2 * BLOCK_DO, BLOCK_DO, IEEE, RESCALE)
        if ND > 3:
            acc3 = _accumulate(acc3, op, r, Y, offs_l, NL, D, c0 + 3 * BLOCK_DO, BLOCK_DO, IEEE, RESCALE)
    scale = tl.load(SCALE)
    osum = osum * scale
    if STORE_OSUM:
        if pid_g == 0:
            tl.store(OSUM + offs_o, osum, mask=mo)
    dp = tl.zeros([BLOCK_O], dtype=tl.float32)
    if POS:
        dp = -(osum + tl.load(PREV + offs_o, mask=mo, other=0.0))
    _store(acc0, scale, dp, OUT, X, PARTNER, OTHER, offs_o, NO, D, c0, BLOCK_DO, POS)
    if ND > 1:
        _store(acc1, scale, dp, OUT, X, PARTNER, OTHER, offs_o, NO, D, c0 + BLOCK_DO, BLOCK_DO, POS)
    if ND > 2:
        _store(acc2, scale, dp, OUT, X, PARTNER, OTHER, offs_o, NO, D, c0 + 2 * BLOCK_DO, BLOCK_DO, POS)
    if ND > 3:
        _store(acc3, scale, dp, OUT, X, PARTNER, OTHER, offs_o, NO, D, c0 + 3 * BLOCK_DO, BLOCK_DO, POS)


# ----------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _wrap(kernel):
    """``wrap_triton(kernel)``, except for the interpreter's kernels: under
    ``TRITON_INTERPRET=1`` ``@triton.jit`` makes an ``InterpretedFunction``,
    which newer torch passes through unchanged and torch <= 2.11 (the GPU
    machine's version) rejects; it is launched directly (eager only)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has it
        InterpretedFunction = ()
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return wrap_triton(kernel)


def _precision(dtype: torch.dtype, interpret: bool) -> dict:
    """Operand handling for ``tl.dot`` (see the module docstring)."""
    if dtype == torch.float32:
        return dict(IEEE=True, ROUND_BF16=False, RESCALE=False)
    if dtype == torch.bfloat16:
        if interpret:  # the interpreter's bf16 dot is wrong: fp32 operands, bf16-rounded dS
            return dict(IEEE=True, ROUND_BF16=True, RESCALE=False)
        return dict(IEEE=False, ROUND_BF16=False, RESCALE=False)
    return dict(IEEE=False, ROUND_BF16=False, RESCALE=True)  # float16


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


CONFIG_ENV = "VLMKERN_HGCL_TRITON_CONFIG"
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hgcl_tuned.json")
_KEYS = {"lse": {"BLOCK_O", "BLOCK_L", "BLOCK_K", "num_warps", "num_stages"},
         "grad": {"BLOCK_O", "BLOCK_L", "BLOCK_K", "BLOCK_DO", "ND", "num_warps", "num_stages"}}


def _check_overrides(over: dict, origin: str) -> dict:
    """Validate ``{"lse": {...}, "grad": {...}}`` launch overrides; errors name ``origin``."""
    if not isinstance(over, dict) or not set(over) <= set(_KEYS):
        raise ValueError(f"{origin}: expected a JSON object with keys among {sorted(_KEYS)}, got {over!r}")
    for kind, cfg in over.items():
        if not isinstance(cfg, dict) or not set(cfg) <= _KEYS[kind]:
            raise ValueError(f"{origin}: {kind!r} takes keys among {sorted(_KEYS[kind])}, got {cfg!r}")
        for k, v in cfg.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{origin}: {kind}.{k} must be a positive integer, got {v!r}")
            if k.startswith("BLOCK_") and (v & (v - 1) or v < 16):
                raise ValueError(f"{origin}: {kind}.{k} must be a power of two >= 16, got {v}")
            if k == "num_warps" and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"{origin}: {kind}.num_warps must be 1, 2, 4, 8 or 16, got {v}")
            if k == "ND" and v > MAX_ND:
                raise ValueError(f"{origin}: grad.ND must be at most {MAX_ND}, got {v}")
    return over


def _tuned(d: int, dtype: torch.dtype) -> dict:
    """The entry of ``hgcl_tuned.json`` (written by ``tools/hgcl_tune.py`` on a
    GPU) for this dtype and ``d``, if the file exists and was tuned on this GPU's
    architecture (or no GPU is visible: the sm_90 compile check)."""
    table = _tuned_table()
    if not table:
        return {}
    arch = table.get("arch")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if arch != f"sm_{major}{minor}":
            return {}
    return table.get("entries", {}).get(f"{str(dtype).replace('torch.', '')}:{d}", {})


_TUNED_CACHE: dict = {}


def _tuned_table() -> dict:
    if "table" not in _TUNED_CACHE:
        table = {}
        if os.path.exists(TUNED_PATH):
            import json

            with open(TUNED_PATH) as f:
                table = json.load(f)
            for key, entry in table.get("entries", {}).items():
                _check_overrides(entry, f"{TUNED_PATH} [{key}]")
        _TUNED_CACHE["table"] = table
    return _TUNED_CACHE["table"]


def _config(d: int, gpu: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch configuration ``{"lse": {...}, "grad": {...}}``: the defaults of
    :func:`_default_config`; on the GPU updated by the tuned table
    (``hgcl_tuned.json``, when present); then by the JSON in the environment
    variable ``VLMKERN_HGCL_TRITON_CONFIG`` (any device, e.g.
    ``'{"grad": {"BLOCK_L": 64, "num_stages": 2}}'``; ``tools/hgcl_tune.py``
    uses it to time candidates)."""
    cfg = _default_config(d, gpu, dtype)
    layers = [_tuned(d, dtype)] if gpu else []
    env = os.environ.get(CONFIG_ENV, "").strip()
    if env:
        import json

        try:
            over = json.loads(env)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{CONFIG_ENV} is not valid JSON ({exc}): {env!r}") from None
        layers.append(_check_overrides(over, CONFIG_ENV))
    for over in layers:
        for kind, part in over.items():
            cfg[kind] = {**cfg[kind], **part}
    return cfg


def _launch_options(cfg: dict) -> Tuple[dict, dict]:
    """Split one kernel family's configuration into its constexpr block sizes
    and the launch options (``num_warps``, ``num_stages`` when set)."""
    consts = dict(cfg)
    opts = {"num_warps": consts.pop("num_warps")}
    if "num_stages" in consts:
        opts["num_stages"] = consts.pop("num_stages")
    return consts, opts


def _default_config(d: int, gpu: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Default block sizes: ``{"lse": {...}, "grad": {...}}``.

    The interpreter (CPU tensors) prefers few, large numpy blocks.  The GPU
    numbers are untuned defaults (no GPU was available), chosen so that
    ``ptxas`` compiles every gradient variant for sm_90 *without register
    spills* (``tools/triton_sm90_check.py`` compiles them here, no GPU needed):
    the owned block holds an fp32 ``[BLOCK_O, ND * BLOCK_DO]`` accumulator.

    * bf16 / fp16, d <= 512: 64 (bf16, Hopper wgmma) or 32 (fp16, whose
      rescaled dS needs a temporary tile) owned rows x up to 4 x 128 columns;
      looped tiles of 32 rows (bf16; with 64, triton 3.6 - the GPU machine's
      version - spills 16 bytes) or 64 (fp16);
    * bf16 / fp16, d > 512: 32 owned rows x up to 3 x 256 columns (one program
      group for d <= 768; wider features split over groups), looped tiles of
      32 (bf16) or 16 rows (fp16: 32 spills 8 bytes under triton 3.6);
    * fp32 (IEEE fp32 ``tl.dot`` on FMA units, whose operand layouts cost far
      more registers than MMA ones; several accumulator chunks spill badly):
      16 owned rows x one chunk of up to 512 columns.
    """
    if not gpu:
        bdo = _pow2(d, 16, 64)
        bk = _pow2(d, 16, 64)
        return dict(lse=dict(BLOCK_O=32, BLOCK_L=32, BLOCK_K=bk, num_warps=4),
                    grad=dict(BLOCK_O=32, BLOCK_L=32, BLOCK_K=bk, BLOCK_DO=bdo,
                              ND=min(MAX_ND, triton.cdiv(d, bdo)), num_warps=4))
    lse = dict(BLOCK_O=64, BLOCK_L=64, BLOCK_K=64, num_warps=4)
    if dtype == torch.float32:
        grad = dict(BLOCK_O=16, BLOCK_L=32, BLOCK_K=32, BLOCK_DO=_pow2(d, 16, 512), ND=1, num_warps=8)
    elif d <= 512:
        bdo = _pow2(d, 16, 128)
        bf16 = dtype == torch.bfloat16
        grad = dict(BLOCK_O=64 if bf16 else 32, BLOCK_L=32 if bf16 else 64, BLOCK_K=64, BLOCK_DO=bdo,
                    ND=triton.cdiv(d, bdo), num_warps=8)
    else:
        grad = dict(BLOCK_O=32, BLOCK_L=32 if dtype == torch.bfloat16 else 16, BLOCK_K=64, BLOCK_DO=256,
                    ND=min(3, triton.cdiv(d, 256)), num_warps=8)
    return dict(lse=lse, grad=grad)


def _d_groups(d: int, grad_cfg: dict) -> int:
    return triton.cdiv(d, grad_cfg["ND"] * grad_cfg["BLOCK_DO"])


def flop_count(b: int, B: int, d: int, local: bool = True, dtype: torch.dtype = torch.bfloat16,
               gpu: bool = True) -> float:
    """Nominal FLOPs (multiply-adds x 2, padding not counted) of one forward
    (statistics) + backward (gradient) of these kernels: ``12 B^2 d`` for one
    process when ``d`` fits one program group (GPU: d <= 768 for bf16 / fp16,
    d <= 512 for fp32), ``20 b B d`` per rank with global columns; ``+ 2 b B d``
    per extra d-group of every gradient sweep."""
    g = _d_groups(d, _config(d, gpu, dtype)["grad"])
    lse = 2 * (2.0 * b * B * d)
    sweep = 2.0 * b * B * d * g + 2.0 * b * B * d
    return lse + (2 if local else 4) * sweep


def _columns(img, txt, all_img, all_txt):
    if (all_img is None) != (all_txt is None):
        raise ValueError("vlmkern.hgcl: give both all_img and all_txt or neither")
    if all_img is None:
        return img, txt
    return all_img.contiguous(), all_txt.contiguous()


def _lse_config(d: int, gpu: bool, dtype: torch.dtype, lmean: bool) -> dict:
    """The ``lse`` launch configuration; with ``lmean`` (the extra running sum of a learnable
    tau) in fp32 on the GPU the looped tile is capped at 32 rows: the IEEE-fp32 tile of 64
    spills registers with it on sm_90 (``tools/triton_sm90_check.py``: 32 bytes at 168
    registers; 156 and no spill at 32)."""
    cfg = dict(_config(d, gpu, dtype)["lse"])
    if lmean and gpu and dtype == torch.float32 and cfg["BLOCK_L"] > 32:
        cfg["BLOCK_L"] = 32
    return cfg


def _launch_lse(X, Y, p, out, off_o, tau, margin, hinge, wout=None):
    NO, D = X.shape
    NL = Y.shape[0]
    gpu = X.device.type == "cuda" and not _interpret()
    cfg, opts = _launch_options(_lse_config(D, gpu, X.dtype, wout is not None))
    log_nm1 = math.log(NL - 1) if NL > 1 else 0.0
    grid = (triton.cdiv(NO, cfg["BLOCK_O"]),)
    _wrap(_lse_kernel)[grid](
        X, Y, p, out, out if wout is None else wout, NO, NL, D, off_o, 1.0 / tau, margin, log_nm1,
        HINGE=hinge, LMEAN=wout is not None, IEEE=_precision(X.dtype, _interpret())["IEEE"], **opts, **cfg,
    )


@triton_op("vlmkern::hgcl_stats_triton", mutates_args=())
def hgcl_stats_triton(
    img: torch.Tensor, txt: torch.Tensor, all_img: Optional[torch.Tensor], all_txt: Optional[torch.Tensor],
    offset: int, tau: float, margin: float, hinge: bool, lmean: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``hgcl_stats``: ``(log Phi1, log Phi2, lbar1, lbar2)`` float32 (same contract as
    the C++ op: ``lbar`` ``[b]`` with ``lmean``, else empty ``[0]``)."""
    img = img.contiguous()
    txt = txt.contiguous()
    Fg, Gg = _columns(img, txt, all_img, all_txt)
    b = img.shape[0]
    p = (img.float() * txt.float()).sum(1)
    lphi1 = outputs.empty((b,), dtype=torch.float32, device=img.device)
    lphi2 = outputs.empty((b,), dtype=torch.float32, device=img.device)
    nl = b if lmean else 0
    bar1 = outputs.empty((nl,), dtype=torch.float32, device=img.device)
    bar2 = outputs.empty((nl,), dtype=torch.float32, device=img.device)
    if b > 0:  # row sweep: image anchors; column sweep: text anchors
        _launch_lse(img, Gg, p, lphi1, offset, tau, margin, hinge, bar1 if lmean else None)
        _launch_lse(txt, Fg, p, lphi2, offset, tau, margin, hinge, bar2 if lmean else None)
    return lphi1, lphi2, bar1, bar2


@hgcl_stats_triton.register_fake
def _(img, txt, all_img, all_txt, offset, tau, margin, hinge, lmean=False):
    b = img.shape[0]
    nl = b if lmean else 0
    return (img.new_empty((b,), dtype=torch.float32), img.new_empty((b,), dtype=torch.float32),
            img.new_empty((nl,), dtype=torch.float32), img.new_empty((nl,), dtype=torch.float32))


def _launch_grad(X, Y, *, p, ld_own, ld_loop, scale, out, osum=None, prev=None, partner=None, other=None,
                 off_o=0, off_l=0, n_cols, tau, margin, hinge):
    """One :func:`_grad_kernel` sweep: ``X`` owned, ``Y`` looped; ``ld_own`` /
    ``ld_loop`` select the OWN / LOOP terms; ``prev`` switches on the POS epilogue."""
    NO, D = X.shape
    NL = Y.shape[0]
    interp = _interpret()
    cfg, opts = _launch_options(_config(D, X.device.type == "cuda" and not interp, X.dtype)["grad"])
    grid = (triton.cdiv(NO, cfg["BLOCK_O"]), _d_groups(D, cfg))
    unused = p  # placeholder pointer for arguments a constexpr branch never touches
    _wrap(_grad_kernel)[grid](
        X, Y, p,
        unused if ld_own is None else ld_own,
        unused if ld_loop is None else ld_loop,
        scale, out,
        unused if osum is None else osum,
        unused if prev is None else prev,
        unused if partner is None else partner,
        unused if other is None else other,
        NO, NL, D, off_o, off_l, 1.0 / tau, margin, 1.0 / (n_cols - 1),
        HINGE=hinge, OWN=ld_own is not None, LOOP=ld_loop is not None, STORE_OSUM=osum is not None,
        POS=prev is not None, **opts, **_precision(X.dtype, interp), **cfg,
    )


@triton_op("vlmkern::hgcl_grad_triton", mutates_args=())
def hgcl_grad_triton(
    img: torch.Tensor, txt: torch.Tensor, all_img: Optional[torch.Tensor], all_txt: Optional[torch.Tensor],
    logden_img: torch.Tensor, logden_txt: torch.Tensor, grad_out: torch.Tensor,
    offset: int, tau: float, margin: float, hinge: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``hgcl_grad`` (same contract as the C++ op: with ``all_img = None``
    both directions are folded into ``grad_img``/``grad_txt`` and the last two
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
    f32 = dict(dtype=torch.float32, device=dev)  # fp32 results, cast once at the end
    gF = outputs.empty((b, D), **f32)
    gG = outputs.empty((b, D), **f32)
    nB = 0 if local else B
    gFg = outputs.empty((nB, D), **f32)
    gGg = outputs.empty((nB, D), **f32)
    if b == 0 or B < 2:
        gF.zero_(), gG.zero_(), gFg.zero_(), gGg.zero_()
    else:
        rsum1 = outputs.empty((b,), **f32)  # scale * sum_j dS1_ij (image anchors)
        kw = dict(p=p, scale=scale, n_cols=B, tau=tau, margin=margin, hinge=hinge)
        if local:
            # s_ij = F_i . G_j carries dS1_ij (anchor i: OWN) and dS2_ji (anchor j: LOOP).
            _launch_grad(img, txt, ld_own=ld1, ld_loop=ld2, out=gF, osum=rsum1, **kw)
            # its transpose G_j . F_i, owned by j: dG, then the positive pairs of both.
            _launch_grad(txt, img, ld_own=ld2, ld_loop=ld1, out=gG, prev=rsum1, partner=img, other=gF, **kw)
        else:
            _launch_grad(img, Gg, ld_own=ld1, ld_loop=None, out=gF, osum=rsum1, off_o=offset, **kw)
            _launch_grad(txt, Fg, ld_own=ld2, ld_loop=None, out=gG, prev=rsum1, partner=img, other=gF,
                         off_o=offset, **kw)
            _launch_grad(Gg, img, ld_own=None, ld_loop=ld1, out=gGg, off_l=offset, **kw)
            _launch_grad(Fg, txt, ld_own=None, ld_loop=ld2, out=gFg, off_l=offset, **kw)
    dt = img.dtype
    if dt == torch.float32:  # outputs must not alias each other: the empty [0, d] ones are fresh tensors
        return gF, gG, gFg, gGg
    return gF.to(dt), gG.to(dt), gFg.to(dt), gGg.to(dt)


@hgcl_grad_triton.register_fake
def _(img, txt, all_img, all_txt, logden_img, logden_txt, grad_out, offset, tau, margin, hinge):
    b, d = img.shape
    B = 0 if all_img is None else all_img.shape[0]
    return (img.new_empty((b, d)), txt.new_empty((b, d)), img.new_empty((B, d)), img.new_empty((B, d)))
