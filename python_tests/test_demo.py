"""The demo end to end at the tiny scale: every method and baseline runs and the report is written;
the fidelity report's claims are read from its results."""

import copy
import json
import math
import os

import pytest

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from vlmkern.demo import run_demo

    os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=str(out), scale="tiny")


def test_demo_tiny(tiny_run):
    tmp_path, r = tiny_run
    assert set(r["tuneclip"]) == {"CLIP loss", "GCL", "HGCL (no OSR)", "TuneCLIP (OSR + HGCL)"}
    assert set(r["apft"]) == {"full", "lora", "apft"}
    assert set(r["wrf4cir"]) == {"plain", "WRF4CIR adversarial", "WRF4CIR random"}
    assert set(r["kalman"]) == {"adamw", "kalman"}
    report = (tmp_path / "report.md").read_text()
    assert "| TuneCLIP | TuneCLIP (OSR + HGCL) |" in report and "| Kalman | LoRA + kalman |" in report
    assert json.loads((tmp_path / "results.json").read_text())["scale"] == "tiny"
    pytest.importorskip("matplotlib")
    for name in ("tuneclip_curves.png", "apft_dynamics.png", "recall_by_group.png", "wrf4cir_gap.png",
                 "kalman_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_demo_uses_real_images_when_installed(tiny_run):
    from vlmkern.data import real

    _, r = tiny_run
    installed = real.available(quiet=True)
    if "fashion-mnist" in installed:
        assert r["labelled_source"] == "fashion-mnist"
    elif "sklearn-digits" in installed:
        assert r["labelled_source"] == "sklearn-digits"
    # pretraining mixes in the installed captioned sources (digits stay out when they are the labelled set)
    assert r["pretrain"]["real_pairs"] > 0 and r["pretrain"]["real_sources"]
    assert r["labelled_source"] not in r["pretrain"]["real_sources"] or r["labelled_source"] == "fashion-mnist"
    counts = r["apft_train_counts"]
    assert max(counts) > min(counts) >= 1  # long-tailed, every class present


def test_fidelity_verdicts():
    from vlmkern.fidelity import verdict

    assert verdict([0.1, 0.2, 0.05], +1) == "reproduced"
    assert verdict([0.3, -0.1, 0.05], +1) == "partly reproduced"
    assert verdict([-0.3, 0.1], +1) == "not reproduced"
    assert verdict([-0.3, -0.1], -1) == "reproduced"
    assert verdict([0.0, 0.0], +1) == "not reproduced"
    assert verdict([float("nan")], +1) == "not measured"


def test_fidelity_report_from_runs(tiny_run, tmp_path):
    from vlmkern.fidelity import CLAIMS, _steps_to, evaluate_claims, write_report

    _, r = tiny_run
    r2 = copy.deepcopy(r)
    r2["seed"] = 1
    # a second "seed" where APFT's tail recall is 10 points higher than in the first
    tail = r2["apft"]["apft"]["final"]["retrieval"]["i2t"]["tail"]["recall"]
    tail[1] = tail[1] + 0.1
    rows = evaluate_claims([r, r2])
    assert len(rows) == len(CLAIMS)
    by = {x["claim"]: x for x in rows}
    apft = by["APFT lifts tail-label recall over full fine-tuning"]
    assert math.isclose(apft["values"][1] - apft["values"][0], 0.1, abs_tol=1e-9)
    direct = (r["apft"]["apft"]["final"]["retrieval"]["i2t"]["tail"]["recall"][1]
              - r["apft"]["full"]["final"]["retrieval"]["i2t"]["tail"]["recall"][1])
    assert math.isclose(apft["values"][0], direct)
    gap = by["weight perturbation narrows the train/validation gap"]
    assert gap["values"][0] == pytest.approx(r["wrf4cir"]["WRF4CIR adversarial"]["final"]["gap_R5"]
                                             - r["wrf4cir"]["plain"]["final"]["gap_R5"])
    assert _steps_to([{"step": 0, "val_acc": 0.1}, {"step": 5, "val_acc": 0.5}], 0.4) == 5
    assert _steps_to([{"step": 0, "val_acc": 0.1}], 0.4) == float("inf")
    path = tmp_path / "FIDELITY.md"
    write_report(rows, [r, r2], str(path), "vlmkern fidelity --seeds 0 1 --scale tiny", 1.0)
    text = path.read_text()
    assert "vlmkern fidelity --seeds 0 1 --scale tiny" in text
    assert sum(line.startswith("|") for line in text.splitlines()) == len(CLAIMS) + 2  # header, rule, rows
    for x in rows:
        assert x["verdict"] in text
