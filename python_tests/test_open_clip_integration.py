"""vlmkern's HGCL/GCL loss inside open_clip's own trainer (vlmkern.integrations.open_clip_train).

End to end: ``python -m vlmkern.integrations.open_clip_train`` trains the tiny
``vlmkern-micro-ViT`` on a 32-image CSV dataset for 2 epochs, then a second run
``--resume``s a checkpoint whose u state was overwritten with a marker value
and checks that the state went on from the marker (restored, then updated once
per sample). Unit tests cover the loss adapter, the index hand-off (through
DataLoader workers) and the clear errors for unsupported options.

Without open_clip_train's dependencies the module skips (with the pip command),
except under CI, where it fails.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkern

INSTALL = "pip install braceexpand webdataset pandas  (or: pip install 'vlmkern[open_clip_train]')"
try:
    import open_clip
    import open_clip_train.main  # noqa: F401  (imports its data module: braceexpand, webdataset, pandas)
    from open_clip_train.data import DataInfo
except ImportError as exc:  # pragma: no cover - depends on the install
    if os.environ.get("CI"):
        pytest.fail(f"open_clip_train cannot be imported in CI ({exc}): {INSTALL}", pytrace=False)
    pytest.skip(f"open_clip_train cannot be imported ({exc}): {INSTALL}", allow_module_level=True)

from vlmkern.integrations import open_clip_train as oct  # noqa: E402

ROOT = Path(vlmkern.__file__).resolve().parent.parent
N = 32
MODEL = "vlmkern-micro-ViT"
GAMMA = 0.9
TAU = 0.05


# ----------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("csvdata")
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}
    rows = ["filepath,title"]
    g = torch.Generator().manual_seed(0)
    for i in range(N):
        name, rgb = list(colours.items())[i % 4]
        img = (torch.rand(16, 16, 3, generator=g) * 60).to(torch.uint8)
        lo = 2 + (i // 4) % 4 * 2
        img[lo:lo + 6, lo:lo + 6] = torch.tensor(rgb, dtype=torch.uint8)
        path = d / f"{i:02d}.png"
        Image.fromarray(img.numpy()).save(path)
        rows.append(f"{path},a {name} square at {lo} number {i}")
    csv = d / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _run(args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "vlmkern.integrations.open_clip_train", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _common(csv, logs, name, epochs):
    return ["--train-data", str(csv), "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", MODEL, "--batch-size", "8", "--epochs", str(epochs),
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-4", "--warmup", "2",
            "--log-every-n-steps", "1", "--seed", "0", "--logs", str(logs), "--name", name]


def _losses(log_text):
    return [float(v) for v in re.findall(r"Contrastive_loss: ([-+0-9.eE]+)", log_text)]


def _state(ckpt):
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    return ck, ck[oct.CHECKPOINT_KEY]


@pytest.fixture(scope="module")
def first_run(csv_dataset, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    r = _run(["--vlmkern-loss", "hgcl", "--vlmkern-margin", "0.1", "--vlmkern-gamma", str(GAMMA),
              "--vlmkern-tau", str(TAU), *_common(csv_dataset, logs, "run", 2)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return logs / "run"


def test_end_to_end_trains_logs_and_checkpoints_the_state(first_run):
    log = (first_run / "out.log").read_text()
    assert "vlmkern: loss HGCL" in log and "frozen (requires_grad=False)" in log
    losses = _losses(log)
    assert len(losses) == 2 * 4 and all(math.isfinite(v) for v in losses), losses  # 32 / 8 = 4 steps an epoch
    assert f"Logit Scale: {1 / TAU:.3f}" in log  # the fixed temperature, as open_clip logs it
    for epoch in (1, 2):
        ck, entry = _state(first_run / "checkpoints" / f"epoch_{epoch}.pt")
        assert ck["epoch"] == epoch
        assert entry["loss"] == "hgcl" and entry["num_samples"] == N and entry["gamma"] == GAMMA
        assert entry["margin"] == 0.1 and abs(entry["tau"] - TAU) < 1e-6
        for key in ("log_u_img", "log_u_txt"):  # every sample of the CSV visited in every epoch
            u = entry["state_dict"][key]
            assert u.shape == (N,) and torch.isfinite(u).all(), (epoch, key, u)
        assert abs(float(ck["state_dict"]["logit_scale"]) - math.log(1 / TAU)) < 1e-6
    _, e1 = _state(first_run / "checkpoints" / "epoch_1.pt")
    _, e2 = _state(first_run / "checkpoints" / "epoch_2.pt")
    assert not torch.equal(e1["state_dict"]["log_u_img"], e2["state_dict"]["log_u_img"])


def test_the_checkpoint_still_loads_into_a_plain_open_clip_model(first_run):
    from vlmkern.app.models.clip import CONFIG_DIR
    open_clip.add_model_config(CONFIG_DIR)
    model = open_clip.create_model(MODEL)
    ck = torch.load(first_run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["state_dict"])  # strict: the loss state is not in the model's state dict


def test_resume_restores_the_state_and_updates_it_once_per_sample(first_run, csv_dataset, tmp_path):
    marker = 1000.0
    ck = torch.load(first_run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)
    for key in ("log_u_img", "log_u_txt"):
        ck[oct.CHECKPOINT_KEY]["state_dict"][key].fill_(marker)
    resume = tmp_path / "marked.pt"
    torch.save(ck, resume)
    # no --vlmkern-tau: the resumed model's frozen logit_scale gives it
    r = _run(["--vlmkern-loss", "hgcl", "--vlmkern-gamma", str(GAMMA), "--resume", str(resume),
              *_common(csv_dataset, tmp_path / "logs", "resumed", 3)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "resumed" / "out.log").read_text()
    assert f"restored the loss state from {resume}: {N} of {N} samples visited" in log
    assert "tau=0.05," in log and "resuming checkpoint" in log
    assert len(_losses(log)) == 4  # one epoch (epoch 2 of 0..2)
    ck3, entry = _state(tmp_path / "logs" / "resumed" / "checkpoints" / "epoch_3.pt")
    assert ck3["epoch"] == 3
    for key in ("log_u_img", "log_u_txt"):
        # one update from the marker: log((1-gamma) e^marker + gamma Phi) = marker + log(1-gamma) (Phi << e^marker);
        # a state reset to -inf would give log Phi instead, two updates marker + 2 log(1-gamma)
        u = entry["state_dict"][key]
        assert torch.allclose(u, torch.full_like(u, marker + math.log(1 - GAMMA)), atol=1e-3), (key, u)


# ----------------------------------------------------------------------------
# clear errors instead of silent garbage
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["--accum-freq", "2"], "--accum-freq 2 is not supported"),
    (["--siglip"], "--siglip is not supported"),
    (["--model", "coca_ViT-B-32"], "(CoCa) is not supported"),
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"], "--distill-model/--distill-pretrained"),
    (["--dataset-type", "webdataset"], "--dataset-type webdataset"),
    (["--train-data", "shards/{000..009}.tar"], "webdataset pipeline has none yet"),
])
def test_unsupported_open_clip_options_fail_before_training(extra, needle, capsys):
    args = ["--vlmkern-loss", "hgcl", "--train-data", "x.csv", "--model", MODEL, *extra]
    with pytest.raises(SystemExit) as e:
        oct.main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--vlmkern-loss", "gcl", "--vlmkern-margin", "0.1"], "plain GCL (--vlmkern-loss gcl) has none"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-tau", "0.001"], "--vlmkern-tau must be in [0.01, 1]"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-gamma", "0"], "--vlmkern-gamma must be in (0, 1]"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-taus", "0.1"], "unknown vlmkern flag"),
    (["--train-data", "x.csv"], "--vlmkern-loss"),
])
def test_bad_vlmkern_flags(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        oct.main([*flags, "--train-data", "x.csv"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


# ----------------------------------------------------------------------------
# the loss adapter and the index hand-off
# ----------------------------------------------------------------------------


def _features(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    t = torch.nn.functional.normalize(f + 0.5 * torch.randn(b, d, generator=g), dim=1)
    return f.requires_grad_(), t.requires_grad_()


@pytest.mark.parametrize("margin", [0.1, None])
def test_adapter_follows_open_clips_call_convention(margin):
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9, margin=margin))
    ref = vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9, margin=margin)
    f, t = _features()
    f2, t2 = (x.detach().clone().requires_grad_() for x in (f, t))
    index = torch.arange(3, 11)
    out = a(image_features=f, text_features=t, logit_scale=torch.tensor(1 / 0.07), output_dict=True, index=index)
    assert list(out) == ["contrastive_loss"]  # open_clip sums the entries ending in _loss
    expected = ref(f2, t2, index)
    assert torch.equal(out["contrastive_loss"], expected)
    out["contrastive_loss"].backward(), expected.backward()
    assert torch.equal(f.grad, f2.grad) and torch.equal(t.grad, t2.grad)
    assert torch.equal(a.loss.log_u_img, ref.log_u_img)
    plain = a(f.detach(), t.detach(), index=index)  # output_dict=False: the tensor
    assert isinstance(plain, torch.Tensor) and plain.dim() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_works_inside_open_clips_autocast_region(dtype):
    """--precision amp*: open_clip calls the loss under autocast; the result is the one outside it."""
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9))
    ref = vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9)
    f, t = _features()
    with torch.autocast("cpu", dtype=dtype):
        out = a(f, t, output_dict=True, index=torch.arange(8))["contrastive_loss"]
    assert torch.equal(out, ref(f, t, torch.arange(8)))


def test_adapter_takes_each_batch_index_from_the_handoff_exactly_once():
    h = oct.IndexHandoff()
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9), h)
    f, t = _features()
    with pytest.raises(RuntimeError, match="without a pending training batch index"):
        a(f, t, output_dict=True)
    h.put(torch.arange(8))
    a(f, t, output_dict=True)
    assert torch.isfinite(a.loss.log_u_img[:8]).all() and torch.isinf(a.loss.log_u_img[8:]).all()
    with pytest.raises(RuntimeError, match="without a pending"):  # e.g. --accum-freq > 1 calling it again
        a(f, t, output_dict=True)
    h.put(torch.arange(8))
    with pytest.raises(RuntimeError, match="before the loss took the previous batch"):
        h.put(torch.arange(8, 16))
    h.take()
    h.put(torch.arange(4))
    with pytest.raises(RuntimeError, match="index has shape"):
        a(f, t, output_dict=True)


def test_adapter_rejects_duplicate_indices_and_leaves_the_state_alone():
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9))
    f, t = _features()
    a(f, t, index=torch.arange(8))
    before = a.loss.log_u_img.clone(), a.loss.log_u_txt.clone()
    with pytest.raises(ValueError, match="duplicate"):
        a(f, t, index=torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    assert torch.equal(a.loss.log_u_img, before[0]) and torch.equal(a.loss.log_u_txt, before[1])


def test_adapter_rejects_siglip_coca_and_distill_outputs():
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9))
    f, t = _features()
    with pytest.raises(oct.UnsupportedOption, match="SigLIP"):
        a(f, t, logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-10.0), index=torch.arange(8))
    with pytest.raises(oct.UnsupportedOption, match="logits"):
        a(f, t, logits=torch.zeros(8, 4, 10), labels=torch.zeros(8, 4), index=torch.arange(8))
    with pytest.raises(oct.UnsupportedOption, match="dist_image_features"):
        a(f, t, dist_image_features=f, dist_text_features=t, index=torch.arange(8))


class _Numbered(torch.utils.data.Dataset):
    """Item i = (image tensor filled with i, text tensor filled with i)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), torch.full((5,), i, dtype=torch.long)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_index_travels_with_its_batch_through_the_dataloader(workers):
    ds = _Numbered()
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, drop_last=True)
    dl.num_samples, dl.num_batches = len(ds), len(dl)
    h = oct.IndexHandoff()
    info = oct.with_index(DataInfo(dl), h)
    loader = info.dataloader
    assert (loader.num_samples, loader.num_batches, len(loader)) == (40, 5, 5)
    seen = []
    for images, texts in loader:  # what train_one_epoch unpacks
        index = h.take()
        assert torch.equal(images[:, 0, 0, 0].long(), index) and torch.equal(texts[:, 0], index)
        seen += index.tolist()
    assert sorted(seen) == list(range(40))
    with pytest.raises(oct.UnsupportedOption, match="map-style"):
        oct.with_index(DataInfo(torch.utils.data.DataLoader(_Stream())), h)


def test_apply_patches_open_clip_train_main_and_undo_restores_it(tmp_path):
    import open_clip_train.main as ocmain

    before = {n: getattr(ocmain, n) for n in oct.OpenClipTrainPatch.NAMES}
    patch = oct.apply_vlmkern_to_open_clip_train("gcl", gamma=0.5)
    try:
        assert all(getattr(ocmain, n) is not before[n] for n in oct.OpenClipTrainPatch.NAMES)
        assert ocmain.torch.cuda is torch.cuda and ocmain.torch.nn is torch.nn  # the proxy is torch otherwise
        patch.session.loss = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(4, tau=0.1, gamma=0.5, margin=None))
        ocmain.torch.save({"epoch": 1, "name": "x", "state_dict": {}, "optimizer": {}}, tmp_path / "ck.pt")
        ocmain.torch.save({"other": 1}, tmp_path / "other.pt")  # not a training checkpoint: as is
        entry = torch.load(tmp_path / "ck.pt", weights_only=True)[oct.CHECKPOINT_KEY]
        assert entry["loss"] == "gcl" and entry["margin"] is None and entry["state_dict"]["log_u_img"].shape == (4,)
        assert oct.CHECKPOINT_KEY not in torch.load(tmp_path / "other.pt", weights_only=True)
    finally:
        patch.undo()
    assert all(getattr(ocmain, n) is before[n] for n in oct.OpenClipTrainPatch.NAMES)


# ----------------------------------------------------------------------------
# the learned temperature (--vlmkern-learn-tau)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("learn", [True, False])
def test_adapter_learns_logit_scale_only_when_asked(learn):
    """learn_tau: the logit_scale open_clip passes (model.logit_scale.exp()) gives tau = 1/it and
    the parameter gets -tau dF/dtau; otherwise it is ignored (the loss's fixed tau) and gets nothing."""
    from vlmkern import reference as R

    tau0, rho = 0.07, 2.0
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / tau0)))
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.2, gamma=0.9, rho=rho if learn else 0.0),
                         learn_tau=learn)
    f, t = _features()
    index = torch.arange(8)
    out = a(f, t, logit_scale=log_scale.exp(), output_dict=True, index=index)["contrastive_loss"]
    out.backward()
    used = tau0 if learn else 0.2
    ref = R.hgcl(f, t, index, torch.full((20,), -math.inf), torch.full((20,), -math.inf), tau=used, gamma=0.9,
                 margin=0.1)
    assert math.isclose(out.item(), ref.loss.item() + (rho * tau0 if learn else 0.0), rel_tol=1e-5)
    if learn:
        expect = -tau0 * (ref.grad_tau.item() + rho)
        assert torch.isfinite(log_scale.grad) and log_scale.grad.item() != 0.0
        assert abs(log_scale.grad.item() - expect) <= 1e-4 * (1 + abs(expect))
        with pytest.raises(ValueError, match="learn_tau needs the model's logit_scale"):
            a(f, t, index=index)
    else:
        assert log_scale.grad is None


def test_end_to_end_learns_the_temperature(csv_dataset, tmp_path):
    """--vlmkern-learn-tau: logit_scale stays trainable, gets a finite gradient from the loss and moves
    (open_clip logs and checkpoints it); the fixed-tau run above keeps it frozen."""
    r = _run(["--vlmkern-loss", "hgcl", "--vlmkern-gamma", str(GAMMA), "--vlmkern-tau", str(TAU),
              "--vlmkern-learn-tau", "--vlmkern-rho", "2.0",
              *_common(csv_dataset, tmp_path / "logs", "learn", 1), "--lr", "1e-3"])  # the last --lr wins
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "learn" / "out.log").read_text()
    assert "the temperature is learned (RGCL-g, rho=2.0)" in log
    assert all(math.isfinite(v) for v in _losses(log))
    scales = [float(v) for v in re.findall(r"Logit Scale: ([-+0-9.eE]+)", log)]
    assert len(scales) == 4 and len(set(scales)) > 1, scales
    ck, entry = _state(tmp_path / "logs" / "learn" / "checkpoints" / "epoch_1.pt")
    learned = float(ck["state_dict"]["logit_scale"])
    assert math.isfinite(learned) and abs(learned - math.log(1 / TAU)) > 1e-4, learned
    assert all(torch.isfinite(entry["state_dict"][k]).all() for k in ("log_u_img", "log_u_txt"))


@pytest.mark.parametrize("flags, needle", [
    (["--vlmkern-loss", "hgcl", "--vlmkern-rho", "2"], "--vlmkern-rho is the learned temperature's regulariser"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-learn-tau", "--vlmkern-rho", "nan"], "--vlmkern-rho must be a finite"),
])
def test_bad_learn_tau_flags(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        oct.main([*flags, "--train-data", "x.csv"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
