"""WRF4CIR and Kalman trainers end to end on the micro CLIP and the synthetic world."""

import math
import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app.data import synthetic as S  # noqa: E402
from vlmkern.app.methods.common import read_metrics  # noqa: E402
from vlmkern.app.models.clip import create_clip  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")


def _clip(seed=0):
    torch.manual_seed(seed)
    m, _, tok = create_clip("vlmkern-micro-ViT")
    return m, tok


@pytest.mark.parametrize("gamma,random_ratio,combiner", [(0.0, 0.0, "sum"), (1e-2, 0.5, "learned")])
def test_wrf4cir_runs_and_logs_gap(tmp_path, gamma, random_ratio, combiner):
    from vlmkern.app.methods.wrf4cir import WRF4CIRConfig, train_wrf4cir

    m, tok = _clip()
    tr = S.cir_triplets(32, seed=1, image_size=16)
    va = S.cir_triplets(16, seed=2, image_size=16)
    cfg = WRF4CIRConfig(epochs=2, batch_size=8, lr=1e-4, gamma=gamma, random_ratio=random_ratio, warmup_epochs=1,
                        combiner=combiner, ks=(1, 5))
    res = train_wrf4cir(m, tok, tr, va, cfg, str(tmp_path))
    assert len(res["history"]) == 2
    last = res["final"]
    assert last["gap_R5"] == pytest.approx(last["train_R5"] - last["val_R5"])
    assert all("val_R1" in r for r in read_metrics(str(tmp_path)))


def test_evaluate_cir_equal_gallery_for_the_gap():
    """Training recall for the gap uses as many queries and gallery images as validation has:
    the first n triplets' own images, then other gallery images; the indices are remapped so
    that recall equals a direct computation on that sub-gallery."""
    from vlmkern.app.eval.metrics import cir_recall
    from vlmkern.app.methods.wrf4cir import CIRModel, evaluate_cir
    from vlmkern.app.models.cir import SumCombiner

    m, tok = _clip()
    model = CIRModel(m, SumCombiner())
    tr = S.cir_triplets(40, seed=3, image_size=16)
    n, size = 10, 24
    used = list(dict.fromkeys(j for t in tr.triplets[:n] for j in (t[0], t[2])))
    gal = used + [j for j in range(len(tr.gallery)) if j not in set(used)][:size - len(used)]
    assert len(gal) == size < len(tr.gallery)
    assert all(tr.gallery_indices(i) == (tr[i][3], tr[i][4]) for i in range(n))
    got = evaluate_cir(model, tok, tr, "cpu", ks=(1, 5, 10), max_triplets=n, gallery_size=size)
    with torch.no_grad():
        model.eval()
        g = model.target(torch.stack([tr.image(j) for j in gal]))
        q = model.query(torch.stack([tr[i][0] for i in range(n)]), tok([tr[i][1] for i in range(n)]))
    pos = {j: k for k, j in enumerate(gal)}
    want = cir_recall(q, g, torch.tensor([pos[t[2]] for t in tr.triplets[:n]]), ks=(1, 5, 10),
                      exclude_index=torch.tensor([pos[t[0]] for t in tr.triplets[:n]]))
    assert got == pytest.approx(want)
    # a bigger gallery can only push the targets down: recall on the whole gallery is not higher
    whole = evaluate_cir(model, tok, tr, "cpu", ks=(1, 5, 10), max_triplets=n)
    assert all(whole[k] <= got[k] + 1e-12 for k in (1, 5, 10))


def test_wrf4cir_gamma_zero_equals_plain_adamw(tmp_path):
    """gamma = 0: the wrapper takes exactly the base optimizer's steps."""
    from vlmkern.app.methods.wrf4cir import WRF4CIRConfig, train_wrf4cir

    tr = S.cir_triplets(16, seed=1, image_size=16)
    va = S.cir_triplets(8, seed=2, image_size=16)
    m1, tok = _clip()
    r1 = train_wrf4cir(m1, tok, tr, va, WRF4CIRConfig(epochs=1, batch_size=8, gamma=0.0, warmup_epochs=0, ks=(1,)),
                       str(tmp_path / "a"))
    m2, tok = _clip()
    r2 = train_wrf4cir(m2, tok, tr, va, WRF4CIRConfig(epochs=1, batch_size=8, gamma=0.0, warmup_epochs=1, ks=(1,)),
                       str(tmp_path / "b"))
    assert r1["final"]["train_loss"] == r2["final"]["train_loss"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer,observation,jacobian", [("kalman", "loss", "vmap"), ("kalman", "per_sample", "vmap"),
                                                            ("kalman", "per_sample", "batched"), ("adamw", "loss", "vmap"),
                                                            ("polyak", "loss", "vmap")])
def test_kalman_trainer_curve(tmp_path, optimizer, observation, jacobian):
    from vlmkern.app.methods.kalman import KalmanTrainConfig, train_kalman

    m, tok = _clip()
    tr, va = S.labelled(24, 12, seed=1, image_size=16, num_classes=6)
    res = train_kalman(m, tok, tr, va, tr.prompts(), KalmanTrainConfig(optimizer=optimizer, steps=6, batch_size=8,
                                                                       eval_every=3, observation=observation,
                                                                       jacobian=jacobian),
                       str(tmp_path))
    assert all(math.isfinite(c["loss"]) for c in res["curve"] if "loss" in c) and "loss" in res["curve"][-1]
    assert [c["step"] for c in res["curve"]] == [0, 3, 6]
    assert all(0 <= c["val_acc"] <= 1 for c in res["curve"])
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n.lower() for n in trainable)
    if optimizer == "kalman":  # how far P moved (the fidelity report's premise): more with per-sample observations
        assert res["observation"] == observation and res["p_moved"]["mean_abs_log_p"] > 0
    else:
        assert "p_moved" not in res


def test_cli_train_then_eval_each_checkpoint_kind(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), VLMKERN_NO_PROGRESS="1")

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "vlmkern", *args], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout[r.stdout.index("{"):])

    common = ["--model", "vlmkern-micro-ViT", "--batch-size", "8", "--n-val", "8"]
    run("train", "kalman", *common, "--steps", "2", "--n-train", "16", "--out", str(tmp_path / "k"))
    ev = run("eval", "--model", "vlmkern-micro-ViT", "--checkpoint", str(tmp_path / "k" / "checkpoint.pt"),
             "--task", "labels", "--n-val", "8")
    assert ev["loaded"] == "lora" and 0 <= ev["metrics"]["zero_shot_top1"] <= 1
    run("train", "wrf4cir", *common, "--epochs", "1", "--n-train", "16", "--out", str(tmp_path / "w"))
    ev = run("eval", "--model", "vlmkern-micro-ViT", "--checkpoint", str(tmp_path / "w" / "checkpoint.pt"),
             "--task", "cir", "--n-val", "8")
    assert ev["loaded"] == "cir" and set(ev["metrics"]) == {"R1", "R5", "R10", "R50"}
    run("train", "tuneclip", *common, "--epochs", "1", "--osr-epochs", "1", "--n-train", "16", "--out",
        str(tmp_path / "t"))
    ev = run("eval", "--model", "vlmkern-micro-ViT", "--checkpoint", str(tmp_path / "t" / "checkpoint.pt"),
             "--task", "pairs", "--n-val", "8")
    assert ev["loaded"] == "clip" and 0 <= ev["metrics"]["mean_R"] <= 1


def test_cli_train_lists_only_the_methods_own_flags(capsys):
    from vlmkern.app import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "kalman", "--help"])
    out = capsys.readouterr().out
    assert "--p0" in out and "--steps" in out and "--n-train" in out
    assert "--awp-gamma" not in out and "--strategy" not in out and "--osr-epochs" not in out
    with pytest.raises(SystemExit):
        cli.main(["train", "kalman", "--awp-gamma", "0"])


def test_wrf4cir_resume_matches_uninterrupted(tmp_path):
    from vlmkern.app.methods.wrf4cir import WRF4CIRConfig, train_wrf4cir

    tr = S.cir_triplets(16, seed=1, image_size=16)
    va = S.cir_triplets(8, seed=2, image_size=16)
    cfg = WRF4CIRConfig(epochs=2, batch_size=8, lr=1e-4, gamma=1e-2, random_ratio=0.5, warmup_epochs=0, ks=(1, 5))
    m, tok = _clip()
    a = train_wrf4cir(m, tok, tr, va, cfg, str(tmp_path / "a"))
    m, tok = _clip()
    train_wrf4cir(m, tok, tr, va, cfg, str(tmp_path / "b"), stop_after=1)
    m, tok = _clip(seed=7)
    b = train_wrf4cir(m, tok, tr, va, cfg, str(tmp_path / "b"), resume=True)
    assert a["history"] == b["history"]


def test_polyak_sgd_step_is_the_closed_form():
    """One PolyakSGD step is theta - c L / ||g||^2 g with ||g|| over every parameter of every group; a step with a
    non-finite loss or gradient leaves the parameters unchanged; bad arguments name themselves."""
    from vlmkern.app.methods.kalman import PolyakSGD

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)
    x = torch.randn(3, generator=g)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = PolyakSGD([{"params": [a]}, {"params": [b], "c": 0.3}], c=0.3)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = ((a @ x).sin().sum() + (b ** 2).sum()) ** 2 / 10
        loss.backward()
        return loss

    loss = opt.step(closure)
    # the float64 closed form, from the starting point
    a64, b64 = a0.double().requires_grad_(), b0.double().requires_grad_()
    L = ((a64 @ x.double()).sin().sum() + (b64 ** 2).sum()) ** 2 / 10
    ga, gb = torch.autograd.grad(L, (a64, b64))
    eta = 0.3 * L.detach() / (ga.pow(2).sum() + gb.pow(2).sum())
    assert torch.allclose(loss.double(), L.detach(), rtol=1e-6)
    assert torch.allclose(a.detach().double(), a0.double() - eta * ga, rtol=1e-5, atol=1e-6)
    assert torch.allclose(b.detach().double(), b0.double() - eta * gb, rtol=1e-5, atol=1e-6)

    before = [a.detach().clone(), b.detach().clone()]

    def bad():
        opt.zero_grad(set_to_none=True)
        loss = (a * float("nan")).sum() + b.sum()
        loss.backward()
        return loss

    assert not torch.isfinite(opt.step(bad))
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="c must be"):
        PolyakSGD([a], c=0.0)


def test_kalman_resume_matches_uninterrupted(tmp_path):
    from vlmkern.app.methods.kalman import KalmanTrainConfig, train_kalman

    tr, va = S.labelled(20, 12, seed=1, image_size=16, num_classes=6)
    cfg = KalmanTrainConfig(steps=6, batch_size=8, eval_every=2)  # 3 batches per pass: resume mid-pass
    m, tok = _clip()
    a = train_kalman(m, tok, tr, va, tr.prompts(), cfg, str(tmp_path / "a"))
    m, tok = _clip()
    train_kalman(m, tok, tr, va, tr.prompts(), cfg, str(tmp_path / "b"), stop_after=2)
    m, tok = _clip(seed=3)
    b = train_kalman(m, tok, tr, va, tr.prompts(), cfg, str(tmp_path / "b"), resume=True)
    assert a["curve"] == b["curve"]
