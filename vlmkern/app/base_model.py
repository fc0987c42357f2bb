"""The converged micro CLIP that the per-claim fidelity protocols share (issue 18).

A micro CLIP pretrained on synthetic pairs with AdamW, linear warm-up then cosine
annealing to 0, at a fixed low temperature (``tau``; the logit scale is set to
``1 / tau`` and frozen), until validation stops improving: the cosine horizon is
doubled (training restarts, at most ``max_doublings`` times) while the best validation
attribute-level R@1 of the last quarter of the run beats the best before it by more
than ``converge_tol``. The result is cached under ``cache_dir/<key>``, ``key`` a hash of
every setting that shapes it and of the source of the code that makes it, and shared by
all claims, seeds, learning rates and arms (:func:`base_model`).

Used by :mod:`vlmkern.app.osr_protocol` (``--claims osr``) and
:mod:`vlmkern.app.hgcl_protocol` (``--claims hgcl``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

# The cache's sub-folder (under ``vlmkern fidelity --cache``): named for the claim that introduced the
# base model; every protocol reads the same one.
CACHE_SUBDIR = "osr_base"

BASE_DEFAULTS: Dict[str, Any] = dict(
    model="vlmkern-micro-ViT", size=16, n_train=1024, n_val=256, data_seed=0, seed=0, batch=64,
    peak_lr=1e-3, wd=0.1, betas=(0.9, 0.98), warmup=30, steps=600, max_doublings=2, tau=0.02,
    converge_tol=0.01, eval_every=50)


def _code_version() -> str:
    """Hash of the source of everything that shapes the base model."""
    from .data import synthetic as S
    from .models import clip

    parts = [inspect.getsource(f) for f in (_pretrain, _base_data, _val_loss, attribute_r1, S.pairs, S.render,
                                            S.random_attrs, clip.create_clip)]
    cfg = os.path.join(clip.CONFIG_DIR, f"{BASE_DEFAULTS['model']}.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            parts.append(f.read())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def base_key(settings: Dict[str, Any]) -> str:
    """Cache key of the base model: every setting plus the code version, hashed."""
    blob = json.dumps({"settings": {k: settings[k] for k in sorted(settings)}, "code": _code_version()},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _base_data(s: Dict[str, Any]):
    from .data import synthetic as S

    return (S.pairs(s["n_train"], seed=900 + s["data_seed"], image_size=s["size"]),
            S.pairs(s["n_val"], seed=950 + s["data_seed"], image_size=s["size"]))


@torch.no_grad()
def _encode(model, tok, ds, batch: int = 256):
    from .methods.tuneclip import collate_pairs

    model.eval()
    fis, fts = [], []
    for images, caps, _ in torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate_pairs):
        fis.append(F.normalize(model.encode_image(images), dim=-1))
        fts.append(F.normalize(model.encode_text(tok(caps)), dim=-1))
    return torch.cat(fis), torch.cat(fts)


@torch.no_grad()
def attribute_r1(model, tok, ds) -> float:
    """Attribute-level R@1, mean of I2T and T2I: the top-1 caption (image) counts when its attributes
    equal the query's (near-duplicates are right answers)."""
    fi, ft = _encode(model, tok, ds)
    ids = {a: i for i, a in enumerate(sorted(set(ds.attrs), key=repr))}
    lab = torch.tensor([ids[a] for a in ds.attrs])
    sim = fi @ ft.T
    i2t = (lab[sim.argmax(1)] == lab).float().mean()
    t2i = (lab[sim.argmax(0)] == lab).float().mean()
    return float((i2t + t2i) / 2)


@torch.no_grad()
def _val_loss(model, tok, ds, tau: float) -> float:
    fi, ft = _encode(model, tok, ds)
    logits = fi @ ft.T / tau
    target = torch.arange(len(ds))
    return float((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)


def _pretrain(s: Dict[str, Any], steps: int):
    """One pretraining run of ``steps`` steps (warm-up, cosine to 0, fixed tau); returns (model, tok, curve)."""
    from .methods.tuneclip import collate_pairs
    from .models.clip import create_clip

    torch.manual_seed(s["seed"])
    model, _, tok = create_clip(s["model"])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / s["tau"]))
    model.logit_scale.requires_grad_(False)
    train, val = _base_data(s)
    loader = torch.utils.data.DataLoader(train, batch_size=s["batch"], shuffle=True, drop_last=True,
                                         collate_fn=collate_pairs, generator=torch.Generator().manual_seed(s["seed"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["peak_lr"], weight_decay=s["wd"], betas=tuple(s["betas"]))

    def lr_at(step):
        if step < s["warmup"]:
            return (step + 1) / s["warmup"]
        return 0.5 * (1 + math.cos(math.pi * (step - s["warmup"]) / max(steps - s["warmup"], 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, step = [], 0
    while step < steps:
        for images, caps, _ in loader:
            model.train()
            fi = F.normalize(model.encode_image(images), dim=-1)
            ft = F.normalize(model.encode_text(tok(caps)), dim=-1)
            logits = fi @ ft.T / s["tau"]
            target = torch.arange(len(caps))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % s["eval_every"] == 0 or step == steps:
                curve.append({"step": step, "train_loss": loss.item(), "val_loss": _val_loss(model, tok, val, s["tau"]),
                              "val_attr_R1": attribute_r1(model, tok, val)})
            if step >= steps:
                break
    return model, tok, curve


def _late_improvement(curve: List[Dict[str, Any]]) -> float:
    """Best validation attribute-level R@1 in the last quarter of the run minus the best before it
    (> 0: still improving). The task's metric, not the loss: at a low tau the validation loss of a
    small training set keeps moving with the training set's overfitting while retrieval has stopped."""
    cut = 0.75 * curve[-1]["step"]
    before = [c["val_attr_R1"] for c in curve if c["step"] <= cut]
    late = [c["val_attr_R1"] for c in curve if c["step"] > cut]
    return max(late) - max(before) if before else float("inf")


def base_model(settings: Optional[Dict[str, Any]] = None, cache_dir: str = "runs/cache/osr_base",
               log=print):
    """The converged base model ``(model, tokenizer, info)``, from the cache when a run with the same key
    left one (``info["cached"]``), else pretrained here and saved."""
    from .models.clip import create_clip

    s = {**BASE_DEFAULTS, **(settings or {})}
    key = base_key(s)
    folder = os.path.join(cache_dir, key)
    path, meta = os.path.join(folder, "model.pt"), os.path.join(folder, "info.json")
    if os.path.exists(path) and os.path.exists(meta):
        model, _, tok = create_clip(s["model"])
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.logit_scale.requires_grad_(False)  # as pretrained: the temperature is fixed
        with open(meta) as f:
            info = json.load(f)
        log(f"[base] base model {key} from the cache ({folder})")
        return model, tok, {**info, "cached": True}
    t0 = time.time()
    runs = []
    for doubling in range(s["max_doublings"] + 1):
        steps = s["steps"] * 2 ** doubling
        log(f"[base] pretraining the base model: {steps} steps, cosine to 0, tau {s['tau']}")
        model, tok, curve = _pretrain(s, steps)
        late = _late_improvement(curve)
        runs.append({"steps": steps, "late_improvement": late, "final": curve[-1]})
        if late <= s["converge_tol"]:
            break
    info = {"key": key, "settings": s, "code_version": _code_version(), "steps": steps, "curve": curve,
            "converged": late <= s["converge_tol"], "late_improvement": late, "runs": runs,
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.time() - t0}
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(meta, "w") as f:
        json.dump(info, f, indent=1, default=list)
    log(f"[base] base model {key}: {steps} steps, val attribute R@1 {curve[-1]['val_attr_R1']:.3f}, "
        f"val loss {curve[-1]['val_loss']:.3f}, last-quarter R@1 gain {100 * late:+.1f} pts "
        f"({'converged' if info['converged'] else 'NOT converged'}), {info['seconds']:.0f} s")
    return model, tok, {**info, "cached": False}


# ----------------------------------------------------------------------------
# what every per-claim protocol does with its runs (report rows, driver)
# ----------------------------------------------------------------------------


def contrastive_step(model, obj, opt, tok, images, caps, idx) -> torch.Tensor:
    """One fine-tuning step of a protocol on the CPU: features, the objective ``obj(fi, ft, idx,
    logit_scale)``, backward, ``opt.step()``; returns the (detached) loss."""
    from .methods.tuneclip import _features

    model.train()
    fi, ft = _features(model, images, caps, tok, "cpu")
    loss = obj(fi, ft, idx, model.logit_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def pts(v: float) -> str:
    """A fraction as signed percentage points (``n/a`` for NaN)."""
    return "n/a" if v != v else f"{100 * v:+.1f}"


def claim_table_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The claims table of a protocol's report section: one line per (LR, claim) row."""
    from .fidelity import _ci

    lines = ["| LR x peak | claim | paper | per seed | mean (sd) | 95% CI | premise | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        sd = "n/a" if x["std"] != x["std"] else f"{100 * x['std']:.1f}"
        lines.append(f"| {x['lr_mult']} | {x['claim']} | {x['paper']} | {', '.join(pts(v) for v in x['values'])} "
                     f"| {pts(x['mean'])} ({sd}) | {_ci(x['ci'], True)} | {x['premise']['text']} "
                     f"| **{x['verdict']}** |")
    return lines


def run_protocol(name: str, run_seed: Callable, claim_rows: Callable, section: Callable, seeds: Sequence[int],
                 out: str, cache_dir: str, base_settings: Optional[Dict[str, Any]],
                 protocol: Optional[Dict[str, Any]], command: str, log=print) -> Dict[str, Any]:
    """A whole protocol: the base model (cached), ``run_seed`` for every seed, the claims'
    rows and the report section, written to ``<out>/<name>.json`` and ``<out>/<name>.md``;
    returns ``{"runs", "rows", "base", "section", "seconds"}``."""
    t0 = time.time()
    base, tok, info = base_model(base_settings, cache_dir, log=log)
    runs = [run_seed(base, tok, info, seed, protocol, log=log) for seed in seeds]
    rows = claim_rows(runs)
    seconds = time.time() - t0
    text = section(runs, rows, info, command, seconds)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"base": info, "runs": runs, "rows": rows, "seconds": seconds}, f, indent=1, default=list)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    log(text)
    return {"runs": runs, "rows": rows, "base": info, "section": text, "seconds": seconds}
