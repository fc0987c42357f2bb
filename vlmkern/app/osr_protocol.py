"""The OSR claim's own protocol (``vlmkern fidelity --claims osr``; issue 18).

TuneCLIP's optimizer statistics recovery (SPEC §2, the paper's Table 2 and Fig. 2/9)
removes the *cold-start drop*: fine-tuning a model that sits near a stationary point
with a fresh AdamW (m = v = 0, so the first updates are about ``lr * sign(g)`` in every
coordinate) first knocks it away from that point. The premise is a converged model; the
demo's briefly pretrained one is not, so this protocol builds one:

1. **Base model** (:func:`base_model`): a micro CLIP pretrained on synthetic pairs with
   AdamW, linear warm-up then cosine annealing to 0, at a fixed low temperature
   (``tau``; the logit scale is set to ``1 / tau`` and frozen), until validation stops
   improving: the cosine horizon is doubled (training restarts, at most
   ``max_doublings`` times) while the best validation attribute-level R@1 of the last
   quarter of the run beats the best before it by more than ``converge_tol``. The
   result is cached under ``cache_dir/<key>``, ``key`` a hash of every setting that
   shapes it and of the source of the code that makes it, and shared by all seeds,
   learning rates and arms.
2. **Arms**, per seed (fine-tuning data and batch order) and per common learning rate
   (``lr_mults`` times the pretraining peak), all from the same base model and the same
   batches: ``none`` (fresh AdamW, no recovery), ``mv`` (OSR, u forgotten), ``mvu`` (OSR,
   the paper's method) and ``mvu_reset`` (OSR, AdamW's step counter restarted). One
   recovery per seed serves every recovered arm and learning rate (recovery does not
   update the weights, so it does not depend on the learning rate).
3. **Evaluation** before fine-tuning and after each of the first ``steps`` steps:
   attribute-level R@1 on a held-out set (a retrieved caption or image counts when its
   shape, colour, size and position match, so near-duplicates are not errors), the mean
   of I2T and T2I.
4. **Dip** of an arm = min over the evaluations after steps 1..``dip_window`` minus the
   start value. **Claim value** = dip of an OSR arm minus dip of the ``none`` arm (paired,
   same seed). **Premise**: the ``none`` arm's dip is below zero by more than 2 standard
   errors (seed-to-seed standard error of the mean).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .base_model import (BASE_DEFAULTS, _base_data, _code_version, _encode, _late_improvement,  # noqa: F401
                         _pretrain, _val_loss, attribute_r1, base_key, base_model, claim_table_lines, pts,
                         contrastive_step, run_protocol)

PROTOCOL_DEFAULTS: Dict[str, Any] = dict(
    ft_n=512, eval_n=256, batch=32, osr_steps=64, steps=16, dip_window=4, lr_mults=(0.1, 0.3, 1.0),
    wd=0.02, margin=0.1, gamma=0.9, dup_frac=0.3)

ARMS = ("none", "mv", "mvu", "mvu_reset")
ARM_TITLES = {"none": "no recovery", "mv": "OSR (m, v)", "mvu": "OSR (m, v, u)",
              "mvu_reset": "OSR (m, v, u), step counter reset"}
# (arm, baseline, sign, claim, the paper's own number for comparison)
COMPARISONS = [
    ("mvu", "none", +1, "OSR (m, v, u) removes the cold-start drop",
     "Table 2: mean score 56.01 without recovery, 60.70 with (m, v, u)"),
    ("mv", "none", +1, "OSR (m, v) removes the cold-start drop",
     "Table 2: 56.01 without recovery, 60.58 with (m, v)"),
    ("mvu", "mv", +1, "recovering u as well helps beyond (m, v)",
     "Table 2: 60.70 (m, v, u) vs 60.58 (m, v)"),
    ("mvu", "mvu_reset", +1, "keeping AdamW's step counter helps (no re-amplified bias correction)",
     "SPEC §2 (Algorithm 1 keeps the counter; no number in the paper)"),
]


def _arm_state(base, opt_state, obj_state, arm: str, p: Dict[str, Any], tau: float, lr: float,
               num_samples: int):
    """A fresh (model, optimizer, objective) for ``arm``, from the base weights and the recovered state."""
    from .methods.tuneclip import TuneCLIPConfig, _Objective, finish_recovery

    model = copy.deepcopy(base)
    model.logit_scale.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    cfg = TuneCLIPConfig(loss="hgcl", lr=lr, wd=p["wd"], margin=p["margin"], gamma=p["gamma"])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=p["wd"], betas=cfg.betas)
    obj = _Objective(cfg, num_samples, tau, "cpu")
    if arm != "none":
        opt.load_state_dict(opt_state)
        for g in opt.param_groups:
            g["lr"] = lr
        obj.load_state_dict(obj_state)
        finish_recovery(opt, obj, "mv" if arm == "mv" else "mvu", reset_step=arm == "mvu_reset")
    obj.module.gamma = p["gamma"]
    return model, params, opt, obj


def run_seed(base, tok, base_info: Dict[str, Any], seed: int, protocol: Optional[Dict[str, Any]] = None,
             arms: Sequence[str] = ARMS, log=print) -> Dict[str, Any]:
    """Every arm at every learning rate for one seed: ``{"curves": {lr_mult: {arm: [R1 at step 0..steps]}},
    "first_update": {lr_mult: {arm: ||w1 - w0||}}, ...}``."""
    from .data import synthetic as S
    from .methods.tuneclip import TuneCLIPConfig, _Objective, collate_pairs, recover_statistics

    p = {**PROTOCOL_DEFAULTS, **(protocol or {})}
    s = base_info["settings"]
    tau = float(s["tau"])
    ft = S.pairs(p["ft_n"], seed=1000 + seed, image_size=s["size"], dup_frac=p["dup_frac"])
    ev = S.pairs(p["eval_n"], seed=2000 + seed, image_size=s["size"])
    start = attribute_r1(base, tok, ev)

    def loader(stream: int):
        return torch.utils.data.DataLoader(ft, batch_size=p["batch"], shuffle=True, drop_last=True,
                                           collate_fn=collate_pairs,
                                           generator=torch.Generator().manual_seed(10_000 * stream + seed))

    # one recovery for every recovered arm and learning rate (the weights stay at w0)
    t0 = time.time()
    cfg = TuneCLIPConfig(loss="hgcl", margin=p["margin"], gamma=p["gamma"], gamma_decay_epochs=1)
    rec_model = copy.deepcopy(base)
    rec_model.logit_scale.requires_grad_(False)
    params = [q for q in rec_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=p["wd"], betas=cfg.betas)
    obj = _Objective(cfg, len(ft), tau, "cpu")
    per_epoch = len(ft) // p["batch"]
    osr_epochs = max(1, math.ceil(p["osr_steps"] / per_epoch))
    osr_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ft, range(min(len(ft), p["osr_steps"] * p["batch"] // osr_epochs))),
        batch_size=p["batch"], shuffle=True, drop_last=True, collate_fn=collate_pairs,
        generator=torch.Generator().manual_seed(20_000 + seed))
    osr_steps = recover_statistics(rec_model, tok, osr_loader, obj, opt, osr_epochs, "cpu") if any(
        a != "none" for a in arms) else 0
    opt_state, obj_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(obj.state_dict())
    del rec_model, opt, obj
    curves: Dict[str, Dict[str, List[float]]] = {}
    first_update: Dict[str, Dict[str, float]] = {}
    for mult in p["lr_mults"]:
        lr = mult * s["peak_lr"]
        key = f"{mult:g}"
        curves[key], first_update[key] = {}, {}
        for arm in arms:
            model, params, opt, obj = _arm_state(base, opt_state, obj_state, arm, p, tau, lr, len(ft))
            w0 = torch.cat([q.detach().flatten() for q in params])
            r1 = [start]
            it = iter(loader(1))
            for step in range(p["steps"]):
                try:
                    images, caps, idx = next(it)
                except StopIteration:
                    it = iter(loader(2 + step))
                    images, caps, idx = next(it)
                contrastive_step(model, obj, opt, tok, images, caps, idx)
                if step == 0:
                    w1 = torch.cat([q.detach().flatten() for q in params])
                    first_update[key][arm] = float((w1 - w0).norm())
                r1.append(attribute_r1(model, tok, ev))
            curves[key][arm] = r1
            log(f"[osr] seed {seed} lr {lr:.2g} ({key}x peak) {ARM_TITLES[arm]}: R@1 start {r1[0]:.3f}, "
                f"min over steps 1-{p['dip_window']} {min(r1[1:1 + p['dip_window']]):.3f}, "
                f"step {p['steps']} {r1[-1]:.3f}")
    return {"seed": seed, "start": start, "osr_steps": osr_steps, "curves": curves, "first_update": first_update,
            "seconds": time.time() - t0, "protocol": p}


def dip(curve: Sequence[float], window: int) -> float:
    """min over the evaluations after steps 1..window, minus the start value (negative = a drop)."""
    return min(curve[1:1 + window]) - curve[0]


def claim_rows(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (learning rate, comparison): per-seed paired values and the premise of that learning rate."""
    from .fidelity import premise_from_dips, summarize, verdict

    window = runs[0]["protocol"]["dip_window"]
    rows = []
    for key in runs[0]["curves"]:
        none = [dip(r["curves"][key]["none"], window) for r in runs]
        premise = premise_from_dips(none)
        for arm, base, sign, claim, paper in COMPARISONS:
            if arm not in runs[0]["curves"][key] or base not in runs[0]["curves"][key]:
                continue
            vals = [dip(r["curves"][key][arm], window) - dip(r["curves"][key][base], window) for r in runs]
            rows.append({"lr_mult": key, "claim": claim, "paper": paper, "arm": arm, "baseline": base,
                         "values": vals, **summarize(vals), "premise": premise,
                         "verdict": verdict(vals, sign, premise)})
    return rows


def section(runs: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]], base_info: Dict[str, Any],
            command: str, seconds: float) -> str:
    """The OSR protocol's section of the fidelity report (markdown)."""
    import platform

    from .fidelity import summarize

    s, p = base_info["settings"], runs[0]["protocol"]
    last = base_info["curve"][-1]
    lines = [
        "## OSR protocol (TuneCLIP Table 2, Fig. 2/9): converged base model, per-step evaluation",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on {platform.machine()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
        f"Seeds {[r['seed'] for r in runs]}. Protocol: `vlmkern/app/osr_protocol.py`.",
        "",
        f"Base model (`{s['model']}`, {base_info['parameters'] / 1e6:.1f}M parameters, cache key "
        f"`{base_info['key']}`{', read from the cache' if base_info.get('cached') else ''}): "
        f"{s['n_train']} synthetic pairs, batch {s['batch']}, AdamW peak LR {s['peak_lr']:g} ({s['warmup']} "
        f"warm-up steps, cosine to 0 over {base_info['steps']} steps), fixed tau {s['tau']:g}. Validation "
        f"({s['n_val']} held-out pairs) at the end: CLIP loss {last['val_loss']:.3f}, attribute-level R@1 "
        f"{last['val_attr_R1']:.3f}; the best R@1 of the last quarter of the run minus the best before it: "
        f"{100 * base_info['late_improvement']:+.1f} pts ({'converged' if base_info['converged'] else 'NOT converged'}"
        f": the criterion is <= {100 * s['converge_tol']:g} pt; a run that misses it is restarted with twice the "
        f"steps, at most {s['max_doublings']} times). Pretraining took {base_info['seconds']:.0f} s.",
        "",
        f"Fine-tuning, per seed: {p['ft_n']} new pairs ({100 * p['dup_frac']:.0f}% near-duplicates), batch "
        f"{p['batch']}, HGCL (margin {p['margin']:g}, gamma {p['gamma']:g}) at the base model's tau, AdamW "
        f"without warm-up at a constant LR of {', '.join(f'{m:g}' for m in p['lr_mults'])} x the pretraining "
        f"peak; OSR arms first run {runs[0]['osr_steps']} recovery steps (weights frozen). Metric: "
        f"attribute-level R@1 (mean of I2T and T2I) on {p['eval_n']} held-out pairs per seed, before and after "
        f"each of the first {p['steps']} steps. Dip of an arm = min over steps 1-{p['dip_window']} minus the "
        f"start; claim value = dip of the method arm minus dip of the baseline arm, same seed (points). "
        f"Premise: the no-recovery arm's dip is below 0 by more than 2 standard errors (seed-to-seed SE of the "
        f"mean). Interval: 95% t interval over seeds.",
        "",
        "Mean attribute-level R@1 over seeds, start and after steps 1-4 and the last step:",
        "",
        "| LR x peak | arm | start | step 1 | step 2 | step 3 | step 4 | last step | dip (mean, sd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in runs[0]["curves"]:
        for arm in runs[0]["curves"][key]:
            cs = [r["curves"][key][arm] for r in runs]
            mean = [sum(c[i] for c in cs) / len(cs) for i in range(len(cs[0]))]
            d = summarize([dip(c, p["dip_window"]) for c in cs])
            sd = "n/a" if d["std"] != d["std"] else f"{100 * d['std']:.1f}"
            lines.append(f"| {key} | {ARM_TITLES[arm]} | " + " | ".join(f"{v:.3f}" for v in mean[:5])
                         + f" | {mean[-1]:.3f} | {pts(d['mean'])} ({sd}) |")
    lines += ["", *claim_table_lines(rows)]
    return "\n".join(lines) + "\n"


def run_osr(seeds: Sequence[int] = (0, 1, 2), out: str = "runs/fidelity/osr", cache_dir: str = "runs/cache/osr_base",
            base_settings: Optional[Dict[str, Any]] = None, protocol: Optional[Dict[str, Any]] = None,
            command: str = "vlmkern fidelity --claims osr", log=print) -> Dict[str, Any]:
    """The whole OSR protocol: base model (cached), every seed, the claims' rows and the report section
    (``<out>/osr.json``, ``<out>/osr.md``); returns ``{"runs", "rows", "base", "section", "seconds"}``."""
    return run_protocol("osr", run_seed, claim_rows, section, seeds, out, cache_dir, base_settings, protocol,
                        command, log)
