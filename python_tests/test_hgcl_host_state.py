"""GlobalContrastiveLoss(state_on_host=True): the per-sample state in host memory.

Every call gathers the batch's distinct entries into a batch-local state, runs the op
on it with local indices and writes the updated entries back.  Checked on the CPU
against the on-device mode, bit for bit: losses, feature and temperature gradients and
both state buffers over several steps (duplicates within a batch, stateless calls,
separate text indices into a longer text state, gamma < 1 and a gamma change, a learned
tau, a NaN batch), plus state_dict / load_state_dict / ``.to`` and the argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require_backend
from vlmkern import GlobalContrastiveLoss

N, N_TXT, D = 40, 55, 16
# (index, txt_index or None, update_state, gamma or None (keep), nan batch, learned tau)
STEPS = [
    (list(range(0, 8)), None, True, None, False, False),
    ([3, 9, 3, 12, 39, 0, 9, 3], None, True, None, False, False),  # duplicates, revisits
    ([5, 6, 7, 8, 9, 10, 11, 12], None, False, None, False, False),  # stateless
    ([1, 2, 1, 30, 31, 2, 4, 5], [50, 2, 50, 54, 0, 7, 7, 1], True, None, False, True),  # txt_index, learned tau
    ([0, 1, 2, 3, 4, 5, 6, 7], None, True, None, True, False),  # NaN features: state untouched
    ([20, 21, 22, 20, 3, 9, 24, 25], [8, 9, 10, 11, 12, 13, 14, 8], True, 1.0, False, False),  # gamma = 1
    ([7, 7, 7, 7, 1, 2, 3, 4], None, True, 0.5, False, True),
]


def _batch(step, b=8):
    g = torch.Generator().manual_seed(1000 + step)
    img = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1)
    return img, txt


def _run(loss_fn, steps=STEPS, device="cpu", index_device="cpu"):
    """The steps; with a text state as long as the image state, txt_index is taken mod N (and
    None stays None: the image index); with a longer one, None becomes the image index."""
    sep_txt = loss_fn.log_u_txt.shape[0] != loss_fn.log_u_img.shape[0]
    out = []
    for s, (index, txt_index, update, gamma, nan, learn_tau) in enumerate(steps):
        if sep_txt and txt_index is None:
            txt_index = index
        elif not sep_txt and txt_index is not None:
            txt_index = [i % N for i in txt_index]
        if gamma is not None:
            loss_fn.gamma = gamma
        img, txt = (t.to(device) for t in _batch(s))
        if nan:
            img[2, 3] = math.nan
        a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        tau = torch.tensor(0.07, device=device, requires_grad=True) if learn_tau else None
        loss = loss_fn(a, t, torch.tensor(index, device=index_device), update_state=update,
                       txt_index=None if txt_index is None else torch.tensor(txt_index, device=index_device), tau=tau)
        loss.backward()
        out.append({k: None if v is None else v.cpu() for k, v in dict(
            loss=loss.detach(), ga=a.grad, gt=t.grad, gtau=None if tau is None else tau.grad,
            u1=loss_fn.log_u_img.clone(), u2=loss_fn.log_u_txt.clone()).items()})
    return out


def _same(x, y):
    """Bit for bit, NaN in the same places."""
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(torch.isnan(x), torch.isnan(y)) and \
        torch.equal(torch.nan_to_num(x, nan=0.0), torch.nan_to_num(y, nan=0.0))


def _make(backend, host, n_txt=N, **kw):
    return GlobalContrastiveLoss(N, tau=0.05, gamma=0.8, margin=0.1, backend=backend, num_txt_samples=n_txt,
                                 state_on_host=host, **kw)


def _check_bit_identical(ref, host):
    for s, (r, h) in enumerate(zip(ref, host)):
        for key in r:
            if r[key] is None:
                assert h[key] is None
            else:
                assert _same(r[key], h[key]), (s, key)
    # the state did change (the comparison is not between two untouched buffers)
    assert torch.isfinite(host[-1]["u1"]).sum() > 10 and torch.isfinite(host[-1]["u2"]).sum() > 10
    assert torch.isnan(host[4]["loss"]) and _same(host[4]["u1"], host[3]["u1"])


@pytest.mark.parametrize("n_txt", [N, N_TXT])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_host_state_bit_identical_to_device_state(backend, n_txt):
    require_backend("hgcl", backend, "cpu")
    _check_bit_identical(_run(_make(backend, False, n_txt)), _run(_make(backend, True, n_txt)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_host_state_bit_identical_to_device_state_on_cuda(backend):
    """The point of the mode: features on the GPU, state in pinned host memory (the
    loader's CPU index), against the state on the GPU (its index on the GPU)."""
    require_backend("hgcl", backend, "cuda")
    ref = _run(_make(backend, False, N_TXT).cuda(), device="cuda", index_device="cuda")
    host_loss = _make(backend, True, N_TXT).cuda()
    assert host_loss.log_u_img.device.type == "cpu"
    _check_bit_identical(ref, _run(host_loss, device="cuda", index_device="cpu"))


def test_host_state_write_back_is_deferred_until_read():
    loss_fn = _make("torch", True)
    img, txt = _batch(0)
    loss_fn(img, txt, torch.arange(8))
    assert loss_fn._pending is not None  # the write-back waits for the next reader
    raw = loss_fn._buffers["log_u_img"]
    assert torch.isneginf(raw).all()  # not yet scattered
    loss_fn.flush()
    assert loss_fn._pending is None
    assert torch.isfinite(raw[:8]).all() and torch.isneginf(raw[8:]).all()
    loss_fn(img, txt, torch.arange(8), update_state=False)
    assert loss_fn._pending is None  # a stateless call writes nothing


def test_host_state_state_dict_round_trip_and_resume():
    backend = "torch"
    a = _make(backend, True)
    _run(a, STEPS[:3])
    sd = a.state_dict()  # flushes the pending write-back
    ref = _make(backend, False)
    _run(ref, STEPS[:3])
    assert set(sd) == {"log_u_img", "log_u_txt"}
    for k, v in ref.state_dict().items():
        assert _same(sd[k], v), k
    # a checkpoint saved by the on-device mode loads into the host mode and vice versa
    b = _make(backend, True)
    b.load_state_dict(ref.state_dict())  # same lengths: the steps' txt_index are taken mod N
    c = _make(backend, False)
    c.load_state_dict(sd)
    rb, rc, ra = _run(b, STEPS[3:]), _run(c, STEPS[3:]), _run(a, STEPS[3:])
    for x, y, z in zip(rb, rc, ra):
        for key in ("loss", "ga", "gt", "u1", "u2"):
            assert _same(x[key], y[key]) and _same(x[key], z[key]), key


def test_load_state_dict_not_overwritten_by_pending_write_back():
    a = _make("torch", True)
    fresh = {k: v.clone() for k, v in a.state_dict().items()}  # all -inf
    img, txt = _batch(0)
    a(img, txt, torch.arange(8))  # leaves a pending write-back
    a.load_state_dict(fresh)
    assert torch.isneginf(a.log_u_img).all() and torch.isneginf(a.log_u_txt).all()


def test_to_keeps_host_state_on_host():
    a = _make("torch", True)
    img, txt = _batch(0)
    a(img, txt, torch.arange(8))
    before = a.log_u_img.clone()
    ptr = a.log_u_img.data_ptr()
    a.double()  # in the on-device mode this would retype the buffers
    a.to(torch.device("cpu"))
    assert a.log_u_img.dtype == torch.float32 and a.log_u_img.data_ptr() == ptr
    assert _same(a.log_u_img, before)
    ref = _make("torch", False).double()
    assert ref.log_u_img.dtype == torch.float64  # the contrast: device-mode buffers follow the module
    if torch.cuda.is_available():
        a.cuda()
        assert a.log_u_img.device.type == "cpu" and a.log_u_img.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA runtime")
def test_host_state_is_pinned():
    assert _make("torch", True).log_u_img.is_pinned()
    assert not _make("torch", True, pin_memory=False).log_u_img.is_pinned()


def test_host_state_argument_errors():
    a = _make("torch", True)
    img, txt = _batch(0)
    with pytest.raises(IndexError, match=r"index must be in \[0, 40\)"):
        a(img, txt, torch.tensor([0, 1, 2, 3, 4, 5, 6, 40]))
    with pytest.raises(IndexError, match=r"txt_index must be in \[0, 40\)"):
        a(img, txt, torch.arange(8), txt_index=torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))
    with pytest.raises(ValueError, match="index must be 1-D of length b = 8"):
        a(img, txt, torch.arange(7))
    with pytest.raises(TypeError, match="index must be int64"):
        a(img, txt, torch.arange(8).float())
    with pytest.raises(ValueError, match="needs txt_index"):
        _make("torch", True, N_TXT)(img, txt, torch.arange(8))  # the text state is longer
    with pytest.raises(TypeError, match="state_on_host must be a bool"):
        GlobalContrastiveLoss(N, tau=0.05, gamma=0.8, state_on_host="cpu")
    assert a._pending is None and torch.isneginf(a.log_u_img).all()  # nothing was written


def test_state_placement_benchmark_runs_from_run_all(tmp_path):
    from vlmkern.app.bench import run_all

    torch.set_num_threads(1)
    assert run_all.main(["--only", "hgcl_state", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "hgcl_state_cpu.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1e+06 | 256 | 512 |")]
    assert [r.split("|")[4].strip() for r in rows] == ["device-state", "host-state", "host-state bookkeeping only"]
    import json

    recs = json.loads((tmp_path / "hgcl_state_cpu.json").read_text())["records"]
    # two float32 buffers of N (on the CPU the features' device is the host too)
    assert [r["state_bytes_on_host"] for r in recs] == [8 * 10**6, 8 * 10**6, None]
    assert all(r["median_s"] > 0 for r in recs)
    assert "hgcl_state on cpu" in (tmp_path / "SUMMARY_cpu.md").read_text()
