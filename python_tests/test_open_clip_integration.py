"""vlmkern's HGCL/GCL loss inside open_clip's own trainer (vlmkern.integrations.open_clip_train).

End to end: ``python -m vlmkern.integrations.open_clip_train`` trains the tiny
``vlmkern-micro-ViT`` on a 32-image CSV dataset for 2 epochs, then a second run
``--resume``s a checkpoint whose u state was overwritten with a marker value
and checks that the state went on from the marker (restored, then updated once
per sample). ``--batch-size 4 --accum-freq 2`` is checked against
``--batch-size 8``, and 2 gloo ranks under torchrun (``--batch-size 4`` each)
against one process on the same global batches (``--batch-size 8``). A run resumed from
the epoch-1 checkpoint ends epoch 2 bit for bit like the uninterrupted run. Plain GCL at
gamma = 1, eps = 1/(B-1) against open_clip's own ``ClipLoss`` (SGD, logit_scale frozen):
the same steps at a learning rate 2*tau times smaller for ClipLoss. Webdataset: tiny tar
shards indexed by ``python -m vlmkern.integrations.wds_index`` go through open_clip's own
``get_data`` (every batch's index is its captions' sample number, with 0 and 2 workers and
resampled) and its real ``main`` (the checkpointed u has the index space's size, exactly the
trained shards' entries visited); shards without the index fail clearly. Unit tests
cover the loss adapter, the index hand-off (through DataLoader workers and
accumulation steps) and the clear errors for unsupported options.

Without open_clip_train's dependencies the module skips (with the pip command),
except under CI, where it fails.
"""

from __future__ import annotations

import json
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
from vlmkern import reference as R

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


HGCL_FLAGS = ["--vlmkern-loss", "hgcl", "--vlmkern-margin", "0.1", "--vlmkern-gamma", "0.9", "--vlmkern-tau", "0.05"]


def _run(args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "vlmkern.integrations.open_clip_train", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _common(csv, logs, name, epochs, batch_size=8):
    return ["--train-data", str(csv), "--csv-separator", ",", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", MODEL, "--batch-size", str(batch_size), "--epochs", str(epochs),
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


def test_state_on_host_run_matches_the_on_device_run(first_run, csv_dataset, tmp_path):
    """--vlmkern-state-on-host: the same run with the u state in host memory gives the same logged
    losses and the same checkpointed state, bit for bit (CPU: same kernels, same order)."""
    r = _run(["--vlmkern-loss", "hgcl", "--vlmkern-margin", "0.1", "--vlmkern-gamma", str(GAMMA),
              "--vlmkern-tau", str(TAU), "--vlmkern-state-on-host", *_common(csv_dataset, tmp_path, "host", 2)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    host_log = (tmp_path / "host" / "out.log").read_text()
    assert "state_on_host=True: the u state is in host memory" in host_log
    assert _losses(host_log) == _losses((first_run / "out.log").read_text())
    for epoch in (1, 2):
        _, ref = _state(first_run / "checkpoints" / f"epoch_{epoch}.pt")
        _, got = _state(tmp_path / "host" / "checkpoints" / f"epoch_{epoch}.pt")
        for key in ("log_u_img", "log_u_txt"):
            assert torch.equal(got["state_dict"][key], ref["state_dict"][key]), (epoch, key)


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


# Runs compared step for step: the random crop is the full image whatever the RNG draws
# (open_clip's train transform draws per image; the compared runs draw in other streams).
SAME_PIXELS = ["--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]
HGCL = ["--vlmkern-loss", "hgcl", "--vlmkern-margin", "0.1", "--vlmkern-gamma", str(GAMMA), "--vlmkern-tau", str(TAU)]
# Tolerances of the step-for-step comparisons. The compared runs compute the same float32 quantities with
# other matmul shapes (BLAS blocking) and other summation orders of the gradient (accum: two backward
# passes summed; DDP: an all-reduce): ~1e-7 relative per step. Measured over 8 AdamW steps at lr 1e-4
# (accum-freq 2 vs the doubled batch): log u within 1e-6 (values ~0.4), parameters within 1.2e-7, and
# the logged losses equal in all 5 printed digits; 2 gloo ranks vs one process: log u within 2e-6,
# parameters within 1.2e-7. STATE_TOL leaves a factor 5-10 for other BLAS builds;
# the logged losses are printed with 5 significant digits (open_clip's #.5g): 1e-4 relative is one unit
# of the last printed digit.
STATE_TOL = 1e-5
LOGGED_LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def accum_runs(csv_dataset, tmp_path_factory):
    logs = tmp_path_factory.mktemp("accum_logs")
    for name, batch, extra in (("b8", 8, []), ("b4x2", 4, ["--accum-freq", "2"])):
        r = _run([*HGCL, *_common(csv_dataset, logs, name, 2, batch_size=batch), *SAME_PIXELS, *extra])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return logs / "b8", logs / "b4x2"


def _assert_close_states(a, b, what):
    for key in ("log_u_img", "log_u_txt"):
        x, y = a[key], b[key]
        assert x.shape == (N,) and torch.isfinite(x).all() and torch.isfinite(y).all(), (what, key)
        assert torch.allclose(x, y, rtol=STATE_TOL, atol=STATE_TOL), (what, key, (x - y).abs().max())


def _assert_close_models(a, b, what):
    for name, x in a.items():
        assert torch.allclose(x, b[name], rtol=STATE_TOL, atol=STATE_TOL), (what, name, (x - b[name]).abs().max())


def test_accum_freq_2_takes_the_steps_of_the_doubled_batch(accum_runs):
    """--batch-size 4 --accum-freq 2 vs --batch-size 8 (same data order, seed, steps): the u state,
    the model and the logged losses agree (open_clip: the two are equivalent up to floating point).
    Updating u on every one of open_clip's accum-freq loss calls would leave a different u."""
    big, acc = accum_runs
    lb, la = _losses((big / "out.log").read_text()), _losses((acc / "out.log").read_text())
    assert len(lb) == len(la) == 2 * 4, (lb, la)
    for x, y in zip(la, lb):
        assert math.isclose(x, y, rel_tol=LOGGED_LOSS_RTOL), (la, lb)
    for epoch in (1, 2):
        ckb, eb = _state(big / "checkpoints" / f"epoch_{epoch}.pt")
        cka, ea = _state(acc / "checkpoints" / f"epoch_{epoch}.pt")
        _assert_close_states(ea["state_dict"], eb["state_dict"], f"epoch {epoch}")
        _assert_close_models(cka["state_dict"], ckb["state_dict"], f"epoch {epoch}")


@pytest.fixture(scope="module")
def resumed_run(accum_runs, csv_dataset, tmp_path_factory):
    """accum_runs' uninterrupted 2-epoch run (``b8``), continued by a new process from its epoch-1 checkpoint."""
    big, _ = accum_runs
    logs = tmp_path_factory.mktemp("resume_logs")
    r = _run([*HGCL, "--resume", str(big / "checkpoints" / "epoch_1.pt"),
              *_common(csv_dataset, logs, "resumed", 2), *SAME_PIXELS])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return logs / "resumed"


def test_a_resumed_run_continues_the_uninterrupted_run_exactly(accum_runs, resumed_run):
    """open_clip's --resume from epoch 1's checkpoint, then epoch 2 in a new process, against the
    uninterrupted 2-epoch run: the same u, model and optimizer state after epoch 2, the same logged
    losses of epoch 2. This needs the data order of epoch 2 to be the same: the launcher makes the
    single-process shuffle a function of (--seed, epoch) (epoch_seeded_order; open_clip's own draws it
    from the global RNG, which its checkpoints do not hold), and the random crop draws nothing that
    matters (SAME_PIXELS: open_clip's augmentation RNG is not checkpointed either). Measured: every
    compared tensor and every logged loss is bit for bit the same (the two processes compute the same
    float32 operations in the same order), so the comparison is exact."""
    big, _ = accum_runs
    log = (resumed_run / "out.log").read_text()
    assert "resuming checkpoint" in log and f"restored the loss state" in log and f"{N} of {N} samples visited" in log
    uninterrupted, resumed = _losses((big / "out.log").read_text()), _losses(log)
    assert len(uninterrupted) == 8 and len(resumed) == 4, (uninterrupted, resumed)
    assert resumed == uninterrupted[4:], (resumed, uninterrupted)
    ck_big, e_big = _state(big / "checkpoints" / "epoch_2.pt")
    ck_res, e_res = _state(resumed_run / "checkpoints" / "epoch_2.pt")
    assert ck_res["epoch"] == ck_big["epoch"] == 2
    for key in ("log_u_img", "log_u_txt"):
        assert torch.isfinite(e_res["state_dict"][key]).all()
        assert torch.equal(e_res["state_dict"][key], e_big["state_dict"][key]), key
    assert ck_res["state_dict"].keys() == ck_big["state_dict"].keys()
    for name, x in ck_big["state_dict"].items():
        assert torch.equal(ck_res["state_dict"][name], x), (name, (ck_res["state_dict"][name] - x).abs().max())
    for i, st in ck_big["optimizer"]["state"].items():  # AdamW's moments and step count
        for k, v in st.items():
            assert torch.equal(ck_res["optimizer"]["state"][i][k], v), (i, k)
    # and epoch 2 did move the state: the comparison is not of two untouched copies of epoch 1
    _, e1 = _state(big / "checkpoints" / "epoch_1.pt")
    assert not torch.equal(e1["state_dict"]["log_u_img"], e_big["state_dict"]["log_u_img"])


def test_the_single_process_shuffle_is_a_function_of_seed_and_epoch():
    """epoch_seeded_order: open_clip's shuffle=True loader gets the order of open_clip's DistributedSampler
    (one replica, seed = --seed, advanced by open_clip's DataInfo.set_epoch), whatever the global RNG holds."""
    from torch.utils.data.distributed import DistributedSampler

    ds = _Numbered()
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True)
    dl.num_samples, dl.num_batches = len(ds), len(dl)

    def order(seed, epoch, rng):
        torch.manual_seed(rng)
        info = oct.epoch_seeded_order(DataInfo(dl), seed, 0)
        info.set_epoch(epoch)  # what open_clip's train_one_epoch calls
        assert (info.dataloader.num_samples, info.dataloader.num_batches) == (40, 5)
        return torch.cat([texts[:, 0] for _, texts in info.dataloader]).tolist()

    assert order(3, 1, rng=0) == order(3, 1, rng=123)
    assert sorted(order(3, 1, rng=0)) == list(range(40))
    assert order(3, 1, rng=0) != order(3, 2, rng=0)
    assert order(3, 1, rng=0) != order(4, 1, rng=0)
    assert order(0, 0, rng=5) == list(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))
    kept = torch.utils.data.DataLoader(ds, batch_size=8, sampler=torch.utils.data.SequentialSampler(ds))
    assert oct.epoch_seeded_order(DataInfo(kept), 0, 0).dataloader is kept  # other samplers are left alone


# Plain GCL at gamma = 1, eps = 1/(B-1), fixed tau, one process, against open_clip's ClipLoss at
# logit_scale = 1/tau (docs/SPEC.md section 1): loss = 2*tau*(ClipLoss - ln(B-1)), gradient = 2*tau x ClipLoss's.
GCL_AT_1 = ["--vlmkern-loss", "gcl", "--vlmkern-gamma", "1", "--vlmkern-eps", repr(1 / 7), "--vlmkern-tau", str(TAU)]
# plain SGD through open_clip's own --opt (timm is an open_clip_torch dependency): timm's "momentum" is
# torch.optim.SGD without Nesterov; --momentum 0 --wd 0 make a step lr * gradient, so the factor shows
# (AdamW would hide it: it is invariant to a constant gradient scale up to its eps).
SGD = ["--opt", "timm/momentum", "--momentum", "0", "--wd", "0"]
GCL_LR = 1.0


@pytest.fixture(scope="module")
def gcl_vs_cliploss_runs(csv_dataset, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cliploss_logs")
    r = _run([*GCL_AT_1, *_common(csv_dataset, logs, "gcl", 1), *SAME_PIXELS, *SGD, "--lr", str(GCL_LR)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    worker = str(Path(__file__).resolve().parent / "open_clip_train_worker.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = logs / "clip_init"
    out.mkdir()
    clip = subprocess.run(
        [sys.executable, worker, "--open-clip-loss", str(TAU), str(out),
         *_common(csv_dataset, logs, "clip", 1), *SAME_PIXELS, *SGD, "--lr", repr(2 * TAU * GCL_LR)],
        env=env, capture_output=True, text=True, timeout=300)
    assert clip.returncode == 0, clip.stdout[-3000:] + clip.stderr[-3000:]
    return logs / "gcl", logs / "clip", out / "initial.pt"


# Measured (4 SGD steps, GCL at lr 1.0 vs ClipLoss at lr 2*tau = 0.1; parameters move by up to 0.16): the
# parameter changes agree within 4.2e-5 relative (all parameters together; the float32 gradients differ by
# ~2e-6, see the adapter test below, and 4 large steps amplify it), the worst single tensor 7.7e-5 (a
# LayerNorm gain near 1 whose change of 3e-3 is itself rounded at its ulp 1.2e-7). 2e-4 leaves a factor 5;
# a factor other than 2*tau (even 1% off) fails by orders of magnitude.
CLIP_DELTA_RTOL = 2e-4


def test_gcl_at_gamma_1_takes_cliplosss_steps_scaled_by_2_tau(gcl_vs_cliploss_runs):
    """open_clip's real trainer, plain SGD: our GCL (gamma 1, eps 1/(B-1), tau fixed) at lr L and
    open_clip's own ClipLoss (logit_scale frozen at 1/tau) at lr 2*tau*L take the same steps (the
    gradients differ by exactly 2*tau), and every logged loss is 2*tau*(ClipLoss - ln(B-1))."""
    gcl, clip, initial = gcl_vs_cliploss_runs
    lg, lc = _losses((gcl / "out.log").read_text()), _losses((clip / "out.log").read_text())
    assert "vlmkern: loss GCL" in (gcl / "out.log").read_text()
    assert "Created SGD (timm/momentum)" in (clip / "out.log").read_text()
    assert len(lg) == len(lc) == 4, (lg, lc)
    for g, c in zip(lg, lc):
        # open_clip prints 5 significant digits: ClipLoss (~2.2) to 1e-4, times 2*tau, and GCL (~0.02) to 1e-6;
        # one unit of each. Measured: within 5.0e-6 (the rounding of the printed ClipLoss).
        assert abs(g - 2 * TAU * (c - math.log(7))) <= 2 * TAU * 1e-4 + 1e-6, (lg, lc)
    init = torch.load(initial, map_location="cpu", weights_only=True)
    ck_g, _ = _state(gcl / "checkpoints" / "epoch_1.pt")
    ck_c = torch.load(clip / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert oct.CHECKPOINT_KEY not in ck_c  # open_clip's own run
    assert ck_g["state_dict"].keys() == ck_c["state_dict"].keys() == init.keys()
    diff2, norm2, moved = 0.0, 0.0, 0.0
    for name, x0 in init.items():
        dg, dc = ck_g["state_dict"][name] - x0, ck_c["state_dict"][name] - x0
        diff2, norm2 = diff2 + float((dg - dc).double().pow(2).sum()), norm2 + float(dc.double().pow(2).sum())
        moved = max(moved, float(dc.abs().max()))
    scale = math.log(1 / TAU)  # the fixed temperature, frozen in both
    assert abs(float(init["logit_scale"]) - scale) < 1e-6
    assert float(ck_g["state_dict"]["logit_scale"]) == float(ck_c["state_dict"]["logit_scale"]) == float(init["logit_scale"])
    assert moved > 1e-2, moved  # the steps are not negligible
    assert math.sqrt(diff2 / norm2) <= CLIP_DELTA_RTOL, math.sqrt(diff2 / norm2)


def test_gcl_at_gamma_1_parameter_gradient_is_2_tau_times_open_clips_cliploss():
    """The same identity at the adapter, on the real tiny open_clip model: one forward, one backward of
    each loss, the gradient of every model parameter. GCL through OpenClipLoss (gamma 1, eps 1/(B-1))
    against open_clip.loss.ClipLoss at logit_scale = 1/tau."""
    from open_clip.loss import ClipLoss

    from vlmkern.app.models.clip import CONFIG_DIR
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    model.logit_scale.requires_grad_(False)
    tok = open_clip.get_tokenizer(MODEL)
    b = 8
    g = torch.Generator().manual_seed(1)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(b, 3, *size, generator=g)
    texts = tok([f"a photo of thing number {i}" for i in range(b)])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss_fn):
        loss = loss_fn(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True))
        return loss, torch.autograd.grad(loss, params)

    ours = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(b, tau=TAU, gamma=1.0, margin=None, eps=1 / (b - 1)))
    lg, gg = grads(lambda f, t: ours(f, t, index=torch.arange(b)))
    lc, gc = grads(lambda f, t: ClipLoss()(f, t, torch.tensor(1 / TAU)))
    assert math.isclose(lg.item(), 2 * TAU * (lc.item() - math.log(b - 1)), rel_tol=1e-5, abs_tol=1e-6)
    num = torch.sqrt(sum(((x - 2 * TAU * y) ** 2).sum() for x, y in zip(gg, gc)))
    den = torch.sqrt(sum((2 * TAU * y).pow(2).sum() for y in gc))
    # measured: gradients within 1.7e-6 (relative, all parameters together), losses within 5e-7 (float32
    # through the model's forward and backward); 1e-5 leaves a factor 6. A factor other than 2*tau fails by O(1).
    assert den > 0 and num / den <= 1e-5, float(num / den)


@pytest.mark.multiproc
def test_torchrun_two_gloo_ranks_take_the_single_process_step_on_the_global_batch(csv_dataset, tmp_path):
    """open_clip's real main under torchrun, 2 CPU ranks (gloo), --batch-size 4 each, against one
    process at --batch-size 8 whose sampler yields the same global batches (rank 0's rows, then
    rank 1's): the u state is bit for bit the same on both ranks, saved once (rank 0's checkpoints),
    and equal to the single-process state; the model too. And the two together: 2 ranks at
    --batch-size 2 --accum-freq 2 take the steps of 2 ranks at --batch-size 4."""
    worker = str(Path(__file__).resolve().parent / "open_clip_train_worker.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    ddp_out, one_out, acc_out = tmp_path / "ddp_state", tmp_path / "one_state", tmp_path / "acc_state"
    ddp_out.mkdir(), one_out.mkdir(), acc_out.mkdir()
    (tmp_path / "ddp.json").write_text(json.dumps(
        [*HGCL, *_common(csv_dataset, tmp_path / "logs", "ddp", 2, batch_size=4), *SAME_PIXELS,
         "--dist-backend", "gloo", "--local-loss", "--gather-with-grad"]))
    (tmp_path / "acc.json").write_text(json.dumps(
        [*HGCL, *_common(csv_dataset, tmp_path / "logs", "acc", 2, batch_size=2), *SAME_PIXELS,
         "--accum-freq", "2", "--dist-backend", "gloo", "--local-loss", "--gather-with-grad"]))
    (tmp_path / "one.json").write_text(json.dumps(
        ["--combined-order", "2", *HGCL, *_common(csv_dataset, tmp_path / "logs", "one", 2, batch_size=8),
         *SAME_PIXELS]))
    for out, argfile in ((ddp_out, "ddp.json"), (acc_out, "acc.json")):
        ddp = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(out),
             str(tmp_path / argfile)], env=env, capture_output=True, text=True, timeout=600)
        assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, worker, str(one_out), str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    log = (tmp_path / "logs" / "ddp" / "out.log").read_text()
    assert "vlmkern: 2 ranks" in log and len(_losses(log)) == 2 * 4  # 16 samples a rank / 4 = 4 steps an epoch
    r0, r1 = torch.load(ddp_out / "rank0.pt"), torch.load(ddp_out / "rank1.pt")
    for key in ("log_u_img", "log_u_txt"):
        assert torch.equal(r0[key], r1[key]), key  # one u, the same on every rank
    ckpts = sorted(p.name for p in (tmp_path / "logs" / "ddp" / "checkpoints").iterdir())
    assert ckpts == ["epoch_1.pt", "epoch_2.pt"], ckpts
    ck, entry = _state(tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_2.pt")
    for key in ("log_u_img", "log_u_txt"):
        assert torch.equal(entry["state_dict"][key], r0[key]), key
    # open_clip saves the DDP-wrapped model's state dict ("module." prefix; its --resume strips it)
    model = {k.removeprefix("module."): v for k, v in ck["state_dict"].items()}
    single = torch.load(one_out / "rank0.pt")
    _assert_close_states(r0, single, "2 ranks vs 1 process")
    ck_one, _ = _state(tmp_path / "logs" / "one" / "checkpoints" / "epoch_2.pt")
    assert model.keys() == ck_one["state_dict"].keys()
    _assert_close_models(model, ck_one["state_dict"], "2 ranks vs 1 process")
    a0, a1 = torch.load(acc_out / "rank0.pt"), torch.load(acc_out / "rank1.pt")
    for key in ("log_u_img", "log_u_txt"):
        assert torch.equal(a0[key], a1[key]), key
    _assert_close_states(a0, r0, "2 ranks with --accum-freq 2 vs without")
    ck_acc, _ = _state(tmp_path / "logs" / "acc" / "checkpoints" / "epoch_2.pt")
    _assert_close_models(ck_acc["state_dict"], ck["state_dict"], "2 ranks with --accum-freq 2 vs without")


# ----------------------------------------------------------------------------
# webdataset training data: the sample index is a field of the sample (wds_index)
# ----------------------------------------------------------------------------

WDS_SHARDS, WDS_PER_SHARD = 6, 6  # indexed together: 36 indices; the runs train on the first 4 shards
WDS_TRAIN = 4 * WDS_PER_SHARD
WDS_N = WDS_SHARDS * WDS_PER_SHARD


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    """``raw/``: 6 tar shards of 6 samples (``<key>.png``, ``<key>.txt`` = "a <colour> square number <i>",
    keys not in sample order); ``indexed/``: the same through ``python -m vlmkern.integrations.wds_index``."""
    import io
    import tarfile
    from PIL import Image

    from vlmkern.integrations import wds_index

    raw = tmp_path_factory.mktemp("wds_raw")
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 30)]
    g = torch.Generator().manual_seed(1)
    for s in range(WDS_SHARDS):
        with tarfile.open(raw / f"{s:06d}.tar", "w") as tar:
            for j in range(WDS_PER_SHARD):
                i = s * WDS_PER_SHARD + j
                img = (torch.rand(16, 16, 3, generator=g) * 60).to(torch.uint8)
                img[4:12, 4:12] = torch.tensor(colours[i % 4], dtype=torch.uint8)
                png = io.BytesIO()
                Image.fromarray(img.numpy()).save(png, format="PNG")
                key = f"k{(7 * i) % 97:03d}x{i}"  # webdataset keys are strings, unrelated to the order
                for ext, data in (("png", png.getvalue()), ("txt", f"a square number {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    indexed = raw.parent / (raw.name + "_indexed")
    assert wds_index.main([str(raw / f"{{000000..{WDS_SHARDS - 1:06d}}}.tar"), "--out", str(indexed)]) == 0
    return raw, indexed


def _wds_train(d, shards=4):
    return str(d / f"{{000000..{shards - 1:06d}}}.tar")


def test_wds_index_numbers_every_sample_in_shard_and_sample_order(wds_shards, capsys):
    import tarfile

    from vlmkern.integrations import wds_index

    raw, indexed = wds_shards
    for s in range(WDS_SHARDS):
        with tarfile.open(indexed / f"{s:06d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        with tarfile.open(raw / f"{s:06d}.tar") as tar:
            original = {m.name: tar.extractfile(m).read() for m in tar}
        assert {k: v for k, v in members.items() if not k.endswith(".idx")} == original  # nothing else changed
        idx = {k[:-4]: int(v) for k, v in members.items() if k.endswith(".idx")}
        assert len(idx) == WDS_PER_SHARD
        for key, i in idx.items():  # the index is the sample's number (its caption), in shard then sample order
            assert members[f"{key}.txt"].decode() == f"a square number {i}", (key, i)
    index = json.loads((indexed / wds_index.INDEX_FILE).read_text())
    assert index["num_samples"] == WDS_N and index["field"] == "idx"
    assert index["shards"]["000002.tar"] == {"first": 2 * WDS_PER_SHARD, "count": WDS_PER_SHARD}
    assert json.loads((indexed / "sizes.json").read_text()) == {f"{s:06d}.tar": WDS_PER_SHARD
                                                                for s in range(WDS_SHARDS)}
    assert wds_index.read_index(wds_index.expand_shards(_wds_train(indexed)))["dataset_id"] == index["dataset_id"]
    with pytest.raises(SystemExit) as e:  # indexing twice would renumber: refused
        wds_index.main([_wds_train(indexed), "--out", str(indexed)])
    assert e.value.code == 2 and "already hold a '.idx' field" in capsys.readouterr().err


def _wds_loader(shards, workers, num_samples=None, resampled=False, batch_size=4):
    """open_clip's own get_data (patched by the launcher) on webdataset shards: the training
    ``DataInfo`` and the hand-off. The tokenizer turns "... number i" into [i] * 5."""
    from open_clip_train.params import parse_args
    import open_clip_train.main as ocmain
    import torchvision.transforms as T

    args = parse_args(["--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples",
                       str(WDS_TRAIN), "--batch-size", str(batch_size), "--workers", str(workers), "--model", MODEL,
                       "--seed", "0"] + (["--dataset-resampled"] if resampled else []))
    args.world_size, args.rank, args.distributed = 1, 0, False
    patch = oct.apply_vlmkern_to_open_clip_train("hgcl", num_samples=num_samples)
    try:
        data = ocmain.get_data(args, (T.ToTensor(), T.ToTensor()), epoch=0,
                               tokenizer=lambda text: torch.tensor([[int(text.split()[-1])] * 5]))  # open_clip: tokenizer(text)[0]
    finally:
        patch.undo()
    data["train"].set_epoch(0)
    return data["train"], patch.session


@pytest.mark.parametrize("workers, resampled", [(0, False), (2, False), (0, True)])
def test_the_wds_index_travels_with_its_sample_through_open_clips_pipeline(wds_shards, workers, resampled):
    """Every batch's index is its samples' own (the caption says which sample it is), after open_clip's
    shard and sample shuffles, the split over 2 DataLoader workers and resampling with replacement."""
    _, indexed = wds_shards
    info, session = _wds_loader(_wds_train(indexed), workers, resampled=resampled)
    assert session.num_samples == WDS_N  # the index space of vlmkern_index.json, not --train-num-samples
    loader = info.dataloader
    assert isinstance(loader, oct.IndexedLoader) and (loader.num_samples, loader.num_batches) == (WDS_TRAIN, 6)
    seen = []
    for images, texts in loader:  # what train_one_epoch unpacks
        index = session.handoff.take()
        assert index.dtype == torch.int64 and images.shape[0] == 4
        assert torch.equal(texts[:, 0], index), (texts[:, 0], index)  # the caption's number is the index
        seen += index.tolist()
    assert len(seen) == WDS_TRAIN
    if resampled:  # shards drawn with replacement: repeats allowed, only the 4 training shards' samples
        assert set(seen) <= set(range(WDS_TRAIN)), seen
    else:  # one pass over the 4 shards: each sample exactly once, shuffled
        assert sorted(seen) == list(range(WDS_TRAIN)) and seen != sorted(seen), seen


def test_wds_shards_without_the_index_fail_clearly(wds_shards, capsys):
    raw, indexed = wds_shards
    with pytest.raises(SystemExit) as e:  # no vlmkern_index.json: the state's size is unknown before training
        oct.main(["--vlmkern-loss", "hgcl", "--train-data", _wds_train(raw), "--dataset-type", "webdataset",
                  "--train-num-samples", str(WDS_TRAIN), "--model", MODEL])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no vlmkern_index.json next to the shard" in err, err
    assert "python -m vlmkern.integrations.wds_index" in err and "--vlmkern-num-samples" in err
    with pytest.raises(SystemExit) as e:  # the flag is for webdataset data only
        oct.main(["--vlmkern-loss", "hgcl", "--train-data", "x.csv", "--model", MODEL, "--vlmkern-num-samples", "9"])
    assert e.value.code == 2 and "--vlmkern-num-samples is the index space" in capsys.readouterr().err
    # a size given by hand, but samples without the field: the first sample says so
    info, _ = _wds_loader(_wds_train(raw), 0, num_samples=WDS_N)
    with pytest.raises(ValueError, match=r"has no '\.idx' field.*wds_index"):
        next(iter(info.dataloader))
    # an index beyond the size given
    info, _ = _wds_loader(_wds_train(indexed), 0, num_samples=10)
    with pytest.raises(ValueError, match=r"outside the loss state's \[0, 10\)"):
        for _ in info.dataloader:
            pass


def test_the_wds_index_stage_reads_the_field_and_names_the_sample_it_refuses():
    stage = oct._ImageTextIndex(5)
    img, txt, i = stage({"__key__": "k", "__url__": "s.tar", "image": "I", "text": "T", "idx": b"4"})
    assert (img, txt) == ("I", "T") and i.dtype == torch.int64 and i.shape == () and int(i) == 4
    for raw, needle in ((None, "has no '.idx' field"), (b"four", "is not an integer"), (b"5", r"outside .*\[0, 5\)"),
                        (b"-1", "outside")):
        sample = {"__key__": "k7", "__url__": "s3.tar", "image": "I", "text": "T"}
        if raw is not None:
            sample["idx"] = raw
        with pytest.raises(ValueError, match=needle) as e:
            stage(sample)
        assert "'k7' of the shard 's3.tar'" in str(e.value)


def test_end_to_end_on_webdataset_shards_visits_each_indexed_sample(wds_shards, tmp_path):
    """open_clip's real main on 4 of the 6 indexed shards (24 of 36 indices) with 2 DataLoader workers
    (2 shards each; 3 batches of 4 a worker: one epoch is one pass over the 24 samples): the
    checkpointed u holds 36 entries, exactly the 24 training samples' visited."""
    _, indexed = wds_shards
    r = _run([*HGCL_FLAGS, "--train-data", _wds_train(indexed), "--dataset-type", "webdataset",
              "--train-num-samples", str(WDS_TRAIN), "--model", MODEL, "--batch-size", "4", "--epochs", "1",
              "--workers", "2", "--device", "cpu", "--precision", "fp32", "--lr", "1e-4", "--warmup", "1",
              "--log-every-n-steps", "1", "--seed", "0", "--logs", str(tmp_path), "--name", "wds"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "wds" / "out.log").read_text()
    assert f"num_samples={WDS_N}," in log
    losses = _losses(log)
    assert len(losses) == WDS_TRAIN // 4 and all(math.isfinite(v) for v in losses), losses
    ck, entry = _state(tmp_path / "wds" / "checkpoints" / "epoch_1.pt")
    assert ck["epoch"] == 1 and entry["num_samples"] == WDS_N
    for key in ("log_u_img", "log_u_txt"):
        u = entry["state_dict"][key]
        assert torch.isfinite(u[:WDS_TRAIN]).all() and torch.isneginf(u[WDS_TRAIN:]).all(), (key, u)


# ----------------------------------------------------------------------------
# clear errors instead of silent garbage
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["--siglip"], "--siglip is not supported"),
    (["--model", "coca_ViT-B-32"], "(CoCa) is not supported"),
    (["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"], "--distill-model/--distill-pretrained"),
])
def test_unsupported_open_clip_options_fail_before_training(extra, needle, capsys):
    args = ["--vlmkern-loss", "hgcl", "--train-data", "x.csv", "--model", MODEL, *extra]
    with pytest.raises(SystemExit) as e:
        oct.main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_torchrun_without_gather_with_grad_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in every rank
    with pytest.raises(SystemExit) as e:
        oct.main(["--vlmkern-loss", "hgcl", "--train-data", "x.csv", "--model", MODEL, "--local-loss"])
    assert e.value.code == 2
    assert "torchrun without --gather-with-grad is not supported" in capsys.readouterr().err
    from open_clip_train.params import parse_args

    oct.check_open_clip_args(parse_args(
        ["--train-data", "x.csv", "--model", MODEL, "--gather-with-grad"]))  # accepted, --local-loss or not


@pytest.mark.parametrize("flags, needle", [
    (["--vlmkern-loss", "gcl", "--vlmkern-margin", "0.1"], "plain GCL (--vlmkern-loss gcl) has none"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-tau", "0.001"], "--vlmkern-tau must be in [0.01, 1]"),
    (["--vlmkern-loss", "hgcl", "--vlmkern-gamma", "0"], "--vlmkern-gamma must be in (0, 1]"),
    (["--vlmkern-loss", "gcl", "--vlmkern-eps", "0"], "--vlmkern-eps must be a number > 0"),
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
    with pytest.raises(RuntimeError, match="without a pending"):  # a second call on one batch (accum_freq = 1)
        a(f, t, output_dict=True)
    h.put(torch.arange(8))
    with pytest.raises(RuntimeError, match="before the loss took the previous batch"):
        h.put(torch.arange(8, 16))
    h.take()
    h.put(torch.arange(4))
    with pytest.raises(RuntimeError, match="index has shape"):
        a(f, t, output_dict=True)


def test_adapter_accepts_duplicate_indices_one_update_with_the_mean_phi():
    """A resampling loader repeats samples: the repeated entry is updated once (mean Phi), as the op says."""
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9, margin=None))
    f, t = _features()
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    a(f, t, index=index)
    ref = R.hgcl(f, t, index, torch.full((20,), -math.inf), torch.full((20,), -math.inf),
                 tau=0.07, gamma=0.9, margin=None)  # GCL: every anchor's Phi differs
    assert torch.allclose(a.loss.log_u_img.double()[:7], ref.log_u_img[:7], rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.loss.log_u_txt.double()[:7], ref.log_u_txt[:7], rtol=1e-5, atol=1e-5)
    phi6 = ref.log_phi_img[6:]
    assert not torch.allclose(phi6[0], phi6[1]) and phi6.min() < ref.log_u_img[6] < phi6.max()


def test_adapter_stateless_call():
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(20, tau=0.07, gamma=0.9))
    f, t = _features()
    updating = a(f, t, index=torch.arange(8))
    before = a.loss.log_u_img.clone(), a.loss.log_u_txt.clone()
    again = a(f, t, index=torch.arange(8), update_state=False)
    assert torch.equal(a.loss.log_u_img, before[0]) and torch.equal(a.loss.log_u_txt, before[1])
    assert torch.allclose(again, updating, rtol=1e-6, atol=1e-7)


def test_handoff_serves_an_accumulation_step():
    """--accum-freq 3: three micro-batches arrive, then three loss calls on their concatenation:
    the first updates the state, the other two are stateless, all with the same index."""
    h = oct.IndexHandoff(accum_freq=3)
    a = oct.OpenClipLoss(vlmkern.GlobalContrastiveLoss(30, tau=0.07, gamma=0.9), h)
    ref = vlmkern.GlobalContrastiveLoss(30, tau=0.07, gamma=0.9)
    parts = [torch.tensor([4, 0]), torch.tensor([9, 2]), torch.tensor([7, 1])]
    f, t = _features(b=6)
    for step in range(2):
        for p in parts:
            h.put(p + 10 * step)
        index = torch.cat(parts) + 10 * step
        losses = [a(f, t) for _ in range(3)]
        expected = ref(f, t, index)  # one updating call on the concatenated batch
        assert torch.equal(a.loss.log_u_img, ref.log_u_img) and torch.equal(a.loss.log_u_txt, ref.log_u_txt)
        assert torch.equal(losses[0], expected)
        for later in losses[1:]:  # stateless: they read the updated u
            assert torch.allclose(later, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="without a pending"):
        a(f, t)
    h.put(parts[0])
    with pytest.raises(RuntimeError, match="1 of the 3 micro-batches"):  # the loss before the step is complete
        a(f, t)
    h.clear()
    for p in parts:
        h.put(p)
    a(f, t)
    with pytest.raises(RuntimeError, match="after 1 of the 3 loss calls"):  # the trainer skipped loss calls
        h.put(parts[0])


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
        assert ocmain.torch.cuda is torch.cuda and ocmain.torch.nn.Module is torch.nn.Module  # torch otherwise
        assert ocmain.torch.nn.parallel.DistributedDataParallel is oct._ddp_on_any_device
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
