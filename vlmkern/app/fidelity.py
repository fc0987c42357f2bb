"""Method-fidelity check: each paper's central claim, tested on the embedded
data over several seeds (``vlmkern fidelity``).

Runs the demo (:func:`vlmkern.app.demo.run_demo`) once per seed and reads, from
its results, one paired difference per claim (method minus baseline, same
seed, same pretrained model). A claim is

* **reproduced** when the mean difference points the way the paper says and
  every seed agrees,
* **partly reproduced** when the mean points that way but some seed disagrees,
* **not reproduced** otherwise,
* **premise absent** when the claim carries a premise check (the setting the
  paper's effect needs, e.g. a cold-start dip without OSR) and the check fails:
  then the claim is not tested here, and the report gives the premise's
  measured value instead. A claim without a check says "premise not checked".

Claims with their own protocol (``--claims osr``: :mod:`vlmkern.app.osr_protocol`;
``--claims hgcl``: :mod:`vlmkern.app.hgcl_protocol`; ``--claims kalman``:
:mod:`vlmkern.app.kalman_protocol`; ``--claims apft``: :mod:`vlmkern.app.apft_protocol`; ``--claims wrf4cir``:
:mod:`vlmkern.app.wrf4cir_protocol`) run apart from the demo, on the
cached converged base model of :mod:`vlmkern.app.base_model`, and write their own
section of the report.

Tiny models on tiny data: this checks the direction of an effect, not its size.
"""

from __future__ import annotations

import itertools
import importlib
import json
import math
import os
import platform
import re
import time
from typing import Any, Callable, Dict, List, Sequence

import torch

from .base_model import CACHE_SUBDIR


def _mean_r(res: Dict[str, Any], epoch: int) -> float:
    h = [x for x in res["history"] if x["epoch"] == epoch]
    return h[0]["mean_R"] if h else float("nan")


def _early_drop(res: Dict[str, Any]) -> float:
    """Mean recall after the first fine-tuning epoch minus the pretrained model's (negative = a drop)."""
    return _mean_r(res, 1) - _mean_r(res, 0)


def _steps_to(curve: List[Dict[str, Any]], target: float) -> float:
    for c in curve:
        if c["val_acc"] >= target - 1e-12:
            return float(c["step"])
    return float("inf")


def _kalman_iters(r: Dict[str, Any], arm: str) -> float:
    """AdamW's iterations minus the Kalman run ``arm``'s to reach 95% of AdamW's best validation accuracy
    (> 0: Kalman faster)."""
    ad, ka = r["kalman"]["adamw"]["curve"], r["kalman"][arm]["curve"]
    target = 0.95 * max(c["val_acc"] for c in ad)
    a, k = _steps_to(ad, target), _steps_to(ka, target)
    if math.isinf(k):
        return -float(ad[-1]["step"])  # Kalman never got there: count it as the whole budget behind
    return a - k


Claim = Dict[str, Any]


def _paired(task: str, method: str, baseline: str, *path) -> Callable[[Dict[str, Any]], float]:
    """``r[task][method][path...] - r[task][baseline][path...]`` for a demo result ``r``."""
    def get(res):
        for key in path:
            res = res[key]
        return res

    return lambda r: get(r[task][method]) - get(r[task][baseline])


# The Kalman claims' premise: the filter is more than SGD with a Polyak step, i.e. its covariance P
# became a per-parameter preconditioner (sd over the LoRA parameters of log p at the end of the run,
# recorded by vlmkern.app.methods.kalman.train_kalman; 0 for any scalar step size or schedule). The same
# threshold as the Kalman protocol's (vlmkern/app/kalman_protocol.py, ``--claims kalman``, which tests these
# claims with tuning on validation).
KALMAN_P_MOVED_MIN = 0.1


def premise_kalman_moved(runs: Sequence[Dict[str, Any]], arm: str) -> Dict[str, Any]:
    vals = [r["kalman"][arm].get("p_moved", {}).get("sd_log_p", float("nan")) for r in runs]
    obs = {r["kalman"][arm].get("observation", "?") for r in runs}
    if any(v != v for v in vals):
        return {**NOT_CHECKED, "text": "premise not checked here (these results predate the record of P); the Kalman "
                                       "protocol section (`--claims kalman`) checks it"}
    pr = premise_at_least(vals, KALMAN_P_MOVED_MIN,
                          f"Kalman (observation={'/'.join(sorted(obs))}) sd of log p over parameters")
    return {**pr, "text": pr["text"] + " (tuned on validation, both forms: the Kalman protocol section)"}


def _cir_gap_growth(r: Dict[str, Any]) -> float:
    """The plain CIR run's train - validation R@5 gap at the end minus after its first epoch."""
    h = r["wrf4cir"]["plain"]["history"]
    return h[-1]["gap_R5"] - h[0]["gap_R5"]


# The demo's APFT task cannot show APFT's claims: its base model's pretraining already saw the APFT class
# prompts on Fashion-MNIST images, so there is no domain shift to adapt to, and no zero-shot skill elsewhere is
# measured that fine-tuning could erase (issue 18). Set by construction, not measured per run; the claims are
# tested in the APFT protocol (``--claims apft``, :mod:`vlmkern.app.apft_protocol`).
APFT_DEMO_PREMISE = {"holds": False, "value": float("nan"),
                     "text": "premise absent in the demo (by construction): its base model's pretraining already saw "
                             "these prompts on Fashion-MNIST images, so there is no shift and nothing measured to "
                             "protect; see the APFT protocol section"}


# The demo cannot show the HGCL-vs-GCL claim: its premise (GCL raises retrieval on the training pairs while
# held-out retrieval falls, with false negatives present) needs retrieval on the training pairs and a held-out
# shift, and the demo measures neither (its validation pairs come from the training distribution; issue 18).
# Set by construction; the claim is tested in the HGCL protocol (``--claims hgcl``).
HGCL_DEMO_PREMISE = {"holds": False, "value": float("nan"),
                     "text": "premise absent in the demo (by construction): it measures neither retrieval on the "
                             "training pairs nor a held-out shift, where GCL's fit to false negatives would show; "
                             "see the HGCL-vs-GCL protocol section"}


WRF4CIR_PROTOCOL_NOTE = ("tested where the regime exists: the WRF4CIR protocol section "
                         "(`vlmkern fidelity --claims wrf4cir`)")


def _cir_premise(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The demo's WRF4CIR premise (the plain run's gap grows); where it is absent, the text points to the
    WRF4CIR protocol, which builds the overfitting regime the demo lacks."""
    pr = premise_above_zero([_cir_gap_growth(r) for r in runs],
                            "plain run's train-val R@5 gap growth, last minus first epoch")
    if pr["holds"] is False:
        pr = {**pr, "text": f"{pr['text']}; {WRF4CIR_PROTOCOL_NOTE}"}
    return pr


def _kalman_claims(arm: str, form: str) -> List[Claim]:
    """The demo's two Kalman claims (iterations to target, final accuracy) for its run ``arm`` against AdamW."""
    premise = lambda runs: premise_kalman_moved(runs, arm)  # noqa: E731
    return [
        dict(paper="Kalman / LoKO", claim=f"the Kalman optimizer ({form}) needs fewer iterations than AdamW",
             metric=f"iterations AdamW needs minus iterations Kalman ({form}) needs to reach 95% of AdamW's best val "
                    "accuracy (validation after every iteration at the default scale)",
             value=lambda r: _kalman_iters(r, arm), sign=+1, pct=False, premise=premise),
        dict(paper="Kalman / LoKO", claim=f"the Kalman optimizer ({form}) reaches at least AdamW's accuracy",
             metric=f"final val accuracy, Kalman ({form}) minus AdamW",
             value=_paired("kalman", arm, "adamw", "final_acc"), sign=+1, pct=True, premise=premise),
    ]


CLAIMS: List[Claim] = [
    dict(paper="TuneCLIP (Table 2, Fig. 2/9)", claim="OSR removes the early drop of fine-tuning",
         metric="mean R (I2T+T2I R@1/5/10) after the first fine-tuning epoch minus before, HGCL with OSR minus "
                "HGCL without",
         value=lambda r: _early_drop(r["tuneclip"]["TuneCLIP (OSR + HGCL)"]) - _early_drop(
             r["tuneclip"]["HGCL (no OSR)"]), sign=+1, pct=True,
         premise=lambda runs: premise_below_zero(
             [_early_drop(r["tuneclip"]["HGCL (no OSR)"]) for r in runs], "no-OSR drop after epoch 1")),
    dict(paper="TuneCLIP (Fig. 3/4/7)", claim="HGCL keeps retrieval above GCL when false negatives are present",
         metric="final mean R on validation pairs, HGCL (no OSR) minus GCL; training pairs hold 30% near-duplicates",
         value=_paired("tuneclip", "HGCL (no OSR)", "GCL", "final", "mean_R"), sign=+1, pct=True,
         premise=lambda runs: dict(HGCL_DEMO_PREMISE)),
    dict(paper="TuneCLIP", claim="TuneCLIP (OSR + HGCL) beats CLIP-loss fine-tuning",
         metric="final mean R, TuneCLIP minus CLIP loss",
         value=_paired("tuneclip", "TuneCLIP (OSR + HGCL)", "CLIP loss", "final", "mean_R"), sign=+1, pct=True,
         premise=lambda runs: premise_below_zero(
             [_early_drop(r["tuneclip"]["HGCL (no OSR)"]) for r in runs],
             "no-OSR drop after epoch 1 (TuneCLIP's gain is recovery from that drop plus HGCL)")),
    dict(paper="APFT", claim="APFT lifts tail-label recall over full fine-tuning",
         metric="tail-label I2T Recall@1 (top-1 label of a tail image), APFT minus full fine-tuning",
         value=_paired("apft", "apft", "full", "final", "retrieval", "i2t", "tail", "recall", 1), sign=+1, pct=True,
         premise=lambda runs: dict(APFT_DEMO_PREMISE)),
    dict(paper="APFT", claim="APFT lifts tail-label retrieval over full fine-tuning (T2I)",
         metric="tail-label T2I mAP@10, APFT minus full fine-tuning",
         value=_paired("apft", "apft", "full", "final", "retrieval", "t2i", "tail", "mAP", 10), sign=+1, pct=True,
         premise=lambda runs: dict(APFT_DEMO_PREMISE)),
    dict(paper="WRF4CIR", claim="weight perturbation narrows the train/validation gap",
         metric="train R@5 - val R@5 at the end, adversarial perturbation minus plain (negative = narrower)",
         value=_paired("wrf4cir", "WRF4CIR adversarial", "plain", "final", "gap_R5"), sign=-1, pct=True,
         premise=lambda runs: _cir_premise(runs)),
    dict(paper="WRF4CIR", claim="weight perturbation improves validation recall",
         metric="val R@5, adversarial perturbation minus plain",
         value=_paired("wrf4cir", "WRF4CIR adversarial", "plain", "final", "val_R5"), sign=+1, pct=True,
         premise=lambda runs: _cir_premise(runs)),
    *_kalman_claims("kalman per-sample", "per-sample"),
    *_kalman_claims("kalman scalar", "scalar"),
]


# two-sided 97.5% quantiles of Student's t, degrees of freedom 1..30 (for 95% intervals)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample sd, standard error (seed to seed) and 95% t interval of the finite values."""
    vals = [float(v) for v in values if v == v and not math.isinf(v)]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "se": float("nan"),
                "ci": (float("nan"), float("nan"))}
    mean = sum(vals) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": float("nan"), "se": float("nan"), "ci": (float("nan"), float("nan"))}
    std = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5
    se = std / n ** 0.5
    t = _T975[min(n - 1, len(_T975)) - 1] if n - 1 <= len(_T975) else 1.96
    return {"n": n, "mean": mean, "std": std, "se": se, "ci": (mean - t * se, mean + t * se)}


def premise_below_zero(values: Sequence[float], what: str, pct: bool = True, k: float = 2.0) -> Dict[str, Any]:
    """Premise "``values`` are below zero by more than ``k`` standard errors" (seed to seed); fewer than two
    finite values cannot show it."""
    st = summarize(values)
    unit = " pts" if pct else ""
    scale = 100.0 if pct else 1.0
    if st["n"] < 2:
        return {"holds": None, "value": st["mean"], "se": st["se"],
                "text": f"{what}: {st['n']} seed(s), needs >= 2 to check"}
    holds = st["mean"] < -k * st["se"]
    return {"holds": bool(holds), "value": st["mean"], "se": st["se"],
            "text": f"{what} {scale * st['mean']:+.1f}{unit} (SE {scale * st['se']:.1f}, seed to seed; needs < "
                    f"-{k:g} SE): {'present' if holds else 'absent'}"}


def premise_from_dips(dips: Sequence[float]) -> Dict[str, Any]:
    """OSR's premise: fine-tuning without recovery dips (min over the first evaluations minus the start)."""
    return premise_below_zero(dips, "no-OSR dip")


def premise_above_zero(values: Sequence[float], what: str, pct: bool = True, k: float = 2.0) -> Dict[str, Any]:
    neg = premise_below_zero([-v for v in values], what, pct, k)
    if neg["holds"] is None:
        return neg
    scale = 100.0 if pct else 1.0
    unit = " pts" if pct else ""
    return {**neg, "value": -neg["value"],
            "text": f"{what} {scale * -neg['value']:+.1f}{unit} (SE {scale * neg['se']:.1f}, seed to seed; needs > "
                    f"+{k:g} SE): {'present' if neg['holds'] else 'absent'}"}


NOT_CHECKED = {"holds": None, "value": float("nan"), "text": "premise not checked"}


def premise_at_least(values: Sequence[float], threshold: float, what: str, k: float = 2.0) -> Dict[str, Any]:
    """Premise "``values`` exceed ``threshold`` by more than ``k`` standard errors" (seed to seed; plain
    numbers, not points): for a quantity that is positive by construction (how far a covariance moved), where
    "above zero" says nothing."""
    st = summarize(values)
    if st["n"] < 2:
        return {"holds": None, "value": st["mean"], "se": st["se"],
                "text": f"{what}: {st['n']} seed(s), needs >= 2 to check"}
    holds = st["mean"] - k * st["se"] > threshold
    return {"holds": bool(holds), "value": st["mean"], "se": st["se"],
            "text": f"{what} {st['mean']:.3g} (SE {st['se']:.2g}, seed to seed; needs > {threshold:g} + {k:g} SE): "
                    f"{'present' if holds else 'absent'}"}


def verdict(values: Sequence[float], sign: int, premise: Dict[str, Any] | None = None) -> str:
    """reproduced / partly reproduced / not reproduced (see the module docstring); *premise absent*
    when ``premise["holds"]`` is False (None or no premise: not checked, the verdict stands)."""
    if premise is not None and premise.get("holds") is False:
        return "premise absent"
    vals = [v for v in values if v == v]
    if not vals:
        return "not measured"
    mean = sum(vals) / len(vals)
    if sign * mean > 0 and all(sign * v > 0 for v in vals):
        return "reproduced"
    if sign * mean > 0:
        return "partly reproduced"
    return "not reproduced"


def _interval_or_verdict(values: Sequence[float], premise: Dict[str, Any] | None):
    """The shared start of the interval verdicts: ``(None, (lo, hi))`` with the 95% interval, or
    ``("premise absent" | "not measured", None)`` when there is nothing to read."""
    if premise is not None and premise.get("holds") is False:
        return "premise absent", None
    st = summarize(values)
    if st["n"] < 2:
        return "not measured", None
    return None, st["ci"]


def verdict_at_least(values: Sequence[float], margin: float, premise: Dict[str, Any] | None = None) -> str:
    """Non-inferiority ("at least as good", within ``margin``): *reproduced* when the 95% interval's lower end is
    above ``-margin``, *not reproduced* when its upper end is below 0, else *inconclusive*; *premise absent* as
    :func:`verdict`."""
    early, ci = _interval_or_verdict(values, premise)
    if early:
        return early
    lo, hi = ci
    if lo > -margin:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"


def verdict_tie(values: Sequence[float], margin: float, premise: Dict[str, Any] | None = None) -> str:
    """Equivalence ("ties", within ``margin``): *reproduced* when the 95% interval lies inside
    ``[-margin, margin]``, *not reproduced* when it excludes 0 and leaves that band, else *inconclusive*."""
    early, ci = _interval_or_verdict(values, premise)
    if early:
        return early
    lo, hi = ci
    if -margin < lo and hi < margin:
        return "reproduced"
    if (lo > 0 or hi < 0) and (lo < -margin or hi > margin):
        return "not reproduced"
    return "inconclusive"


def evaluate_claims(runs: Sequence[Dict[str, Any]], claims: Sequence[Claim] = CLAIMS) -> List[Dict[str, Any]]:
    rows = []
    for c in claims:
        vals = [float(c["value"](r)) for r in runs]
        st = summarize(vals)
        premise = c["premise"](runs) if c.get("premise") is not None else dict(NOT_CHECKED)
        rows.append({"paper": c["paper"], "claim": c["claim"], "metric": c["metric"], "values": vals,
                     "mean": st["mean"], "std": st["std"], "se": st["se"], "ci": st["ci"], "pct": c["pct"],
                     "premise": premise, "verdict": verdict(vals, c["sign"], premise)})
    return rows


def _f(v: float, pct: bool) -> str:
    if v != v:
        return "n/a"
    return f"{100 * v:+.1f}" if pct else f"{v:+.0f}"


def _ci(ci, pct: bool) -> str:
    lo, hi = ci
    return "n/a" if lo != lo else f"[{_f(lo, pct)}, {_f(hi, pct)}]"


def parameter_count(model_name: str) -> int:
    """Parameters of an architecture (built with random weights, so it is measured, not quoted)."""
    from .models.clip import create_clip

    model, _, _ = create_clip(model_name)
    return sum(p.numel() for p in model.parameters())


def _params_text(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def write_report(rows: List[Dict[str, Any]], runs: Sequence[Dict[str, Any]], path: str, command: str,
                 seconds: float) -> None:
    r0 = runs[0]
    lines = [
        "# Method fidelity on the embedded data",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}). Seeds {[r['seed'] for r in runs]}; scale "
        f"`{r0['scale']}`, model `{r0['model']}` pretrained per seed on {r0['pretrain']['synthetic_pairs']} "
        f"synthetic + {r0['pretrain']['real_pairs']} real captioned images; APFT and Kalman on "
        f"`{r0.get('labelled_source', 'synthetic')}` (see docs/DATA.md and `vlmkern/app/demo.py`).",
        "",
        "Each value is a paired difference (method minus baseline, same seed and pretrained model), in percentage "
        "points unless it counts iterations. Verdict: *reproduced* = the mean points the paper's way and every "
        "seed agrees; *partly* = the mean does but not every seed; *not reproduced* = the mean does not; "
        "*premise absent* = the claim's premise check failed (the setting the paper's effect needs is not there), "
        "so the claim is not tested here. The interval is the 95% t interval of the mean over seeds.",
        "",
        "| paper | claim | metric | per seed | mean (sd) | 95% CI | premise | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        per = ", ".join(_f(v, x["pct"]) for v in x["values"])
        sd = "n/a" if x["std"] != x["std"] else (f"{100 * x['std']:.1f}" if x["pct"] else f"{x['std']:.0f}")
        lines.append(f"| {x['paper']} | {x['claim']} | {x['metric']} | {per} | {_f(x['mean'], x['pct'])} ({sd}) "
                     f"| {_ci(x.get('ci', (float('nan'),) * 2), x['pct'])} | {x['premise']['text']} "
                     f"| **{x['verdict']}** |")
    lines += ["", *_settings_lines(r0)]
    lines += ["", f"Tiny models (`{r0['model']}`: {_params_text(parameter_count(r0['model']))} parameters), minutes "
              "of CPU training and small validation sets: a verdict here says whether the direction of a paper's "
              "effect shows up at this scale, not whether the paper is right. Per-seed reports (tables and plots) "
              "are in the run folder."]
    # the per-claim protocols' sections stay (they are re-run on their own), and so do the hand-written
    # readings kept in sections of their own (``<!-- section:osr_reading -->``); loose prose does not
    kept = _sections(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
        for name, text in kept.items():
            f.write(f"\n<!-- section:{name} -->\n{text}<!-- /section:{name} -->\n")
    print("\n".join(lines))


def _sections(path: str) -> Dict[str, str]:
    """The marked per-claim sections (``<!-- section:NAME -->`` ... ``<!-- /section:NAME -->``) of a report."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read()
    out = {}
    for m in re.finditer(r"<!-- section:(\w+) -->\n(.*?)<!-- /section:\1 -->", text, flags=re.S):
        out[m.group(1)] = m.group(2)
    return out


def upsert_section(path: str, name: str, text: str) -> None:
    """Write ``text`` as the report's section ``name``: in place of that section when the report has it,
    else at the end (a missing report starts with a title)."""
    body = f"<!-- section:{name} -->\n{text}<!-- /section:{name} -->\n"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    else:
        old = "# Method fidelity on the embedded data\n"
    pat = re.compile(rf"<!-- section:{name} -->\n.*?<!-- /section:{name} -->\n", flags=re.S)
    new = pat.sub(lambda _: body, old) if pat.search(old) else old.rstrip("\n") + "\n\n" + body
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(new)


def _settings_lines(r: Dict[str, Any]) -> List[str]:
    """The step sizes every seed used, and where they came from."""
    from .demo import _hp_text, _hparams_sentence

    hp = r.get("hparams")
    if not hp:
        return ["Step sizes: not recorded in these results."]
    tuning = hp.get("_tuning", {})
    grids, selection = tuning.get("grids", {}), tuning.get("selection", {})
    out = [_hparams_sentence(hp), "", "| task | run | setting | grid | selected on (tuning seed) |",
           "|---|---|---|---|---|"]
    for task in ("tuneclip", "apft", "wrf4cir", "kalman"):
        for name, values in hp.get(task, {}).items():
            grid = "; ".join(f"{k} " + ", ".join(f"{v:g}" for v in vs) for k, vs in grids.get(task, {}).get(name, {}).items())
            out.append(f"| {task} | {name} | {_hp_text(values)} | {grid or '-'} | {selection.get(task, '-')} |")
    return out


# ``--claims`` names: "demo" = the claims read from the demo's runs (:data:`CLAIMS`), and the claims
# with their own protocol: ``--claims`` name -> the module of this package whose
# ``run_<name>(seeds, out=, cache_dir=, base_settings=, protocol=, command=)`` runs it and returns
# ``{"rows", "section", ...}``; each writes its own section of the report.
PROTOCOLS = {"osr": "osr_protocol", "hgcl": "hgcl_protocol", "kalman": "kalman_protocol", "apft": "apft_protocol",
             "wrf4cir": "wrf4cir_protocol"}
CLAIM_GROUPS = ("demo", *PROTOCOLS)
DEFAULT_CACHE = os.environ.get("VLMKERN_CACHE", os.path.join("runs", "cache"))


def run_fidelity(seeds: Sequence[int] = (0, 1, 2), scale: str = "default", out: str = "runs/fidelity",
                 report: str = "runs/fidelity/FIDELITY.md", command: str = "vlmkern fidelity",
                 reuse: bool = False, claims: Sequence[str] | None = None,
                 cache_dir: str | None = None, protocol: Dict[str, Any] | None = None,
                 kalman_protocol: Dict[str, Any] | None = None,
                 base_settings: Dict[str, Any] | None = None,
                 wrf4cir_protocol: Dict[str, Any] | None = None) -> List[Dict[str, Any]]:
    """Run the claims ``claims`` (default: all of :data:`CLAIM_GROUPS`) and write the report.

    "demo": the demo for each seed (``reuse``: read ``<out>/seed<n>/results.json`` where a
    finished run of the same scale left one), its claims' table; "osr": the OSR protocol
    (:func:`vlmkern.app.osr_protocol.run_osr`, base model cached under ``cache_dir``), its section;
    "hgcl": the HGCL-vs-GCL protocol (:func:`vlmkern.app.hgcl_protocol.run_hgcl`, same base model), its
    section; ``protocol`` overrides the HGCL and APFT protocols' settings (``lr_mults``, ...), the OSR protocol
    ignores it; "kalman": the Kalman optimizer's protocol (:func:`vlmkern.app.kalman_protocol.run_kalman`, same
    base model, settings overridden by ``kalman_protocol``), its section; "apft": the APFT protocol
    (:func:`vlmkern.app.apft_protocol.run_apft`, same base model), its section; ``base_settings`` overrides the
    base model's settings (tests: a tiny one); "wrf4cir": the WRF4CIR protocol
    (:func:`vlmkern.app.wrf4cir_protocol.run_wrf4cir`, same base model), its section; ``wrf4cir_protocol``
    overrides its settings."""
    claims = list(CLAIM_GROUPS) if not claims else list(dict.fromkeys(claims))
    unknown = [c for c in claims if c not in CLAIM_GROUPS]
    if unknown:
        raise ValueError(f"unknown claims {unknown}; choose from {CLAIM_GROUPS}")
    settings = {"hgcl": protocol, "apft": protocol, "kalman": kalman_protocol, "wrf4cir": wrf4cir_protocol}
    rows: List[Dict[str, Any]] = []
    t0 = time.time()
    for name in claims:
        if name == "demo":
            rows += _run_demo_claims(seeds, scale, out, report, command, reuse)
            continue
        run = getattr(importlib.import_module(f".{PROTOCOLS[name]}", __package__), f"run_{name}")
        os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
        res = run(seeds, out=os.path.join(out, name),
                  cache_dir=os.path.join(cache_dir or DEFAULT_CACHE, CACHE_SUBDIR), base_settings=base_settings, protocol=settings.get(name), command=command)
        upsert_section(report, name, res["section"])
        rows += res["rows"]
    if set(claims) == set(CLAIM_GROUPS):  # the whole report from one command: its wall time (issue 18's budget)
        upsert_section(report, "whole_run", whole_run_text(command, time.time() - t0))
    return rows


def whole_run_text(command: str, seconds: float) -> str:
    """The report's closing section: the command that made every section, and its wall time."""
    load = f", 1-min load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return ("## The whole run\n\n"
            f"`{command}` wrote every section above in {seconds / 60:.1f} min wall time on {platform.machine()} "
            f"({os.cpu_count()} cores{load}; torch {torch.__version__}, {torch.get_num_threads()} threads), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, the base models' pretraining and the protocols' own "
            "tuning included (the demo table's step sizes are read from vlmkern/app/tuned_hparams.json, made "
            "beforehand by `vlmkern fidelity --tune`). Budget: 60 min on 2 cores.\n")


def _run_demo_claims(seeds, scale, out, report, command, reuse) -> List[Dict[str, Any]]:
    from .demo import DEFAULT_HPARAMS, run_demo

    t0 = time.time()
    runs = []
    for seed in seeds:
        path = os.path.join(out, f"seed{seed}")
        done = os.path.join(path, "results.json")
        if reuse and os.path.exists(done):
            with open(done) as f:
                r = json.load(f)
            # a finished run of this scale and seed with every run the demo now makes (older results lack some)
            if r.get("scale") == scale and r.get("seed") == seed and all(
                    set(names) <= set(r.get(task, {})) for task, names in DEFAULT_HPARAMS.items()):
                r["apft"] = {k: _int_keys(v) for k, v in r["apft"].items()}
                runs.append(r)
                continue
        runs.append(run_demo(out=path, scale=scale, seed=seed))
    seconds = time.time() - t0 if not reuse else sum(r.get("seconds", 0.0) for r in runs)
    rows = evaluate_claims(runs)
    with open(os.path.join(out, "fidelity.json"), "w") as f:
        json.dump({"seeds": list(seeds), "scale": scale, "claims": rows}, f, indent=1, default=str)
    write_report(rows, runs, report, command, seconds)
    return rows


def _late_mean_acc(res: Dict[str, Any]) -> float:
    curve = res["curve"]
    half = curve[-1]["step"] / 2
    late = [c["val_acc"] for c in curve if c["step"] > half] or [curve[-1]["val_acc"]]
    return sum(late) / len(late)


# What tuning maximises for each task: a general validation metric, never the claim's own
# (so the claims are not selected for). Larger is better.
SELECTION: Dict[str, Any] = {
    "tuneclip": ("final mean R (I2T+T2I R@1/5/10) on validation pairs", lambda res: res["final"]["mean_R"]),
    "apft": ("final I2T Recall@1 over all validation labels", lambda res: res["final"]["retrieval"]["i2t"]["all"]["recall"][1]),
    "wrf4cir": ("final validation R@5", lambda res: res["final"]["val_R5"]),
    # the mean over the second half of training, not the last point alone: few-shot
    # accuracy on a small validation set moves by single images from one step to the next
    "kalman": ("mean validation accuracy over the second half of the iterations", _late_mean_acc),
}


def tune(scale: str = "default", seed: int = 100, out: str = "runs/tune", path: str | None = None,
         command: str = "vlmkern fidelity --tune", tasks: Sequence[str] | None = None) -> Dict[str, Any]:
    """Pick every run's step sizes from :data:`vlmkern.app.demo.TUNING_GRIDS` on tuning seed ``seed``.

    One pretrained model and one draw of every task's data, from ``seed`` (the report's
    seeds are 0, 1, 2, ...: keep ``seed`` away from them); each run of each task (method
    and baselines alike) is trained once per grid point and the point with the best
    :data:`SELECTION` score wins (ties: the first). The choice is written under ``scale``
    into ``path`` (default vlmkern/app/tuned_hparams.json), which the demo then reads.
    """
    from .demo import TUNED_PATH, TUNING_GRIDS, _hp_text, _slug, prepare, run_one

    path = TUNED_PATH if path is None else path
    os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
    t0 = time.time()
    ctx = prepare(scale, seed, out)
    chosen: Dict[str, Dict[str, Dict[str, float]]] = {}
    trials: List[Dict[str, Any]] = []
    for task, runs in TUNING_GRIDS.items():
        if tasks is not None and task not in tasks:
            continue
        what, score_of = SELECTION[task]
        for name, grid in runs.items():
            best = None
            for values in itertools.product(*grid.values()):
                hp = dict(zip(grid, values))
                res = run_one(ctx, task, name, hp, os.path.join(out, "trials", _slug(f"{name} {_hp_text(hp)}")))
                score = float(score_of(res))
                trials.append({"task": task, "run": name, "hparams": hp, "score": score})
                print(f"[tune] {task} / {name} / {_hp_text(hp)}: {what} = {score:.4f}", flush=True)
                if best is None or score > best[0]:
                    best = (score, hp)
            chosen.setdefault(task, {})[name] = best[1]
    entry = {"seed": seed, "command": command, "date": time.strftime("%Y-%m-%d"),
             "seconds": round(time.time() - t0), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
             "selection": {k: v[0] for k, v in SELECTION.items()}, "grids": TUNING_GRIDS, "chosen": chosen,
             "trials": trials}
    table: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    if tasks is not None and scale in table:  # a partial re-tune keeps the other tasks' choices
        old = table[scale]
        entry["chosen"] = {**old.get("chosen", {}), **chosen}
        entry["trials"] = [t for t in old.get("trials", []) if t["task"] not in chosen] + trials
        entry["command"] = f"{old.get('command', '?')}; then {command}"
        entry["seconds"] += old.get("seconds", 0)
    table[scale] = entry
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"[tune] {time.time() - t0:.0f} s; chosen step sizes written to {path}", flush=True)
    return entry


def _int_keys(o):
    """JSON turns the metrics' integer K keys into strings: turn them back."""
    if isinstance(o, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_int_keys(v) for v in o]
    return o
