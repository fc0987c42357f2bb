"""The Kalman optimizer's fidelity protocol (``vlmkern fidelity --claims kalman``): its helpers (early
stopping on validation, iterations to a target, the non-inferiority / equivalence verdicts, the
"P moved" premise) and the whole protocol end to end at a tiny setting."""

import math
import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app import fidelity as FI  # noqa: E402
from vlmkern.app import kalman_protocol as KP  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")

TINY_BASE = dict(n_train=32, n_val=16, batch=16, steps=4, warmup=2, eval_every=2, max_doublings=0)
TINY_GRIDS = {"adamw": {"lr": [1e-3, 1e-2]}, "polyak": {"c": [0.1]}, "kalman": {"p0": [0.1]},
              "kalman_ps": {"p0": [1e-2], "q_rel": [0.0, 0.01], "beta": [0.9], "lam": [1.0]}}
TINY_PROTOCOL = dict(classes=3, shots=2, val_shots=1, test_per_class=2, tune_test_per_class=2, iters=3,
                     grids=TINY_GRIDS, min_seeds=2)


def test_early_stopped_curve_follows_the_best_validation_checkpoint():
    val = [0.2, 0.5, 0.4, 0.5, 0.7, 0.1]
    test = [0.1, 0.6, 0.9, 0.2, 0.3, 0.8]
    curve, which = KP.early_stopped(val, test)
    assert which == [0, 1, 1, 1, 4, 4]  # ties keep the earlier checkpoint; a drop in validation is not followed
    assert curve == [0.1, 0.6, 0.6, 0.6, 0.3, 0.3]


def test_iters_to_target_counts_one_past_the_budget_when_missed():
    assert KP.iters_to([0.1, 0.3, 0.5, 0.4], 0.45) == 2
    assert KP.iters_to([0.1, 0.3], 0.1) == 0
    assert KP.iters_to([0.1, 0.3, 0.2], 0.9) == 3


def test_non_inferiority_and_equivalence_verdicts():
    absent = {"holds": False, "text": "x"}
    # mean +0.01, tight: lower end above -0.02
    assert FI.verdict_at_least([0.01, 0.012, 0.008, 0.011, 0.009], 0.02) == "reproduced"
    # clearly worse: upper end below 0
    assert FI.verdict_at_least([-0.05, -0.06, -0.04, -0.055, -0.045], 0.02) == "not reproduced"
    # wide interval across -margin and 0
    assert FI.verdict_at_least([0.05, -0.08, 0.02, -0.06, 0.01], 0.02) == "inconclusive"
    assert FI.verdict_at_least([0.01, 0.012, 0.008], 0.02, absent) == "premise absent"
    assert FI.verdict_at_least([0.01], 0.02) == "not measured"
    assert FI.verdict_tie([0.001, -0.002, 0.003, 0.0, -0.001], 0.02) == "reproduced"
    assert FI.verdict_tie([0.05, 0.06, 0.055, 0.045, 0.05], 0.02) == "not reproduced"
    assert FI.verdict_tie([0.05, -0.06, 0.03, -0.04, 0.0], 0.02) == "inconclusive"
    # excludes 0 but stays inside the band: still a tie within the margin
    assert FI.verdict_tie([0.005, 0.006, 0.0055, 0.0045, 0.005], 0.02) == "reproduced"


def test_premise_at_least_needs_the_threshold_plus_two_standard_errors():
    p = FI.premise_at_least([0.30, 0.32, 0.31], 0.1, "moved")
    assert p["holds"] is True and "present" in p["text"]
    # positive and far from 0, but not above the threshold: absent
    p = FI.premise_at_least([0.0002, 0.0003, 0.00025], 0.1, "moved")
    assert p["holds"] is False and "absent" in p["text"]
    # mean above the threshold but within 2 SE of it
    assert FI.premise_at_least([0.05, 0.3, 0.1], 0.1, "moved")["holds"] is False
    assert FI.premise_at_least([0.5], 0.1, "moved")["holds"] is None


def _fake(seed, curves, moved):
    arms = {}
    for arm, c in curves.items():
        arms[arm] = {"es_test": c, "curves": {"test": c}, "train_loss": [0.5], "seconds": 1.0}
        if arm in moved:
            arms[arm]["p"] = {"mean_abs_log_p": 0.8, "sd_log_p": moved[arm]}
    return {"seed": seed, "arms": arms, "protocol": dict(KP.PROTOCOL_DEFAULTS)}


def test_claim_rows_premise_and_verdicts():
    # the premise reads the spread of log p over the parameters, not mean |log p/p0| (which a common
    # factor, e.g. forgetting, raises as much as any scalar schedule)
    base = [0.3, 0.4, 0.45, 0.5, 0.5]
    fast = [0.3, 0.5, 0.52, 0.52, 0.52]
    runs = [_fake(s, {"adamw": base, "polyak": [0.3, 0.45, 0.48, 0.5, 0.5], "kalman": [0.3, 0.45, 0.48, 0.5, 0.5],
                      "kalman_ps": fast}, {"kalman": 0.0003 + 1e-5 * s, "kalman_ps": 0.4 + 0.01 * s})
            for s in range(5)]
    rows = {x["id"]: x for x in KP.claim_rows(runs)}
    # per-sample: P moved, faster and better -> reproduced
    assert rows["iters_kalman_ps"]["premise"]["holds"] is True
    # target = 0.3 + 0.9 * (0.5 - 0.3) = 0.48: AdamW at iteration 3, per-sample at 1
    assert rows["iters_kalman_ps"]["values"] == [2.0] * 5 and rows["iters_kalman_ps"]["verdict"] == "reproduced"
    assert rows["acc_kalman_ps"]["verdict"] == "reproduced"
    # scalar: P did not move -> premise absent on the paper claims, whatever the values
    for rid in ("iters_kalman", "auc_kalman", "acc_kalman"):
        assert rows[rid]["verdict"] == "premise absent"
    # the sanity tie and the default decision carry no paper premise
    tie = rows["tie_scalar_polyak"]
    assert tie["verdict"] == "reproduced" and tie["premise"]["holds"] is None
    assert rows["default"]["verdict"] == "reproduced"
    assert KP.default_decision(list(rows.values()))["per_sample"] is True


def test_kalman_protocol_end_to_end(tmp_path):
    torch.set_num_threads(1)
    report = str(tmp_path / "FIDELITY.md")
    with open(report, "w") as f:
        f.write("# Method fidelity\n\nthe demo table\n")
    rows = FI.run_fidelity(seeds=[0, 1], out=str(tmp_path / "out"), report=report, claims=["kalman"],
                           command="vlmkern fidelity --claims kalman --seeds 0 1", cache_dir=str(tmp_path / "cache"),
                           kalman_protocol={**TINY_PROTOCOL, "base_settings": TINY_BASE})
    ids = [x["id"] for x in rows]
    assert ids == ["iters_kalman_ps", "auc_kalman_ps", "acc_kalman_ps", "iters_kalman", "auc_kalman", "acc_kalman",
                   "tie_scalar_polyak", "default"]
    for x in rows:
        assert len(x["values"]) == 2 and all(math.isfinite(v) for v in x["values"])
        assert "text" in x["premise"] and x["verdict"] in (
            "reproduced", "partly reproduced", "not reproduced", "premise absent", "inconclusive")
    for x in rows[:6]:
        assert "sd of log p over parameters" in x["premise"]["text"]
    text = open(report).read()
    assert text.startswith("# Method fidelity\n\nthe demo table\n")  # the rest of the report is kept
    assert "<!-- section:kalman -->" in text and "<!-- /section:kalman -->" in text
    assert "vlmkern fidelity --claims kalman --seeds 0 1" in text and "Default decision" in text
    assert "s / (s + R)" in text  # how far the scalar filter's step was from the Polyak step
    assert os.path.exists(tmp_path / "out" / "kalman" / "kalman.json")
    # a second run replaces the section in place
    FI.run_fidelity(seeds=[0, 1], out=str(tmp_path / "out"), report=report, claims=["kalman"],
                    command="vlmkern fidelity --claims kalman --seeds 0 1", cache_dir=str(tmp_path / "cache"),
                    kalman_protocol={**TINY_PROTOCOL, "base_settings": TINY_BASE})
    assert open(report).read().count("<!-- section:kalman -->") == 1


def test_seeds_extended_to_the_minimum_past_the_tuning_seed():
    assert KP.extend_seeds([0, 1, 2], 5, avoid=100) == [0, 1, 2, 3, 4]
    assert KP.extend_seeds([98, 99], 4, avoid=100) == [98, 99, 101, 102]  # never the tuning seed
    assert KP.extend_seeds([3, 1, 3], 2, avoid=100) == [3, 1]  # enough already: as given, without repeats
    assert KP.extend_seeds([], 2, avoid=0) == [1, 2]


def test_trainer_default_follows_the_reports_default_decision():
    """docs/FIDELITY.md's Kalman section decides issue 16's default; `vlmkern train kalman` must agree."""
    from vlmkern.app.methods.kalman import KalmanTrainConfig

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "FIDELITY.md")
    section = FI._sections(path)["kalman"]
    line = next(x for x in section.splitlines() if x.startswith("Default decision"))
    expected = "per_sample" if 'is the default of `vlmkern train kalman`' in line else "loss"
    assert KalmanTrainConfig().observation == expected, line
    import re

    seeds = re.search(r"Seeds \[([0-9, ]+)\]", section).group(1).split(",")
    assert len(seeds) >= KP.PROTOCOL_DEFAULTS["min_seeds"]  # the decision was made on the protocol's seeds


def test_tuning_seed_must_not_be_a_report_seed(tmp_path):
    with pytest.raises(ValueError, match="tuning seed"):
        KP.run_kalman(seeds=[0, 100], out=str(tmp_path), cache_dir=str(tmp_path / "c"),
                      protocol={**TINY_PROTOCOL, "base_settings": TINY_BASE})


def test_arms_from_the_same_base_and_p_moves_only_with_per_sample_observations(tmp_path):
    torch.set_num_threads(1)
    from vlmkern.app.base_model import base_model

    base, tok, info = base_model(TINY_BASE, str(tmp_path), log=lambda m: None)
    p = {**KP.PROTOCOL_DEFAULTS, **TINY_PROTOCOL, "iters": 4}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    t = KP.task(0, p, int(info["settings"]["size"]), 2)
    assert len(t["train"][1]) == 6 and len(t["val"][1]) == 3 and len(t["test"][1]) == 6
    sc = KP.run_arm(base, tok, t, "kalman", {"p0": 0.1}, p, 0)
    ps = KP.run_arm(base, tok, t, "kalman_ps", {"p0": 0.1}, p, 0)
    assert sc["curves"]["test"][0] == ps["curves"]["test"][0]  # same start
    # 6 observations per step against 1: P moves far more
    assert ps["p"]["mean_abs_log_p"] > 20 * sc["p"]["mean_abs_log_p"]
    after = base.state_dict()  # the arms train copies
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_demo_kalman_rows_check_that_p_moved():
    """The demo table's Kalman claims: two per form (iterations, final accuracy), each with the premise read from
    its own run's record of P."""
    def run(arm, moved=None, obs="loss"):
        k = {"curve": [], "final_acc": 0.5}
        if moved is not None:
            k.update(observation=obs, p_moved={"mean_abs_log_p": 5.0, "sd_log_p": moved})
        other = "kalman scalar" if arm == "kalman per-sample" else "kalman per-sample"
        return {"kalman": {arm: k, other: {"curve": [], "final_acc": 0.5}, "adamw": {"final_acc": 0.5}}}

    rows = [c for c in FI.CLAIMS if c["paper"] == "Kalman / LoKO"]
    assert len(rows) == 4
    for c in rows:
        arm = "kalman per-sample" if "(per-sample)" in c["claim"] else "kalman scalar"
        assert "(scalar)" in c["claim"] or arm == "kalman per-sample"
        old = c["premise"]([run(arm), run(arm)])  # results from before train_kalman recorded P
        assert old["holds"] is None and "Kalman protocol" in old["text"]
        scalar = c["premise"]([run(arm, 0.0003), run(arm, 0.0004), run(arm, 0.00035)])
        assert scalar["holds"] is False and "observation=loss" in scalar["text"]
        ps = c["premise"]([run(arm, 0.7, "per_sample"), run(arm, 0.72, "per_sample"), run(arm, 0.71, "per_sample")])
        assert ps["holds"] is True

