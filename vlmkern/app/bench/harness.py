"""The one benchmark harness every op's benchmark uses.

A benchmark is a :class:`Bench`: a list of cases (parameter dicts), a list of
:class:`Provider` s (reference, eager torch, vlmkern backends, peers) and the
modes to time (``"fwd"``, ``"bwd"``, ``"full"``).  For every (case, provider,
mode) the harness

* builds the inputs with ``provider.make(case, mode, device)``, which returns a
  zero-argument callable doing exactly the work to time (for ``"bwd"`` the
  callable runs the backward of a forward done at setup, keeping the graph with
  ``retain_graph=True``);
* warms up, then times ``repeats`` calls (CUDA events on GPU, a monotonic clock
  with synchronisation on CPU) and keeps the median and the 20th/80th
  percentiles;
* measures the peak memory of one call over what was allocated before it:
  ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) over
  the resident size before the call — large tensors are ``mmap``-ed, so this
  sees them; small allocations reused from the heap are invisible;
* computes the ratio to the ``baseline`` provider measured in the same run, and
  the fraction of the hardware floor: ``floor = max(bytes / copy_bandwidth,
  flops / matmul_peak)`` with both ceilings *measured on the machine at hand*
  by :func:`measure_ceilings` (a large device copy; a large matrix product in
  the benchmark's dtype), ``fraction = floor / median``.

The benchmarks are modules of the package (``vlmkern/app/bench/<op>.py``, so they run from
an installed wheel too); each imports ``from vlmkern.app.bench.harness import Bench, Provider, main``.

Results go to ``<out>/<bench>.json`` (every record, plus the machine and the
ceilings) and ``<out>/<bench>.md`` (a markdown table).  Each benchmark script
exposes ``make_bench(quick: bool) -> Bench`` and calls :func:`main` so that
``python -m vlmkern.app.bench.<op> --quick --out bench/out`` runs it; ``vlmkern bench``
(``python -m vlmkern.app.bench.run_all``) runs them all; ``bench/test_pytest_benchmark.py``
in a checkout exposes the same quick cases
to ``pytest-benchmark``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Case = Dict[str, Any]
MakeFn = Callable[[Case, str, torch.device], Callable[[], Any]]


@dataclass
class Provider:
    """One implementation to time.

    ``make(case, mode, device)`` returns the callable to time (inputs already
    built).  ``available(case, device)`` returns ``(ok, reason)``; unavailable
    providers are recorded with the reason instead of a time.  ``kind`` is one
    of ``reference``, ``baseline``, ``vlmkern``, ``peer``.  ``modes`` limits the
    modes this provider supports (``None``: all of the bench's modes).
    ``skip(case, mode, device)`` (optional) returns a reason to skip one
    (case, mode) pair (recorded like an unavailable provider), or ``None``.
    """

    name: str
    make: MakeFn
    kind: str = "vlmkern"
    available: Callable[[Case, torch.device], Tuple[bool, str]] = lambda case, dev: (True, "")
    modes: Optional[Sequence[str]] = None
    skip: Optional[Callable[[Case, str, torch.device], Optional[str]]] = None


@dataclass
class Bench:
    """A benchmark: cases x providers x modes.

    ``bytes_moved(case, mode)`` and ``flops(case, mode)`` give the minimum
    traffic and arithmetic of the op (for the hardware-floor fraction);
    ``dtype_of(case)`` picks the dtype of the matmul ceiling.  ``max_case``
    (optional) returns False for cases too large for a device (e.g. 256k only
    on GPU).  ``time_budget_s`` (optional) caps the timed calls of one
    (case, provider, mode): the repeats shrink (to no fewer than 3) when the
    warm-up calls say ``repeats`` would take longer (e.g. B = 256k on a GPU).
    ``count_launches``: on CUDA, also record the device operations (kernels,
    memsets, copies) one call of each ``vlmkern`` provider issues, from
    ``torch.profiler``.  ``baseline_of(case)`` (optional) names the baseline
    of one case when it is not ``baseline`` (a bench whose cases compare
    different peers).
    """

    name: str
    cases: List[Case]
    providers: List[Provider]
    baseline: str
    modes: Sequence[str] = ("full",)
    bytes_moved: Optional[Callable[[Case, str], float]] = None
    flops: Optional[Callable[[Case, str], float]] = None
    dtype_of: Callable[[Case], torch.dtype] = lambda case: torch.float32
    case_ok: Callable[[Case, torch.device], Tuple[bool, str]] = lambda case, dev: (True, "")
    notes: str = ""
    time_budget_s: Optional[float] = None
    count_launches: bool = False
    baseline_of: Optional[Callable[[Case], str]] = None


# ---------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
                  min_time_s: float = 0.0, budget_s: Optional[float] = None) -> List[float]:
    """Seconds per call for ``repeats`` calls after ``warmup`` calls.

    ``budget_s``: the second warm-up call (the first when there is only one;
    the first may include compilation) is timed, and the repeats shrink (to no
    fewer than 3) and the remaining warm-ups are dropped when they would take
    longer than ``budget_s``."""
    for i in range(warmup):
        if budget_s is None or (i == 0 and warmup > 1):
            fn()
            continue
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        per_call = time.perf_counter() - t0
        repeats = max(3, min(repeats, int(budget_s / max(per_call, 1e-9))))
        if per_call * (warmup - 1 - i + repeats) > budget_s:
            break
        budget_s = None  # decided: the remaining warm-ups run untimed
    _sync(device)
    times: List[float] = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        t_begin = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - t_begin < min_time_s and len(times) < 10 * repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _fix_malloc_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at 128 KiB.

    glibc raises the threshold dynamically after a large block is freed, after
    which same-sized blocks come from the heap and are reused without touching
    the resident size - invisible to the RSS-based CPU peak-memory measure.
    Setting it explicitly turns the dynamic adjustment off.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    except OSError:
        pass


_fix_malloc_mmap_threshold()


def _read_status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one call of ``fn`` above what was live before it."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    if not _reset_peak_rss():
        return None
    before = _read_status_kb("VmRSS")
    out = fn()
    peak = _read_status_kb("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return max(0, (peak - before) * 1024)


def count_device_ops(fn: Callable[[], Any], device: torch.device) -> Optional[Dict[str, Any]]:
    """Device operations (kernels, memsets, copies) one call of ``fn`` issues on
    CUDA, from ``torch.profiler``: ``{"total": n, "names": {name: count}}``;
    ``None`` on other devices or when the profiler is unavailable."""
    if device.type != "cuda":
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        return None
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    names: Dict[str, int] = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) == DeviceType.CUDA:
            names[ev.name] = names.get(ev.name, 0) + 1
    return {"total": sum(names.values()), "names": names}


# ---------------------------------------------------------------------------
# hardware ceilings
# ---------------------------------------------------------------------------

_CEILING_CACHE: Dict[Tuple[str, str], Dict[str, float]] = {}


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.float32, quick: bool = False) -> Dict[str, float]:
    """Measured copy bandwidth (bytes/s, read+write) and matmul rate (FLOP/s)."""
    key = (str(device), str(dtype))
    if key in _CEILING_CACHE:
        return _CEILING_CACHE[key]
    if device.type == "cuda":
        nbytes = 1 << 30
        n_mm = 8192
    else:
        nbytes = (64 << 20) if quick else (256 << 20)
        n_mm = 1024 if quick else 2048
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = statistics.median(time_callable(lambda: dst.copy_(src), device, warmup=2, repeats=5 if quick else 10))
    bw = 2 * nbytes / t
    del src, dst
    mm_dtype = dtype if (device.type == "cuda" or dtype in (torch.float32, torch.float64, torch.bfloat16)) else torch.float32
    a = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device).to(mm_dtype)
    t = statistics.median(time_callable(lambda: a @ b, device, warmup=2, repeats=3 if quick else 7))
    flops = 2 * n_mm**3 / t
    res = {"copy_bytes_per_s": bw, "matmul_flops_per_s": flops, "matmul_dtype": str(mm_dtype), "matmul_n": n_mm,
           "copy_bytes": nbytes}
    _CEILING_CACHE[key] = res
    return res


def machine_description(device: torch.device) -> Dict[str, Any]:
    d = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    d["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    try:
        import vlmkern

        d["vlmkern_backends"] = {op: row.get(str(device.type), {}).get("auto")
                                 for op, row in vlmkern.backends.table([device.type]).items()}
    except Exception as exc:  # pragma: no cover
        d["vlmkern_error"] = repr(exc)
    return d


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


def run(bench: Bench, device: torch.device | str, *, warmup: int = 2, repeats: int = 5, quick: bool = False,
        out_dir: Optional[str] = None, measure_memory: bool = True, verbose: bool = True) -> Dict[str, Any]:
    """Run every case x provider x mode; return (and write) the results."""
    device = torch.device(device)
    records: List[Dict[str, Any]] = []
    ceilings: Dict[str, Dict[str, float]] = {}
    for case in bench.cases:
        ok_case, why_case = bench.case_ok(case, device)
        if not ok_case:
            if verbose:
                print(f"[{bench.name}] skip case {case}: {why_case}", flush=True)
            continue
        dt = bench.dtype_of(case)
        ceil = measure_ceilings(device, dt, quick=quick)
        ceilings[str(dt)] = ceil
        for mode in bench.modes:
            case_records = []
            for prov in bench.providers:
                rec: Dict[str, Any] = {"bench": bench.name, "case": dict(case), "provider": prov.name,
                                       "kind": prov.kind, "mode": mode}
                if prov.modes is not None and mode not in prov.modes:
                    continue
                ok, why = prov.available(case, device)
                if ok and prov.skip is not None:
                    why = prov.skip(case, mode, device) or ""
                    ok = not why
                if not ok:
                    rec["skipped"] = why
                    case_records.append(rec)
                    continue
                try:
                    fn = prov.make(case, mode, device)
                    times = time_callable(fn, device, warmup=max(warmup, 1) if bench.time_budget_s else warmup,
                                          repeats=repeats, budget_s=bench.time_budget_s)
                    rec["median_s"] = statistics.median(times)
                    qs = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
                    rec["p20_s"], rec["p80_s"] = qs[0], qs[-1]
                    rec["repeats"] = len(times)
                    if measure_memory:
                        rec["peak_mem_bytes"] = peak_memory(fn, device)
                    if bench.count_launches and prov.kind == "vlmkern":
                        ops = count_device_ops(fn, device)
                        if ops is not None:
                            rec["device_ops"] = ops["total"]
                            rec["device_op_names"] = ops["names"]
                    del fn
                except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
                    rec["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
                    torch.cuda.empty_cache()
                except MemoryError as exc:
                    rec["skipped"] = f"out of memory: {exc}"
                gc.collect()
                if "median_s" in rec:
                    fl = bench.flops(case, mode) if bench.flops else 0.0
                    by = bench.bytes_moved(case, mode) if bench.bytes_moved else 0.0
                    floor_bytes, floor_flops = by / ceil["copy_bytes_per_s"], fl / ceil["matmul_flops_per_s"]
                    floor = max(floor_bytes, floor_flops)
                    rec["flops"], rec["bytes"] = fl, by
                    rec["floor_s"] = floor
                    rec["floor_bytes_s"], rec["floor_flops_s"] = floor_bytes, floor_flops
                    rec["floor_fraction"] = floor / rec["median_s"] if floor > 0 else None
                    rec["achieved_tflops"] = fl / rec["median_s"] / 1e12 if fl else None
                    rec["achieved_gbps"] = by / rec["median_s"] / 1e9 if by else None
                case_records.append(rec)
                if verbose:
                    print(_fmt_line(rec), flush=True)
            base_name = bench.baseline_of(case) if bench.baseline_of else bench.baseline
            base = next((r for r in case_records if r["provider"] == base_name and "median_s" in r), None)
            for r in case_records:
                if base is not None and "median_s" in r:
                    r["speedup_vs_baseline"] = base["median_s"] / r["median_s"]
                    bm, rm = base.get("peak_mem_bytes"), r.get("peak_mem_bytes")
                    r["mem_ratio_vs_baseline"] = (rm / bm) if (bm and rm is not None) else None
            records.extend(case_records)
        _write_result(bench, device, ceilings, warmup, repeats, records, out_dir, complete=False)
    return _write_result(bench, device, ceilings, warmup, repeats, records, out_dir, complete=True)


def _write_result(bench: Bench, device: torch.device, ceilings, warmup: int, repeats: int,
                  records: List[Dict[str, Any]], out_dir: Optional[str], complete: bool) -> Dict[str, Any]:
    """The result dict; written to ``out_dir`` after every case (``complete`` =
    False until the last), so a run stopped by a timeout keeps what it measured."""
    result = {
        "bench": bench.name,
        "baseline": bench.baseline,
        "device": str(device),
        "machine": machine_description(device),
        "ceilings": ceilings,
        "warmup": warmup,
        "repeats": repeats,
        "notes": bench.notes,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "complete": complete,
        "records": records,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{bench.name}_{device.type}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(out_dir, f"{bench.name}_{device.type}.md"), "w") as f:
            f.write(markdown(result))
    return result


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= s:
            return f"{n / s:.1f} {unit}"
    return f"{int(n)} B"


def _fmt_case(case: Case) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def _fmt_line(rec: Dict[str, Any]) -> str:
    if "median_s" not in rec:
        return f"  {_fmt_case(rec['case'])} {rec['mode']:4s} {rec['provider']:24s} skipped: {rec.get('skipped')}"
    ff = rec.get("floor_fraction")
    return (f"  {_fmt_case(rec['case'])} {rec['mode']:4s} {rec['provider']:24s} {rec['median_s'] * 1e3:10.3f} ms"
            f"  peak {_fmt_bytes(rec.get('peak_mem_bytes')):>10s}"
            + (f"  floor {ff * 100:5.1f}%" if ff else ""))


def markdown(result: Dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"### {result['bench']} on {result['device']}",
        "",
        f"Machine: {m.get('gpu') or m.get('cpu_model', m.get('processor'))}, {m.get('cpu_threads')} threads, "
        f"torch {m.get('torch')}, {m.get('platform')}.  Command: `{result['command']}`.  "
        f"Median of {result['repeats']} after {result['warmup']} warm-up calls; baseline: `{result['baseline']}`.",
        "",
        "Ceilings measured in this run: "
        + "; ".join(f"{k}: copy {v['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul ({v['matmul_dtype']}) "
                    f"{v['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s" for k, v in result["ceilings"].items()),
        "",
    ]
    ops = any("device_ops" in r for r in result["records"])
    lines += [
        "| case | mode | provider | median ms | vs baseline | peak extra mem | mem vs baseline | TFLOP/s | GB/s | % of floor |"
        + (" device ops |" if ops else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ops else ""),
    ]
    for r in result["records"]:
        if "median_s" not in r:
            lines.append(f"| {_fmt_case(r['case'])} | {r['mode']} | {r['provider']} | skipped: {r.get('skipped')} | | | | | | |"
                         + (" |" if ops else ""))
            continue
        sp = r.get("speedup_vs_baseline")
        mr = r.get("mem_ratio_vs_baseline")
        ff = r.get("floor_fraction")
        tf = r.get("achieved_tflops")
        gb = r.get("achieved_gbps")
        lines.append(
            f"| {_fmt_case(r['case'])} | {r['mode']} | {r['provider']} | {r['median_s'] * 1e3:.3f} | "
            f"{(f'{sp:.2f}x' if sp else '')} | {_fmt_bytes(r.get('peak_mem_bytes'))} | "
            f"{(f'{mr * 100:.1f}%' if mr is not None else '')} | {(f'{tf:.3f}' if tf else '')} | "
            f"{(f'{gb:.1f}' if gb else '')} | {(f'{ff * 100:.1f}%' if ff else '')} |"
            + (f" {r.get('device_ops', '')} |" if ops else ""))
    cut = sorted({r["repeats"] for r in result["records"] if r.get("repeats", result["repeats"]) < result["repeats"]})
    if cut:
        lines += ["", f"Some rows are medians of fewer calls ({', '.join(map(str, cut))}): the benchmark's time "
                      "budget per row cut them (the JSON's `repeats` has each row's count)."]
    if result.get("complete") is False:
        lines += ["", "**Incomplete**: the run stopped (or is still running) before its last case."]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines) + "\n"


def main(make_bench: Callable[[bool], Bench], argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point shared by every ``vlmkern/app/bench/<op>.py``."""
    p = argparse.ArgumentParser(description=(make_bench.__doc__ or "").strip().splitlines()[0] if make_bench.__doc__ else None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small cases and few repeats (CI / demo)")
    p.add_argument("--targets", action="store_true",
                   help="only the cases the issues' speed / memory targets name (vlmkern.app.bench.targets judges them)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default="bench/out", help="folder for <bench>_<device>.json and .md")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)
    bench = make_bench(args.quick, targets=args.targets)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    res = run(bench, args.device, warmup=warmup, repeats=repeats, quick=args.quick, out_dir=args.out,
              measure_memory=not args.no_memory)
    print()
    print(markdown(res))
    return res


def fraction(a: Optional[float], b: Optional[float]) -> float:
    if a is None or b is None or b == 0:
        return math.nan
    return a / b
