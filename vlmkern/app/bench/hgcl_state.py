"""HGCL state placement: the ``u`` state on the features' device vs in host memory.

One training step of :class:`vlmkern.GlobalContrastiveLoss` (forward + backward of the
features, state update) with the state on the features' device (``state_on_host=False``,
``8 N`` bytes there) against ``state_on_host=True`` (the state in (pinned) host memory;
per call the batch's distinct entries are gathered into a batch-local state on the device
and written back asynchronously, scattered before the next call).  Reported per
``(N, B)``: the median step time, the state's bytes resident on the features' device and
in host memory, and on CUDA the peak extra device memory of one step.

The index comes as a data loader gives it: on the CPU for the host mode (no
device-to-host copy), already on the device for the on-device mode.  Indices are drawn
with replacement (duplicates occur, as with a resampling loader) from ``[0, N)``.

``python -m vlmkern.app.bench.hgcl_state [--quick] [--device cpu|cuda] [--out bench/out]``
(also run by ``python -m vlmkern.app.bench.run_all``).  Cases: N in {1e6, 1e7} x B in
{256, 1024}, d = 512 (fp32 on CPU, bf16 on GPU; on the GPU also N = 1e8);
``--quick``: N = 1e6, B = 256.  On the CPU the two modes hold the state in the same memory,
so the comparison there measures the gather / scatter overhead only; the point of the mode
(device memory at N = 400M) needs a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn

from vlmkern import GlobalContrastiveLoss
from vlmkern.app.bench.harness import _fmt_bytes, _sync, machine_description, peak_memory, time_callable

TAU, GAMMA, MARGIN, D = 0.05, 0.9, 0.1, 512


def cases(quick: bool, device: torch.device):
    if quick:
        return [dict(N=10**6, B=256, d=D)]
    ns = (10**6, 10**7) + ((10**8,) if device.type == "cuda" else ())
    return [dict(N=n, B=b, d=D) for n in ns for b in (256, 1024)]


def make_step(case, host: bool, device: torch.device, calls: int = 64):
    """The step callable and its loss module (state visited once over the first batch)."""
    N, B, d = case["N"], case["B"], case["d"]
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    img = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt).requires_grad_()
    txt = Fn.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt).requires_grad_()
    loss_fn = GlobalContrastiveLoss(N, tau=TAU, gamma=GAMMA, margin=MARGIN, state_on_host=host)
    if not host:
        loss_fn = loss_fn.to(device)
    idx = [torch.randint(0, N, (B,), generator=g) for _ in range(calls)]
    if not host:
        idx = [i.to(device) for i in idx]
    k = [0]

    def step():
        i = idx[k[0] % calls]
        k[0] += 1
        loss = loss_fn(img, txt, i)
        loss.backward()
        return loss

    step.img, step.indices = img, idx
    return step, loss_fn


def state_bytes(loss_fn, device: torch.device):
    """(bytes of the state on ``device``, bytes of the state in host memory)."""
    on_dev = host = 0
    for t in (loss_fn._buffers["log_u_img"], loss_fn._buffers["log_u_txt"]):
        n = t.numel() * t.element_size()
        if t.device == device:
            on_dev += n
        if t.device.type == "cpu":
            host += n
    return on_dev, host


def run_bench(device="cpu", quick: bool = False, out_dir: str = "bench/out", warmup: int = 2,
              repeats: int = 10) -> str:
    device = torch.device(device)
    records = []
    for case in cases(quick, device):
        # the two modes' steps alternate (device, host, host, device, ...): on a shared machine a load
        # change then hits both medians alike
        made = {host: make_step(case, host, device) for host in (False, True)}
        times = {False: [], True: []}
        for r in range(warmup + repeats):
            for host in ((False, True) if r % 2 == 0 else (True, False)):
                _sync(device)
                t0 = time.perf_counter()
                made[host][0]()
                _sync(device)
                if r >= warmup:
                    times[host].append(time.perf_counter() - t0)
        for host in (False, True):
            step, loss_fn = made[host]
            name = "host-state" if host else "device-state"
            on_dev, on_host = state_bytes(loss_fn, device)
            peak = peak_memory(step, device) if device.type == "cuda" else None
            q = statistics.quantiles(times[host], n=5) if len(times[host]) >= 2 else times[host] * 4
            rec = dict(case=case, provider=name, median_s=statistics.median(times[host]), p20_s=q[0],
                       p80_s=q[-1], repeats=len(times[host]), state_bytes_on_device=on_dev,
                       state_bytes_on_host=on_host, peak_extra_device_bytes=peak)
            records.append(rec)
            print(f"  N={case['N']:.0e} B={case['B']} d={case['d']} {name:12s} {rec['median_s'] * 1e3:9.2f} ms  "
                  f"state on {device.type}: {_fmt_bytes(on_dev)}  host: {_fmt_bytes(on_host)}", flush=True)
        # the host mode's own work alone (no loss): flush of the previous write-back, index
        # check, unique, gather into staging, copies to the device, start of the write-back
        step, loss_fn = made[True]
        img, idx = step.img, step.indices
        k = [0]

        def bookkeeping():
            loss_fn.flush()
            *_, writes = loss_fn._gather_local(img, idx[k[0] % len(idx)], None, None)
            loss_fn._start_write_back(writes, img.device)
            k[0] += 1

        bk = time_callable(bookkeeping, device, warmup=warmup, repeats=repeats)
        q = statistics.quantiles(bk, n=5) if len(bk) >= 2 else bk * 4
        records.append(dict(case=case, provider="host-state bookkeeping only", median_s=statistics.median(bk),
                            p20_s=q[0], p80_s=q[-1], repeats=len(bk), state_bytes_on_device=None,
                            state_bytes_on_host=None, peak_extra_device_bytes=None))
        print(f"  N={case['N']:.0e} B={case['B']} host bookkeeping only {records[-1]['median_s'] * 1e3:9.3f} ms",
              flush=True)
        del made, step, loss_fn
    m = machine_description(device)
    cmd = " ".join([os.path.basename(sys.executable), "-m", "vlmkern.app.bench.hgcl_state"] + sys.argv[1:]) \
        if __name__ == "__main__" else f"vlmkern.app.bench.run_all (device={device.type}, quick={quick})"
    lines = [
        f"### hgcl_state on {device.type}",
        "",
        f"Machine: {m.get('gpu') or m.get('cpu_model', m.get('processor'))}, {m.get('cpu_threads')} threads, "
        f"torch {m.get('torch')}.  Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.  "
        f"Command: `{cmd}`.  Median (p20-p80) of {repeats} steps after {warmup} warm-up steps, the two "
        f"modes' steps alternating "
        f"(step = forward + backward + state update, HGCL margin {MARGIN}, tau {TAU}, gamma {GAMMA}).",
        "",
        "| N | B | d | state | median ms | p20-p80 ms | vs device-state | state on device | state in host memory "
        "| peak extra device mem |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r in records:
        c = r["case"]
        key = (c["N"], c["B"])
        if r["provider"] == "device-state":
            base[key] = r["median_s"]
        rel = r["median_s"] / base[key] if key in base else None
        lines.append(f"| {c['N']:.0e} | {c['B']} | {c['d']} | {r['provider']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['p20_s'] * 1e3:.3f}-{r['p80_s'] * 1e3:.3f} | {(f'{rel:.3f}x' if rel else '')} | "
                     f"{_fmt_bytes(r['state_bytes_on_device'])} | "
                     f"{_fmt_bytes(r['state_bytes_on_host'])} | {_fmt_bytes(r['peak_extra_device_bytes'])} |")
    if device.type == "cpu":
        lines += ["", "On the CPU both modes keep the state in host memory: the host-state row's extra time is "
                      "the per-call gather, the local state and the scatter (no device copies); the "
                      "bookkeeping-only row times that work alone (vs device-state: its share of a step).  Peak device "
                      "memory: n/a on the CPU."]
    md = "\n".join(lines) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"hgcl_state_{device.type}.json"), "w") as f:
            json.dump(dict(machine=m, command=cmd, records=records), f, indent=1, default=str)
        with open(os.path.join(out_dir, f"hgcl_state_{device.type}.md"), "w") as f:
            f.write(md)
    return md


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    md = run_bench(args.device, args.quick, args.out, warmup=args.warmup, repeats=args.repeats)
    print()
    print(md)
    return md


if __name__ == "__main__":
    main()
