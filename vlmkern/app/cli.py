"""Command line: ``vlmkern info``, ``vlmkern demo``, ``vlmkern fidelity``, ``vlmkern bench``, ``vlmkern train``, ``vlmkern eval``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional


def cmd_info(args) -> int:
    import vlmkern

    if args.json:
        print(json.dumps(vlmkern.info(), indent=1, default=str))
    else:
        print(vlmkern.info(as_text=True))
    return 0


def _run_bench(quick: bool, out: str, device: Optional[str], only: Optional[List[str]], targets: bool = False) -> int:
    """``vlmkern.app.bench.run_all`` in a child process (the benchmarks' memory peaks are then their own),
    writing under ``out`` relative to the current folder; works from a checkout and from a wheel install."""
    cmd = [sys.executable, "-m", "vlmkern.app.bench.run_all", "--out", out]
    if quick:
        cmd.append("--quick")
    if targets:
        cmd.append("--targets")
    if device:
        cmd += ["--device", device]
    if only:
        cmd += ["--only", *only]
    # the child imports this very vlmkern: the installed package as it is; a source tree (run with
    # PYTHONPATH or from elsewhere) is put first on the child's path
    import vlmkern

    root = os.path.dirname(os.path.dirname(os.path.abspath(vlmkern.__file__)))
    env = dict(os.environ)
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.call(cmd, env=env)


def _banner(text: str) -> None:
    print("=" * 78)
    print(text)
    print("=" * 78, flush=True)


def cmd_demo(args) -> int:
    """The main job on the embedded default: backends, every method vs its baseline, microbenchmarks."""
    _banner("vlmkern demo 1/3: build and backends")
    cmd_info(argparse.Namespace(json=False))
    print()
    if not args.skip_methods:
        _banner(f"vlmkern demo 2/3: each method against its baseline (embedded data, scale {args.scale})")
        from .demo import run_demo

        run_demo(out=args.out, scale=args.scale, seed=args.seed)
        print()
    if args.skip_bench:
        return 0
    _banner("vlmkern demo 3/3: kernel microbenchmarks (quick sizes; full sizes: make bench)")
    return _run_bench(quick=True, out=os.path.join(args.out, "bench"), device=args.device, only=None)


def cmd_fidelity(args) -> int:
    """Each paper's central claim on the embedded data, over several seeds (docs/FIDELITY.md)."""
    from .fidelity import run_fidelity, tune

    scale_flag = f" --scale {args.scale}" if args.scale != "default" else ""
    if args.tune:
        tcmd = f"vlmkern fidelity --tune --tune-seed {args.tune_seed}{scale_flag}" + (
            " --tune-tasks " + " ".join(args.tune_tasks) if args.tune_tasks else "")
        if args.tune_seed in args.seeds:
            raise SystemExit(f"--tune-seed {args.tune_seed} is one of --seeds: tune on a seed the report does not use")
        tune(scale=args.scale, seed=args.tune_seed, out=os.path.join(args.out, f"tune_seed{args.tune_seed}"),
             command=tcmd, tasks=args.tune_tasks)
    if not args.seeds:
        return 0
    cmd = "vlmkern fidelity" + (" --claims " + " ".join(args.claims) if args.claims else "") + " --seeds " + \
        " ".join(map(str, args.seeds)) + scale_flag
    protocol = None
    if args.lr_mults:
        cmd += " --lr-mults " + " ".join(f"{m:g}" for m in args.lr_mults)
        protocol = {"lr_mults": tuple(args.lr_mults)}
    run_fidelity(seeds=args.seeds, scale=args.scale, out=args.out, report=args.report or
                 os.path.join(args.out, "FIDELITY.md"), command=cmd, reuse=args.reuse, claims=args.claims,
                 cache_dir=args.cache, protocol=protocol)
    return 0


def cmd_bench(args) -> int:
    return _run_bench(quick=args.quick, out=args.out, device=args.device, only=args.only, targets=args.targets)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="vlmkern", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, devices and live backends per op")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(fn=cmd_info)
    pd = sub.add_parser("demo", help="the main job on the embedded default (no downloads)")
    pd.add_argument("--out", default="runs/demo")
    pd.add_argument("--device", default=None)
    pd.add_argument("--scale", default="default", choices=("default", "tiny"))
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--skip-methods", action="store_true")
    pd.add_argument("--skip-bench", action="store_true")
    pd.set_defaults(fn=cmd_demo)
    pf = sub.add_parser("fidelity", help="check each paper's central claim over several seeds (runs the demo per seed)")
    pf.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the report (none: only --tune)")
    pf.add_argument("--tune", action="store_true",
                    help="first pick every run's step sizes on --tune-seed (writes vlmkern/app/tuned_hparams.json)")
    pf.add_argument("--tune-seed", type=int, default=100)
    pf.add_argument("--tune-tasks", nargs="*", default=None, choices=("tuneclip", "apft", "wrf4cir", "kalman"),
                    help="re-tune only these tasks (the others keep their tuned values)")
    pf.add_argument("--scale", default="default", choices=("default", "tiny"))
    pf.add_argument("--out", default="runs/fidelity")
    pf.add_argument("--report", default=None, help="markdown report path (default <out>/FIDELITY.md)")
    pf.add_argument("--reuse", action="store_true", help="read finished seeds' results.json instead of re-running")
    pf.add_argument("--claims", nargs="*", default=None, choices=("demo", "osr", "hgcl", "kalman", "apft", "wrf4cir"),
                    help="which claims to run (default all): demo = the claims read from the demo's runs; osr = "
                         "the OSR protocol (converged cached base model, per-step evaluation, Table 2 ablation); "
                         "hgcl = HGCL vs GCL with and without semantic false negatives, attribute-level relevance, "
                         "held-out shift (Fig. 3/4/7); kalman = AdamW, Polyak SGD, scalar and per-sample Kalman on "
                         "few-shot LoRA, tuned on validation (LoKO, Kalman-NGD CLIP; issue 16); apft = APFT vs full "
                         "fine-tuning and LoRA on a shifted, long-tailed domain: tail retrieval and forgetting of "
                         "the base model's zero-shot skill; wrf4cir = WRF4CIR's weight perturbation in an "
                         "overfitting regime (frozen image tower, learned combiner, 30 epochs, gamma picked on a "
                         "tuning split; Table 4, Fig. 5)")
    pf.add_argument("--lr-mults", type=float, nargs="*", default=None,
                    help="hgcl and apft protocols: the common learning rates, as multiples of the base model's "
                         "peak (defaults: hgcl 0.03 0.1 0.3, apft 0.03 0.3)")
    pf.add_argument("--cache", default=None,
                    help="cache folder for base models (default $VLMKERN_CACHE or runs/cache)")
    pf.set_defaults(fn=cmd_fidelity)
    pb = sub.add_parser("bench", help="kernel microbenchmarks (vlmkern.app.bench.run_all)")
    pb.add_argument("--quick", action="store_true")
    pb.add_argument("--targets", action="store_true",
                    help="only the sizes the issues' targets name, then vlmkern.app.bench.targets (TARGETS_<device>.md)")
    pb.add_argument("--out", default="bench/out")
    pb.add_argument("--device", default=None)
    pb.add_argument("--only", nargs="*", default=None)
    pb.set_defaults(fn=cmd_bench)
    from .methods.cli_train import add_train_parser

    add_train_parser(sub)
    from .methods.cli_eval import add_eval_parser

    add_eval_parser(sub)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
