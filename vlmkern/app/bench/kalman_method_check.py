"""A small, honest method check: LoRA fine-tuning of a tiny CLIP for few-shot
classification, KalmanOptimizer vs AdamW (CPU, offline; the default run about
10 minutes on a shared 2-core VM, 1 thread: bench/RESULTS_kalman.md).

    python -m vlmkern.app.bench.kalman_method_check [--seeds 0 1] [--iters 60] [--out bench/out]

No pretrained weights can be downloaded here, so the "pretrained" CLIP is made
on the spot: a tiny open_clip CLIP (ViT 3x64 on 32x32 images, text 2x64) is
trained contrastively for a few hundred AdamW steps on synthetic images of
coloured shapes ("a photo of a red circle.") drawn on a plain grey background,
with 6 of the 24 (colour, shape) combinations held out.

Few-shot task: classify all 24 combinations, zero-shot style (image features
against the 24 prompt features, cross-entropy over the classes), on a shifted
domain (striped, coloured-noise backgrounds, smaller shapes), from 4 shots per
class.  Only LoRA adapters (rank 4, both towers, attention qkv/out + MLP) are
trained, full batch, ``--iters`` iterations; test accuracy on 20 fresh images
per class is measured every ``--eval-every`` (10) iterations.  Each optimizer gets two settings
(reported, not tuned on the test set beyond that): AdamW lr in {3e-3, 1e-2};
the scalar Kalman filter (one observation per step: the batch loss) p0 in
{0.1, 1.0}; the per-sample Kalman filter (SPEC §3b: one observation per
training image, M = 24 x shots; Jacobian rows by ``torch.func`` vmap(grad) over
the images, ``KalmanOptimizer.step_per_sample``) p0 in {0.01, 0.1}; SGD with a Polyak step
``-c L / ||g||^2 g``, c in {0.1, 1} (the scalar filter is this step damped by
R / p0).  Kalman: R0 = 1, beta = 0.9, no process noise, gate off.  Reported per
arm over the seeds: the mean test accuracy over the evaluation points (area
under the accuracy-vs-iteration curve, normalised) and the first iteration at
which the accuracy reaches the target (90% of the best final accuracy of any
run), with the number of seeds that reach it; for the Kalman arms, how far
P moved from its prior (mean |log(p / p0)| over the LoRA parameters at the end).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmkern.app.models.lora import add_lora, lora_parameters
from vlmkern.optim import KalmanOptimizer

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.9, 0.1), "magenta": (0.9, 0.1, 0.9), "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ["circle", "square", "triangle", "cross"]
CLASSES = [(c, s) for c in COLORS for s in SHAPES]
HELD_OUT = {("red", "cross"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"),
            ("magenta", "triangle"), ("cyan", "square")}
SIZE = 32


def render(labels: torch.Tensor, gen: torch.Generator, shifted: bool) -> torch.Tensor:
    """Images [n, 3, 32, 32] of the classes ``labels`` (indices into CLASSES)."""
    n = labels.numel()
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    lo, hi = (4.0, 7.0) if shifted else (6.0, 10.0)
    r = lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen)
    cx = r + (SIZE - 2 * r) * torch.rand(n, 1, 1, generator=gen)
    cy = r + (SIZE - 2 * r) * torch.rand(n, 1, 1, generator=gen)
    dx, dy = xx - cx, yy - cy
    masks = {
        "circle": dx**2 + dy**2 < r**2,
        "square": (dx.abs() < 0.85 * r) & (dy.abs() < 0.85 * r),
        "triangle": (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),
        "cross": ((dx.abs() < r / 3) & (dy.abs() < r)) | ((dy.abs() < r / 3) & (dx.abs() < r)),
    }
    if shifted:  # stripes and coloured noise
        phase = 6.28 * torch.rand(n, 1, 1, 1, generator=gen)
        freq = 0.3 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
        stripes = 0.5 + 0.2 * torch.sin(freq * (xx + yy) + phase)
        img = stripes.expand(n, 3, SIZE, SIZE) + 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    else:
        img = 0.5 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    img = img.clone()
    bright = 0.8 + 0.2 * torch.rand(n, generator=gen)
    for i in range(n):
        c, s = CLASSES[int(labels[i])]
        m = masks[s][i]
        col = torch.tensor(COLORS[c]) * bright[i]
        img[i][:, m] = col[:, None]
    return ((img - 0.5) / 0.25).clamp(-3, 3)


def prompts() -> torch.Tensor:
    return open_clip.tokenize([f"a photo of a {c} {s}." for c, s in CLASSES], context_length=16)


def tiny_clip(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=SIZE, patch_size=4, width=64, layers=3, head_width=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2, mlp_ratio=2.0),
    )


def pretrain(steps: int, batch: int, seed: int = 1234) -> torch.nn.Module:
    model = tiny_clip(seed)
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i, c in enumerate(CLASSES) if c not in HELD_OUT])
    tokens = prompts()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        labels = allowed[torch.randint(0, len(allowed), (batch,), generator=gen)]
        img = model.encode_image(render(labels, gen, shifted=False), normalize=True)
        txt = model.encode_text(tokens[labels], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (labels[:, None] == labels[None, :]).float()  # duplicates of a class are positives too
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def class_logits(model, images, tokens):
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    return model.logit_scale.exp() * img @ txt.T


@torch.no_grad()
def accuracy(model, images, labels, tokens) -> float:
    model.eval()
    acc = (class_logits(model, images, tokens).argmax(1) == labels).float().mean().item()
    return acc


def finetune(base, opt_name, hp, train, test, tokens, iters, seed, eval_every=10):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    add_lora(model, rank=4, alpha=8)
    params = lora_parameters(model)
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=hp, weight_decay=0.0)
    elif opt_name == "sgd-polyak":
        opt = None
    else:
        opt = KalmanOptimizer(params, p0=hp, obs_noise0=1.0, obs_noise_beta=0.9,
                              observation="per_sample" if opt_name == "kalman-ps" else "loss")
    x, y = train
    curve = {"loss": [], "acc": {0: accuracy(model, *test, tokens)}}

    def closure():
        for q in params:
            q.grad = None
        model.train()
        loss = F.cross_entropy(class_logits(model, x, tokens), y)
        loss.backward()
        return loss

    def sample_loss(m, xs, ys):  # one sample; KalmanOptimizer.step_per_sample runs it under torch.func.vmap
        with sdpa_kernel([SDPBackend.MATH]):  # the CPU's fused attention has no vmap batching rule
            return F.cross_entropy(class_logits(m, xs, tokens), ys, reduction="none")

    for it in range(1, iters + 1):
        if opt_name == "adamw":
            loss = closure()
            opt.step()
        elif opt_name == "sgd-polyak":
            loss = closure()
            with torch.no_grad():
                g2 = sum((q.grad * q.grad).sum() for q in params)
                eta = hp * loss.detach() / g2.clamp_min(1e-12)
                for q in params:
                    q.add_(q.grad, alpha=-float(eta))
        elif opt_name == "kalman-ps":
            model.train()
            loss = opt.step_per_sample(model, sample_loss, x, y).mean()
        else:
            loss = opt.step(closure)
        curve["loss"].append(float(loss.detach()))
        if it % eval_every == 0:
            curve["acc"][it] = accuracy(model, *test, tokens)
    if isinstance(opt, KalmanOptimizer):  # how far P moved from its prior: mean |log(p / p0)| over all parameters
        logs = torch.cat([(opt.state[q]["variance"] / hp).log().abs().flatten() for q in params])
        curve["mean_abs_log_p_over_p0"] = float(logs.mean())
    return curve


HP_NAME = {"adamw": "lr", "kalman": "p0", "kalman-ps": "p0", "sgd-polyak": "c"}


def summarise(runs):
    """Per arm: mean, sd and standard error over seeds of the normalised area
    under the accuracy curve and of the final accuracy; the first iteration
    reaching the target (90% of the best accuracy of any run): median, mean
    and standard error over the seeds that reach it, and how many do; for the
    Kalman arms the mean |log(p/p0)| at the end."""
    import statistics

    def se(xs):
        return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0

    target = 0.9 * max(max(r["acc"].values()) for r in runs)
    arms = {}
    for r in runs:
        arms.setdefault((r["optimizer"], r["hp"]), []).append(r)
    rows = []
    for (name, hp), rs in arms.items():
        aucs = [sum(r["acc"].values()) / len(r["acc"]) for r in rs]
        hits = [min((k for k, v in r["acc"].items() if v >= target), default=None) for r in rs]
        reached = [h for h in hits if h is not None]
        finals = [list(r["acc"].values())[-1] for r in rs]
        moved = [r["mean_abs_log_p_over_p0"] for r in rs if "mean_abs_log_p_over_p0" in r]
        rows.append({"optimizer": name, "hp": hp, "seeds": len(rs), "target": target,
                     "auc_mean": statistics.mean(aucs), "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                     "auc_se": se(aucs), "final_mean": statistics.mean(finals), "final_se": se(finals),
                     "iters_to_target": statistics.median(reached) if reached else None,
                     "iters_to_target_mean": statistics.mean(reached) if reached else None,
                     "iters_to_target_se": se(reached) if reached else None, "reached": len(reached),
                     "mean_abs_log_p_over_p0": statistics.mean(moved) if moved else None,
                     "seconds_per_run": statistics.mean(r["seconds"] for r in rs)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10, help="test accuracy every this many iterations")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--arms", nargs="+", default=["adamw", "kalman", "kalman-ps", "sgd-polyak"],
                   choices=sorted(HP_NAME), help="optimizers to run (kalman-ps: per-sample observations)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # 1: reproducible, and no OpenMP oversubscription on a shared machine
    t0 = time.time()
    base = pretrain(args.pretrain_steps, 96)
    t_pre = time.time() - t0
    tokens = prompts()
    K = len(CLASSES)
    results = {"config": vars(args), "pretrain_s": t_pre, "runs": []}
    gen_test = torch.Generator().manual_seed(999)
    test_labels = torch.arange(K).repeat_interleave(20)
    test = (render(test_labels, gen_test, shifted=True), test_labels)
    unshifted = (render(test_labels, gen_test, shifted=False), test_labels)
    results["base_acc_unshifted_domain"] = accuracy(base, *unshifted, tokens)
    results["base_acc_shifted_domain"] = accuracy(base, *test, tokens)
    print(f"pretrained in {t_pre:.0f}s: zero-shot acc plain {results['base_acc_unshifted_domain']:.3f}, "
          f"shifted {results['base_acc_shifted_domain']:.3f}", flush=True)
    settings = [("adamw", 3e-3), ("adamw", 1e-2), ("kalman", 0.1), ("kalman", 1.0), ("kalman-ps", 0.01),
                ("kalman-ps", 0.1), ("sgd-polyak", 0.1), ("sgd-polyak", 1.0)]
    settings = [(n, hp) for n, hp in settings if n in args.arms]
    for seed in args.seeds:
        g = torch.Generator().manual_seed(100 + seed)
        y = torch.arange(K).repeat_interleave(args.shots)
        train = (render(y, g, shifted=True), y)
        for name, hp in settings:
            t1 = time.time()
            curve = finetune(base, name, hp, train, test, tokens, args.iters, seed, args.eval_every)
            run = {"seed": seed, "optimizer": name, "hp": hp, **curve, "seconds": time.time() - t1}
            results["runs"].append(run)
            accs = " ".join(f"{k}:{v:.3f}" for k, v in curve["acc"].items())
            print(f"seed {seed} {name:10s} {HP_NAME[name]}={hp:<6g} loss {curve['loss'][0]:.3f} -> "
                  f"{curve['loss'][-1]:.3f}  test acc {accs}  ({run['seconds']:.0f}s)", flush=True)
    results["summary"] = summarise(results["runs"])
    for row in results["summary"]:
        it = "-" if row["iters_to_target"] is None else (
            f"median {row['iters_to_target']}, mean {row['iters_to_target_mean']:.1f} "
            f"+- {row['iters_to_target_se']:.1f}")
        moved = "" if row["mean_abs_log_p_over_p0"] is None else f"  mean|log p/p0| {row['mean_abs_log_p_over_p0']:.3g}"
        print(f"{row['optimizer']:10s} {HP_NAME[row['optimizer']]}={row['hp']:<6g} AUC {row['auc_mean']:.3f} "
              f"+- {row['auc_se']:.3f} (se)  final {row['final_mean']:.3f} +- {row['final_se']:.3f}  iterations to "
              f"{row['target']:.3f}: {it} ({row['reached']}/{row['seeds']} seeds){moved}  "
              f"{row['seconds_per_run']:.0f}s/run")
    results["total_s"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kalman_method_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"total {results['total_s']:.0f}s")
    return results


if __name__ == "__main__":
    main()
