"""The main job: every method against its baseline on the embedded synthetic
world, with a report - no downloads, CPU-friendly (a few minutes on 2 cores).

1. A tiny CLIP (``vlmkern-tiny-ViT``) is pretrained briefly on one part of the
   synthetic image-text world (some shape/colour combinations held out), so
   fine-tuning starts from a trained model, as in the papers.
2. Each method fine-tunes a copy against its baseline(s):
   * TuneCLIP (OSR + HGCL) vs CLIP-loss and GCL fine-tuning, on pairs with
     near-duplicate false negatives;
   * APFT vs full fine-tuning and LoRA, on a long-tailed labelled set;
   * WRF4CIR (adversarial weight perturbation) vs plain CIR fine-tuning;
   * Kalman (per-sample observations, the default, and the scalar form) vs AdamW and SGD with a
     Polyak step (what the scalar form reduces to), LoRA few-shot classification.
3. ``<out>/report.md``, ``<out>/results.json`` and PNG plots (learning curves,
   APFT phase dynamics, train/validation gap, recall by head/torso/tail,
   accuracy vs iterations).

Seeds are fixed: a re-run on the same machine gives the same numbers. This is
a small, honest demonstration of the machinery, not a reproduction of the
papers' numbers (see the report's notes).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

SCALES = {
    # name: pretrain pairs/epochs, tuneclip pairs/epochs, apft n/epochs, cir triplets/epochs, kalman shots/steps
    "tiny": dict(model="vlmkern-micro-ViT", size=16, pre_n=64, pre_real=32, pre_epochs=1, tc_n=48, tc_val=24,
                 tc_epochs=1, ap_n=48, ap_val=24, ap_epochs=3, ap_classes=6, ap_head=12, ap_vpc=3, k_vpc=2,
                 cir_n=32, cir_val=16, cir_epochs=1,
                 k_classes=6, k_shots=4, k_steps=4, k_eval=2, batch=16),
    "default": dict(model="vlmkern-tiny-ViT", size=32, pre_n=1536, pre_real=1024, pre_epochs=6, tc_n=512, tc_val=512,
                    tc_epochs=5, ap_n=480, ap_val=144, ap_epochs=20, ap_classes=12, ap_head=160, ap_vpc=100,
                    k_vpc=50, cir_n=192, cir_val=192,
                    cir_epochs=4, k_classes=12, k_shots=16, k_steps=60, k_eval=1, batch=64),
}


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def real_sources():
    """The installed real-image sources the demo uses (``vlmkern.app.data.real``), or [] without scikit-learn."""
    try:
        from .data import real
    except ImportError as exc:  # scikit-learn / scikit-image missing
        _log(f"no real images ({exc}); synthetic data only (pip install scikit-learn scikit-image)")
        return []
    return real.available(["fashion-mnist", "tuxpaint-stamps", "sklearn-photos", "skimage-photos", "sklearn-digits"])


def labelled_source(sources) -> str:
    """The real labelled set for APFT and Kalman: Fashion-MNIST, else scikit-learn's digits, else synthetic."""
    for name in ("fashion-mnist", "sklearn-digits"):
        if name in sources:
            return name
    return "synthetic"


def pretrain_data(s: Dict[str, Any], seed: int = 0, sources=None):
    """The pretraining set: part of the synthetic world (some shape/colour pairs held out) plus real
    captioned images (Fashion-MNIST's training file, Tux Paint stamps, photo crops) from ``sources``
    (default: :func:`real_sources`). Returns ``(dataset, info)``."""
    from .data import synthetic as S

    held = [("circle", "red"), ("square", "blue"), ("triangle", "green")]
    data = S.pairs(s["pre_n"], seed=100 + seed, image_size=s["size"], holdout=held)
    sources = real_sources() if sources is None else sources
    # scikit-learn's digits have no separate test file: when they are the labelled
    # fallback, keep them out of pretraining so that validation digits stay unseen
    pre_sources = [n for n in sources if not (n == "sklearn-digits" and labelled_source(sources) == n)]
    n_real = 0
    if pre_sources and s["pre_real"]:
        from .data import real

        per = max(1, s["pre_real"] // len(pre_sources))
        rp = real.caption_pairs(pre_sources, split="train", seed=seed, image_size=s["size"], per_source=per)
        n_real = len(rp)
        data = torch.utils.data.ConcatDataset([data, rp])
    return data, {"held_out": held, "synthetic_pairs": s["pre_n"], "real_pairs": n_real,
                  "real_sources": pre_sources}


def pretrain(s: Dict[str, Any], out: str, seed: int = 0, sources=None):
    """Brief contrastive pretraining (CLIP loss, AdamW) on :func:`pretrain_data`."""
    from open_clip.loss import ClipLoss

    from .methods.tuneclip import collate_pairs
    from .models.clip import create_clip

    torch.manual_seed(seed)
    model, _, tok = create_clip(s["model"])
    data, info = pretrain_data(s, seed, sources)
    loader = torch.utils.data.DataLoader(data, batch_size=s["batch"], shuffle=True, drop_last=True,
                                         collate_fn=collate_pairs, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    # linear warm-up: without it the towers collapse to one embedding at the first steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    loss_fn = ClipLoss()
    losses = []
    for _ in range(s["pre_epochs"]):
        for images, caps, _ in loader:
            fi = F.normalize(model.encode_image(images), dim=-1)
            ft = F.normalize(model.encode_text(tok(caps)), dim=-1)
            loss = loss_fn(fi, ft, logit_scale=model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    torch.save(model.state_dict(), os.path.join(out, "pretrained.pt"))
    return model, tok, {**info, "losses": losses}


def _fit(want_train: int, want_val: int, train_min: int, val_min, what: str, source: str):
    """``(train, val)`` per class that ``source`` can supply: as asked when it can; else, from one
    shared pool of ``train_min`` per class, both shrunk in proportion (separate pools: each capped)."""
    if val_min is None:
        if want_train + want_val <= train_min:
            return want_train, want_val
        val = want_val * train_min // (want_train + want_val)
        train = train_min - val
    else:
        train, val = min(want_train, train_min), min(want_val, val_min)
    if train < 1 or val < 1:
        from .data import real

        raise real.SourceUnavailable(
            "fashion-mnist", f"{source} has only {train_min} images in its smallest class, too few for the "
            f"{what} split ({want_train} training + {want_val} validation per class)", real._HOW["fashion-mnist"])
    _log(f"{source} has {train_min} images in its smallest class: {what} uses {train} training (head) + {val} "
         f"validation images per class instead of {want_train} + {want_val}"
         + ("" if source == "fashion-mnist" else " (the Debian package dataset-fashion-mnist gives the full sizes)"))
    return train, val


def labelled_sizes(s: Dict[str, Any], source: str) -> Dict[str, int]:
    """The labelled split sizes (``ap_head``, ``ap_vpc``, ``k_shots``, ``k_vpc``) that ``source`` can
    supply at scale ``s``: the scale's own where it can, else smaller ones (with a notice)."""
    sizes = {k: s[k] for k in ("ap_head", "ap_vpc", "k_shots", "k_vpc")}
    if source == "synthetic":
        return sizes
    from .data import real

    train_min, val_min = real.labelled_pool_sizes(source)
    sizes["ap_head"], sizes["ap_vpc"] = _fit(s["ap_head"], s["ap_vpc"], train_min, val_min, "APFT", source)
    sizes["k_shots"], sizes["k_vpc"] = _fit(s["k_shots"], s["k_vpc"], train_min, val_min, "Kalman", source)
    return sizes


@dataclass
class TaskData:
    """Every fine-tuning task's ``(train, val)`` data at one scale."""
    tuneclip: Tuple[Any, Any]  # image-text pairs with near-duplicate false negatives
    apft: Tuple[Any, Any]  # long-tailed labelled images, balanced validation
    kalman: Tuple[Any, Any]  # few-shot labelled images
    wrf4cir: Tuple[Any, Any]  # composed-retrieval triplets
    labelled_source: str  # where APFT's and Kalman's images come from (:func:`labelled_source`)
    labelled_sizes: Dict[str, int]  # the split sizes used (:func:`labelled_sizes`)


@dataclass
class DemoContext(TaskData):
    """The shared start of every run of one seed (:func:`prepare`)."""
    settings: Dict[str, Any]  # SCALES[scale]
    seed: int
    pretrained_model: Any
    tokenizer: Any
    pretrain_info: Dict[str, Any]  # :func:`pretrain_data`'s info and the pretraining losses


def task_data(s: Dict[str, Any], seed: int = 0, sources=None) -> TaskData:
    """Every fine-tuning task's data at scale ``s``."""
    from .data import synthetic as S

    sources = real_sources() if sources is None else sources
    pairs = (S.pairs(s["tc_n"], seed=200 + seed, image_size=s["size"], dup_frac=0.3),
             S.pairs(s["tc_val"], seed=300 + seed, image_size=s["size"]))
    lsrc = labelled_source(sources)
    z = labelled_sizes(s, lsrc)
    if lsrc == "synthetic":
        longtail = S.labelled(s["ap_n"], s["ap_val"], seed=400 + seed, image_size=s["size"],
                              num_classes=s["ap_classes"])
        fewshot = S.labelled(s["k_classes"] * s["k_shots"], s["k_classes"] * 6, seed=700 + seed,
                             image_size=s["size"], num_classes=s["k_classes"], zipf=0.0)
    else:
        from .data import real

        # long-tailed training labels (Zipf, head = ap_head images), balanced validation
        longtail = real.labelled(lsrc, seed=400 + seed, image_size=s["size"], long_tail=True,
                                 train_per_class=z["ap_head"], val_per_class=z["ap_vpc"])
        fewshot = real.labelled(lsrc, seed=700 + seed, image_size=s["size"], shots=z["k_shots"],
                                val_per_class=z["k_vpc"])
    cir = (S.cir_triplets(s["cir_n"], seed=500 + seed, image_size=s["size"]),
           S.cir_triplets(s["cir_val"], seed=600 + seed, image_size=s["size"]))
    return TaskData(tuneclip=pairs, apft=longtail, kalman=fewshot, wrf4cir=cir, labelled_source=lsrc,
                    labelled_sizes=z)


# Each run's step size (and WRF4CIR's perturbation size). DEFAULT_HPARAMS are the
# hand-set values; ``vlmkern fidelity --tune`` picks each run's values from
# TUNING_GRIDS on a separate tuning seed (never one the report uses) and writes
# them to vlmkern/app/tuned_hparams.json, which the demo reads for that scale.
DEFAULT_HPARAMS: Dict[str, Dict[str, Dict[str, float]]] = {
    "tuneclip": {"CLIP loss": {"lr": 1e-4}, "GCL": {"lr": 1e-4}, "HGCL (no OSR)": {"lr": 1e-4},
                 "TuneCLIP (OSR + HGCL)": {"lr": 1e-4}},
    "apft": {"full": {"lr": 3e-4}, "lora": {"lr": 1e-3}, "apft": {"lr": 3e-4}},
    "wrf4cir": {"plain": {"lr": 1e-4}, "WRF4CIR adversarial": {"lr": 1e-4, "gamma": 1e-3},
                "WRF4CIR random": {"lr": 1e-4, "gamma": 1e-3}},
    "kalman": {"adamw": {"lr": 1e-3}, "sgd polyak": {"polyak_c": 0.1}, "kalman scalar": {"p0": 0.1},
               "kalman per-sample": {"p0": 1e-2}},
}
_LR = [1e-5, 3e-5, 1e-4, 3e-4]
_GAMMA = [1e-3, 5e-3, 2e-2, 5e-2]
TUNING_GRIDS: Dict[str, Dict[str, Dict[str, list]]] = {
    "tuneclip": {name: {"lr": _LR} for name in DEFAULT_HPARAMS["tuneclip"]},
    "apft": {"full": {"lr": _LR}, "lora": {"lr": [3e-5, 1e-4, 3e-4, 1e-3]}, "apft": {"lr": _LR}},
    "wrf4cir": {"plain": {"lr": _LR}, "WRF4CIR adversarial": {"lr": _LR, "gamma": _GAMMA},
                "WRF4CIR random": {"lr": _LR, "gamma": _GAMMA}},
    "kalman": {"adamw": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]}, "sgd polyak": {"polyak_c": [0.03, 0.1, 0.3, 1.0]},
               "kalman scalar": {"p0": [0.03, 0.1, 0.3, 1.0]},
               "kalman per-sample": {"p0": [3e-3, 1e-2, 3e-2, 0.1, 0.3], "forgetting": [1.0, 0.98]}},
}
# the demo's Kalman runs: name -> (KalmanTrainConfig.optimizer, .observation)
KALMAN_RUNS = {"adamw": ("adamw", "per_sample"), "sgd polyak": ("polyak", "loss"), "kalman scalar": ("kalman", "loss"),
               "kalman per-sample": ("kalman", "per_sample")}
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_hparams.json")


def load_hparams(scale: str, path: str | None = None) -> Dict[str, Any]:
    """Per-run hyperparameters for ``scale``: the tuned ones where ``path`` (default
    vlmkern/app/tuned_hparams.json) has them, else :data:`DEFAULT_HPARAMS`. The result carries
    ``"_source"`` (``"tuned"`` or ``"default"``) and, when tuned, ``"_tuning"`` (seed, command)."""
    hp = copy.deepcopy(DEFAULT_HPARAMS)
    path = TUNED_PATH if path is None else path
    info: Dict[str, Any] = {"_source": "default"}
    if os.path.exists(path):
        with open(path) as f:
            tuned = json.load(f).get(scale)
        if tuned:
            for task, runs in tuned["chosen"].items():
                for name, values in runs.items():
                    hp.setdefault(task, {}).setdefault(name, {}).update(values)
            info = {"_source": "tuned", "_tuning": {k: tuned[k] for k in ("seed", "command", "date", "grids", "selection")
                                                    if k in tuned}}
    hp.update(info)
    return hp


def prepare(scale: str, seed: int, out: str) -> DemoContext:
    """Pretrain the seed's tiny CLIP and build every task's data (the shared start of all runs)."""
    s = SCALES[scale]
    os.makedirs(out, exist_ok=True)
    _log(f"pretraining {s['model']} on the synthetic world ({s['pre_n']} pairs) and real captioned images "
         f"(up to {s['pre_real']}) x {s['pre_epochs']} epochs")
    sources = real_sources()
    # the tasks' data first: a source too small for this scale says so before minutes of pretraining
    data = task_data(s, seed, sources)
    base, tok, pre = pretrain(s, out, seed, sources)
    return DemoContext(**vars(data), settings=s, seed=seed, pretrained_model=base, tokenizer=tok,
                       pretrain_info=pre)


def run_one(ctx: DemoContext, task: str, name: str, hp: Dict[str, float], out: str) -> Dict[str, Any]:
    """One fine-tuning run (``task`` / ``name`` as in :data:`DEFAULT_HPARAMS`) from a fresh copy of the
    pretrained model, with the step sizes ``hp``; returns the trainer's result."""
    from .methods.apft import APFTTrainConfig, train_apft
    from .methods.apft_schedule import APFTConfig
    from .methods.kalman import KalmanTrainConfig, train_kalman
    from .methods.tuneclip import TuneCLIPConfig, train_tuneclip
    from .methods.wrf4cir import WRF4CIRConfig, train_wrf4cir

    s, seed, tok, b = ctx.settings, ctx.seed, ctx.tokenizer, ctx.settings["batch"]
    model = copy.deepcopy(ctx.pretrained_model)
    run_dir = os.path.join(out, task, _slug(name))
    if task == "tuneclip":
        loss, osr = {"CLIP loss": ("clip", 0), "GCL": ("gcl", 0), "HGCL (no OSR)": ("hgcl", 0),
                     "TuneCLIP (OSR + HGCL)": ("hgcl", 1)}[name]
        cfg = TuneCLIPConfig(loss=loss, osr_epochs=osr, epochs=s["tc_epochs"], batch_size=b, lr=hp["lr"], seed=seed)
        return train_tuneclip(model, tok, *ctx.tuneclip, cfg, run_dir)
    if task == "apft":
        atr, ava = ctx.apft
        cfg = APFTTrainConfig(strategy=name, max_epochs=s["ap_epochs"], batch_size=b // 2, lr=hp["lr"],
                              schedule=APFTConfig(window=3, patience=5, min_epochs=10), seed=seed, eval_ks=(1, 5, 10))
        return train_apft(model, tok, atr, ava, atr.prompts(), cfg, run_dir)
    if task == "wrf4cir":
        rr = {"plain": 0.0, "WRF4CIR adversarial": 0.0, "WRF4CIR random": 1.0}[name]
        cfg = WRF4CIRConfig(epochs=s["cir_epochs"], batch_size=b // 2, lr=hp["lr"], gamma=hp.get("gamma", 0.0),
                            random_ratio=rr, warmup_epochs=1 if s["cir_epochs"] > 1 else 0, seed=seed, ks=(1, 5, 10))
        return train_wrf4cir(model, tok, *ctx.wrf4cir, cfg, run_dir)
    if task == "kalman":
        ktr, kva = ctx.kalman
        optimizer, observation = KALMAN_RUNS[name]  # the scalar form (SPEC §3) and the default, per-sample (§3b)
        cfg = KalmanTrainConfig(optimizer=optimizer, steps=s["k_steps"], batch_size=min(b, len(ktr)),
                                eval_every=s["k_eval"], seed=seed, observation=observation, **hp)
        return train_kalman(model, tok, ktr, kva, ktr.prompts(), cfg, run_dir)
    raise ValueError(f"unknown task {task!r}")


_TASK_TITLE = {"tuneclip": "TuneCLIP", "apft": "APFT", "wrf4cir": "WRF4CIR", "kalman": "Kalman"}


def run_demo(out: str = "runs/demo", scale: str = "default", seed: int = 0,
             hparams: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Pretrain, then every method and baseline (step sizes from ``hparams``, default
    :func:`load_hparams`); writes ``<out>/results.json``, ``report.md`` and the plots."""
    os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
    t0 = time.time()
    hp = load_hparams(scale) if hparams is None else hparams
    ctx = prepare(scale, seed, out)
    results: Dict[str, Any] = {"scale": scale, "seed": seed, "model": ctx.settings["model"],
                               "pretrain": ctx.pretrain_info, "labelled_source": ctx.labelled_source,
                               "labelled_sizes": ctx.labelled_sizes, "hparams": dict(hp)}
    atr = ctx.apft[0]
    results["apft_train_counts"] = [atr.labels.count(k) for k in range(len(atr.prompts()))]
    for task in ("tuneclip", "apft", "wrf4cir", "kalman"):
        results[task] = {}
        for name in DEFAULT_HPARAMS[task]:
            _log(f"{_TASK_TITLE[task]} experiment: {name} ({_hp_text(hp[task][name])})")
            results[task][name] = run_one(ctx, task, name, hp[task][name], out)
    results["seconds"] = time.time() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    plots = make_plots(results, out)
    write_report(results, out, plots)
    _log(f"done in {results['seconds']:.0f} s: {os.path.join(out, 'report.md')}")
    return results


def _hp_text(hp: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _fmt(x, pct=True):
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def summary_rows(r: Dict[str, Any]):
    hp = r.get("hparams", {})

    def setting(task, name):
        return _hp_text(hp.get(task, {}).get(name, {}))

    rows = []
    for name, res in r["tuneclip"].items():
        first = res["history"][0]
        rows.append(("TuneCLIP", name, setting("tuneclip", name), "mean R@1/5/10 (I2T+T2I), val pairs",
                     _fmt(first["mean_R"]), _fmt(res["final"]["mean_R"])))
    for name, res in r["apft"].items():
        t2i = res["final"]["retrieval"]["t2i"]
        rows.append(("APFT", name, setting("apft", name), "T2I mAP@10 all / tail",
                     "", f"{_fmt(t2i['all']['mAP'][10])} / {_fmt(t2i['tail']['mAP'][10])}"))
    for name, res in r["wrf4cir"].items():
        f = res["final"]
        rows.append(("WRF4CIR", name, setting("wrf4cir", name), "val R@5 (train-val gap)", "",
                     f"{_fmt(f['val_R5'])} ({_fmt(f['gap_R5'])})"))
    for name, res in r["kalman"].items():
        c = res["curve"]
        rows.append(("Kalman", f"LoRA + {name}", setting("kalman", name), "val accuracy", _fmt(c[0]["val_acc"]),
                     _fmt(c[-1]["val_acc"])))
    return rows


def make_plots(r: Dict[str, Any], out: str) -> Dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no plots (pip install matplotlib)")
        return {}
    paths = {}

    def save(fig, name):
        p = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[name] = p

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in r["tuneclip"].items():
        h = res["history"]
        ax.plot([x["epoch"] for x in h], [x["mean_R"] for x in h], marker="o", label=name)
    ax.set(xlabel="fine-tuning epoch (0 = pretrained)", ylabel="mean recall (R@1/5/10, I2T+T2I)",
           title="TuneCLIP vs baselines")
    ax.legend()
    save(fig, "tuneclip_curves.png")

    from .methods.common import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for strategy, res in r["apft"].items():
        recs = [x for x in read_metrics(os.path.join(out, "apft", strategy)) if x["split"] == "val"]
        axes[0].plot([x["epoch"] for x in recs], [x["val_loss"] for x in recs], marker=".", label=strategy)
        if strategy == "apft":
            for t in res["transitions"]:
                axes[0].axvline(t["epoch"], color="green", ls="--", lw=0.8)
            axes[1].plot([x["epoch"] for x in recs], [x["lr"] for x in recs], label="LR")
            ax2 = axes[1].twinx()
            ax2.plot([x["epoch"] for x in recs], [x["wd"] for x in recs], color="C3", label="WD")
            ax2.set_ylabel("weight decay")
            axes[2].step([x["epoch"] for x in recs], [100 * x["trainable_frac"] for x in recs], where="post")
    axes[0].set(xlabel="epoch", ylabel="validation loss", title="APFT: transitions (dashed)")
    axes[0].legend()
    axes[1].set(xlabel="epoch", ylabel="learning rate", title="APFT: LR / WD per phase")
    axes[2].set(xlabel="epoch", ylabel="% trainable", title="APFT: trainable parameters")
    save(fig, "apft_dynamics.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = ["head", "torso", "tail"]
    w = 0.8 / max(len(r["apft"]), 1)
    for i, (strategy, res) in enumerate(r["apft"].items()):
        # Recall@1 (the top-1 label): with about 10 labels, Recall@10 is 100% for every image
        vals = [res["final"]["retrieval"]["i2t"][g]["recall"][1] for g in groups]
        ax.bar([j + i * w for j in range(3)], vals, width=w, label=strategy)
    ax.set_xticks([j + w for j in range(3)], groups)
    ax.set(ylabel="I2T Recall@1 (top-1 label)", title="Recall by label-frequency group")
    ax.legend()
    save(fig, "recall_by_group.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in r["wrf4cir"].items():
        h = res["history"]
        ax.plot([x["epoch"] for x in h], [x["gap_R5"] for x in h], marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="train R@5 - val R@5", title="Generalisation gap, CIR")
    ax.legend()
    save(fig, "wrf4cir_gap.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in r["kalman"].items():
        c = res["curve"]
        ax.plot([x["step"] for x in c], [x["val_acc"] for x in c], marker="o", label=f"LoRA + {name}")
    ax.set(xlabel="iteration", ylabel="validation accuracy", title="Kalman vs AdamW and Polyak SGD (few-shot)")
    ax.legend()
    save(fig, "kalman_accuracy.png")
    return paths


def write_report(r: Dict[str, Any], out: str, plots: Dict[str, str]) -> None:
    import platform

    lines = [
        "# vlmkern demo report",
        "",
        f"Scale `{r['scale']}`, seed {r['seed']}, model `{r['model']}` pretrained here for "
        f"{len(r['pretrain']['losses'])} steps (final CLIP loss {r['pretrain']['losses'][-1]:.3f}); "
        f"{r['seconds']:.0f} s on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        f"Data: pretraining on {r['pretrain']['synthetic_pairs']} synthetic pairs + {r['pretrain']['real_pairs']} real "
        f"captioned images ({', '.join(r['pretrain']['real_sources']) or 'none installed'}); TuneCLIP on synthetic "
        f"pairs with near-duplicates; APFT (long-tailed, train counts {r.get('apft_train_counts')}) and Kalman "
        f"(few-shot) on `{r.get('labelled_source', 'synthetic')}`; WRF4CIR on synthetic composed-retrieval triplets "
        "(docs/DATA.md).",
        "",
        _hparams_sentence(r.get("hparams", {})),
        "",
        "| method | run | setting | metric | before | after |",
        "|---|---|---|---|---:|---:|",
    ]
    for row in summary_rows(r):
        lines.append("| " + " | ".join(row) + " |")
    ap = r["apft"].get("apft")
    if ap is not None:
        lines += ["", f"APFT used {ap['phases_used']} phase(s); transitions: "
                  + (", ".join(f"epoch {t['epoch']} ({t['reason']}, LR {t['lr']:.2e}, WD {t['wd']:.3f})"
                               for t in ap["transitions"]) or "none")]
    lines += ["", "Numbers are percentages. Tiny model, tiny synthetic data, one seed: differences of a few points "
              "are within noise; this run shows the machinery end to end, not the papers' effect sizes.", ""]
    for name in plots:
        lines.append(f"![{name}]({name})")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(summary_rows(r))]))


def _hparams_sentence(hp: Dict[str, Any]) -> str:
    if hp.get("_source") == "tuned":
        t = hp.get("_tuning", {})
        return (f"Step sizes (column *setting*) were chosen per run from a grid on tuning seed {t.get('seed')} "
                f"(`{t.get('command', 'vlmkern fidelity --tune')}`), a seed whose pretraining and data this "
                "report does not use (vlmkern/app/tuned_hparams.json).")
    return ("Step sizes (column *setting*) are the hand-set defaults (vlmkern.app.demo.DEFAULT_HPARAMS); "
            "`vlmkern fidelity --tune` picks them per run on a separate seed.")
