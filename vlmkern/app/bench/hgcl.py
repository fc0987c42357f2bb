"""HGCL / GCL loss (SPEC §1): forward + backward time and peak memory.

Providers:

* ``eager`` (baseline): the obvious PyTorch implementation - the full ``B x B``
  similarity matrix, the hinge logits of both directions, log-sum-exp for the
  state, and autograd through ``exp(z - logden)`` (the same estimator).
* ``vlmkern-<backend>``: :func:`vlmkern.hgcl_loss` on each live backend
  (``cpu``, ``torch`` on CPU; ``triton``, ``torch`` on GPU).
* ``vlmkern-triton-clip`` (and ``vlmkern-cpu-clip`` in ``--targets``): the same
  op as GCL with ``gamma = 1`` and no hinge - the plain CLIP loss, the same
  math as the two peers below, for the per-pair comparison with Inf-CL.
* ``open_clip-ClipLoss``: open_clip's CLIP loss, the GCL ``gamma = 1`` special
  case (plain loss, no state, no hinge).
* ``inf-cl`` (GPU, when ``inf_cl`` is importable; ``bench/gpu_check.sh`` carries
  the ``inf-cl`` wheel): Inf-CL's tiled CLIP loss (``cal_inf_loss``), both
  directions.  Inf-CL casts the features to fp32 before its kernels (its dots
  are fp32 / TF32, not bf16) and runs three sweeps per direction (lse, dq, dk:
  10 B^2 d, 20 B^2 d for the two directions, against 12 B^2 d here).

``python -m vlmkern.app.bench.hgcl [--quick | --targets] [--device cpu|cuda] [--out bench/out]``.
``--targets``: only the sizes issue 3's targets name (CPU: B = 8192, d = 512;
GPU: B = 16k at d = 512 / 768, 64k and 256k at d = 512), at most ~30 s of timed
calls per row; ``vlmkern.app.bench.targets`` judges the results.
Cases: B in {1k, 4k, 16k, 64k} (+256k on GPU) x d in {512, 768}, HGCL (margin
0.1), tau 0.05, gamma 0.9; bf16 on GPU, fp32 on CPU.  On the CPU only
B in {1024, 4096, 8192} at d = 512 run (B = 8192 is the CPU target size);
``VLMKERN_BENCH_HGCL_B=1024,2048`` overrides the sizes and
``VLMKERN_BENCH_HGCL_PROVIDERS=vlmkern-cpu,open_clip-ClipLoss`` the providers
(the ``eager`` baseline always runs).

TFLOP/s: every provider's time is converted with the arithmetic of the tiled
Triton kernels, :func:`vlmkern.kernels.triton.hgcl.flop_count` - ``12 B^2 d``
for one process at the benchmarked widths (d = 512, 768 in bf16 / fp16;
d = 512 in fp32; fp32 at d = 768 is ``16 B^2 d``).  "% of floor" is then that
count over the measured matmul peak, i.e. the Triton kernels' fraction of the
peak.  The other providers do different amounts of work (eager and ClipLoss
materialise ``S`` once: ~6 B^2 d; the CPU kernel recomputes one tile: 8 B^2 d),
so for them the column is "equivalent" throughput on the same scale.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as Fn

from vlmkern.app.bench.harness import Bench, Provider, main
from vlmkern import backends, hgcl_loss

TAU, GAMMA, MARGIN = 0.05, 0.9, 0.1
CPU_SIZES = (1024, 4096, 8192)


def kernel_flops(B: int, d: int, dtype: torch.dtype) -> float:
    """Forward + backward FLOPs of the Triton kernels for one process (GPU block sizes)."""
    try:
        from vlmkern.kernels.triton.hgcl import flop_count
    except Exception:  # triton not importable: the count for d within one program group
        return 12.0 * B * B * d
    return flop_count(B, B, d, local=True, dtype=dtype, gpu=True)


def _dtype(case, device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _inputs(case, device, grad=True):
    B, d = case["B"], case["d"]
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = _dtype(case, device)
    img = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt).requires_grad_(grad)
    txt = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt).requires_grad_(grad)
    n = 2 * B
    index = torch.randperm(n, generator=g)[:B].to(device)
    lu1 = torch.zeros(n, device=device)  # visited state: the moving-average branch
    lu2 = torch.zeros(n, device=device)
    return img, txt, index, lu1, lu2


def eager_hgcl(img, txt, index, lu1, lu2, tau=TAU, gamma=GAMMA, margin=MARGIN, eps=1e-14):
    """The obvious materialised implementation (returns the surrogate whose gradient is the estimator)."""
    B = img.shape[0]
    S = img @ txt.T  # [B, B]
    p = S.diagonal()
    eye = torch.eye(B, dtype=torch.bool, device=img.device)
    Z1 = (torch.clamp(S - p[:, None] + margin, min=0) ** 2 / tau).float().masked_fill(eye, -math.inf)
    Z2 = (torch.clamp(S.T - p[:, None] + margin, min=0) ** 2 / tau).float().masked_fill(eye, -math.inf)
    with torch.no_grad():
        ld = []
        for Z, lu in ((Z1, lu1), (Z2, lu2)):
            lphi = torch.logsumexp(Z, 1) - math.log(B - 1)
            old = lu[index]
            new = torch.logaddexp(old + math.log1p(-gamma), lphi + math.log(gamma))
            lu[index] = new
            ld.append(torch.logaddexp(new, torch.full_like(new, math.log(eps))))
    sur = (torch.exp(Z1 - ld[0][:, None]).sum() + torch.exp(Z2 - ld[1][:, None]).sum()) * (tau / B / (B - 1))
    return sur


def _full(loss_fn, img, txt):
    def fn():
        img.grad = txt.grad = None
        loss_fn().backward()

    return fn


def make_eager(case, mode, device):
    img, txt, index, lu1, lu2 = _inputs(case, device)
    return _full(lambda: eager_hgcl(img, txt, index, lu1, lu2), img, txt)


def make_vlmkern(backend, clip: bool = False):
    """:func:`vlmkern.hgcl_loss` on ``backend``; ``clip``: GCL with gamma = 1 and no
    hinge, i.e. the plain CLIP loss (the same math as ClipLoss / Inf-CL)."""
    gamma, margin = (1.0, None) if clip else (GAMMA, MARGIN)

    def make(case, mode, device):
        img, txt, index, lu1, lu2 = _inputs(case, device)
        return _full(lambda: hgcl_loss(img, txt, index, lu1, lu2, tau=TAU, gamma=gamma, margin=margin,
                                       backend=backend, validate=False), img, txt)

    def available(case, device):
        return backends.availability("hgcl", backend, device)

    return Provider(f"vlmkern-{backend}" + ("-clip" if clip else ""), make, kind="vlmkern", available=available)


def make_clip(case, mode, device):
    from open_clip.loss import ClipLoss

    img, txt, *_ = _inputs(case, device)
    loss = ClipLoss()
    scale = torch.tensor(1.0 / TAU, device=device)
    return _full(lambda: loss(img, txt, scale), img, txt)


def clip_available(case, device):
    try:
        import open_clip.loss  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return False, f"open_clip not importable: {exc}"
    return _materialised_ok(case, device)


def _materialised_ok(case, device):
    if device.type == "cuda":
        need = 6 * case["B"] ** 2 * 4
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            return False, f"needs ~{need / 2**30:.0f} GiB for the B x B matrices, {free / 2**30:.0f} GiB free"
    return True, ""


def make_infcl(case, mode, device):
    from inf_cl import cal_inf_loss

    img, txt, *_ = _inputs(case, device)
    return _full(lambda: 0.5 * (cal_inf_loss(img, txt, scale=1.0 / TAU).mean()
                                + cal_inf_loss(txt, img, scale=1.0 / TAU).mean()), img, txt)


def infcl_available(case, device):
    if device.type != "cuda":
        return False, "Inf-CL runs on CUDA only"
    try:
        import inf_cl  # noqa: F401
    except Exception as exc:
        return False, f"inf_cl not importable: {type(exc).__name__}: {exc}"
    return True, ""


# The sizes issue 3's targets name: CPU B = 8192, d = 512 (time and memory vs
# eager); GPU B = 16k, d = 512, bf16 (2x eager, 1% of its memory), Inf-CL's
# per-pair throughput (16k / 64k / 256k), B = 262144 on one GPU.
TARGET_CASES = {"cpu": [(8192, 512)], "cuda": [(16384, 512), (16384, 768), (65536, 512), (262144, 512)]}
TARGET_PROVIDERS = {"cpu": ("eager", "vlmkern-cpu", "vlmkern-cpu-clip", "open_clip-ClipLoss"),
                    "cuda": ("eager", "vlmkern-triton", "vlmkern-triton-clip", "vlmkern-torch", "open_clip-ClipLoss",
                             "inf-cl")}


def _target_skip(name):
    """Targets mode: time only the providers a target compares (per device)."""
    def skip(case, mode, device):
        if name not in TARGET_PROVIDERS[device.type]:
            return "not compared by a target"
        if name in ("vlmkern-torch", "eager", "open_clip-ClipLoss") and case["B"] > 16384:
            return "timed at 16k only (no target compares it above; it materialises B x B or loops in Python)"
        if name.endswith("-clip") and case["B"] > 65536:
            return "the plain-CLIP variant is timed up to 64k (time budget)"
        return None

    return skip


def make_bench(quick: bool, targets: bool = False) -> Bench:
    """HGCL fwd+bwd: eager materialised vs vlmkern backends vs ClipLoss / Inf-CL."""
    env = os.environ.get("VLMKERN_BENCH_HGCL_B")
    if targets:
        cases = [dict(B=B, d=d) for dev in ("cpu", "cuda") for B, d in TARGET_CASES[dev]]
    else:
        if env:
            sizes, dims = [int(x) for x in env.split(",")], [512]
        elif quick:
            sizes, dims = [1024, 4096], [512]
        else:
            sizes, dims = [1024, 4096, 8192, 16384, 65536, 262144], [512, 768]
        cases = [dict(B=B, d=d) for B in sizes for d in dims]

    def case_ok(case, device):
        if targets:
            if (case["B"], case["d"]) not in TARGET_CASES[device.type]:
                return False, f"not a {device.type} target size"
            return True, ""
        if device.type == "cpu" and not env and (case["B"] not in CPU_SIZES or case["d"] != 512):
            return False, "CPU run limited to B in {1024, 4096, 8192}, d = 512 (minutes, 2 cores)"
        if device.type == "cuda" and case["B"] == 8192:
            return False, "8192 is the CPU target size"
        if device.type == "cpu" and case["B"] > 65536:
            return False, "256k only on GPU"
        return True, ""

    providers = [
        Provider("eager", make_eager, kind="baseline", available=_materialised_ok),
        make_vlmkern("cpu"),
        make_vlmkern("cpu", clip=True),
        make_vlmkern("triton"),
        make_vlmkern("triton", clip=True),
        make_vlmkern("torch"),
        Provider("open_clip-ClipLoss", make_clip, kind="peer", available=clip_available),
        Provider("inf-cl", make_infcl, kind="peer", available=infcl_available),
    ]
    only = os.environ.get("VLMKERN_BENCH_HGCL_PROVIDERS")
    if only:
        keep = set(only.split(","))
        providers = [p for p in providers if p.name in keep or p.kind == "baseline"]
    elif targets:
        for p in providers:
            p.skip = _target_skip(p.name)
    else:  # the "-clip" variants only where the Inf-CL comparison needs them
        providers = [p for p in providers if p.name != "vlmkern-cpu-clip"]
    return Bench(
        name="hgcl",
        cases=cases,
        providers=providers,
        baseline="eager",
        modes=("full",),
        # the tiled Triton kernels' count (12 B^2 d here), for every provider
        flops=lambda case, mode: kernel_flops(case["B"], case["d"],
                                              torch.bfloat16 if torch.cuda.is_available() else torch.float32),
        bytes_moved=lambda case, mode: 4.0 * case["B"] * case["d"] * 4,
        dtype_of=lambda case: torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        case_ok=case_ok,
        time_budget_s=30.0 if targets else None,
        notes=("HGCL, margin 0.1, tau 0.05, gamma 0.9, visited state.  `full` = forward + backward of the features.  "
               "TFLOP/s and % of floor use the Triton kernels' count, 12 B^2 d (2 lse sweeps of 2 B^2 d, "
               "2 gradient sweeps of 4 B^2 d), for every provider; eager and ClipLoss do ~6 B^2 d "
               "(S materialised once), the CPU kernel 8 B^2 d.  ClipLoss / Inf-CL compute the plain CLIP loss "
               "(the GCL gamma = 1 special case), not HGCL."),
    )


if __name__ == "__main__":
    main(make_bench)
