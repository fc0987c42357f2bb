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
    from vlmkern.app.demo import run_demo

    os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=str(out), scale="tiny")


def test_demo_tiny(tiny_run):
    tmp_path, r = tiny_run
    assert set(r["tuneclip"]) == {"CLIP loss", "GCL", "HGCL (no OSR)", "TuneCLIP (OSR + HGCL)"}
    assert set(r["apft"]) == {"full", "lora", "apft"}
    assert set(r["wrf4cir"]) == {"plain", "WRF4CIR adversarial", "WRF4CIR random"}
    assert set(r["kalman"]) == {"adamw", "sgd polyak", "kalman scalar", "kalman per-sample"}
    # the two Kalman forms ran as named (the per-sample one is the trainer's default)
    assert r["kalman"]["kalman scalar"]["observation"] == "loss"
    assert r["kalman"]["kalman per-sample"]["observation"] == "per_sample"
    report = (tmp_path / "report.md").read_text()
    assert "| TuneCLIP | TuneCLIP (OSR + HGCL) |" in report and "| Kalman | LoRA + kalman per-sample |" in report
    assert json.loads((tmp_path / "results.json").read_text())["scale"] == "tiny"
    pytest.importorskip("matplotlib")
    for name in ("tuneclip_curves.png", "apft_dynamics.png", "recall_by_group.png", "wrf4cir_gap.png",
                 "kalman_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_demo_uses_real_images_when_installed(tiny_run):
    from vlmkern.app.data import real

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
    from vlmkern.app.fidelity import verdict

    assert verdict([0.1, 0.2, 0.05], +1) == "reproduced"
    assert verdict([0.3, -0.1, 0.05], +1) == "partly reproduced"
    assert verdict([-0.3, 0.1], +1) == "not reproduced"
    assert verdict([-0.3, -0.1], -1) == "reproduced"
    assert verdict([0.0, 0.0], +1) == "not reproduced"
    assert verdict([float("nan")], +1) == "not measured"


def test_fidelity_report_from_runs(tiny_run, tmp_path):
    from vlmkern.app.fidelity import CLAIMS, _steps_to, evaluate_claims, write_report

    _, r = tiny_run
    r2 = copy.deepcopy(r)
    r2["seed"] = 1
    # a second "seed" where APFT's tail recall is 10 points higher than in the first
    tail = r2["apft"]["apft"]["final"]["retrieval"]["i2t"]["tail"]["recall"]
    tail[1] = tail[1] + 0.1
    rows = evaluate_claims([r, r2])
    assert len(rows) == len(CLAIMS)
    # every claim of the demo table is checked against its premise (absent ones name the protocol that has it)
    for x in rows:
        assert x["premise"]["holds"] in (True, False), (x["claim"], x["premise"]["text"])
        assert x["premise"]["holds"] or "section" in x["premise"]["text"] or x["verdict"] == "premise absent"
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
    # a protocol's section and its hand-written reading survive the table's rewrite, in order
    path.write_text("old table\n\n<!-- section:osr -->\nprotocol\n<!-- /section:osr -->\n\nloose prose\n\n"
                    "<!-- section:osr_reading -->\nby hand\n<!-- /section:osr_reading -->\n")
    write_report(rows, [r, r2], str(path), "vlmkern fidelity --seeds 0 1 --scale tiny", 1.0)
    text = path.read_text()
    assert "old table" not in text and "loose prose" not in text
    assert text.index("protocol\n") < text.index("by hand\n") and text.count("by hand") == 1
    assert "vlmkern fidelity --seeds 0 1 --scale tiny" in text
    assert sum(line.startswith("|") and line.rstrip().endswith("** |") for line in text.splitlines()) == len(CLAIMS)
    # the step sizes every run used are listed, with where they came from
    assert "| kalman | kalman per-sample | p0 " in text and "| tuneclip | GCL | lr " in text
    for x in rows:
        assert x["verdict"] in text


def test_demo_report_lists_settings(tiny_run):
    tmp_path, r = tiny_run
    assert r["hparams"]["_source"] in ("default", "tuned")
    report = (tmp_path / "report.md").read_text()
    for task in ("tuneclip", "apft", "wrf4cir", "kalman"):
        for name, hp in r["hparams"][task].items():
            assert set(hp) <= {"lr", "gamma", "p0", "forgetting", "polyak_c"}
    assert "| WRF4CIR | WRF4CIR adversarial | lr " in report and ", gamma " in report


def test_load_hparams_tuned_and_default(tmp_path):
    from vlmkern.app.demo import DEFAULT_HPARAMS, load_hparams

    missing = load_hparams("default", path=str(tmp_path / "none.json"))
    assert missing["_source"] == "default" and missing["kalman"] == DEFAULT_HPARAMS["kalman"]
    f = tmp_path / "tuned.json"
    f.write_text(json.dumps({"default": {"seed": 100, "command": "vlmkern fidelity --tune",
                                         "chosen": {"kalman": {"kalman scalar": {"p0": 0.3}}}}}))
    hp = load_hparams("default", path=str(f))
    assert hp["_source"] == "tuned" and hp["_tuning"]["seed"] == 100
    assert hp["kalman"]["kalman scalar"] == {"p0": 0.3}
    assert hp["kalman"]["adamw"] == DEFAULT_HPARAMS["kalman"]["adamw"]  # not tuned: the default
    assert load_hparams("tiny", path=str(f))["_source"] == "default"  # tuned for another scale only


def test_tune_picks_best_grid_point(tmp_path, monkeypatch):
    """Tuning trains each grid point once on its own seed, keeps the best by the task's selection
    score, writes it for the scale, and a partial re-tune keeps the other tasks' choices."""
    from vlmkern.app import demo, fidelity

    monkeypatch.setattr(demo, "TUNING_GRIDS", {"kalman": {"adamw": {"lr": [1e-4, 3e-3]},
                                                          "kalman scalar": {"p0": [0.01, 0.3]}},
                                               "tuneclip": {"GCL": {"lr": [1e-4]}}})
    path = tmp_path / "tuned.json"
    entry = fidelity.tune(scale="tiny", seed=7, out=str(tmp_path / "t"), path=str(path), tasks=["kalman"])
    trials = {(t["run"], tuple(t["hparams"].values())): t["score"] for t in entry["trials"]}
    assert len(trials) == 4 and all(0.0 <= v <= 1.0 for v in trials.values())
    for run, key in (("adamw", "lr"), ("kalman scalar", "p0")):
        chosen = entry["chosen"]["kalman"][run][key]
        assert trials[(run, (chosen,))] == max(v for (r, _), v in trials.items() if r == run)
    assert "tuneclip" not in entry["chosen"]
    saved = json.loads(path.read_text())["tiny"]
    assert saved["seed"] == 7 and saved["chosen"] == entry["chosen"]
    entry2 = fidelity.tune(scale="tiny", seed=7, out=str(tmp_path / "t2"), path=str(path), tasks=["tuneclip"],
                           command="retune tuneclip")
    assert entry2["command"].endswith("; then retune tuneclip")  # a partial re-tune says so
    assert entry2["chosen"]["kalman"] == entry["chosen"]["kalman"] and entry2["chosen"]["tuneclip"]["GCL"]["lr"] == 1e-4
    assert demo.load_hparams("tiny", path=str(path))["kalman"]["kalman scalar"] == entry["chosen"]["kalman"]["kalman scalar"]
