"""Tests of the fused diagonal Kalman step ``vlmkern.kalman_step_`` (SPEC §3).

Every live backend (compiled CPU, torch fallback, compiled CUDA when a GPU is
present) is compared with the float64 oracle ``vlmkern.reference.kalman_step``.
Parameters in bf16/fp16 are compared with a reference whose parameters are
rounded to the dtype after every step (the kernel stores them in that dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

import vlmkern
from vlmkern import reference as ref

from conftest import CUDA_EMU, TOL, backend_or_emu, rel_err, require_backend

HAS_CUDA = torch.cuda.is_available()

# (backend, device) pairs; CUDA ones skip by capability.  (CUDA_EMU, "cpu") runs
# the CUDA kernels on the CPU emulator (the `backend` fixture below).
BACKEND_DEVICES = [
    ("cpu", "cpu"),
    ("torch", "cpu"),
    (CUDA_EMU, "cpu"),
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
    pytest.param("torch", "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]

# Mixed shapes: an empty tensor, scalars, odd sizes, one tensor larger than a
# CUDA chunk (16384 elements) so that chunking and tails are exercised.
SHAPES = [(33, 17), (0,), (128,), (7, 1, 3), (1,), (129, 131), (5, 0, 2), (1025,)]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of a test's (backend, device) parameter (CUDA_EMU: the CUDA
    kernels on the CPU emulator, called as "cpu")."""
    return backend_or_emu(request.param, "kalman", monkeypatch)


def _make(shapes, dtype, device, p_lo=0.05, p_hi=0.15, gen=None):
    params = [(0.1 * torch.randn(s, generator=gen)).to(dtype).to(device) for s in shapes]
    variances = [(p_lo + (p_hi - p_lo) * torch.rand(s, generator=gen)).to(device) for s in shapes]
    return params, variances


def _grads(shapes, dtype, device, gen=None):
    # Different scales per tensor so that some variances shrink visibly.
    scales = [0.3, 1.0, 3.0, 10.0]
    return [(scales[i % 4] * torch.randn(s, generator=gen)).to(dtype).to(device) for i, s in enumerate(shapes)]


def _round(ts, dtype):
    return [t.to(dtype).double() for t in ts]


def _check_close(got, want, dtype, what, step):
    rtol, _ = TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        if w.numel() == 0:
            assert g.numel() == 0
            continue
        err = rel_err(g, w)
        assert err <= rtol, f"step {step}: {what}[{i}] rel err {err:.3g} > {rtol:g}"


# ---------------------------------------------------------------------------
# 20 consecutive steps against the float64 reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
@pytest.mark.parametrize("forgetting,q,gate", [(1.0, 0.0, None), (0.95, 1e-3, 2.0)], ids=["plain", "forget_q_gate"])
def test_twenty_steps_match_reference(backend, device, dtype, forgetting, q, gate):
    require_backend("kalman", backend, device)
    gen = torch.Generator().manual_seed(7)
    params, variances = _make(SHAPES, dtype, device, gen=gen)
    ref_params = [p.double().cpu() for p in params]
    ref_vars = [v.double().cpu() for v in variances]
    for step in range(20):
        grads = _grads(SHAPES, dtype, device, gen=gen)
        e = float(100.0 * torch.randn((), generator=gen))
        R = float(0.5 + torch.rand((), generator=gen))
        S = vlmkern.kalman_step_(
            params, grads, variances,
            torch.tensor(e, device=device), torch.tensor(R, device=device),
            process_noise=q, forgetting=forgetting, var_floor=1e-8, gate_chi2=gate, backend=backend,
        )
        want = ref.kalman_step(
            ref_params, [g.cpu() for g in grads], ref_vars, e, R,
            process_noise=q, forgetting=forgetting, var_floor=1e-8, gate_chi2=gate,
        )
        assert S.shape == () and S.dtype == torch.float32 and S.device.type == device
        assert abs(S.item() - want.S.item()) <= 2e-6 * abs(want.S.item()), (step, S.item(), want.S.item())
        ref_params = want.params if dtype == torch.float32 else _round(want.params, dtype)
        ref_vars = want.variances
        _check_close(params, ref_params, dtype, "params", step)
        _check_close(variances, ref_vars, torch.float32, "variances", step)
        for p, w in zip(params, SHAPES):
            assert p.dtype == dtype and tuple(p.shape) == w
    # the steps moved the parameters and shrank/grew the variances (no assert-nothing test)
    assert any((v.min() < 0.05 * 0.999).item() or (v.max() > 0.15 * 1.001).item() for v in variances if v.numel())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_mixed_dtypes_in_one_list(backend, device):
    """fp32, bf16 and fp16 parameters in one list (one table per pass on CUDA):
    S couples them all; each tensor is stored in its own dtype."""
    require_backend("kalman", backend, device)
    gen = torch.Generator().manual_seed(11)
    dts = [torch.float32, torch.bfloat16, torch.float16]
    shapes = [(33, 17), (20000,), (5,), (129, 131), (0,), (1025,)]
    params, variances = [], []
    for i, s in enumerate(shapes):
        p, v = _make([s], dts[i % 3], device, gen=gen)
        params += p
        variances += v
    ref_params = [p.double().cpu() for p in params]
    ref_vars = [v.double().cpu() for v in variances]
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype).to(device) for p in params]
        e, R = float(30.0 * torch.randn((), generator=gen)), 0.7
        S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(e, device=device), torch.tensor(R, device=device),
                                 process_noise=1e-3, var_floor=1e-8, backend=backend)
        want = ref.kalman_step(ref_params, [g.cpu() for g in grads], ref_vars, e, R, process_noise=1e-3, var_floor=1e-8)
        assert abs(S.item() - want.S.item()) <= 2e-6 * abs(want.S.item()), (step, S.item(), want.S.item())
        ref_params = [w.to(p.dtype).double() for w, p in zip(want.params, params)]
        ref_vars = want.variances
        for i, (p, w) in enumerate(zip(params, ref_params)):
            assert p.dtype == dts[i % 3]
            _check_close([p], [w], p.dtype, f"params[{i}]", step)
        _check_close(variances, ref_vars, torch.float32, "variances", step)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_empty_tensors_and_empty_list(backend, device):
    require_backend("kalman", backend, device)
    e, R = torch.tensor(2.0, device=device), torch.tensor(0.75, device=device)
    # all tensors empty: S = R, nothing else happens
    params = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    grads = [torch.empty_like(p) for p in params]
    variances = [torch.empty_like(p) for p in params]
    S = vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=0.1, backend=backend)
    assert S.item() == pytest.approx(0.75)
    # empty list
    S = vlmkern.kalman_step_([], [], [], e, R, process_noise=0.1, backend=backend)
    assert S.item() == pytest.approx(0.75) and S.device.type == device


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_non_contiguous_inputs(backend, device, dtype):
    require_backend("kalman", backend, device)
    gen = torch.Generator().manual_seed(3)
    base_w = (0.1 * torch.randn(40, 30, generator=gen)).to(dtype).to(device)
    base_v = (0.1 + 0.05 * torch.rand(40, 30, generator=gen)).to(device)
    base_g = torch.randn(30, 40, generator=gen).to(dtype).to(device)
    flat_w = (0.1 * torch.randn(1001, generator=gen)).to(dtype).to(device)
    flat_v = (0.1 + 0.05 * torch.rand(1001, generator=gen)).to(device)
    flat_g = torch.randn(1001, generator=gen).to(dtype).to(device)
    w_keep, v_keep, fw_keep = base_w.clone(), base_v.clone(), flat_w.clone()
    # disjoint views of one storage: even columns (strided), columns 1 and 3 read
    # through the transpose, and a contiguous view at an odd (unaligned) offset
    params = [base_w[:, ::2], base_w.t()[1:5:2], flat_w[1:]]
    variances = [base_v[:, ::2], base_v.t()[1:5:2], flat_v[1:]]
    grads = [base_g.t()[:, ::2], base_g[1:5:2], flat_g[1:]]
    assert not params[0].is_contiguous() and not params[1].is_contiguous() and not grads[0].is_contiguous()
    assert params[2].storage_offset() == 1
    want = ref.kalman_step([p.double().cpu() for p in params], [g.cpu() for g in grads],
                           [v.double().cpu() for v in variances], 50.0, 0.5, process_noise=1e-3)
    S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(50.0, device=device),
                             torch.tensor(0.5, device=device), process_noise=1e-3, backend=backend)
    assert S.item() == pytest.approx(want.S.item(), rel=2e-6)
    rp = want.params if dtype == torch.float32 else _round(want.params, dtype)
    _check_close(params, rp, dtype, "params", 0)
    _check_close(variances, want.variances, torch.float32, "variances", 0)
    # the views were updated in place (read back through the bases) ...
    _check_close([base_w[:, ::2], base_w[:, 1:5:2].t(), flat_w[1:]], rp, dtype, "base params", 0)
    _check_close([base_v[:, ::2], base_v[:, 1:5:2].t(), flat_v[1:]], want.variances, torch.float32, "base vars", 0)
    assert not torch.equal(base_w[:, ::2], w_keep[:, ::2])
    # ... and nothing outside them was touched
    untouched = [c for c in range(30) if c % 2 == 1 and c not in (1, 3)]
    assert torch.equal(base_w[:, untouched], w_keep[:, untouched])
    assert torch.equal(base_v[:, untouched], v_keep[:, untouched])
    assert torch.equal(flat_w[:1], fw_keep[:1])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_thousand_tiny_tensors(backend, device):
    require_backend("kalman", backend, device)
    gen = torch.Generator().manual_seed(11)
    shapes = [(int(torch.randint(1, 6, (), generator=gen)),) for _ in range(1000)]
    shapes[17] = (0,)
    shapes[500] = (0,)
    params, variances = _make(shapes, torch.float32, device, gen=gen)
    ref_p = [p.double().cpu() for p in params]
    ref_v = [v.double().cpu() for v in variances]
    for step in range(3):
        grads = _grads(shapes, torch.float32, device, gen=gen)
        S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(20.0, device=device),
                                 torch.tensor(1.0, device=device), process_noise=1e-4, backend=backend)
        want = ref.kalman_step(ref_p, [g.cpu() for g in grads], ref_v, 20.0, 1.0, process_noise=1e-4)
        ref_p, ref_v = want.params, want.variances
        assert S.item() == pytest.approx(want.S.item(), rel=2e-6)
        cat = lambda ts: torch.cat([t.reshape(-1).double().cpu() for t in ts])  # noqa: E731
        assert rel_err(cat(params), cat(ref_p)) < 2e-6
        assert rel_err(cat(variances), cat(ref_v)) < 2e-6


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_variance_floor_and_positivity(backend, device):
    require_backend("kalman", backend, device)
    # One element with a huge Jacobian dominates S: its posterior variance
    # p_hat R' / (S) is far below the floor and must be clamped to it exactly.
    w = torch.zeros(4, device=device)
    h = torch.tensor([1e3, 1e-2, 0.0, -1e-2], device=device)
    v = torch.full((4,), 0.5, device=device)
    floor = 1e-4
    vlmkern.kalman_step_([w], [h], [v], torch.tensor(1.0, device=device), torch.tensor(1e-3, device=device),
                         process_noise=0.0, var_floor=floor, backend=backend)
    floor32 = torch.tensor(floor, dtype=torch.float32).item()
    assert v[0].item() == floor32  # exactly the (float32) floor
    assert (v >= floor32).all()
    assert v[2].item() == 0.5  # h = 0: no information, no change (q = 0)
    # floor 0: variances stay >= 0 even when rounding would make them negative
    v = torch.full((4,), 0.5, device=device)
    for _ in range(5):
        vlmkern.kalman_step_([w], [h], [v], torch.tensor(1.0, device=device), torch.tensor(1e-30, device=device),
                             process_noise=0.0, var_floor=0.0, backend=backend)
        assert (v >= 0).all() and torch.isfinite(v).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
def test_forgetting_inflates_variances(backend, device):
    require_backend("kalman", backend, device)
    w = torch.zeros(10, device=device)
    v = torch.full((10,), 0.2, device=device)
    g = torch.zeros(10, device=device)  # no information: p = (p + q) / lambda
    vlmkern.kalman_step_([w], [g], [v], torch.tensor(1.0, device=device), torch.tensor(1.0, device=device),
                         process_noise=0.01, forgetting=0.8, backend=backend)
    torch.testing.assert_close(v, torch.full((10,), 0.21 / 0.8, device=device), rtol=1e-6, atol=0)
    assert torch.equal(w, torch.zeros(10, device=device))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
@pytest.mark.parametrize("fires", [True, False], ids=["gate_fires", "gate_quiet"])
def test_gate(backend, device, fires):
    require_backend("kalman", backend, device)
    gen = torch.Generator().manual_seed(5)
    shapes = [(50,), (3, 4)]
    params, variances = _make(shapes, torch.float32, device, gen=gen)
    grads = _grads(shapes, torch.float32, device, gen=gen)
    R = 0.5
    S_val = ref.kalman_step(params, grads, variances, 0.0, R, process_noise=0.0).S.item()
    chi2 = 4.0
    # e^2 / S = 9 chi2 (fires: the used innovation is e / 3) or 0.81 chi2 (quiet)
    e = (3.0 if fires else 0.9) * math.sqrt(chi2 * S_val)
    p_gated = [p.clone() for p in params]
    v_gated = [v.clone() for v in variances]
    S = vlmkern.kalman_step_(p_gated, grads, v_gated, torch.tensor(e, device=device), torch.tensor(R, device=device),
                             process_noise=0.0, gate_chi2=chi2, backend=backend)
    p_free = [p.clone() for p in params]
    v_free = [v.clone() for v in variances]
    vlmkern.kalman_step_(p_free, grads, v_free, torch.tensor(e, device=device), torch.tensor(R, device=device),
                         process_noise=0.0, backend=backend)
    want = ref.kalman_step(params, grads, variances, e, R, process_noise=0.0, gate_chi2=chi2)
    assert (e * e / S.item() > chi2) == fires
    _check_close(p_gated, want.params, torch.float32, "params", 0)
    for a, b in zip(v_gated, v_free):  # the variance update does not depend on e
        assert torch.equal(a, b)
    d_gated = torch.cat([(a - p).reshape(-1) for a, p in zip(p_gated, params)])
    d_free = torch.cat([(a - p).reshape(-1) for a, p in zip(p_free, params)])
    if fires:
        # the step is the free step scaled by sqrt(chi2 S) / |e| = 1/3
        torch.testing.assert_close(d_gated, d_free / 3.0, rtol=1e-4, atol=1e-9)
    else:
        assert torch.equal(d_gated, d_free)


# ---------------------------------------------------------------------------
# argument errors name the argument
# ---------------------------------------------------------------------------

BAD = [
    (lambda p, g, v, d: ([p[0], p[1]], [g[0]], v), {}, r"grads has 1 tensors but params has 2"),
    (lambda p, g, v, d: (p, [g[0], torch.zeros(3, device=d)], v), {}, r"grads\[1\] has shape"),
    (lambda p, g, v, d: (p, g, [v[0], v[1].bfloat16()]), {}, r"variances\[1\] must be float32"),
    (lambda p, g, v, d: ([p[0], p[1].int()], [g[0], g[1].int()], v), {}, r"params\[1\] must be float32, bfloat16 or float16"),
    (lambda p, g, v, d: (p, [g[0], g[1].half()], v), {}, r"grads\[1\] must have the dtype of params\[1\]"),
    (lambda p, g, v, d: (p, g, v), {"forgetting": 0.0}, r"forgetting must be in \(0, 1\]"),
    (lambda p, g, v, d: (p, g, v), {"process_noise": -1.0}, r"process_noise must be finite and >= 0"),
    (lambda p, g, v, d: (p, g, v), {"var_floor": -1.0}, r"var_floor must be finite and >= 0"),
    (lambda p, g, v, d: (p, g, v), {"gate_chi2": 0.0}, r"gate_chi2 must be > 0"),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_name_the_argument(backend, device, case):
    require_backend("kalman", backend, device)
    p = [torch.zeros(4, device=device), torch.zeros(2, 2, device=device)]
    g = [torch.ones_like(t) for t in p]
    v = [torch.ones_like(t) for t in p]
    make, kw, msg = BAD[case]
    pp, gg, vv = make(p, g, v, device)
    kwargs = {"process_noise": 0.0, **kw}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        vlmkern.kalman_step_(pp, gg, vv, torch.tensor(1.0, device=device), torch.tensor(1.0, device=device),
                             backend=backend, **kwargs)


def test_bad_scalars_name_the_argument():
    p = [torch.zeros(4)]
    with pytest.raises(ValueError, match=r"innovation must be a 0-d tensor"):
        vlmkern.kalman_step_(p, p, [torch.ones(4)], torch.ones(2, 2), 1.0, process_noise=0.0)
    # a 1-D innovation is M observations: the grads must then carry the leading M
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape \[M, \*params\[0\]\.shape\]"):
        vlmkern.kalman_step_(p, p, [torch.ones(4)], torch.ones(2), 1.0, process_noise=0.0)
    with pytest.raises(TypeError, match=r"params must be a list of tensors"):
        vlmkern.kalman_step_(p[0], p, [torch.ones(4)], 1.0, 1.0, process_noise=0.0)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda a: a.__setitem__(2, [a[2][0].half()]), r"variances\[0\] must be float32"),
        (lambda a: a.__setitem__(4, torch.ones(2)), r"obs_noise must be a 0-d"),
        (lambda a: a.__setitem__(3, torch.tensor(1.0, dtype=torch.float64)), r"innovation must be float32"),
    ],
)
def test_compiled_op_errors_name_the_argument(mutate, msg):
    """The C++ checks (common/checks.h) of the raw op, bypassing the Python wrapper."""
    require_backend("kalman", "cpu", "cpu")
    args = [[torch.zeros(4)], [torch.ones(4)], [torch.ones(4)], torch.tensor(1.0), torch.tensor(1.0), 0.0, 1.0, 0.0, None]
    mutate(args)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.vlmkern.kalman_step_(*args)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"forgetting": 1.5}, r"forgetting must be in \(0, 1\]"),
        ({"process_noise": -0.5}, r"process_noise must be finite and >= 0"),
        ({"gate_chi2": -2.0}, r"gate_chi2 must be > 0"),
    ],
)
def test_value_range_errors_name_the_argument(kw, msg):
    """Value ranges are checked by the public op (the compiled op checks only
    what memory safety needs)."""
    require_backend("kalman", "cpu", "cpu")
    kwargs = {"process_noise": 0.0, "forgetting": 1.0, "var_floor": 0.0, **kw}
    with pytest.raises(ValueError, match=msg):
        vlmkern.kalman_step_([torch.zeros(4)], [torch.ones(4)], [torch.ones(4)], torch.tensor(1.0),
                             torch.tensor(1.0), backend="cpu", **kwargs)


# ---------------------------------------------------------------------------
# opcheck (schema, fake kernel, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))])
@pytest.mark.parametrize("gate", [None, 3.0])
def test_opcheck(device, gate):
    require_backend("kalman", "cuda" if device == "cuda" else "cpu", device)
    params = [torch.randn(5, 3, device=device), torch.randn(7, device=device).bfloat16()]
    grads = [torch.randn_like(params[0]), torch.randn_like(params[1])]
    variances = [torch.full((5, 3), 0.1, device=device), torch.full((7,), 0.1, device=device)]
    args = (params, grads, variances, torch.tensor(2.0, device=device), torch.tensor(0.5, device=device), 1e-3, 0.9, 1e-8, gate)
    torch.library.opcheck(torch.ops.vlmkern.kalman_step_.default, args)


# ---------------------------------------------------------------------------
# CUDA-only: determinism, graph capture, launch count, no host sync
# ---------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def _vit_like(device, dtype=torch.float32, n=24, width=256):
    shapes = []
    for _ in range(n):
        shapes += [(3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,)]
    gen = torch.Generator().manual_seed(0)
    params, variances = _make(shapes, dtype, device, gen=gen)
    grads = _grads(shapes, dtype, device, gen=gen)
    return params, grads, variances


@cuda_only
def test_cuda_deterministic():
    require_backend("kalman", "cuda", "cuda")
    outs = []
    for _ in range(2):
        p, g, v = _vit_like("cuda")
        S = vlmkern.kalman_step_(p, g, v, torch.tensor(3.0, device="cuda"), torch.tensor(1.0, device="cuda"),
                                 process_noise=1e-4, backend="cuda")
        outs.append((S.clone(), [t.clone() for t in p], [t.clone() for t in v]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


@cuda_only
def test_cuda_no_host_sync_and_graph_capture():
    require_backend("kalman", "cuda", "cuda")
    p, g, v = _vit_like("cuda", n=2)
    e = torch.tensor(3.0, device="cuda")
    R = torch.tensor(1.0, device="cuda")
    p_eager, v_eager = [t.clone() for t in p], [t.clone() for t in v]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S_eager = vlmkern.kalman_step_(p_eager, g, v_eager, e, R, process_noise=1e-4, gate_chi2=4.0, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # capture once, replay with a new innovation written into the same device tensor
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
        pw, vw = [t.clone() for t in p], [t.clone() for t in v]
        vlmkern.kalman_step_(pw, g, vw, e, R, process_noise=1e-4, gate_chi2=4.0, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    p_graph, v_graph = [t.clone() for t in p], [t.clone() for t in v]
    e_dev = torch.tensor(0.0, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S_graph = vlmkern.kalman_step_(p_graph, g, v_graph, e_dev, R, process_noise=1e-4, gate_chi2=4.0, backend="cuda")
    for t, t0 in zip(p_graph, p):
        t.copy_(t0)
    for t, t0 in zip(v_graph, v):
        t.copy_(t0)
    e_dev.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(S_graph, S_eager)
    assert all(torch.equal(a, b) for a, b in zip(p_graph, p_eager))
    assert all(torch.equal(a, b) for a, b in zip(v_graph, v_eager))


@cuda_only
@pytest.mark.parametrize("n_tensors,dtypes,want", [(144, 1, 2), (302, 1, 2), (144, 2, 2), (800, 1, 4)])
def test_cuda_launch_count(n_tensors, dtypes, want):
    require_backend("kalman", "cuda", "cuda")
    from torch.profiler import ProfilerActivity, profile

    shapes = [(97 + i,) for i in range(n_tensors)]
    params, variances = _make(shapes, torch.float32, "cuda")
    if dtypes == 2:
        params = [p.bfloat16() if i % 2 else p for i, p in enumerate(params)]
    grads = [torch.randn_like(p) for p in params]
    e, R = torch.tensor(1.0, device="cuda"), torch.tensor(1.0, device="cuda")
    vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=0.0, backend="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=0.0, backend="cuda")
        torch.cuda.synchronize()
    names = [ev.name for ev in prof.events() if "kalman_pass" in ev.name]
    assert len(names) == want, names


def test_cpu_result_independent_of_thread_count():
    """The compiled CPU kernel sums per-chunk partials in chunk order: S and the
    update are bitwise identical for any number of threads."""
    require_backend("kalman", "cpu", "cpu")
    shapes = [(40000,), (3, 5), (70001,), (0,), (16384,)]
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(2)
            params, variances = _make(shapes, torch.float32, "cpu", gen=gen)
            grads = _grads(shapes, torch.float32, "cpu", gen=gen)
            S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(3.0), torch.tensor(0.1),
                                     process_noise=1e-3, backend="cpu")
            outs.append((S, params, variances))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))
