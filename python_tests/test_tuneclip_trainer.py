"""TuneCLIP trainer: OSR recovers moments and u with frozen weights; fine-tuning; resume."""

import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app.data import synthetic as S  # noqa: E402
from vlmkern.app.methods.common import read_metrics  # noqa: E402
from vlmkern.app.methods.tuneclip import TuneCLIPConfig, _Objective, collate_pairs, recover_statistics, train_tuneclip  # noqa: E402
from vlmkern.app.models.clip import create_clip  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")


def _setup(seed=0):
    torch.manual_seed(seed)
    m, _, tok = create_clip("vlmkern-micro-ViT")
    return m, tok, S.pairs(48, seed=1, image_size=16), S.pairs(24, seed=2, image_size=16)


def test_gamma_schedule_matches_the_reference():
    """The trainer's own gamma schedule (runtime code) agrees with the float64 oracle's copy."""
    import math

    from vlmkern import reference as R
    from vlmkern.app.methods.tuneclip import fastclip_gamma

    for decay in (1, 4, 10):
        for gamma in (0.2, 0.9, 1.0):
            for epoch in range(-1, 13):
                assert math.isclose(fastclip_gamma(epoch, gamma, decay), R.fastclip_gamma(epoch, gamma, decay),
                                    rel_tol=1e-15, abs_tol=0.0)


def test_osr_freezes_weights_and_fills_moments_and_state():
    m, tok, tr, _ = _setup()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = TuneCLIPConfig(batch_size=16)
    obj = _Objective(cfg, len(tr), tau=0.07, device="cpu")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=cfg.betas)
    loader = torch.utils.data.DataLoader(tr, batch_size=16, collate_fn=collate_pairs, drop_last=True)
    steps = recover_statistics(m, tok, loader, obj, opt, 1, "cpu")
    assert steps == 3
    for k, v in m.state_dict().items():
        assert torch.equal(v, w0[k]), f"{k} changed during OSR"
    p = params[0]
    st = opt.state[p]
    assert float(st["step"]) == 3 and st["exp_avg"].abs().sum() > 0 and st["exp_avg_sq"].min() >= 0
    assert torch.isfinite(obj.module.log_u_img).all()  # every sample visited once


@pytest.mark.parametrize("loss,osr", [("hgcl", 1), ("gcl", 0), ("clip", 0)])
def test_trainer_runs_and_logs(tmp_path, loss, osr):
    m, tok, tr, va = _setup()
    res = train_tuneclip(m, tok, tr, va, TuneCLIPConfig(loss=loss, osr_epochs=osr, epochs=1, batch_size=16, lr=1e-4),
                         str(tmp_path))
    assert res["osr_steps"] == (3 if osr else 0)
    assert [h["stage"] for h in res["history"]] == ["start", "finetune"]
    recs = read_metrics(str(tmp_path))
    assert any(r["split"] == "train" for r in recs)
    assert 0 <= res["final"]["mean_R"] <= 1


def test_resume_matches_uninterrupted(tmp_path):
    m, tok, tr, va = _setup()
    a = train_tuneclip(m, tok, tr, va, TuneCLIPConfig(osr_epochs=1, epochs=2, batch_size=16, lr=1e-4), str(tmp_path / "a"))
    m, tok, tr, va = _setup()
    train_tuneclip(m, tok, tr, va, TuneCLIPConfig(osr_epochs=1, epochs=2, batch_size=16, lr=1e-4), str(tmp_path / "b"),
                   stop_after=2)
    m, tok, tr, va = _setup(seed=5)
    b = train_tuneclip(m, tok, tr, va, TuneCLIPConfig(osr_epochs=1, epochs=2, batch_size=16, lr=1e-4),
                       str(tmp_path / "b"), resume=True)
    assert a["final"]["mean_R"] == b["final"]["mean_R"]
    assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"], rel=1e-6)


def test_finish_recovery_variants():
    """osr_recover="mv" forgets u (every sample unvisited); osr_reset_step restarts AdamW's counter."""
    from vlmkern.app.methods.tuneclip import finish_recovery

    m, tok, tr, _ = _setup()
    cfg = TuneCLIPConfig(batch_size=16)
    params = [p for p in m.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(tr, batch_size=16, collate_fn=collate_pairs, drop_last=True)
    obj = _Objective(cfg, len(tr), tau=0.07, device="cpu")
    opt = torch.optim.AdamW(params, lr=1e-3, betas=cfg.betas)
    recover_statistics(m, tok, loader, obj, opt, 1, "cpu")
    m0 = opt.state[params[0]]["exp_avg"].clone()
    finish_recovery(opt, obj, "mvu", reset_step=True)
    assert float(opt.state[params[0]]["step"]) == 0 and torch.isfinite(obj.module.log_u_img).all()
    assert torch.equal(opt.state[params[0]]["exp_avg"], m0)
    finish_recovery(opt, obj, "mv")
    assert torch.isneginf(obj.module.log_u_img).all() and torch.isneginf(obj.module.log_u_txt).all()
    assert torch.equal(opt.state[params[0]]["exp_avg"], m0)
    with pytest.raises(ValueError, match="osr_recover"):
        TuneCLIPConfig(osr_recover="m")
    # through the trainer: the (m, v) row and the reset-counter variant run end to end
    res = train_tuneclip(m, tok, tr, _setup()[3], TuneCLIPConfig(osr_epochs=1, epochs=1, batch_size=16, lr=1e-4,
                                                                  osr_recover="mv", osr_reset_step=True),
                         os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tc_mv_{os.getpid()}"))
    assert res["osr_steps"] == 3 and len(res["history"]) == 2
