"""Tests of ``vlmkern.optim.KalmanOptimizer`` (SPEC §3 as an optimizer)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlmkern.optim import KalmanOptimizer

from conftest import CUDA_EMU, backend_or_emu, require_backend

HAS_CUDA = torch.cuda.is_available()
# CUDA_EMU: the CUDA kernel and its host code on the CPU emulator (conftest.use_cuda_emu).
BACKENDS = ["cpu", "torch", CUDA_EMU]


@pytest.fixture
def backend(request, monkeypatch):
    return backend_or_emu(request.param, "kalman", monkeypatch)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = torch.randn(32, 2, generator=g)
    return x, y


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x.to(next(model.parameters()).dtype)) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _hand_rolled(model, x, y, steps, groups, *, R0, beta, forgetting=1.0, gate=None, floor=1e-12, rfloor=1e-8, target=0.0):
    """Float64 loop written straight from SPEC §3 (no vlmkern code).

    ``groups``: list of (list of parameter indices, p0, q)."""
    m = copy.deepcopy(model).double()
    params = list(m.parameters())
    P = [None] * len(params)
    q_of = [None] * len(params)
    for idx, p0, q in groups:
        for i in idx:
            P[i] = torch.full_like(params[i], p0)
            q_of[i] = q
    R = R0
    xd, yd = x.double(), y.double()
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = ((m(xd) - yd) ** 2).mean()
        loss.backward()
        e = target - loss.item()
        ph = [P[i] + q_of[i] for i in range(len(params))]
        S = sum((p.grad**2 * ph[i]).sum().item() for i, p in enumerate(params)) + R
        if gate is not None and e * e / S > gate:
            e = math.copysign(math.sqrt(gate * S), e)
        with torch.no_grad():
            for i, p in enumerate(params):
                h = p.grad
                p += (e / S) * ph[i] * h
                P[i] = torch.clamp((ph[i] - (ph[i] * h) ** 2 / S) / forgetting, min=floor)
        R = max(beta * R + (1 - beta) * e * e, rfloor)
    return [p.detach() for p in params], P, R


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_hand_rolled_float64(backend):
    require_backend("kalman", backend, "cpu")
    x, y = _data()
    model = _model()
    want_p, want_P, want_R = _hand_rolled(model, x, y, 6, [(range(4), 0.05, 1e-3)], R0=0.5, beta=0.8, forgetting=0.97)
    opt = KalmanOptimizer(model.parameters(), p0=0.05, process_noise=1e-3, obs_noise0=0.5, obs_noise_beta=0.8,
                          forgetting=0.97, backend=backend)
    for _ in range(6):
        opt.step(_closure(model, opt, x, y))
    moved = 0.0
    for p, w, P, p_init in zip(model.parameters(), want_p, want_P, _model().parameters()):
        torch.testing.assert_close(p.double(), w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["variance"].double(), P, rtol=1e-4, atol=1e-9)
        moved = max(moved, (p - p_init).abs().max().item())
    assert moved > 1e-2  # the filter did move the parameters
    assert opt.obs_noise.item() == pytest.approx(want_R, rel=1e-4)
    assert opt.step_count == 6


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_param_groups_own_p0_and_q_and_one_S(backend):
    require_backend("kalman", backend, "cpu")
    x, y = _data()
    model = _model()
    ps = list(model.parameters())
    groups = [([0, 1], 0.02, 0.0), ([2, 3], 0.2, 5e-3)]
    want_p, want_P, want_R = _hand_rolled(model, x, y, 4, groups, R0=1.0, beta=0.9)
    opt = KalmanOptimizer(
        [{"params": ps[:2], "p0": 0.02, "process_noise": 0.0}, {"params": ps[2:], "p0": 0.2, "process_noise": 5e-3}],
        obs_noise0=1.0, obs_noise_beta=0.9, backend=backend,
    )
    for _ in range(4):
        opt.step(_closure(model, opt, x, y))
    for p, w, P in zip(ps, want_p, want_P):
        torch.testing.assert_close(p.double(), w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["variance"].double(), P, rtol=1e-4, atol=1e-9)
    assert opt.obs_noise.item() == pytest.approx(want_R, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("fires", [True, False], ids=["fires", "quiet"])
def test_gate(backend, fires):
    require_backend("kalman", backend, "cpu")
    x, y = _data()
    y = y * 10  # large loss: e^2 / S is large when R is small
    model = _model()
    R0 = 1e-2
    chi2 = 4.0 if fires else 1e9
    want_p, _, want_R = _hand_rolled(model, x, y, 3, [(range(4), 1e-3, 0.0)], R0=R0, beta=0.5, gate=chi2)
    free_p, _, free_R = _hand_rolled(model, x, y, 3, [(range(4), 1e-3, 0.0)], R0=R0, beta=0.5, gate=None)
    opt = KalmanOptimizer(model.parameters(), p0=1e-3, obs_noise0=R0, obs_noise_beta=0.5, gate_chi2=chi2, backend=backend)
    gated = []
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
        gated.append(bool(opt.last_gated))
        assert opt.last_gated.dtype == torch.bool and opt.last_gated.shape == ()
    for p, w in zip(model.parameters(), want_p):
        torch.testing.assert_close(p.double(), w, rtol=1e-4, atol=1e-6)
    assert opt.obs_noise.item() == pytest.approx(want_R, rel=1e-4)
    if fires:
        assert gated[0]
        assert want_R < 0.5 * free_R  # the clamp kept the outlier out of R
        assert max((a - b).abs().max().item() for a, b in zip(want_p, free_p)) > 1e-3
    else:
        assert not any(gated)
        assert want_R == pytest.approx(free_R)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_state_dict_round_trip_continues_identically(backend, tmp_path):
    require_backend("kalman", backend, "cpu")
    x, y = _data()
    model = _model(dtype=torch.bfloat16)
    opt = KalmanOptimizer(model.parameters(), p0=0.05, obs_noise0=0.7, obs_noise_beta=0.8, gate_chi2=50.0, backend=backend)
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    model2 = _model(dtype=torch.bfloat16, seed=99)
    model2.load_state_dict(ck["model"])
    opt2 = KalmanOptimizer(model2.parameters(), p0=1.0, obs_noise0=5.0, obs_noise_beta=0.8, gate_chi2=50.0, backend=backend)
    opt2.load_state_dict(ck["opt"])
    assert opt2.step_count == 3
    assert torch.equal(opt2.obs_noise, opt.obs_noise)
    for p2 in model2.parameters():
        assert opt2.state[p2]["variance"].dtype == torch.float32  # not cast to the bf16 param dtype
    assert opt2.param_groups[0]["p0"] == 0.05
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
        opt2.step(_closure(model2, opt2, x, y))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[a]["variance"], opt2.state[b]["variance"])
    assert torch.equal(opt.obs_noise, opt2.obs_noise) and opt2.step_count == 6


def test_skips_params_without_grad_and_loss_kwarg():
    x, y = _data()
    model = _model()
    ps = list(model.parameters())
    ps[0].requires_grad_(False)
    opt = KalmanOptimizer(model.parameters(), p0=0.1)
    w0 = ps[0].detach().clone()
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    out = opt.step(loss=loss)
    assert out is loss
    assert torch.equal(ps[0], w0) and "variance" not in opt.state[ps[0]]
    assert "variance" in opt.state[ps[1]]


def test_bad_arguments_name_the_argument():
    ps = list(_model().parameters())
    for kw, msg in [({"p0": 0.0}, "p0 must be > 0"), ({"process_noise": -1.0}, "process_noise must be >= 0"),
                    ({"obs_noise0": 0.0}, "obs_noise0 must be > 0"), ({"obs_noise_beta": 1.0}, "obs_noise_beta"),
                    ({"forgetting": 0.0}, "forgetting"), ({"gate_chi2": -1.0}, "gate_chi2"),
                    ({"var_floor": -1.0}, "var_floor"), ({"obs_noise_floor": 0.0}, "obs_noise_floor")]:
        with pytest.raises(ValueError, match=msg):
            KalmanOptimizer(ps, **kw)
    with pytest.raises(ValueError, match=r"p0 must be > 0 \(param group 1\)"):
        KalmanOptimizer([{"params": ps[:2]}, {"params": ps[2:], "p0": -1.0}])
    opt = KalmanOptimizer(ps)
    with pytest.raises(ValueError, match="exactly one of closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure must return the loss as a tensor"):
        opt.step(lambda: 1.0)


class _SyncRecorder(TorchDispatchMode):
    """Records ops that copy a device value to the host (.item(), bool(), float())."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_step_reads_nothing_back_to_the_host(backend):
    """No .item()/bool()/float() on tensors anywhere in the optimizer path.

    On CPU this is what is measurable: every device->host scalar read goes
    through aten::_local_scalar_dense, which the dispatch mode records (the
    compiled CPU kernel's own reads happen below the mode and are not device
    syncs).  The CUDA test below uses torch.cuda.set_sync_debug_mode.
    """
    require_backend("kalman", backend, "cpu")
    x, y = _data()
    model = _model()
    opt = KalmanOptimizer([{"params": list(model.parameters())[:2]},
                           {"params": list(model.parameters())[2:], "process_noise": 1e-3}],
                          gate_chi2=3.0, backend=backend)
    closure = _closure(model, opt, x, y)
    opt.step(closure)  # first step creates the state
    rec = _SyncRecorder()
    with rec:
        opt.step(closure)
        opt.step(closure)
    assert rec.seen == []
    # the recorder does see a host read when there is one
    with rec:
        float(opt.last_S)
    assert rec.seen


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_step_has_no_host_sync():
    require_backend("kalman", "cuda", "cuda")
    x, y = _data()
    x, y = x.cuda(), y.cuda()
    model = _model().cuda()
    opt = KalmanOptimizer(model.parameters(), p0=0.05, gate_chi2=3.0)
    closure = _closure(model, opt, x, y)
    opt.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(opt.last_S)
