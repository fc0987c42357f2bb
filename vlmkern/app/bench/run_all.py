"""Run every op benchmark (vlmkern/app/bench/<op>.py exposing ``make_bench(quick)``), then the
module benchmarks in ``EXTRA`` (``hgcl_state``: the HGCL state on the device vs in host memory;
not under ``--targets``).

    python -m vlmkern.app.bench.run_all [--quick | --targets] [--device cpu|cuda] [--out bench/out] [--only hgcl kalman]

Writes <out>/<bench>_<device>.json/.md for each, and <out>/SUMMARY_<device>.md.
``--targets`` runs only the cases the issues' targets name and then judges them
(vlmkern.app.bench.targets: <out>/TARGETS_<device>.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

import torch

from vlmkern import backends
from vlmkern.app.bench.harness import markdown, run

BENCHES = backends.ops()  # one benchmark per registered op, vlmkern/app/bench/<op>.py
# benchmarks of a module rather than an op: a run_bench(device, quick, out_dir) -> markdown each
EXTRA = ("hgcl_state",)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--targets", action="store_true", help="the target cases only, then vlmkern.app.bench.targets")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = []
    failed = []
    for name in args.only or (list(BENCHES) + ([] if args.targets else list(EXTRA))):
        try:
            mod = importlib.import_module(f"vlmkern.app.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vlmkern.app.bench.{name}":
                print(f"[run_all] op {name} has no benchmark (vlmkern/app/bench/{name}.py): skipped", flush=True)
                continue
            raise
        print(f"[run_all] {name} on {args.device}{' (quick)' if args.quick else ''}"
              f"{' (targets)' if args.targets else ''}", flush=True)
        try:
            if hasattr(mod, "run_bench"):  # its own table (EXTRA)
                summary.append(mod.run_bench(args.device, args.quick, args.out))
                continue
            bench = mod.make_bench(args.quick, targets=args.targets)
            res = run(bench, args.device, warmup=1 if args.quick else 3, repeats=3 if args.quick else 10,
                      quick=args.quick, out_dir=args.out)
            summary.append(markdown(res))
        except Exception:
            traceback.print_exc()
            failed.append(name)
    path = os.path.join(args.out, f"SUMMARY_{torch.device(args.device).type}.md")
    with open(path, "w") as f:
        f.write("\n\n".join(summary))
    print("\n\n".join(summary))
    print(f"[run_all] wrote {path}")
    if args.targets:
        from vlmkern.app.bench import targets

        targets.write(args.out, torch.device(args.device).type)
    if failed:
        print(f"[run_all] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
