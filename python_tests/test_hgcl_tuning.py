"""Launch-configuration overrides of the Triton HGCL kernels (the tuned table and
VLMKERN_HGCL_TRITON_CONFIG) and tools/hgcl_tune.py's CPU smoke run."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
from vlmkern.kernels.triton import hgcl as K  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    """Point the kernels at a temporary tuned table (and forget the cached one)."""
    path = tmp_path / "hgcl_tuned.json"
    monkeypatch.setattr(K, "TUNED_PATH", str(path))
    monkeypatch.setattr(K, "_TUNED_CACHE", {})
    monkeypatch.delenv(K.CONFIG_ENV, raising=False)
    return path


def test_triton_config_env_override_merges_and_validates(tuned_file, monkeypatch):
    base = K._config(512, True, torch.bfloat16)
    monkeypatch.setenv(K.CONFIG_ENV, json.dumps({"grad": {"BLOCK_L": 64, "num_stages": 2}}))
    cfg = K._config(512, True, torch.bfloat16)
    assert cfg["grad"] == {**base["grad"], "BLOCK_L": 64, "num_stages": 2}
    assert cfg["lse"] == base["lse"]
    # the interpreter's (CPU) configuration takes the explicit override too
    assert K._config(40, False, torch.float32)["grad"]["BLOCK_L"] == 64
    for bad, match in (("{not json", "not valid JSON"), ('{"lse": {"BLOCK_X": 16}}', "takes keys"),
                       ('{"grad": {"BLOCK_L": 48}}', "power of two"), ('{"grad": {"ND": 5}}', "at most"),
                       ('{"lse": {"num_warps": 3}}', "num_warps"), ('{"other": {}}', "keys among")):
        monkeypatch.setenv(K.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=match) as exc:
            K._config(512, True, torch.bfloat16)
        assert K.CONFIG_ENV in str(exc.value)


def test_triton_tuned_table_applies_to_its_architecture_only(tuned_file, monkeypatch):
    entry = {"lse": {"BLOCK_L": 128, "num_stages": 4}, "grad": {"BLOCK_O": 32}}
    tuned_file.write_text(json.dumps({"arch": "sm_90", "entries": {"bfloat16:512": entry}}))
    base = K._default_config(512, True, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # offline compile check: applies
    cfg = K._config(512, True, torch.bfloat16)
    assert cfg["lse"] == {**base["lse"], "BLOCK_L": 128, "num_stages": 4}
    assert cfg["grad"]["BLOCK_O"] == 32
    assert K._config(768, True, torch.bfloat16) == K._default_config(768, True, torch.bfloat16)  # other d
    assert K._config(512, False, torch.bfloat16) == K._default_config(512, False, torch.bfloat16)  # interpreter
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100: not applied
    assert K._config(512, True, torch.bfloat16) == base
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv(K.CONFIG_ENV, '{"lse": {"BLOCK_L": 64}}')  # the environment wins over the table
    assert K._config(512, True, torch.bfloat16)["lse"]["BLOCK_L"] == 64
    # flop_count follows the configuration actually launched
    monkeypatch.setenv(K.CONFIG_ENV, '{"grad": {"BLOCK_DO": 64, "ND": 2}}')
    assert K.flop_count(100, 100, 512, dtype=torch.bfloat16) == pytest.approx(
        2 * 2 * 100 * 100 * 512 + 2 * (2 * 100 * 100 * 512 * 4 + 2 * 100 * 100 * 512))


def test_triton_tuned_table_with_bad_entry_names_the_file(tuned_file, monkeypatch):
    tuned_file.write_text(json.dumps({"arch": "sm_90", "entries": {"bfloat16:512": {"grad": {"ND": 9}}}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="hgcl_tuned.json"):
        K._config(512, True, torch.bfloat16)


def test_triton_override_changes_the_launch_not_the_result(monkeypatch):
    """A candidate configuration computes the same loss and gradients (interpreter)."""
    from conftest import rel_err, require_backend

    require_backend("hgcl", "triton", "cuda" if torch.cuda.is_available() else "cpu")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 40, generator=g), dim=1).to(dev)
    txt = torch.nn.functional.normalize(torch.randn(37, 40, generator=g), dim=1).to(dev)
    monkeypatch.delenv(K.CONFIG_ENV, raising=False)
    a = K.hgcl_stats_triton(img, txt, None, None, 0, 0.05, 0.1, True)
    monkeypatch.setenv(K.CONFIG_ENV, json.dumps({"lse": {"BLOCK_O": 16, "BLOCK_L": 16}}))
    b = K.hgcl_stats_triton(img, txt, None, None, 0, 0.05, 0.1, True)
    assert rel_err(b[0].cpu(), a[0].cpu()) < 1e-5 and rel_err(b[1].cpu(), a[1].cpu()) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --interpret smoke run is for CPU-only machines")
def test_triton_tune_script_smoke_run(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import hgcl_tune

    out = tmp_path / "tuned.json"
    before = os.environ.get(K.CONFIG_ENV)
    rc = hgcl_tune.main(["--interpret", "--B", "24", "--d", "24", "--dtype", "float32", "--max-configs", "2",
                         "--reps", "1", "--out", str(out)])
    assert rc == 0
    assert os.environ.get(K.CONFIG_ENV) == before  # the candidates' override is not left behind
    doc = json.loads(out.read_text())
    assert "arch" not in doc  # interpreter timings are never applied to a GPU
    assert set(doc["entries"]["float32:24"]) == {"lse", "grad"}
    assert len(doc["trials"]) == 4 and all("median_s" in t for t in doc["trials"])
    cands = hgcl_tune._candidates("grad", 512, "bfloat16", True, K._default_config(512, True, torch.bfloat16)["grad"], 16)
    assert len(cands) == 16 and cands[0] == K._default_config(512, True, torch.bfloat16)["grad"]
    assert all(c["BLOCK_O"] * c["ND"] * c["BLOCK_DO"] <= 128 * 32 * c["num_warps"] for c in cands[1:])
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == 16


def test_triton_config_source_shown_by_info(tuned_file, monkeypatch):
    import vlmkern

    assert "untuned defaults" in vlmkern.info()["hgcl_triton_config"]
    tuned_file.write_text(json.dumps({"arch": "sm_90", "date": "2027-01-01",
                                      "entries": {"bfloat16:512": {"lse": {"BLOCK_L": 128}}}}))
    monkeypatch.setattr(K, "_TUNED_CACHE", {})
    monkeypatch.setenv(K.CONFIG_ENV, '{"grad": {"BLOCK_L": 16}}')
    text = vlmkern.info(as_text=True)
    assert "tuned table hgcl_tuned.json for sm_90 (bfloat16:512; 2027-01-01)" in text
    assert K.CONFIG_ENV in text
    tuned_file.write_text(json.dumps({"arch": "sm_90", "entries": {"bfloat16:512": {"lse": {"BLOCK_L": 3}}}}))
    monkeypatch.setattr(K, "_TUNED_CACHE", {})
    assert "INVALID" in vlmkern.info()["hgcl_triton_config"]  # reported, not raised
