"""The APFT claims' own protocol (``vlmkern fidelity --claims apft``; issue 18).

APFT (Alijani et al.) says adaptive progressive unfreezing adapts a pretrained CLIP to a shifted,
long-tailed domain better than full fine-tuning, above all on the rare (*tail*) labels, "while
preserving foundational knowledge". Its premise is a base model with zero-shot skill worth
protecting, and a fine-tuning domain it does not already know; the demo has neither (its base
model is pretrained on the very images and prompts it is then fine-tuned on). This protocol
builds both:

1. **Base model**: the converged micro CLIP of :mod:`vlmkern.app.base_model` (cached, shared with
   the OSR and HGCL protocols), pretrained on captioned synthetic shapes in the *plain* style.
   Its zero-shot skill: (shape, colour) classification with the prompt "a photo of a {colour}
   {shape}." over all 48 combinations, on plain images (measured, in the report).
2. **Shifted, long-tailed fine-tuning set**, per seed (:func:`vlmkern.app.data.synthetic.shifted_longtail`):
   ``num_classes`` (shape, colour) classes drawn from the 48, rendered in the *archival* style (a faded
   sepia print: desaturated, low-contrast, sepia cast, film grain;
   :data:`~vlmkern.app.data.synthetic.STYLES`); training counts a deterministic Zipf tail
   (``head_count`` images for the head class down to ``min_count``); a balanced validation set (for
   APFT's triggers, every arm's early stopping and the LR selection) and a balanced test set (for the
   claims). Label groups: :func:`~vlmkern.app.eval.metrics.frequency_groups` (head 20%, tail 40% of
   the classes by training count).
3. **Arms**, per seed and per common learning rate (``lr_mults`` x the base model's pretraining peak),
   all from the same base weights with the same trainer (:func:`vlmkern.app.methods.apft.train_apft`):
   ``full`` fine-tuning (OneCycleLR), ``lora`` (OneCycleLR, adapters only) and ``apft`` (phases,
   triggers, LR/WD adaptation, CosineAnnealingWarmRestarts); each with early stopping on the validation
   loss and the best weights restored. Besides each common LR, a *validation-selected* row: each arm at
   the LR of the grid with the best validation I2T Recall@1 over all classes (per seed and arm; the test
   set is never looked at).
4. **Metrics** on the test set (shifted domain): tail I2T Recall@1 over every tail image (its top-1 label
   is right), tail T2I mAP@10 over every tail class as a query (gallery: the whole test set). On the
   *unshifted* domain: zero-shot 48-way accuracy on plain images of every (shape, colour) combination
   (``plain_per_class`` each), the base model's skill that fine-tuning may erase (forgetting).
5. **Claims** (paired per seed): APFT minus full fine-tuning on tail I2T Recall@1, on tail T2I mAP@10 and
   on unshifted-domain accuracy (> 0: APFT forgets less); APFT minus LoRA on tail T2I mAP@10 (the
   abstract's comparison). **Premise**: full fine-tuning loses tail accuracy (tail I2T Recall@1 on the
   shifted test set) or unshifted-domain accuracy relative to the base model, by more than 2 seed-to-seed
   standard errors; for the forgetting claim, the unshifted-domain loss alone.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .base_model import CACHE_SUBDIR, base_model, claim_table_lines, pts, run_protocol  # noqa: F401

PROTOCOL_DEFAULTS: Dict[str, Any] = dict(
    num_classes=30, head_count=64, zipf=1.2, min_count=1, val_per_class=4, test_per_class=8, plain_per_class=4,
    batch=32, max_epochs=12, lr_mults=(0.3,), wd=0.01, window=3, patience=4, min_epochs=8, t0_epochs=4,
    lora_rank=8, lora_alpha=16.0, arms=("full", "apft"), style="archival",
    prompt="a photo of a {colour} {shape}.")

ARM_TITLES = {"full": "full fine-tuning", "lora": "LoRA", "apft": "APFT"}
SELECTED = "val-selected"


def _tail_i2t(m: Dict[str, Any]) -> float:
    return m["shifted"]["i2t"]["tail"]["recall"][1]


def _tail_t2i(m: Dict[str, Any]) -> float:
    return m["shifted"]["t2i"]["tail"]["mAP"][10]


def _plain(m: Dict[str, Any]) -> float:
    return m["plain_acc"]


# (claim, method arm, baseline arm, metric, sign, premise kind, the paper's own number for comparison)
COMPARISONS = [
    ("APFT lifts tail-label I2T Recall@1 over full fine-tuning", "apft", "full", _tail_i2t, +1, "tail_or_plain",
     "no tail I2T number in the paper; all labels (Table I): I2T Recall@10 0.899 APFT vs 0.800 full FT, "
     "mAP@10 0.759 vs 0.512"),
    ("APFT lifts tail-label T2I mAP@10 over full fine-tuning", "apft", "full", _tail_t2i, +1, "tail_or_plain",
     "abstract: tail T2I mAP@10 +19.9% relative over the strongest baseline (LoRA); Fig. 5: tail T2I Recall@10 "
     "96.8% APFT vs 64.5% full FT; Table I (all labels): T2I mAP@10 0.838 vs 0.573"),
    ("APFT forgets less than full fine-tuning (unshifted-domain zero-shot accuracy)", "apft", "full", _plain, +1,
     "plain", "abstract/intro: APFT adapts 'while preserving foundational knowledge'; the paper does not "
     "measure it"),
    ("APFT lifts tail-label T2I mAP@10 over LoRA", "apft", "lora", _tail_t2i, +1, "tail_or_plain",
     "abstract: +19.9% relative tail T2I mAP@10 over LoRA; Fig. 5: tail T2I Recall@10 96.8% vs 67.7%"),
]


# ----------------------------------------------------------------------------------------- data

def make_sets(seed: int, protocol: Optional[Dict[str, Any]] = None, image_size: int = 16) -> Dict[str, Any]:
    """``{"train", "val", "test"}`` (shifted style, see :func:`~vlmkern.app.data.synthetic.shifted_longtail`)
    and ``"plain"``: every (shape, colour) combination, ``plain_per_class`` plain renders each (the unshifted
    domain; its ``classes`` are all 48)."""
    from .data import synthetic as S

    p = {**PROTOCOL_DEFAULTS, **(protocol or {})}
    sets = S.shifted_longtail(seed=100 + seed, num_classes=p["num_classes"], head_count=p["head_count"],
                              zipf=p["zipf"], min_count=p["min_count"], val_per_class=p["val_per_class"],
                              test_per_class=p["test_per_class"], image_size=image_size, style=p["style"])
    combos = [(s, c) for s in S.SHAPES for c in S.COLOUR_NAMES]
    sets["plain"] = S.styled_labelled(combos, [p["plain_per_class"]] * len(combos), 100 + seed, image_size,
                                      "plain", 3_000_000)
    return sets


# ----------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_model(model, tok, sets: Dict[str, Any], groups: Dict[str, List[int]], prompt: str) -> Dict[str, Any]:
    """Shifted test set: I2T / T2I retrieval of the class prompts, all labels and per frequency group
    (Recall@1, mAP@10, ...); unshifted domain: zero-shot accuracy over all 48 combinations."""
    from .eval.metrics import grouped_label_retrieval, zero_shot_accuracy
    from .methods.common import encode_labelled

    test, plain = sets["test"], sets["plain"]
    fi, labels, ft, loss = encode_labelled(model, tok(test.prompts(prompt)), test, "cpu")
    shifted = grouped_label_retrieval(fi, labels, ft, groups, ks=(1, 10))
    pi, plabels, pt, _ = encode_labelled(model, tok(plain.prompts(prompt)), plain, "cpu")
    return {"shifted": shifted, "test_loss": loss, "plain_acc": zero_shot_accuracy(pi, plabels, pt, (1,))[1]}


# -------------------------------------------------------------------------------------- training

def run_arm(base, tok, sets: Dict[str, Any], arm: str, lr: float, seed: int, p: Dict[str, Any],
            run_dir: str) -> Dict[str, Any]:
    """One arm from the base weights; returns its test metrics and its training summary."""
    from .methods.apft import APFTTrainConfig, train_apft
    from .methods.apft_schedule import APFTConfig

    model = copy.deepcopy(base)
    cfg = APFTTrainConfig(strategy=arm, max_epochs=p["max_epochs"], batch_size=p["batch"], lr=lr, wd=p["wd"],
                          schedule=APFTConfig(window=p["window"], patience=p["patience"], min_epochs=p["min_epochs"]),
                          lora_rank=p["lora_rank"], lora_alpha=p["lora_alpha"], seed=seed, eval_ks=(1, 10),
                          t0_epochs=p["t0_epochs"], checkpoint=False)
    t0 = time.time()
    res = train_apft(model, tok, sets["train"], sets["val"], sets["train"].prompts(p["prompt"]), cfg, run_dir)
    test = evaluate_model(model, tok, sets, res["groups"], p["prompt"])
    return {"arm": arm, "lr": lr, "test": test, "val_i2t_R1": res["final"]["retrieval"]["i2t"]["all"]["recall"][1],
            "val_loss": res["final"]["val_loss"], "epochs": res["epochs"], "best_epoch": res["best_epoch"],
            "phases_used": res["phases_used"], "transitions": [(t["epoch"], t["reason"]) for t in res["transitions"]],
            "trainable_frac": res["trainable_frac"], "seconds": time.time() - t0}


def run_seed(base, tok, base_info: Dict[str, Any], seed: int, protocol: Optional[Dict[str, Any]] = None,
             log=print, out: Optional[str] = None) -> Dict[str, Any]:
    """Every arm at every common LR for one seed, and the validation-selected LR per arm:
    ``{"base": metrics, "arms": {lr_key: {arm: result}}, "selected": {arm: lr_key}, ...}``."""
    from .eval.metrics import frequency_groups

    p = {**PROTOCOL_DEFAULTS, **(protocol or {})}
    s = base_info["settings"]
    t0 = time.time()
    sets = make_sets(seed, p, s["size"])
    groups = frequency_groups(sets["train"].labels, num_classes=p["num_classes"])
    base_m = evaluate_model(base, tok, sets, groups, p["prompt"])
    out = out or os.path.join("runs", "fidelity", "apft")
    arms: Dict[str, Dict[str, Any]] = {}
    for mult in p["lr_mults"]:
        key = f"{mult:g}"
        arms[key] = {}
        for arm in p["arms"]:
            r = run_arm(base, tok, sets, arm, mult * s["peak_lr"], seed, p, os.path.join(out, f"seed{seed}", key, arm))
            arms[key][arm] = r
            log(f"[apft] seed {seed} lr {r['lr']:.2g} ({key}x peak) {ARM_TITLES[arm]}: tail I2T R@1 "
                f"{_tail_i2t(base_m):.3f} -> {_tail_i2t(r['test']):.3f}, tail T2I mAP@10 {_tail_t2i(base_m):.3f} -> "
                f"{_tail_t2i(r['test']):.3f}, unshifted acc {_plain(base_m):.3f} -> {_plain(r['test']):.3f} "
                f"({r['epochs']} epochs, {r['phases_used']} phase(s), {r['seconds']:.0f} s)")
    # validation-selected LR per arm: best validation I2T Recall@1 over all classes (ties: the smaller LR)
    selected = {arm: max(arms, key=lambda k: (arms[k][arm]["val_i2t_R1"], -float(k))) for arm in p["arms"]}
    if len(p["lr_mults"]) > 1:
        arms[SELECTED] = {arm: arms[k][arm] for arm, k in selected.items()}
    counts = [sets["train"].labels.count(k) for k in range(p["num_classes"])]
    return {"seed": seed, "base": base_m, "arms": arms, "selected": selected, "groups": groups,
            "train_counts": counts, "n": {k: len(v) for k, v in sets.items()}, "seconds": time.time() - t0,
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"), "protocol": p}


# ---------------------------------------------------------------------------------------- claims

def premise(runs: Sequence[Dict[str, Any]], key: str, kind: str) -> Dict[str, Any]:
    """Full fine-tuning (at ``key``) loses tail I2T Recall@1 (shifted test) or unshifted-domain accuracy
    relative to the base model by more than 2 seed-to-seed standard errors (``kind`` "tail_or_plain"), or
    the unshifted-domain accuracy alone (``kind`` "plain")."""
    from .fidelity import premise_below_zero

    plain = premise_below_zero([_plain(r["arms"][key]["full"]["test"]) - _plain(r["base"]) for r in runs],
                               "full FT's unshifted-domain accuracy change vs the base model")
    if kind == "plain":
        return plain
    tail = premise_below_zero([_tail_i2t(r["arms"][key]["full"]["test"]) - _tail_i2t(r["base"]) for r in runs],
                              "full FT's tail I2T R@1 change vs the base model")
    flags = [tail["holds"], plain["holds"]]
    holds = True if True in flags else (None if None in flags else False)
    return {"holds": holds, "tail_change": tail["value"], "plain_change": plain["value"],
            "text": f"{tail['text']}; {plain['text']}"}


def claim_rows(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    from .fidelity import summarize, verdict

    rows = []
    for key in runs[0]["arms"]:
        have = runs[0]["arms"][key]
        for claim, arm, baseline, metric, sign, kind, paper in COMPARISONS:
            if arm not in have or baseline not in have:
                continue
            pr = premise(runs, key, kind)
            vals = [metric(r["arms"][key][arm]["test"]) - metric(r["arms"][key][baseline]["test"]) for r in runs]
            rows.append({"lr_mult": key, "claim": claim, "paper": paper, "arm": arm, "baseline": baseline,
                         "sign": sign, "values": vals, **summarize(vals), "premise": pr,
                         "verdict": verdict(vals, sign, pr)})
    return rows


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def section(runs: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]], base_info: Dict[str, Any],
            command: str, seconds: float, when: Optional[str] = None, note: str = "") -> str:
    """The APFT protocol's section of the fidelity report (markdown); ``when``: the run's time (default now);
    ``note``: a sentence on the conditions of the run, after the command."""
    from .data.synthetic import STYLES

    s, p = base_info["settings"], runs[0]["protocol"]
    n, g = runs[0]["n"], runs[0]["groups"]
    st = STYLES[p["style"]]
    counts = runs[0]["train_counts"]
    tail_counts = sorted({counts[k] for k in g["tail"]})
    b = {name: _mean([f(r["base"]) for r in runs]) for name, f in
         (("plain", _plain), ("tail_i2t", _tail_i2t), ("tail_t2i", _tail_t2i),
          ("all_i2t", lambda m: m["shifted"]["i2t"]["all"]["recall"][1]))}
    sel = {arm: [r["selected"][arm] for r in runs] for arm in p["arms"]}
    lines = [
        "## APFT protocol: a base model with zero-shot skill, a shifted long-tailed domain, forgetting",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on {platform.machine()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}, {when or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
        f"Seeds {[r['seed'] for r in runs]}. Protocol: `vlmkern/app/apft_protocol.py`."
        + ("" if not all("loadavg" in r for r in runs) else
           " Load average (1 min) at the end of each seed: " + ", ".join(f"{r['loadavg']:.1f}" for r in runs)
           + f" (on {os.cpu_count()} cores: above that, other jobs shared the machine and the wall time is longer "
           "than an idle machine's).")
        + (f" {note}" if note else ""),
        "",
        f"Base model: the converged micro CLIP of the OSR section (`vlmkern/app/base_model.py`, cache key "
        f"`{base_info['key']}`{', read from the cache' if base_info.get('cached') else ''}), pretrained on "
        f"captioned shapes in the plain style. Its zero-shot skill (prompt \"{p['prompt']}\", mean over seeds): "
        f"**{100 * b['plain']:.1f}%** 48-way (shape, colour) accuracy on plain images (chance 2.1%); on the "
        f"shifted domain's test set, I2T Recall@1 {100 * b['all_i2t']:.1f}% over all {p['num_classes']} classes "
        f"(chance {100 / p['num_classes']:.1f}%), tail I2T Recall@1 {100 * b['tail_i2t']:.1f}%, tail T2I mAP@10 "
        f"{100 * b['tail_t2i']:.1f}%.",
        "",
        f"Fine-tuning domain, per seed: {p['num_classes']} (shape, colour) classes of the 48, rendered in the "
        f"*{p['style']}* style (a faded sepia print: colours {100 * st['desat']:.0f}% desaturated, black level "
        f"{st['lift']:g}, contrast x{st['gain']:g}, sepia cast {st['tint']}, grain sd {st['grain']:g}). Training "
        f"counts: Zipf {p['zipf']:g}, {counts[0]} images for the head class down to {counts[-1]} "
        f"({len(runs[0]['train_counts'])} classes, {n['train']} images); head / torso / tail = "
        f"{len(g['head'])} / {len(g['torso'])} / {len(g['tail'])} classes by training count, the tail classes "
        f"having {', '.join(str(c) for c in tail_counts)} training image(s) each. Validation {n['val']} images "
        f"({p['val_per_class']} per class: APFT's triggers, early stopping"
        f"{', the LR selection' if len(p['lr_mults']) > 1 else ''}), test {n['test']} "
        f"({p['test_per_class']} per class: the claims), unshifted domain {n['plain']} plain images "
        f"({p['plain_per_class']} per combination, all 48 classes, 48-way zero-shot).",
        "",
        f"Arms, from the same base weights with the same trainer (`vlmkern/app/methods/apft.py`): full "
        f"fine-tuning"
        + (f" and LoRA (rank {p['lora_rank']}, alpha {p['lora_alpha']:g})" if "lora" in p["arms"] else "")
        + f" with OneCycleLR, APFT (phases: projections; then the last block of each tower inwards; frontends "
        f"last; window {p['window']}, thresholds 15% / 1e-4 / 1e-4 as in the paper, CosineAnnealingWarmRestarts "
        f"period {p['t0_epochs']} epochs); AdamW, batch {p['batch']}, wd {p['wd']:g}, at most {p['max_epochs']} "
        f"epochs, early stopping on the validation loss (patience {p['patience']}, at least {p['min_epochs']} "
        f"epochs) and the best weights restored, at a common LR of "
        f"{' and '.join(f'{m:g}' for m in p['lr_mults'])} x the base model's pretraining peak ({s['peak_lr']:g})"
        + ("" if len(p["lr_mults"]) < 2 else
           f"; the *{SELECTED}* rows take each arm at the LR of that grid with the best validation I2T Recall@1 "
           "over all classes, per seed (chosen multipliers: "
           + "; ".join(f"{ARM_TITLES[a]} {', '.join(v)}" for a, v in sel.items()) + ")")
        + ". Claim values: paired differences per seed, in points. Premise: full fine-tuning loses tail I2T "
        "Recall@1 (shifted test) or unshifted-domain accuracy relative to the base model by more than 2 "
        "seed-to-seed standard errors (the forgetting claim: unshifted-domain accuracy alone). Interval: 95% t "
        "interval over seeds.",
        "",
        "Means over seeds (base model, then each arm after fine-tuning; percent):",
        "",
        "| LR x peak | arm | tail I2T R@1 | tail T2I mAP@10 | all I2T R@1 | unshifted acc | epochs | phases |",
        "|---|---|---|---|---|---|---|---|",
        f"| - | base model (zero-shot) | {100 * b['tail_i2t']:.1f} | {100 * b['tail_t2i']:.1f} | "
        f"{100 * b['all_i2t']:.1f} | {100 * b['plain']:.1f} | - | - |",
    ]
    for key in runs[0]["arms"]:
        for arm in runs[0]["arms"][key]:
            rs = [r["arms"][key][arm] for r in runs]
            lines.append(
                f"| {key} | {ARM_TITLES[arm]} | {100 * _mean([_tail_i2t(x['test']) for x in rs]):.1f} "
                f"| {100 * _mean([_tail_t2i(x['test']) for x in rs]):.1f} "
                f"| {100 * _mean([x['test']['shifted']['i2t']['all']['recall'][1] for x in rs]):.1f} "
                f"| {100 * _mean([_plain(x['test']) for x in rs]):.1f} | {_mean([x['epochs'] for x in rs]):.1f} "
                f"| {_mean([x['phases_used'] for x in rs]):.1f} |")
    lines += ["", *claim_table_lines(rows)]
    ph = {key: _mean([r["arms"][key]["apft"]["phases_used"] for r in runs]) for key in runs[0]["arms"]
          if "apft" in runs[0]["arms"][key]}
    if ph and max(ph.values()) <= 1.0:
        frac = runs[0]["arms"][next(iter(ph))]["apft"]["trainable_frac"]
        lines += ["", f"APFT never left phase 0 (projections only, {100 * frac:.1f}% "
                  f"of the parameters) within {p['max_epochs']} epochs at any LR here: its validation loss was still "
                  "falling, so no trigger fired. These rows therefore compare APFT's first phase with full "
                  "fine-tuning, not its progressive unfreezing."]
    lines += ["", "The forgetting claim's value is APFT's unshifted-domain accuracy minus full fine-tuning's "
              "(> 0: APFT forgets less). The paper's numbers are on HISTORY-X4 with ViT-L/14@336 and are beside "
              "each claim for its direction, not its size."]
    return "\n".join(lines) + "\n"


def rerender(out: str = "runs/fidelity/apft", report: Optional[str] = None, command: Optional[str] = None,
             note: str = "") -> str:
    """The section again from a finished run's ``<out>/apft.json`` (same runs, rows, base model and wall time;
    the text of this code): for a report whose wording changed after the run. Upserts it into ``report``
    when given; returns it."""
    import json

    from .fidelity import _int_keys, upsert_section

    with open(os.path.join(out, "apft.json")) as f:
        res = _int_keys(json.load(f))
    import re

    old = os.path.join(out, "apft.md")
    first = open(old).read() if os.path.exists(old) else ""
    m = re.search(r"Command: `([^`]*)`", first)
    cmd = command or (m.group(1) if m else "vlmkern fidelity --claims apft")
    w = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d UTC)\)", first)
    text = section(res["runs"], res["rows"], res["base"], cmd, res["seconds"], when=w.group(1) if w else None,
                   note=note)
    if report:
        upsert_section(report, "apft", text)
    return text


def run_apft(seeds: Sequence[int] = (0, 1, 2), out: str = "runs/fidelity/apft",
             cache_dir: str = os.path.join("runs", "cache", CACHE_SUBDIR),
             base_settings: Optional[Dict[str, Any]] = None, protocol: Optional[Dict[str, Any]] = None,
             command: str = "vlmkern fidelity --claims apft", log=print) -> Dict[str, Any]:
    """The whole protocol: base model (cached), every seed, the rows and the report section
    (``<out>/apft.json``, ``<out>/apft.md``); returns ``{"runs", "rows", "base", "section", "seconds"}``."""
    def seed_run(base, tok, info, seed, prot, log=print):
        return run_seed(base, tok, info, seed, prot, log=log, out=out)

    return run_protocol("apft", seed_run, claim_rows, section, seeds, out, cache_dir, base_settings, protocol,
                        command, log)
