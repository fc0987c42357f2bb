"""Benchmark of the fused diagonal Kalman step (SPEC §3).

    python -m vlmkern.app.bench.kalman [--quick | --targets] [--skip-100m] [--vector-only] [--device cpu|cuda] [--out bench/out]

``--targets``: only the 10M and 100M cases (issue 4's targets; ``vlmkern.app.bench.targets``
judges them).  On CUDA every row also counts the device operations one step
issues (``torch.profiler``): the fused step should issue one per pass.

``--skip-100m`` (or ``VLMKERN_BENCH_SKIP_100M=1``, e.g. under ``vlmkern.app.bench.run_all``)
leaves out the 100M case, which on a small CPU takes a few minutes (the
per-tensor loop needs ~2 s per step) and ~2 GiB of memory per provider.

Providers, all doing one optimizer step in place on the same parameter list:

``vlmkern-fused``   :func:`vlmkern.kalman_step_` on the compiled backend of the
                    device (C++ on CPU, multi-tensor CUDA kernel on GPU).
``torch-foreach``   the same math with ``torch._foreach_*`` (baseline), no host sync,
                    no allocation (persistent scratch lists).
``torch-loop``      the same math, one tensor at a time in Python (vlmkern's
                    ``backend="torch"`` fallback).
``adamw-fused``     ``torch.optim.AdamW(fused=True)`` on the same parameters (the
                    bandwidth peer: 28 bytes/element fp32, like the Kalman step);
                    ``foreach=True`` where fused is unavailable (recorded).
``reference``       the float64 oracle (small case only).

Cases: parameter lists shaped like ViT-B/16 CLIP (open_clip), fp32:

* ``lora-r8``: the LoRA adapters ``vlmkern.app.models.lora`` adds to ViT-B/16 CLIP
  with rank 8 on attention qkv/out and MLP fc/proj of both towers
  (2.2M parameters in 192 tensors: the optimizer's actual use case);
* ``prefix-1M / 10M / 100M``: the first N parameters of ViT-B/16 CLIP's full
  parameter list (vision blocks first; the last tensor truncated).

Bytes per element (fp32): pass 1 reads h, p (8 B); pass 2 reads theta, h, p and
writes theta, p (20 B): 28 B, as fused AdamW (reads theta, g, m, v; writes
theta, m, v).

Vector-observation cases (SPEC §3b, ``M`` observations per step; ``--vector-only``
or ``VLMKERN_BENCH_KALMAN_VECTOR_ONLY=1`` runs only these): ``lora-65k``, 65,536
fp32 parameters in 25 tensors (12 rank-8 adapters ``[8, 341]`` / ``[341, 8]`` and one
``[64]`` vector), ``grads[t]`` of shape ``[M, *shape]``, M = 32 and 96.  Providers:
``vlmkern-fused`` (the compiled kernel of the device: C++ on CPU) against
``torch-loop`` (``backend="torch"``, the PyTorch implementation: Gram by matmul,
Cholesky solve per tensor), the baseline of these cases.  Bytes = H read twice
(2 x 4 M B per element) + theta and p read and written (16 B): 8 M + 16 B per
element; FLOPs = 4 M^2 per element (Gram 2 M^2 counted without the symmetry,
h^T S^-1 h about 2 M^2); the JSON records both floors (``floor_bytes_s``,
``floor_flops_s``).
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Tuple

import torch

import vlmkern
from vlmkern.app.bench.harness import Bench, Provider, main
from vlmkern import backends

BYTES_PER_ELEMENT = 28


# ---------------------------------------------------------------------------
# parameter lists
# ---------------------------------------------------------------------------


def _block(width: int) -> List[Tuple[int, ...]]:
    return [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
            (4 * width, width), (4 * width,), (width, 4 * width), (width,)]


def vitb16_clip_shapes() -> List[Tuple[int, ...]]:
    """Parameter shapes of open_clip ViT-B/16 CLIP, vision blocks first (149.6M)."""
    shapes = []
    for _ in range(12):
        shapes += _block(768)
    shapes += [(768,), (197, 768), (768, 512), (768, 3, 16, 16), (768,), (768,), (768,), (768,)]
    for _ in range(12):
        shapes += _block(512)
    shapes += [(77, 512), (512, 512), (), (49408, 512), (512,), (512,)]
    return shapes


def vitb16_lora_shapes(rank: int = 8) -> List[Tuple[int, ...]]:
    """A and B of every adapter add_lora(rank) puts on ViT-B/16 CLIP (both towers)."""
    shapes = []
    for width, blocks in ((768, 12), (512, 12)):
        for _ in range(blocks):
            shapes += [(3, rank, width), (3, width, rank)]  # qkv (q, k, v stacked)
            shapes += [(1, rank, width), (1, width, rank)]  # attn out
            shapes += [(1, rank, width), (1, 4 * width, rank)]  # mlp fc
            shapes += [(1, rank, 4 * width), (1, width, rank)]  # mlp proj
    return shapes


def prefix_shapes(n: int) -> List[Tuple[int, ...]]:
    out, total = [], 0
    for s in vitb16_clip_shapes():
        k = math.prod(s)
        if total + k >= n:
            out.append((n - total,))
            return out
        out.append(s)
        total += k
    return out


def case_shapes(case) -> List[Tuple[int, ...]]:
    return vitb16_lora_shapes(8) if case["list"] == "lora-r8" else prefix_shapes(case["n"])


def vector_shapes() -> List[Tuple[int, ...]]:
    """65,536 parameters in 25 tensors: 12 rank-8 LoRA adapters of width 341 and one [64] vector."""
    return [(8, 341), (341, 8)] * 12 + [(64,)]


def make_vector_state(case, device):
    """The vector-observation step's inputs: grads[t] is [M, *shape] (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    M = case["M"]
    shapes = vector_shapes()
    params = [torch.randn(s, generator=g).mul_(0.02).to(device) for s in shapes]
    grads = [torch.randn((M, *s), generator=g).mul_(1e-2).to(device) for s in shapes]
    variances = [torch.full(s, 1e-3, device=device) for s in shapes]
    e = torch.randn(M, generator=g).to(device)
    R = torch.full((M,), 1.0, device=device)
    return params, grads, variances, e, R


def _is_vector(case) -> bool:
    return "M" in case


def vector_bytes(case) -> float:
    """H read twice (pass 1 and pass 2) + theta and p read and written, fp32."""
    return (8 * case["M"] + 16) * case["n"]


def vector_flops(case) -> float:
    """About 4 M^2 per element: the Gram (2 M^2) and h^T S^-1 h (2 M^2)."""
    return 4 * case["M"] ** 2 * case["n"]


def make_state(case, device):
    if _is_vector(case):
        return make_vector_state(case, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = case_shapes(case)
    params = [torch.randn(s, generator=g).mul_(0.02).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).mul_(1e-3).to(device) for s in shapes]
    variances = [torch.full(s, 1e-3, device=device) for s in shapes]
    e = torch.tensor(-2.0, device=device)
    R = torch.tensor(4.0, device=device)
    return params, grads, variances, e, R


# ---------------------------------------------------------------------------
# the same math with torch._foreach_* (no host sync)
# ---------------------------------------------------------------------------


def kalman_step_foreach(params, grads, variances, e, R, q, forgetting=1.0, var_floor=1e-12, scratch=None):
    """SPEC §3 with ``torch._foreach_*`` ops, no host sync.

    ``scratch``: two lists of tensors shaped like ``params`` (float32), reused
    across calls so that the step allocates nothing (on CPU fresh 40 MB
    temporaries cost page faults that would make this baseline look worse
    than the math it does)."""
    if scratch is None:
        scratch = ([torch.empty_like(v) for v in variances], [torch.empty_like(v) for v in variances])
    k, t = scratch
    torch._foreach_add_(variances, q)  # v = p_hat
    torch._foreach_copy_(k, variances)
    torch._foreach_mul_(k, grads)  # k = p_hat h
    torch._foreach_copy_(t, k)
    torch._foreach_mul_(t, grads)  # t = h^2 p_hat >= 0: its L1 norm is its sum
    s = torch.stack(torch._foreach_norm(t, 1)).sum()
    S = s + R
    torch._foreach_copy_(t, k)
    torch._foreach_mul_(t, e / S)
    torch._foreach_add_(params, t)  # theta += (e/S) p_hat h
    torch._foreach_mul_(k, k)
    torch._foreach_mul_(k, 1.0 / S)
    torch._foreach_sub_(variances, k)  # p = p_hat - (p_hat h)^2 / S
    if forgetting != 1.0:
        torch._foreach_mul_(variances, 1.0 / forgetting)
    torch._foreach_clamp_min_(variances, var_floor)
    return S


def _check_foreach_matches_fused() -> None:
    """The foreach baseline computes the same step as the fused op (small case)."""
    case = {"list": "prefix", "n": 50_000}
    a = make_state(case, torch.device("cpu"))
    b = make_state(case, torch.device("cpu"))
    Sa = vlmkern.kalman_step_(*a[:3], a[3], a[4], process_noise=1e-5)
    Sb = kalman_step_foreach(*b[:3], b[3], b[4], 1e-5)
    torch.testing.assert_close(Sa, Sb, rtol=1e-5, atol=0)
    for x, y in zip(a[0] + a[2], b[0] + b[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------

Q = 1e-6


def _fused(case, mode, device):
    params, grads, variances, e, R = make_state(case, device)
    return lambda: vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=Q)


def _foreach(case, mode, device):
    params, grads, variances, e, R = make_state(case, device)
    scratch = ([torch.empty_like(v) for v in variances], [torch.empty_like(v) for v in variances])
    return lambda: kalman_step_foreach(params, grads, variances, e, R, Q, scratch=scratch)


def _loop(case, mode, device):
    params, grads, variances, e, R = make_state(case, device)
    return lambda: vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=Q, backend="torch")


def _adamw_kind(device) -> str:
    try:
        p = torch.zeros(4, device=device, requires_grad=True)
        p.grad = torch.zeros(4, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return "fused"
    except (RuntimeError, ValueError):
        return "foreach"


def _adamw(case, mode, device):
    params, grads, _, _, _ = make_state(case, device)
    ps = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    kind = _adamw_kind(device)
    opt = torch.optim.AdamW(ps, lr=1e-4, **({"fused": True} if kind == "fused" else {"foreach": True}))
    opt.step()  # allocate the state outside the timed calls
    return opt.step


def _reference(case, mode, device):
    from vlmkern import reference  # the float64 oracle as a baseline (import vlmkern does not load it)

    params, grads, variances, e, R = make_state(case, torch.device("cpu"))
    return lambda: reference.kalman_step(params, grads, variances, e, R, process_noise=Q)


def _fused_ok(case, device):
    ok, why = backends.availability("kalman", "cuda" if device.type == "cuda" else "cpu", device)
    return ok, why


def _scalar_only(case, device):
    return (not _is_vector(case), "scalar-observation cases only")


# Bytes per element the largest provider keeps alive: torch-foreach holds params,
# grads, variances and two scratch lists (5 x 4 B); AdamW holds params, grads,
# exp_avg, exp_avg_sq (4 x 4 B).  A case runs only if the machine has that much
# memory available, plus a margin.
_LIVE_BYTES_PER_ELEMENT = 20
_MEM_MARGIN = 1 << 30


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _case_ok(case, device):
    n = case["n"]
    if n >= 100_000_000 and os.environ.get("VLMKERN_BENCH_SKIP_100M", "") not in ("", "0"):
        return False, "100M skipped (--skip-100m / VLMKERN_BENCH_SKIP_100M)"
    if device.type == "cpu":
        need = _LIVE_BYTES_PER_ELEMENT * n + _MEM_MARGIN
        have = _mem_available()
        if need > have:
            return False, f"needs ~{need / 2**30:.1f} GiB of free memory, {have / 2**30:.1f} GiB available"
    return True, ""


def make_bench(quick: bool, targets: bool = False) -> Bench:
    """Fused diagonal Kalman step vs foreach, per-tensor loop and fused AdamW."""
    _check_foreach_matches_fused()
    vector = [{"list": "lora-65k", "n": 65_536, "M": M} for M in ((32,) if quick else (32, 96))]
    if targets:  # issue 4: >= 2x foreach at 10M (CPU); >= 80% copy bandwidth at >= 10M, vs fused AdamW (GPU)
        cases = [{"list": "prefix", "n": n} for n in (10_000_000, 100_000_000)]
    elif os.environ.get("VLMKERN_BENCH_KALMAN_VECTOR_ONLY", "") not in ("", "0"):
        cases = vector
    elif quick:
        cases = [{"list": "lora-r8", "n": 2_211_840}, {"list": "prefix", "n": 1_000_000}] + vector
    else:
        cases = ([{"list": "lora-r8", "n": 2_211_840}] + [{"list": "prefix", "n": n} for n in (1_000_000, 10_000_000, 100_000_000)]
                 + vector)
    adamw_name = "adamw-fused"
    providers = [
        Provider("vlmkern-fused", _fused, kind="vlmkern", available=_fused_ok),
        Provider("torch-foreach", _foreach, kind="baseline", available=_scalar_only),
        Provider("torch-loop", _loop, kind="baseline"),
        Provider(adamw_name, _adamw, kind="peer", available=_scalar_only),
        Provider("reference-f64", _reference, kind="reference",
                 available=lambda case, dev: ((case["n"] <= 1_000_000 and not _is_vector(case)),
                                              "float64 oracle timed only at <= 1M, scalar cases")),
    ]
    return Bench(
        name="kalman",
        cases=cases,
        providers=providers,
        baseline="torch-foreach",
        modes=("full",),
        bytes_moved=lambda case, mode: vector_bytes(case) if _is_vector(case) else BYTES_PER_ELEMENT * case["n"],
        flops=lambda case, mode: vector_flops(case) if _is_vector(case) else 0.0,
        baseline_of=lambda case: "torch-loop" if _is_vector(case) else "torch-foreach",
        case_ok=_case_ok,
        count_launches=True,
        time_budget_s=20.0 if targets else None,
        notes=("One in-place optimizer step per call, fp32.  Bytes = 28 per element (Kalman and AdamW alike).  "
               f"AdamW peer: torch.optim.AdamW({_adamw_kind(torch.device('cpu'))}=True) on CPU.  "
               "Vector cases (M=...): baseline torch-loop (backend='torch'); bytes = (8 M + 16) per element, "
               "FLOPs = 4 M^2 per element; % of floor = max(bytes/copy bandwidth, FLOPs/matmul rate) / median."),
    )


if __name__ == "__main__":
    if "--skip-100m" in sys.argv:
        sys.argv.remove("--skip-100m")
        os.environ["VLMKERN_BENCH_SKIP_100M"] = "1"
    if "--vector-only" in sys.argv:
        sys.argv.remove("--vector-only")
        os.environ["VLMKERN_BENCH_KALMAN_VECTOR_ONLY"] = "1"
    main(make_bench)
