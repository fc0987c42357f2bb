"""Cost of the per-sample Jacobian (SPEC §3b) on the method check's model.

    python -m vlmkern.app.bench.kalman_jacobian_bench [--M 16 96] [--threads 1] [--reps 3]

LoRA (rank 4, both towers) on the tiny open_clip CLIP of
``kalman_method_check``, loss = per-sample cross-entropy of the image features
against the 24 class-prompt features.  Routes for the M Jacobian rows:

* ``batched``: ``torch.autograd.grad(losses, params, eye(M), is_grads_batched=True)``
  (``KalmanOptimizer.step(closure)`` in per-sample mode);
* ``loop``: M ``torch.autograd.grad(losses[m], params, retain_graph=True)`` calls;
* ``vmap``: ``vlmkern.optim.per_sample_jacobian`` (``torch.func`` vmap(grad)
  over the samples; ``KalmanOptimizer.step_per_sample``);
* ``vmap-math``: the same with ``sdpa_kernel(SDPBackend.MATH)``: on the CPU the
  fused attention kernel has no vmap batching rule (torch falls back to a loop).

* ``scalar``: for scale, the gradient of the mean loss (one ordinary backward:
  what a scalar-observation step needs).

Each includes the batch's forward pass.  Also timed: one whole optimizer step
by ``step(closure)`` and by ``step_per_sample`` (math attention).  Routes
slower than ``--max-seconds`` per call are timed once.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmkern.app.bench import kalman_method_check as K
from vlmkern.app.models.lora import add_lora, lora_parameters
from vlmkern.optim import KalmanOptimizer, per_sample_jacobian


def _timed(fn, reps, max_seconds):
    fn()  # warm-up (first-call allocations, vmap tracing)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if times[-1] > max_seconds:
            break
    return 1e3 * min(times), len(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", type=int, nargs="+", default=[16, 96])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--routes", nargs="+", default=["scalar", "batched", "loop", "vmap", "vmap-math"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = K.tiny_clip(0)
    add_lora(model, rank=4, alpha=8)
    model.train()
    params = lora_parameters(model)
    tokens = K.prompts()

    def loss(m, x, y):
        return F.cross_entropy(K.class_logits(m, x, tokens), y, reduction="none")

    def loss_math(m, x, y):
        with sdpa_kernel([SDPBackend.MATH]):
            return loss(m, x, y)

    out = {"threads": args.threads, "n_params": sum(q.numel() for q in params), "rows": []}
    for M in args.M:
        y = torch.arange(M) % len(K.CLASSES)
        x = K.render(y, torch.Generator().manual_seed(M), shifted=True)
        eye = torch.eye(M)
        routes = {
            "scalar": lambda: torch.autograd.grad(loss(model, x, y).mean(), params),
            "batched": lambda: torch.autograd.grad(loss(model, x, y), params, grad_outputs=eye, is_grads_batched=True),
            "loop": lambda: (lambda ls: [torch.autograd.grad(ls[m], params, retain_graph=True) for m in range(M)])(
                loss(model, x, y)),
            "vmap": lambda: per_sample_jacobian(model, params, loss, x, y),
            "vmap-math": lambda: per_sample_jacobian(model, params, loss_math, x, y),
        }
        row = {"M": M}
        for name in args.routes:
            row[name + "_ms"], row[name + "_reps"] = _timed(routes[name], args.reps, args.max_seconds)
            print(f"M={M:4d} {name:10s} {row[name + '_ms']:10.1f} ms  ({row[name + '_reps']} timed)", flush=True)
        state = {q: q.detach().clone() for q in params}

        def opt_step(fast):
            opt = KalmanOptimizer(params, p0=0.01, observation="per_sample")
            def run():
                if fast:
                    opt.step_per_sample(model, loss_math, x, y)
                else:
                    opt.step(lambda: loss(model, x, y))
            return run

        for name, fast in (("step_per_sample", True), ("step_closure", False)):
            if not fast and "batched" not in args.routes:
                continue
            row[name + "_ms"], row[name + "_reps"] = _timed(opt_step(fast), args.reps, args.max_seconds)
            with torch.no_grad():
                for q, v in state.items():
                    q.copy_(v)
            print(f"M={M:4d} {name:16s} {row[name + '_ms']:10.1f} ms  ({row[name + '_reps']} timed)", flush=True)
        out["rows"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
