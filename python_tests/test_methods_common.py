"""Run plumbing: metrics log, checkpoint round trip with RNG, model factory."""

import os

import pytest
import torch

from vlmkern.app.methods.common import (RunLogger, autocast, load_checkpoint, read_metrics, save_checkpoint,
                                    seed_everything)


def test_logger_and_checkpoint_restore_rng(tmp_path):
    log = RunLogger(str(tmp_path), config={"lr": 1e-3})
    log.log(step=1, split="train", loss=torch.tensor(0.5))
    log.log(step=2, split="val", recall=0.25)
    recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["loss"] == 0.5
    assert os.path.exists(tmp_path / "config.json")
    seed_everything(3)
    torch.randn(5)
    save_checkpoint(str(tmp_path / "ck.pt"), step=7, model={"w": torch.ones(2)})
    after = torch.randn(4)
    torch.randn(10)
    st = load_checkpoint(str(tmp_path / "ck.pt"))
    assert st["step"] == 7 and torch.equal(torch.randn(4), after)


def test_autocast_arg_checked():
    with autocast("cpu", None):
        pass
    with autocast("cpu", "bf16"):
        assert torch.randn(2, 2) @ torch.randn(2, 2) is not None
    with pytest.raises(ValueError, match="amp"):
        autocast("cpu", "int8")


def test_create_clip_tiny_and_local_checkpoint(tmp_path):
    pytest.importorskip("open_clip")
    from vlmkern.app.models.clip import create_clip

    m, preprocess, tok = create_clip("vlmkern-micro-ViT")
    assert tok(["a red cube"]).shape == (1, 16)
    img = torch.randn(2, 3, 16, 16)
    f = m.encode_image(img)
    assert f.shape == (2, 32)
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "ck.pt")
    m2, _, _ = create_clip("vlmkern-micro-ViT", pretrained=str(tmp_path / "ck.pt"))
    assert torch.equal(m2.encode_image(img), f)
