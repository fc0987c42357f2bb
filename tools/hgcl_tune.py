"""Time launch configurations of the Triton HGCL kernels on a GPU and write the
fastest correct ones to ``vlmkern/kernels/triton/hgcl_tuned.json``.

    python tools/hgcl_tune.py [--B 16384] [--d 512 768] [--dtype bfloat16] \
        [--out vlmkern/kernels/triton/hgcl_tuned.json] [--budget-s 240] [--max-configs 16]

The default block sizes (``_default_config``) were chosen without a GPU, only so
that nothing spills registers.  For each ``d`` this script

1. runs the statistics op (the two log-sum-exp sweeps) and the gradient op (the
   row and column sweeps) with the default configuration, as the reference;
2. for each candidate - set through ``VLMKERN_HGCL_TRITON_CONFIG``, one kernel
   family at a time - compiles, checks the outputs against the reference
   (relative error 1e-4 for the statistics, 2e-2 for bf16 / fp16 gradients,
   whose dS operand is rounded per tile; 1e-4 in fp32) and times it (median of
   ``vlmkern.app.bench.harness.time_callable``'s CUDA-event timings after a warm-up call; a candidate that fails to compile, e.g. out
   of shared memory, is recorded as failed);
3. keeps the fastest correct candidate of each family.

The output JSON holds the architecture (``sm_90`` on an H100/H200), the
machine, the command, every trial, and ``entries["<dtype>:<d>"] = {"lse": ...,
"grad": ...}``, which ``vlmkern.kernels.triton.hgcl._config`` reads on GPUs of
that architecture.  ``--interpret`` runs the same loop on the CPU under
``TRITON_INTERPRET=1`` with tiny sizes (a smoke test of the script; its times
mean nothing and it writes no ``arch``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = ("float32", "bfloat16", "float16")


def _candidates(kind: str, d: int, dtype: str, gpu: bool, default: dict, limit: int):
    """Default first, then a deterministic spread of block shapes that fit."""
    if not gpu:
        grid = dict(BLOCK_O=(16, 32), BLOCK_L=(16, 32), num_warps=(4,))
    elif kind == "lse":
        grid = dict(BLOCK_O=(64, 128), BLOCK_L=(32, 64, 128), BLOCK_K=(64, 128), num_warps=(4, 8),
                    num_stages=(2, 3, 4))
    elif dtype == "float32":
        grid = dict(BLOCK_O=(16, 32), BLOCK_L=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3))
    else:
        grid = dict(BLOCK_O=(32, 64, 128), BLOCK_L=(16, 32, 64), BLOCK_DO=(64, 128, 256), num_warps=(4, 8),
                    num_stages=(2, 3))
    keys = list(grid)
    out = [dict(default)]
    for values in itertools.product(*(grid[k] for k in keys)):
        cand = {**default, **dict(zip(keys, values))}
        if kind == "grad":
            if "BLOCK_DO" in grid:
                cand["ND"] = min(4, -(-d // cand["BLOCK_DO"]))
            # fp32 accumulators of the owned block: at most ~128 registers per thread
            acc = cand["BLOCK_O"] * cand["ND"] * cand["BLOCK_DO"] / (32 * cand["num_warps"])
            if gpu and acc > 128:
                continue
        if cand not in out:
            out.append(cand)
    if len(out) <= limit:
        return out
    # spread: every k-th of the rest, the default kept first
    rest = out[1:]
    step = len(rest) / (limit - 1)
    return [out[0]] + [rest[int(i * step)] for i in range(limit - 1)]


def _rel(a, b) -> float:
    import torch

    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    den = b[fin].norm().item()
    return (a[fin] - b[fin]).norm().item() / den if den > 0 else (a[fin] - b[fin]).norm().item()


def tune(B: int, dims, dtype: str, gpu: bool, budget_s: float, max_configs: int, reps: int, log=print) -> dict:
    import torch
    import torch.nn.functional as Fn

    from vlmkern.app.bench.harness import time_callable
    from vlmkern.kernels.triton import hgcl as K

    dt = getattr(torch, dtype)
    dev = "cuda" if gpu else "cpu"
    tau, margin = 0.05, 0.1
    t_start = time.perf_counter()
    entries, trials = {}, []
    saved_env = os.environ.pop(K.CONFIG_ENV, None)
    try:
        for d in dims:
            g = torch.Generator().manual_seed(d)
            img = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(dev, dt)
            txt = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(dev, dt)
            stats = lambda: K.hgcl_stats_triton(img, txt, None, None, 0, tau, margin, True)  # noqa: E731
            os.environ.pop(K.CONFIG_ENV, None)
            ref_s = stats()
            ld1 = torch.logaddexp(ref_s[0], torch.tensor(-30.0, device=dev)).contiguous()
            ld2 = torch.logaddexp(ref_s[1], torch.tensor(-30.0, device=dev)).contiguous()
            one = torch.ones((), device=dev)
            grad = lambda: K.hgcl_grad_triton(img, txt, None, None, ld1, ld2, one, 0, tau, margin, True)  # noqa: E731
            ref_g = grad()
            default = K._config(d, gpu, dt)
            best = {}
            for kind, fn, ref, tol in (("lse", stats, ref_s, 1e-4),
                                       ("grad", grad, ref_g, 1e-4 if dtype == "float32" else 2e-2)):
                results = []
                for cand in _candidates(kind, d, dtype, gpu, default[kind], max_configs):
                    if time.perf_counter() - t_start > budget_s:
                        log(f"[tune] budget of {budget_s:.0f} s spent: stopping")
                        break
                    os.environ[K.CONFIG_ENV] = json.dumps({kind: cand})
                    rec = {"dtype": dtype, "d": d, "B": B, "kind": kind, "config": cand}
                    try:
                        out = fn()
                        err = max(_rel(a, b) for a, b in zip(out, ref) if a.numel())
                        rec["rel_err"] = err
                        if not err <= tol:
                            rec["failed"] = f"wrong result: relative error {err:.2e} > {tol:g}"
                        else:
                            rec["median_s"] = statistics.median(time_callable(fn, torch.device(dev), warmup=1,
                                                                              repeats=reps))
                    except Exception as exc:  # compilation (shared memory, registers) or launch failure
                        rec["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    finally:
                        os.environ.pop(K.CONFIG_ENV, None)
                    trials.append(rec)
                    results.append(rec)
                    log(f"[tune] {dtype} d={d} {kind} {cand}: "
                        + (f"{rec['median_s'] * 1e3:.3f} ms" if "median_s" in rec else rec["failed"]))
                ok = [r for r in results if "median_s" in r]
                if ok:
                    win = min(ok, key=lambda r: r["median_s"])
                    base = results[0].get("median_s")
                    best[kind] = win["config"]
                    log(f"[tune] {dtype} d={d} {kind}: best {win['config']} {win['median_s'] * 1e3:.3f} ms"
                        + (f" (default {base * 1e3:.3f} ms, {base / win['median_s']:.2f}x)" if base else ""))
            if best:
                entries[f"{dtype}:{d}"] = best
    finally:
        os.environ.pop(K.CONFIG_ENV, None)
        if saved_env is not None:
            os.environ[K.CONFIG_ENV] = saved_env
    return {"entries": entries, "trials": trials}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=16384)
    p.add_argument("--d", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--out", default=os.path.join(ROOT, "vlmkern", "kernels", "triton", "hgcl_tuned.json"))
    p.add_argument("--budget-s", type=float, default=240.0, help="stop trying candidates after this long")
    p.add_argument("--max-configs", type=int, default=16, help="candidates per kernel family and d")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--interpret", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    a = p.parse_args(argv)
    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    gpu = torch.cuda.is_available() and not a.interpret
    if not gpu and not a.interpret:
        print("hgcl_tune: no CUDA device (use --interpret for a CPU smoke run)", file=sys.stderr)
        return 2
    res = tune(a.B, a.d, a.dtype, gpu, a.budget_s, a.max_configs, a.reps)
    import triton

    doc = {
        "command": " ".join(["python", "tools/hgcl_tune.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": (torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        **res,
    }
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        doc = {"arch": f"sm_{major}{minor}", **doc}
        if os.path.exists(a.out):  # keep the entries of other dtypes / widths tuned before
            with open(a.out) as f:
                old = json.load(f)
            if old.get("arch") == doc["arch"]:
                doc["entries"] = {**old.get("entries", {}), **doc["entries"]}
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"[tune] wrote {a.out}: {json.dumps(doc['entries'])}")
    return 0 if doc["entries"] else 1


if __name__ == "__main__":
    sys.exit(main())
