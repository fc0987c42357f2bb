"""AWP CPU kernels against the per-tensor loop and the copy bandwidth, one process.

    python -m vlmkern.app.bench.awp_cpu_versions [--list vitb16] [--rounds 5] [--dtypes float32 ...]

For comparing two builds of the library (e.g. before / after a kernel change):
run this once per build, alternating, and compare the ``vs loop`` and ``% copy``
columns (the loop and the copy ceiling are measured in the same process, so
drift of a shared machine's memory bandwidth cancels).  Per dtype: the copy
ceiling (harness.measure_ceilings: a 256 MiB ``copy_``), then perturb, restore
and random mode, each an interleaved A/B of ``loop`` and ``vlmkern``
(vlmkern/app/bench/ab.py).  ``% copy`` = the bytes of SPEC §4 (vlmkern/app/bench/awp.py ``bytes_moved``)
at the copy bandwidth over the median time.
"""

from __future__ import annotations

import argparse

import torch

from vlmkern.app.bench import awp
from vlmkern.app.bench.ab import ab
from vlmkern.app.bench.harness import measure_ceilings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", default="vitb16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--modes", nargs="+", default=["perturb", "restore", "random"])
    a = p.parse_args(argv)
    rows = []
    for dt in a.dtypes:
        case = {"list": a.list, "dtype": dt}
        bw = measure_ceilings(torch.device("cpu"), awp._DT[dt])["copy_bytes_per_s"]
        for mode in a.modes:
            med = ab("awp", case, mode, ["loop", "vlmkern"], rounds=a.rounds, warmup=2)
            pct = 100.0 * awp.bytes_moved(case, mode) / bw / med["vlmkern"]
            rows.append((dt, mode, med["loop"] * 1e3, med["vlmkern"] * 1e3, med["loop"] / med["vlmkern"], pct, bw / 1e9))
    print("\n| dtype | mode | loop ms | vlmkern ms | vs loop | % copy | copy GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f}x | {r[5]:.0f}% | {r[6]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
