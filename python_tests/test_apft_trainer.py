"""APFT trainer end to end on the micro CLIP and the synthetic long-tailed set."""

import json
import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app.data import synthetic as S  # noqa: E402
from vlmkern.app.methods.apft import APFTTrainConfig, train_apft  # noqa: E402
from vlmkern.app.methods.apft_schedule import APFTConfig  # noqa: E402
from vlmkern.app.methods.common import read_metrics  # noqa: E402
from vlmkern.app.models.clip import create_clip  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")


def _setup(seed=0):
    torch.manual_seed(seed)
    model, _, tok = create_clip("vlmkern-micro-ViT")
    tr, va = S.labelled(48, 24, seed=1, image_size=16, num_classes=6)
    return model, tok, tr, va, tr.prompts()


def _cfg(**kw):
    sched = APFTConfig(window=2, tau_vol=0.5, tau_slope=0.0, tau_imp=1e-4, delta_min=0.0, patience=50, min_epochs=1)
    base = dict(strategy="apft", max_epochs=4, batch_size=16, lr=1e-3, wd=1e-2, schedule=sched, eval_ks=(1, 5))
    base.update(kw)
    return APFTTrainConfig(**base)


def test_apft_runs_transitions_and_logs(tmp_path):
    model, tok, tr, va, prompts = _setup()
    res = train_apft(model, tok, tr, va, prompts, _cfg(), str(tmp_path))
    recs = [r for r in read_metrics(str(tmp_path)) if r["split"] == "val"]
    assert len(recs) == res["epochs"] == 4
    phases = [r["phase"] for r in recs]
    assert phases == sorted(phases)
    for r in recs:
        assert {"lr", "wd", "trainable_frac", "event", "val_loss"} <= set(r)
    assert recs[0]["trainable_frac"] < 0.1
    if res["transitions"]:
        t = res["transitions"][0]
        assert t["reason"] in ("volatility", "worsening", "stagnation") and t["wd"] > 1e-2
        assert any(r["trainable_frac"] > recs[0]["trainable_frac"] for r in recs)
    assert set(res["final"]["retrieval"]["i2t"]) == {"all", "head", "torso", "tail"}


def test_apft_resume_matches_uninterrupted(tmp_path):
    model, tok, tr, va, prompts = _setup()
    full = train_apft(model, tok, tr, va, prompts, _cfg(max_epochs=4), str(tmp_path / "a"))
    model2, tok, tr, va, prompts = _setup()
    train_apft(model2, tok, tr, va, prompts, _cfg(max_epochs=2), str(tmp_path / "b"))
    model3, tok, tr, va, prompts = _setup(seed=99)  # different init: everything must come from the checkpoint
    resumed = train_apft(model3, tok, tr, va, prompts, _cfg(max_epochs=4), str(tmp_path / "b"), resume=True)
    va_a = [r["val_loss"] for r in read_metrics(str(tmp_path / "a")) if r["split"] == "val"]
    va_b = [r["val_loss"] for r in read_metrics(str(tmp_path / "b")) if r["split"] == "val"]
    assert va_a == pytest.approx(va_b, rel=1e-6, abs=1e-7)
    assert full["best_val_loss"] == pytest.approx(resumed["best_val_loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["full", "fixed"])
def test_baselines_run(tmp_path, strategy):
    model, tok, tr, va, prompts = _setup()
    res = train_apft(model, tok, tr, va, prompts, _cfg(strategy=strategy, max_epochs=2, fixed_every=1), str(tmp_path))
    assert res["epochs"] == 2 and res["final"]["val_loss"] > 0
    if strategy == "full":
        assert res["trainable_frac"] == 1.0


def test_fixed_schedule_transitions_every_n_epochs(tmp_path):
    model, tok, tr, va, prompts = _setup()
    res = train_apft(model, tok, tr, va, prompts, _cfg(strategy="fixed", max_epochs=4, fixed_every=2), str(tmp_path))
    assert [t["epoch"] for t in res["transitions"]] == [2, 4]
    assert all(t["reason"] == "fixed" for t in res["transitions"])


def test_cli_train_apft_with_yaml_config(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "apft.yaml"
    cfg.write_text("model: vlmkern-micro-ViT\nepochs: 2\nbatch_size: 16\nn_train: 32\nn_val: 12\nlr: 0.001\nwindow: 2\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), VLMKERN_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "vlmkern", "train", "apft", "--config", str(cfg), "--out",
                        str(tmp_path / "run"), "--strategy", "fixed"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["strategy"] == "fixed" and (tmp_path / "run" / "metrics.jsonl").exists()


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """Per-sample loss: 2 micro-batches of 8 accumulate to the gradient of one batch of 16."""
    model, tok, tr, va, prompts = _setup()
    a = train_apft(model, tok, tr, va, prompts, _cfg(strategy="full", max_epochs=1, batch_size=16), str(tmp_path / "a"))
    model, tok, tr, va, prompts = _setup()
    b = train_apft(model, tok, tr, va, prompts, _cfg(strategy="full", max_epochs=1, batch_size=8, grad_accum=2),
                   str(tmp_path / "b"))
    # same generator seed -> same permutation: micro-batches [0:8], [8:16] make up batch [0:16]
    ra = [r for r in read_metrics(str(tmp_path / "a")) if r["split"] == "val"]
    rb = [r for r in read_metrics(str(tmp_path / "b")) if r["split"] == "val"]
    assert len(ra) == len(rb) == 1
    assert ra[0]["train_loss"] == pytest.approx(rb[0]["train_loss"], rel=1e-4)
    assert ra[0]["val_loss"] == pytest.approx(rb[0]["val_loss"], rel=1e-3)
