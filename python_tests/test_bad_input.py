"""Bad input never corrupts state and never passes silently (issue 14).

The sweep over the three public ops -- ``hgcl_loss``, ``kalman_step_``,
``awp_perturb_`` / ``awp_restore_`` -- on every live backend (compiled CPU, the
PyTorch fallback, the CUDA kernels on the CPU emulator for Kalman and AWP, the
Triton kernels under ``TRITON_INTERPRET=1`` for HGCL).  Every case asserts
either a clear error naming the argument, or the documented skip (SPEC §1, §3,
§4 "Bad input"), AND that the caller's state is bit for bit what it was
(compared with clones, NaN bits included).

Then fp16 AMP: a small model trained under ``torch.autocast`` + ``GradScaler``
with ``KalmanOptimizer`` and with ``WeightPerturbation``; an inf gradient is
injected at one step; that step leaves parameters and optimizer state
unchanged, the scale drops, and training continues finitely.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import vlmkern
from vlmkern.ops.awp import perturb_skipped
from vlmkern.optim import KalmanOptimizer, WeightPerturbation
from conftest import CUDA_EMU, backend_or_emu, require_backend

NAN, INF = math.nan, math.inf
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (NaN payloads included) as integers."""
    t = t.detach().contiguous()
    return t.view(_INT[t.dtype]) if t.dtype in _INT else t


def snap(ts):
    return [t.detach().clone() for t in ts]


def assert_same_bits(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]"
        assert torch.equal(bits(g), bits(w)), f"{what}[{i}] changed"


# ===========================================================================
# kalman_step_
# ===========================================================================

KALMAN_BACKENDS = ["cpu", "torch", CUDA_EMU]


@pytest.fixture
def kbackend(request, monkeypatch):
    be = backend_or_emu(request.param, "kalman", monkeypatch)
    require_backend("kalman", be, "cpu")
    return be


def _kalman_state(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (17,), (4, 4)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    variances = [0.05 + 0.1 * torch.rand(s, generator=g) for s in shapes]
    return params, grads, variances


def _poke(t, value, idx=1):
    t.view(-1)[idx] = value
    return t


# (name, mutate(params, grads, variances, extra) -> None).  `extra` holds the
# 0-d tensors innovation / obs_noise / grad_scale / found_inf.
KALMAN_SKIPS = {
    "grad_nan": lambda p, g, v, x: _poke(g[0], NAN),
    "grad_inf": lambda p, g, v, x: _poke(g[2], INF),
    "grad_neg_inf": lambda p, g, v, x: _poke(g[1], -INF, 0),
    "grad_overflowing_square": lambda p, g, v, x: _poke(g[1], 3e19),
    "variance_negative": lambda p, g, v, x: _poke(v[1], -1e-3),
    "variance_nan": lambda p, g, v, x: _poke(v[0], NAN),
    "variance_inf": lambda p, g, v, x: _poke(v[2], INF),
    "innovation_nan": lambda p, g, v, x: x.__setitem__("innovation", torch.tensor(NAN)),
    "innovation_inf": lambda p, g, v, x: x.__setitem__("innovation", torch.tensor(INF)),
    "innovation_neg_inf": lambda p, g, v, x: x.__setitem__("innovation", torch.tensor(-INF)),
    "obs_noise_negative": lambda p, g, v, x: x.__setitem__("obs_noise", torch.tensor(-0.5)),
    "obs_noise_zero": lambda p, g, v, x: x.__setitem__("obs_noise", torch.tensor(0.0)),
    "obs_noise_nan": lambda p, g, v, x: x.__setitem__("obs_noise", torch.tensor(NAN)),
    "obs_noise_inf": lambda p, g, v, x: x.__setitem__("obs_noise", torch.tensor(INF)),
    "found_inf_set": lambda p, g, v, x: x.__setitem__("found_inf", torch.ones(1)),
    "found_inf_nan": lambda p, g, v, x: x.__setitem__("found_inf", torch.tensor([NAN])),
    "grad_scale_zero": lambda p, g, v, x: x.__setitem__("grad_scale", torch.zeros(1)),
    "grad_scale_negative": lambda p, g, v, x: x.__setitem__("grad_scale", torch.tensor([-8.0])),
    "grad_scale_nan": lambda p, g, v, x: x.__setitem__("grad_scale", torch.tensor([NAN])),
    "grad_scale_inf": lambda p, g, v, x: x.__setitem__("grad_scale", torch.tensor([INF])),
}


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", sorted(KALMAN_SKIPS))
@pytest.mark.parametrize("gate", [None, 4.0])
def test_kalman_bad_values_skip_the_step(kbackend, case, gate):
    p, g, v = _kalman_state()
    extra = {"innovation": torch.tensor(-0.7), "obs_noise": torch.tensor(0.3)}
    KALMAN_SKIPS[case](p, g, v, extra)
    p0, g0, v0 = snap(p), snap(g), snap(v)
    S = vlmkern.kalman_step_(p, g, v, extra.pop("innovation"), extra.pop("obs_noise"), process_noise=1e-4,
                             forgetting=0.99, gate_chi2=gate, backend=kbackend, **extra)
    assert S.shape == () and S.dtype == torch.float32
    assert torch.isnan(S), f"{case}: the step was taken (S = {float(S)})"
    assert_same_bits(p, p0, "params")
    assert_same_bits(v, v0, "variances")
    assert_same_bits(g, g0, "grads")


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kalman_nonfinite_low_precision_grads_skip(kbackend, dtype):
    p, g, v = _kalman_state(dtype)
    _poke(g[1], INF)
    p0, v0 = snap(p), snap(v)
    S = vlmkern.kalman_step_(p, g, v, torch.tensor(-1.0), torch.tensor(1.0), process_noise=0.0, backend=kbackend)
    assert torch.isnan(S)
    assert_same_bits(p, p0, "params")
    assert_same_bits(v, v0, "variances")


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
def test_kalman_empty_list_follows_the_rule(kbackend):
    S = vlmkern.kalman_step_([], [], [], torch.tensor(1.0), torch.tensor(-1.0), process_noise=0.0, backend=kbackend)
    assert torch.isnan(S)
    S = vlmkern.kalman_step_([], [], [], torch.tensor(1.0), torch.tensor(2.0), process_noise=0.0, backend=kbackend)
    assert float(S) == 2.0


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
@pytest.mark.parametrize("gate", [None, 0.5])
def test_kalman_grad_scale_equals_unscaled_step_and_found_inf_zero_is_a_step(kbackend, gate):
    """grad_scale = 2^k on scaled gradients: bit for bit the step on the unscaled
    ones; found_inf = 0 changes nothing."""
    p, g, v = _kalman_state()
    pa, va = snap(p), snap(v)
    Sa = vlmkern.kalman_step_(pa, g, va, torch.tensor(-0.7), torch.tensor(0.3), process_noise=1e-4, gate_chi2=gate,
                              backend=kbackend)
    pb, vb = snap(p), snap(v)
    scale = torch.tensor([2.0**13])
    Sb = vlmkern.kalman_step_(pb, [x * scale for x in g], vb, torch.tensor(-0.7), torch.tensor(0.3),
                              process_noise=1e-4, gate_chi2=gate, grad_scale=scale, found_inf=torch.zeros(1),
                              backend=kbackend)
    assert torch.isfinite(Sa) and torch.equal(bits(Sa), bits(Sb))
    assert_same_bits(pb, pa, "params")
    assert_same_bits(vb, va, "variances")
    assert not all(torch.equal(x, y) for x, y in zip(pa, p)), "the step did nothing"


KALMAN_ERRORS = [
    # (mutate(args dict), exception, message)
    (lambda a: a["grads"].__setitem__(1, torch.ones(3)), ValueError, r"grads\[1\] has shape"),
    (lambda a: a["variances"].pop(), ValueError, r"variances has 2 tensors but params has 3"),
    (lambda a: a["grads"].__setitem__(0, a["grads"][0].double()), TypeError, r"grads\[0\] must have the dtype"),
    (lambda a: a["variances"].__setitem__(2, a["variances"][2].half()), TypeError, r"variances\[2\] must be float32"),
    (lambda a: a["params"].__setitem__(0, a["params"][0].long()), TypeError, r"params\[0\] must be float32"),
    (lambda a: a.__setitem__("innovation", INF), ValueError, r"innovation must be finite"),
    (lambda a: a.__setitem__("innovation", NAN), ValueError, r"innovation must be finite"),
    (lambda a: a.__setitem__("obs_noise", -1.0), ValueError, r"obs_noise must be finite and > 0"),
    (lambda a: a.__setitem__("obs_noise", 0.0), ValueError, r"obs_noise must be finite and > 0"),
    (lambda a: a.__setitem__("obs_noise", NAN), ValueError, r"obs_noise must be finite and > 0"),
    (lambda a: a.__setitem__("innovation", torch.ones(2, 2)), ValueError, r"innovation must be a 0-d"),
    (lambda a: a.__setitem__("obs_noise", torch.ones(1, 2)), ValueError, r"obs_noise must be a 0-d"),
    (lambda a: a.__setitem__("process_noise", -1e-3), ValueError, r"process_noise must be finite and >= 0"),
    (lambda a: a.__setitem__("process_noise", NAN), ValueError, r"process_noise must be finite and >= 0"),
    (lambda a: a.__setitem__("var_floor", NAN), ValueError, r"var_floor must be finite and >= 0"),
    (lambda a: a.__setitem__("forgetting", 0.0), ValueError, r"forgetting must be in \(0, 1\]"),
    (lambda a: a.__setitem__("forgetting", NAN), ValueError, r"forgetting must be in \(0, 1\]"),
    (lambda a: a.__setitem__("gate_chi2", NAN), ValueError, r"gate_chi2 must be > 0"),
    (lambda a: a.__setitem__("found_inf", torch.ones(2)), ValueError, r"found_inf must have one element"),
    (lambda a: a.__setitem__("found_inf", torch.ones(1, dtype=torch.float64)), TypeError, r"found_inf must be float32"),
    (lambda a: a.__setitem__("grad_scale", 2.0), TypeError, r"grad_scale must be a one-element float32 tensor"),
    (lambda a: a.__setitem__("grad_scale", torch.ones(1, dtype=torch.float16)), TypeError, r"grad_scale must be float32"),
]


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", range(len(KALMAN_ERRORS)))
def test_kalman_bad_arguments_raise_naming_the_argument(kbackend, case):
    p, g, v = _kalman_state()
    p0, v0 = snap(p), snap(v)
    args = {"params": list(p), "grads": list(g), "variances": list(v), "innovation": torch.tensor(-0.5),
            "obs_noise": torch.tensor(0.2), "process_noise": 1e-4, "forgetting": 1.0, "var_floor": 1e-12,
            "gate_chi2": None}
    mutate, exc, msg = KALMAN_ERRORS[case]
    mutate(args)
    with pytest.raises(exc, match=msg):
        vlmkern.kalman_step_(args.pop("params"), args.pop("grads"), args.pop("variances"), args.pop("innovation"),
                             args.pop("obs_noise"), backend=kbackend, **args)
    assert_same_bits(p, p0, "params")
    assert_same_bits(v, v0, "variances")


def test_kalman_compiled_op_checks_its_new_arguments():
    """The C++ checks of grad_scale / found_inf (common/checks.h), past the wrapper."""
    require_backend("kalman", "cpu", "cpu")
    base = [[torch.zeros(4)], [torch.ones(4)], [torch.ones(4)], torch.tensor(1.0), torch.tensor(1.0), 0.0, 1.0, 0.0,
            None]
    with pytest.raises(RuntimeError, match=r"grad_scale must be a 0-d"):
        torch.ops.vlmkern.kalman_step_(*base, torch.ones(2), None)
    with pytest.raises(RuntimeError, match=r"found_inf must be float32"):
        torch.ops.vlmkern.kalman_step_(*base, None, torch.ones(1, dtype=torch.float64))
    # Value ranges: checked by the public op, not by the compiled one.
    with pytest.raises(ValueError, match=r"process_noise must be finite"):
        vlmkern.kalman_step_(*base[:5], process_noise=INF, backend="cpu")


# ===========================================================================
# awp_perturb_ / awp_restore_
# ===========================================================================

AWP_BACKENDS = ["cpu", "torch", CUDA_EMU]


@pytest.fixture
def abackend(request, monkeypatch):
    be = backend_or_emu(request.param, "awp", monkeypatch)
    require_backend("awp", be, "cpu")
    return be


def _awp_state(dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    g = torch.Generator().manual_seed(5)
    shapes = [(9, 7), (70001,), (3, 4, 5)]  # one tensor spans several CPU blocks / CUDA chunks
    params = [torch.randn(s, generator=g).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    grads = [torch.randn(s, generator=g).to(p.dtype) for s, p in zip(shapes, params)]
    backup = [torch.full_like(p, 7.0) for p in params]
    return params, grads, backup


AWP_SKIPS = {
    "grad_nan": lambda p, g: _poke(g[0], NAN),
    "grad_inf_fp32": lambda p, g: _poke(g[0], INF, 5),
    "grad_inf_bf16": lambda p, g: _poke(g[1], INF, 65537),  # deep inside the large tensor
    "grad_neg_inf_fp16": lambda p, g: _poke(g[2], -INF),
    "grad_nan_last_element": lambda p, g: _poke(g[1], NAN, 70000),
    "grad_overflowing_square": lambda p, g: _poke(g[0], 3e19),
    "weight_inf": lambda p, g: _poke(p[2], INF),
    "weight_nan": lambda p, g: _poke(p[1], NAN, 3),
}


@pytest.mark.parametrize("abackend", AWP_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", sorted(AWP_SKIPS))
def test_awp_nonfinite_values_skip_the_whole_perturbation(abackend, case):
    p, g, b = _awp_state()
    AWP_SKIPS[case](p, g)
    p0, g0 = snap(p), snap(g)
    norms = vlmkern.awp_perturb_(p, g, b, gamma=0.01, backend=abackend)
    assert bool(perturb_skipped(norms)), f"{case}: not reported as skipped (norms {norms})"
    assert_same_bits(p, p0, "params")  # nothing perturbed, not even the finite tensors
    assert_same_bits(b, p0, "backup")  # the backup holds the weights: the restore stays exact
    assert_same_bits(g, g0, "grads")
    vlmkern.awp_restore_(p, b, backend=abackend)
    assert_same_bits(p, p0, "params after restore")


@pytest.mark.parametrize("abackend", AWP_BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", ["adversarial", "random"])
def test_awp_found_inf_skips_and_zero_flag_is_a_normal_step(abackend, mode):
    p, g, b = _awp_state()
    p0 = snap(p)
    kw = dict(gamma=0.01, mode=mode, seed=11 if mode == "random" else None, backend=abackend)
    grads = g if mode == "adversarial" else None
    norms = vlmkern.awp_perturb_(p, grads, b, found_inf=torch.ones(1), **kw)
    assert torch.isfinite(norms).all() and bool(perturb_skipped(norms, torch.ones(1)))
    assert_same_bits(p, p0, "params")
    assert_same_bits(b, p0, "backup")
    # found_inf = 0: the same bits as no flag at all
    pa, ba = snap(p), [torch.empty_like(x) for x in p]
    pb, bb = snap(p), [torch.empty_like(x) for x in p]
    na = vlmkern.awp_perturb_(pa, grads, ba, **kw)
    nb = vlmkern.awp_perturb_(pb, grads, bb, found_inf=torch.zeros(1), **kw)
    assert not bool(perturb_skipped(nb, torch.zeros(1)))
    assert torch.equal(na, nb)
    assert_same_bits(pb, pa, "params")
    assert not all(torch.equal(x, y) for x, y in zip(pa, p0)), "nothing was perturbed"


AWP_ERRORS = [
    (lambda a: a["grads"].__setitem__(0, torch.ones(3)), ValueError, r"grads\[0\] has shape"),
    (lambda a: a["backup"].pop(), ValueError, r"backup has 2 tensors but params has 3"),
    (lambda a: a["grads"].__setitem__(1, a["grads"][1].float()), TypeError, r"grads\[1\] must have the dtype"),
    (lambda a: a["backup"].__setitem__(2, a["backup"][2].float()), TypeError, r"backup\[2\] must have the dtype"),
    (lambda a: a["params"].__setitem__(0, a["params"][0].int()), TypeError, r"params\[0\] must be float32"),
    (lambda a: a["backup"].__setitem__(0, a["params"][0]), ValueError, r"backup\[0\] is params\[0\] itself"),
    (lambda a: a.__setitem__("gamma", NAN), ValueError, r"gamma must be finite and >= 0"),
    (lambda a: a.__setitem__("gamma", -0.1), ValueError, r"gamma must be finite and >= 0"),
    (lambda a: a.__setitem__("eps", INF), ValueError, r"eps must be finite and >= 0"),
    (lambda a: a.__setitem__("sign", 0), ValueError, r"sign must be \+1 or -1"),
    (lambda a: a.__setitem__("mode", "sideways"), ValueError, r"mode must be 'adversarial' or 'random'"),
    (lambda a: a.update(mode="random", seed=None), ValueError, r"seed is required in random mode"),
    (lambda a: a.__setitem__("grads", None), ValueError, r"grads is required in adversarial mode"),
    (lambda a: a.__setitem__("found_inf", torch.ones(3)), ValueError, r"found_inf must have one element"),
    (lambda a: a.__setitem__("found_inf", torch.ones(1, dtype=torch.int32)), TypeError, r"found_inf must be float32"),
    (lambda a: a.__setitem__("found_inf", 1.0), TypeError, r"found_inf must be a one-element float32 tensor"),
]


@pytest.mark.parametrize("abackend", AWP_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", range(len(AWP_ERRORS)))
def test_awp_bad_arguments_raise_naming_the_argument(abackend, case):
    p, g, b = _awp_state()
    p0, b0 = snap(p), snap(b)
    args = {"params": list(p), "grads": list(g), "backup": list(b), "gamma": 0.01, "eps": 1e-12, "sign": 1,
            "mode": "adversarial", "seed": None}
    mutate, exc, msg = AWP_ERRORS[case]
    mutate(args)
    with pytest.raises(exc, match=msg):
        vlmkern.awp_perturb_(args.pop("params"), args.pop("grads"), args.pop("backup"), backend=abackend, **args)
    assert_same_bits(p, p0, "params")
    assert_same_bits(b, b0, "backup")


@pytest.mark.parametrize("abackend", AWP_BACKENDS, indirect=True)
def test_awp_restore_bad_arguments(abackend):
    p, _, b = _awp_state()
    p0 = snap(p)
    with pytest.raises(ValueError, match=r"backup\[1\] has shape"):
        vlmkern.awp_restore_(p, [b[0], b[1][:5], b[2]], backend=abackend)
    with pytest.raises(TypeError, match=r"backup\[0\] must have the dtype"):
        vlmkern.awp_restore_(p, [b[0].double(), b[1], b[2]], backend=abackend)
    with pytest.raises(ValueError, match=r"backup has 2 tensors but params has 3"):
        vlmkern.awp_restore_(p, b[:2], backend=abackend)
    assert_same_bits(p, p0, "params")


@pytest.mark.parametrize("abackend", AWP_BACKENDS, indirect=True)
@pytest.mark.parametrize("bad_at", [None, 3, 799])
def test_awp_skip_decision_spans_every_launch(abackend, bad_at):
    """800 tensors: two multi-tensor launches on CUDA (768 per launch).  A NaN
    in either launch's tensors skips all of them; none skips none."""
    g = torch.Generator().manual_seed(1)
    p = [torch.randn(3, generator=g) for _ in range(800)]
    d = [torch.randn(3, generator=g) for _ in range(800)]
    if bad_at is not None:
        d[bad_at][1] = NAN
    p0 = snap(p)
    b = [torch.empty_like(x) for x in p]
    norms = vlmkern.awp_perturb_(p, d, b, gamma=0.1, backend=abackend)
    assert bool(perturb_skipped(norms)) == (bad_at is not None)
    assert_same_bits(b, p0, "backup")
    unchanged = [torch.equal(bits(x), bits(y)) for x, y in zip(p, p0)]
    assert all(unchanged) if bad_at is not None else not any(unchanged)


@pytest.mark.parametrize("kbackend", KALMAN_BACKENDS, indirect=True)
@pytest.mark.parametrize("bad_at", [None, 3, 799])
def test_kalman_skip_decision_spans_every_launch(kbackend, bad_at):
    g = torch.Generator().manual_seed(2)
    p = [torch.randn(3, generator=g) for _ in range(800)]
    h = [torch.randn(3, generator=g) for _ in range(800)]
    v = [torch.full((3,), 0.1) for _ in range(800)]
    if bad_at is not None:
        h[bad_at][2] = INF
    p0, v0 = snap(p), snap(v)
    S = vlmkern.kalman_step_(p, h, v, torch.tensor(-1.0), torch.tensor(1.0), process_noise=0.0, backend=kbackend)
    assert bool(torch.isnan(S)) == (bad_at is not None)
    unchanged = [torch.equal(bits(x), bits(y)) for x, y in zip(p, p0)]
    if bad_at is not None:
        assert all(unchanged)
        assert_same_bits(v, v0, "variances")
    else:
        assert not any(unchanged)


def test_awp_compiled_op_checks_found_inf():
    require_backend("awp", "cpu", "cpu")
    p, g, b = _awp_state()
    with pytest.raises(RuntimeError, match=r"found_inf must be float32"):
        torch.ops.vlmkern.awp_perturb_(p, g, b, 0.01, 1e-12, 1.0, 0, 0, torch.ones(1, dtype=torch.float64))


# ===========================================================================
# hgcl_loss
# ===========================================================================

HGCL_BACKENDS = ["cpu", "torch", "triton"]


def _hgcl_inputs(b=6, d=8, n=12, dtype=torch.float32, dist=False):
    g = torch.Generator().manual_seed(9)
    img = nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    txt = nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype)
    u1 = torch.full((n,), -INF)
    u2 = torch.full((n,), -INF)
    u1[:4] = torch.randn(4, generator=g)  # some entries visited before
    u2[2:6] = torch.randn(4, generator=g)
    index = torch.tensor([0, 3, 5, 7, 8, 11][:b])
    extra = {}
    if dist:  # this rank's rows are 4..4+b of 2b + 4 global columns
        others = nn.functional.normalize(torch.randn(b + 4, d, generator=g), dim=1).to(dtype)
        others_t = nn.functional.normalize(torch.randn(b + 4, d, generator=g), dim=1).to(dtype)
        extra = {"all_img": torch.cat([others[:4], img, others[4:]]),
                 "all_txt": torch.cat([others_t[:4], txt, others_t[4:]]), "offset": 4}
    return img, txt, index, u1, u2, extra


def _poke_row(t, row, value):
    t[row, 1] = value


HGCL_SKIPS = {
    "img_nan_row": (False, lambda img, txt, u1, u2, x: _poke_row(img, 2, NAN)),
    "img_inf_row": (False, lambda img, txt, u1, u2, x: _poke_row(img, 0, INF)),
    "txt_nan_row": (False, lambda img, txt, u1, u2, x: _poke_row(txt, 5, NAN)),
    "txt_neg_inf_row": (False, lambda img, txt, u1, u2, x: _poke_row(txt, 1, -INF)),
    "all_img_nan_column": (True, lambda img, txt, u1, u2, x: _poke_row(x["all_img"], 1, NAN)),
    "all_txt_inf_column": (True, lambda img, txt, u1, u2, x: _poke_row(x["all_txt"], 13, INF)),
    "state_nan": (False, lambda img, txt, u1, u2, x: u1.__setitem__(3, NAN)),
    "state_pos_inf": (False, lambda img, txt, u1, u2, x: u2.__setitem__(5, INF)),
}


@pytest.mark.parametrize("backend", HGCL_BACKENDS)
@pytest.mark.parametrize("case", sorted(HGCL_SKIPS))
@pytest.mark.parametrize("margin", [None, 0.1])
def test_hgcl_nonfinite_input_keeps_state_and_poisons_loss_and_every_gradient(backend, case, margin):
    require_backend("hgcl", backend, "cpu")
    dist, mutate = HGCL_SKIPS[case]
    img, txt, index, u1, u2, extra = _hgcl_inputs(dist=dist)
    mutate(img, txt, u1, u2, extra)
    u10, u20 = u1.clone(), u2.clone()
    leaves = {"img": img.requires_grad_(), "txt": txt.requires_grad_()}
    for k in ("all_img", "all_txt"):
        if k in extra:
            leaves[k] = extra[k].requires_grad_()
    loss = vlmkern.hgcl_loss(img, txt, index, u1, u2, tau=0.05, gamma=0.9, margin=margin, backend=backend, **extra)
    assert torch.isnan(loss), f"{case}: finite loss {float(loss)}"
    assert_same_bits([u1, u2], [u10, u20], "log_u")
    loss.backward()
    for name, t in leaves.items():
        assert t.grad is not None and torch.isnan(t.grad).all(), f"{case}: {name}.grad has finite entries"


@pytest.mark.parametrize("backend", HGCL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hgcl_nonfinite_low_precision_features(backend, dtype):
    require_backend("hgcl", backend, "cpu")
    img, txt, index, u1, u2, _ = _hgcl_inputs(dtype=dtype)
    img[3, 0] = INF
    u10, u20 = u1.clone(), u2.clone()
    img.requires_grad_()
    loss = vlmkern.hgcl_loss(img, txt, index, u1, u2, tau=0.05, gamma=0.9, backend=backend)
    assert torch.isnan(loss)
    assert_same_bits([u1, u2], [u10, u20], "log_u")
    loss.backward()
    assert torch.isnan(img.grad).all()


@pytest.mark.parametrize("backend", HGCL_BACKENDS)
def test_hgcl_finite_input_unchanged_by_the_guard(backend):
    """The guard costs nothing on good input: a finite loss, the state updated."""
    require_backend("hgcl", backend, "cpu")
    img, txt, index, u1, u2, _ = _hgcl_inputs()
    u10 = u1.clone()
    img.requires_grad_()
    loss = vlmkern.hgcl_loss(img, txt, index, u1, u2, tau=0.05, gamma=0.9, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all()
    assert not torch.equal(u1, u10)


HGCL_ERRORS = [
    # (mutate(kwargs), exception, message)
    (lambda a: a.update(img=a["img"][:1], txt=a["txt"][:1], index=a["index"][:1]), ValueError,
     r"img has 1 column\(s\); the loss needs at least 2"),
    (lambda a: a.update(img=a["img"][:1], txt=a["txt"][:1], index=a["index"][:1], all_img=a["img"][:1],
                        all_txt=a["txt"][:1], offset=0), ValueError, r"all_img has 1 column\(s\)"),
    (lambda a: a.update(img=a["img"][:0], txt=a["txt"][:0], index=a["index"][:0]), ValueError, r"empty batch"),
    (lambda a: a.update(index=torch.tensor([0, 3, 5, 7, 8, 12])), IndexError, r"index values must be in \[0, num_samples\)"),
    (lambda a: a.update(index=torch.tensor([0, 3, 5, 7, 8, -1])), IndexError, r"index values must be in"),
    (lambda a: a.update(txt_index=torch.tensor([0, 3, 5, 7, 8, 12])), IndexError,
     r"txt_index values must be in \[0, len\(log_u_txt\)\)"),
    (lambda a: a.update(txt_index=a["index"][:4]), ValueError, r"txt_index must be 1-D of length b = 6"),
    (lambda a: a.update(index=a["index"].float()), TypeError, r"index must be int64"),
    (lambda a: a.update(index=a["index"][:4]), ValueError, r"index must be 1-D of length b = 6"),
    (lambda a: a.update(img=a["img"][0]), ValueError, r"img must be 2-D"),
    (lambda a: a.update(txt=a["txt"][:, :4]), ValueError, r"txt has shape"),
    (lambda a: a.update(txt=a["txt"].double()), TypeError, r"txt has dtype"),
    (lambda a: a.update(img=a["img"].double(), txt=a["txt"].double()), TypeError, r"img must be float32"),
    (lambda a: a.update(log_u_img=a["log_u_img"].double()), TypeError, r"log_u_img must be float32"),
    (lambda a: a.update(log_u_txt=a["log_u_txt"][:5]), ValueError, r"log_u_txt has shape"),
    (lambda a: a.update(tau=0.0), ValueError, r"tau must be a finite number > 0"),
    (lambda a: a.update(tau=NAN), ValueError, r"tau must be a finite number > 0"),
    (lambda a: a.update(tau=INF), ValueError, r"tau must be a finite number > 0"),
    (lambda a: a.update(gamma=0.0), ValueError, r"gamma must be in \(0, 1\]"),
    (lambda a: a.update(gamma=NAN), ValueError, r"gamma must be in \(0, 1\]"),
    (lambda a: a.update(margin=-0.1), ValueError, r"margin must be None"),
    (lambda a: a.update(margin=NAN), ValueError, r"margin must be None"),
    (lambda a: a.update(eps=0.0), ValueError, r"eps must be > 0"),
    (lambda a: a.update(all_img=a["img"]), ValueError, r"give both all_img and all_txt or neither"),
    (lambda a: a.update(all_img=a["img"], all_txt=a["txt"], offset=1), ValueError, r"offset must be in \[0, B - b\]"),
    (lambda a: a.update(offset=2), ValueError, r"offset must be 0 when all_img/all_txt are not given"),
    (lambda a: a.update(check_finite=True, img=a["img"].index_fill(0, torch.tensor([1]), NAN)), ValueError,
     r"img contains NaN or inf"),
]


@pytest.mark.parametrize("backend", HGCL_BACKENDS)
@pytest.mark.parametrize("case", range(len(HGCL_ERRORS)))
def test_hgcl_bad_arguments_raise_naming_the_argument(backend, case):
    require_backend("hgcl", backend, "cpu")
    img, txt, index, u1, u2, _ = _hgcl_inputs()
    u10, u20 = u1.clone(), u2.clone()
    args = {"img": img, "txt": txt, "index": index, "log_u_img": u1, "log_u_txt": u2, "tau": 0.05, "gamma": 0.9}
    mutate, exc, msg = HGCL_ERRORS[case]
    mutate(args)
    with pytest.raises(exc, match=msg):
        vlmkern.hgcl_loss(args.pop("img"), args.pop("txt"), args.pop("index"), args.pop("log_u_img"),
                          args.pop("log_u_txt"), backend=backend, **args)
    assert_same_bits([u1, u2], [u10, u20], "log_u")


def test_global_contrastive_loss_module_keeps_its_buffers_on_nan_features():
    require_backend("hgcl", "cpu", "cpu")
    crit = vlmkern.GlobalContrastiveLoss(12, tau=0.05, gamma=0.9)
    img, txt, index, _, _, _ = _hgcl_inputs()
    crit(img, txt, index)  # one good step: the buffers hold visited entries
    before = copy.deepcopy(crit.state_dict())
    img = img.clone()
    img[4, 2] = NAN
    loss = crit(img, txt, index)
    assert torch.isnan(loss)
    assert all(torch.equal(bits(v), bits(crit.state_dict()[k])) for k, v in before.items())


# ===========================================================================
# fp16 AMP: GradScaler with KalmanOptimizer and WeightPerturbation
# ===========================================================================


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _amp_dtype():
    """fp16 autocast where this CPU build supports it, else bfloat16."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            y = nn.Linear(2, 2)(torch.randn(1, 2))
        if y.dtype == torch.float16:
            return torch.float16
    except RuntimeError:
        pass
    return torch.bfloat16


def _kalman_state_of(opt, model):
    return [opt.state[p]["variance"].clone() for p in model.parameters()], opt.obs_noise.clone()


@pytest.mark.parametrize("backend", ["cpu", "torch", CUDA_EMU])
def test_amp_kalman_optimizer_skips_an_overflowing_step(backend, monkeypatch):
    be = backend_or_emu(backend, "kalman", monkeypatch)
    require_backend("kalman", be, "cpu")
    amp = _amp_dtype()
    model = _tiny_model()
    opt = KalmanOptimizer(model.parameters(), p0=0.05, backend=be)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    inject_at = 3
    losses = []
    for step in range(8):
        x, y = _batch(step)
        with torch.autocast("cpu", dtype=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == inject_at:
            next(model.parameters()).grad[0, 0] = INF  # an overflowing gradient
            params0 = snap(model.parameters())
            vars0, R0 = _kalman_state_of(opt, model)
            scale0 = scaler.get_scale()
        scaler.step(opt, loss=loss)
        scaler.update()
        if step == inject_at:
            assert_same_bits(list(model.parameters()), params0, "params")
            vars1, R1 = _kalman_state_of(opt, model)
            assert_same_bits(vars1, vars0, "variances")
            assert torch.equal(bits(R1), bits(R0)), "R changed on a skipped step"
            assert not bool(opt.last_step_taken) and torch.isnan(opt.last_S)
            assert scaler.get_scale() < scale0
        else:
            assert bool(opt.last_step_taken)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], f"no progress: {losses}"


def test_amp_kalman_scaled_steps_match_unscaled_steps():
    """Without overflow, GradScaler + KalmanOptimizer (grad_scale handed to the
    fused op, gradients never unscaled) takes the same steps as the optimizer on
    unscaled gradients: the same bits for a power-of-two scale."""
    require_backend("kalman", "cpu", "cpu")
    a, b = _tiny_model(), _tiny_model()
    oa = KalmanOptimizer(a.parameters(), p0=0.05)
    ob = KalmanOptimizer(b.parameters(), p0=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(4):
        x, y = _batch(step)
        la = nn.functional.cross_entropy(a(x), y)
        oa.zero_grad()
        scaler.scale(la).backward()
        scaler.step(oa, loss=la)
        scaler.update()
        lb = nn.functional.cross_entropy(b(x), y)
        ob.zero_grad()
        lb.backward()
        ob.step(loss=lb)
    assert_same_bits(list(a.parameters()), list(b.parameters()), "params")
    assert torch.equal(oa.obs_noise, ob.obs_noise)


def test_kalman_optimizer_nan_loss_skips_without_scaler():
    require_backend("kalman", "cpu", "cpu")
    model = _tiny_model()
    opt = KalmanOptimizer(model.parameters(), p0=0.05)
    x, y = _batch(0)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step(loss=loss)  # creates the state
    params0 = snap(model.parameters())
    vars0, R0 = _kalman_state_of(opt, model)
    loss = nn.functional.cross_entropy(model(x), y) * NAN
    opt.zero_grad()
    loss.backward()
    opt.step(loss=loss)
    assert not bool(opt.last_step_taken)
    assert_same_bits(list(model.parameters()), params0, "params")
    vars1, R1 = _kalman_state_of(opt, model)
    assert_same_bits(vars1 + [R1], vars0 + [R0], "kalman state")


def test_kalman_optimizer_mixed_process_noise_groups_skip_exactly():
    require_backend("kalman", "cpu", "cpu")
    model = _tiny_model()
    ps = list(model.parameters())
    opt = KalmanOptimizer([{"params": ps[:2], "process_noise": 1e-3}, {"params": ps[2:], "process_noise": 0.0}],
                          p0=0.05)
    x, y = _batch(0)
    for poison in (False, True):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if poison:
            ps[3].grad[0] = NAN
            params0 = snap(ps)
            vars0, R0 = _kalman_state_of(opt, model)
        opt.step(loss=loss)
    assert not bool(opt.last_step_taken)
    assert_same_bits(ps, params0, "params")
    vars1, R1 = _kalman_state_of(opt, model)
    assert_same_bits(vars1 + [R1], vars0 + [R0], "kalman state")


def _sgd_state(opt):
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
            if opt.state.get(p, {}).get("momentum_buffer") is not None]


@pytest.mark.parametrize("backend", ["cpu", "torch", CUDA_EMU])
@pytest.mark.parametrize("which", ["first", "second"])
def test_amp_weight_perturbation_skips_an_overflowing_step(backend, which, monkeypatch):
    """inf in the gradient of the first backward (the perturbation direction) or
    of the second (the update): the step is skipped, parameters, momentum
    buffers and backups as they were, the scale lowered, training goes on."""
    be = backend_or_emu(backend, "awp", monkeypatch)
    require_backend("awp", be, "cpu")
    amp = _amp_dtype()
    model = _tiny_model(1)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    wp = WeightPerturbation(model, base, gamma=0.02, scaler=scaler, backend=be)
    inject_at = 3
    losses = []
    for step in range(8):
        x, y = _batch(step)
        calls = []

        def closure():
            with torch.autocast("cpu", dtype=amp):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            calls.append(1)
            if step == inject_at and len(calls) == (1 if which == "first" else 2):
                model[0].weight.grad[1, 1] = INF
            return loss

        if step == inject_at:
            params0 = snap(model.parameters())
            mom0 = _sgd_state(base)
            scale0 = scaler.get_scale()
        loss = wp.step(closure)
        assert len(calls) == 2
        if step == inject_at:
            assert_same_bits(list(model.parameters()), params0, "params")
            assert_same_bits(_sgd_state(base), mom0, "momentum buffers")
            assert scaler.get_scale() < scale0
            assert bool(wp.last_perturb_skipped) == (which == "first")
            # the backups hold the weights (exact restore)
            assert_same_bits([wp._backup[id(p)] for p in wp.perturbed_params], [p.detach() for p in
                                                                               wp.perturbed_params], "backup")
        else:
            assert not bool(wp.last_perturb_skipped)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], f"no progress: {losses}"
