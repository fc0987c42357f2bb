"""The demo end to end at the tiny scale: every method and baseline runs and the report is written."""

import json
import os

import pytest

pytest.importorskip("open_clip")


def test_demo_tiny(tmp_path):
    from vlmkern.demo import run_demo

    os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")
    r = run_demo(out=str(tmp_path), scale="tiny")
    assert set(r["tuneclip"]) == {"CLIP loss", "GCL", "TuneCLIP (OSR + HGCL)"}
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
