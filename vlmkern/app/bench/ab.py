"""Interleaved A/B timing of two (or more) providers of one benchmark case.

    python -m vlmkern.app.bench.ab awp --case list=vitb16 dtype=float16 --mode restore \
        --providers loop vlmkern [--rounds 15] [--device cpu|cuda]

On a machine whose memory bandwidth drifts (a shared VM: the harness's copy
ceiling moved between 37 and 73 GB/s within an hour here), two rows of a
benchmark table measured a minute apart can disagree by 2x for identical
work.  This script builds every provider's inputs once, then alternates one
call of each per round, so drift hits all of them alike; it prints the median
per provider and the ratios to the first one.  Case values are parsed as
integers where they look like integers.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch

from vlmkern.app.bench.harness import _sync


def _parse_case(items):
    case = {}
    for it in items:
        k, _, v = it.partition("=")
        case[k] = int(v) if v.lstrip("-").isdigit() else v
    return case


def ab(bench_name: str, case: dict, mode: str, providers, rounds: int = 15, warmup: int = 3,
       device: str = "cpu") -> dict:
    mod = importlib.import_module(f"vlmkern.app.bench.{bench_name}")
    bench = mod.make_bench(False)
    dev = torch.device(device)
    by_name = {p.name: p for p in bench.providers}
    missing = [n for n in providers if n not in by_name]
    if missing:
        raise SystemExit(f"unknown provider(s) {missing}; {bench_name} has {sorted(by_name)}")
    fns = {}
    for n in providers:
        ok, why = by_name[n].available(case, dev)
        if not ok:
            raise SystemExit(f"{n} is not available: {why}")
        fns[n] = by_name[n].make(case, mode, dev)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in providers}
    for _ in range(rounds):
        for n, f in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    first = providers[0]
    for n in providers:
        print(f"{n:24s} median {med[n] * 1e3:9.3f} ms  (p20 {sorted(times[n])[len(times[n]) // 5] * 1e3:.3f}, "
              f"p80 {sorted(times[n])[(4 * len(times[n])) // 5 - 1] * 1e3:.3f})  "
              f"{first}/this = {med[first] / med[n]:.2f}x", flush=True)
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench")
    p.add_argument("--case", nargs="+", required=True, help="key=value ... (one benchmark case)")
    p.add_argument("--mode", default="full")
    p.add_argument("--providers", nargs="+", required=True)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    case = _parse_case(a.case)
    print(f"{a.bench} {case} mode={a.mode} on {a.device}: {a.rounds} interleaved rounds after {a.warmup} warm-up")
    ab(a.bench, case, a.mode, a.providers, a.rounds, a.warmup, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
