"""awp_perturb_ / awp_restore_ (SPEC §4) on every live backend vs vlmkern.reference."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkern
from vlmkern import reference as R

from conftest import CUDA_EMU, DTYPES, backend_or_emu, require_backend

# (device, backend); ("cpu", CUDA_EMU) runs the CUDA kernels on the CPU emulator.
IMPLS = [("cpu", "cpu"), ("cpu", "torch"), ("cpu", CUDA_EMU), ("cuda", "cuda"), ("cuda", "torch")]

_MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_MIN_SUB = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


@pytest.fixture(params=IMPLS, ids=lambda p: f"{p[0]}-{p[1]}")
def impl(request, monkeypatch):
    dev, backend = request.param
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend = backend_or_emu(backend, "awp", monkeypatch)
    require_backend("awp", backend, dev)
    return dev, backend


def rt(backend):
    """Tolerance on norms / perturbation for a backend (see check_against_reference)."""
    return 2e-6


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of ``x`` (float64)."""
    x = x.double().abs()
    _, e = torch.frexp(x)
    u = torch.ldexp(torch.ones_like(x), e - 1 - _MANT[dtype])
    return torch.clamp(u, min=_MIN_SUB[dtype])


def make_list(dtypes, device, shapes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or [(1,), (97,), (33, 65), (1025,), (70001,), (3, 4, 5)]
    ps, gs = [], []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        ps.append(torch.randn(s, generator=g).to(dt).to(device))
        gs.append((torch.randn(s, generator=g) * (10.0 ** (i % 3 - 1))).to(dt).to(device))
    return ps, gs


def check_against_reference(params0, grads, out, backup, norms, *, gamma, eps=1e-12, sign=1.0, mode="adversarial", seed=None, rtol=2e-6):
    """out: perturbed params from the kernel; compares with the float64 reference.

    Every element within one ulp of the exactly rounded reference, plus ``rtol``
    of the perturbation (fp32 math of the scale and direction); norms within
    ``rtol`` (every backend combines fp32 partial sums in double)."""
    vs = R.awp_perturbation(params0, grads, gamma=gamma, eps=eps, sign=sign, mode=mode, seed=seed)
    for t, (w0, w1, b, v) in enumerate(zip(params0, out, backup, vs)):
        assert w1.dtype == w0.dtype and w1.shape == w0.shape
        # backup: the original weights, bit for bit
        assert torch.equal(b.cpu().view(-1).view(torch.uint8), w0.cpu().reshape(-1).view(torch.uint8)), f"backup[{t}] not bit-exact"
        if w0.numel() == 0:
            continue
        ref = w0.double().cpu() + v  # exact value; the reference rounds it once to the dtype
        w64 = w0.double().cpu()
        if mode == "adversarial":
            d = grads[t].double().cpu()
        else:
            d = R.awp_random_direction(seed, t, w0.numel()).reshape(w0.shape)
        s_ref = gamma * w64.norm() / (d.norm() + eps)
        tol = ulp(ref, w0.dtype) + rtol * s_ref * (d.abs() + 1.0)
        err = (w1.double().cpu() - ref).abs()
        bad = err > tol
        assert not bad.any(), (
            f"tensor {t} ({w0.dtype}, {tuple(w0.shape)}): {int(bad.sum())} elements off by more than 1 ulp; "
            f"max err/tol {float((err / tol).max()):.3g}"
        )
        # returned norms
        assert math.isclose(float(norms[t, 0]), float(w64.norm()), rel_tol=rtol, abs_tol=1e-30)
        assert math.isclose(float(norms[t, 1]), float(d.norm()), rel_tol=rtol, abs_tol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("gamma", [1e-3, 0.3])
def test_adversarial_matches_reference(impl, dtype, gamma):
    dev, backend = impl
    params, grads = make_list([dtype], dev)
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=gamma, backend=backend)
    assert norms.shape == (len(params), 2) and norms.dtype == torch.float32 and norms.device.type == dev
    check_against_reference(params0, grads, params, backup, norms.cpu(), gamma=gamma, rtol=rt(backend))
    if gamma == 0.3:  # the perturbation is visible in every dtype: ||v|| / ||w|| ~ gamma
        for w0, w1 in zip(params0, params):
            if w0.numel() > 1000:
                rel = (w1.double() - w0.double()).norm() / w0.double().norm()
                assert abs(rel.item() - gamma) < 0.02 * gamma


def test_mixed_dtypes_shapes_and_empty(impl):
    dev, backend = impl
    shapes = [(0,), (5, 7), (0, 3), (129,), (2, 0, 2), (40000,), (1,)]
    params, grads = make_list(DTYPES, dev, shapes)
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.05, backend=backend).cpu()
    check_against_reference(params0, grads, params, backup, norms, gamma=0.05, rtol=rt(backend))
    for t, p in enumerate(params0):
        if p.numel() == 0:
            assert norms[t].tolist() == [0.0, 0.0]
    vlmkern.awp_restore_(params, backup, backend=backend)
    for p, p0 in zip(params, params0):
        assert torch.equal(p.view(torch.uint8) if p.numel() else p, p0.view(torch.uint8) if p0.numel() else p0)


def test_empty_list(impl):
    dev, backend = impl
    norms = vlmkern.awp_perturb_([], [], [], gamma=0.1, backend=backend)
    assert norms.shape == (0, 2)
    vlmkern.awp_restore_([], [], backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_restore_bitwise_after_1000_cycles(impl, dtype):
    dev, backend = impl
    params, grads = make_list([dtype], dev, [(7, 5), (64,), (3,)])
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    for it in range(1000):
        mode = "random" if it % 4 == 3 else "adversarial"
        vlmkern.awp_perturb_(params, grads, backup, gamma=0.05, sign=1 if it % 2 else -1, mode=mode, seed=it, backend=backend)
        if it == 0:
            assert any(not torch.equal(p, p0) for p, p0 in zip(params, params0)), "perturbation did nothing"
        vlmkern.awp_restore_(params, backup, backend=backend)
    for p, p0 in zip(params, params0):
        assert torch.equal(p.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           p0.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_subtracting_v_would_drift(impl):
    """Why restore copies: (w + v) - v != w in bf16 (the reason for the backup)."""
    dev, backend = impl
    w = torch.randn(4096, generator=torch.Generator().manual_seed(3)).bfloat16().to(dev)
    g = torch.randn(4096, generator=torch.Generator().manual_seed(4)).bfloat16().to(dev)
    w0, bk = w.clone(), torch.empty_like(w)
    vlmkern.awp_perturb_([w], [g], [bk], gamma=1e-2, backend=backend)
    v = (w.float() - w0.float()).bfloat16()
    assert not torch.equal((w - v), w0)  # naive undo drifts
    vlmkern.awp_restore_([w], [bk], backend=backend)
    assert torch.equal(w.view(torch.int16), w0.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_zero_gradients(impl, dtype):
    dev, backend = impl
    params, _ = make_list([dtype], dev, [(16, 3), (5,)])
    grads = [torch.zeros_like(p) for p in params]
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.5, backend=backend)
    assert torch.isfinite(norms).all() and (norms[:, 1] == 0).all()
    for p, p0 in zip(params, params0):
        assert torch.isfinite(p).all() and torch.equal(p, p0)


def test_gamma_zero_is_identity_after_restore(impl):
    dev, backend = impl
    params, grads = make_list([torch.float32, torch.bfloat16], dev, [(9, 4), (31,)])
    params[0][0, 0] = -0.0
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    vlmkern.awp_perturb_(params, grads, backup, gamma=0.0, backend=backend)
    for p, p0 in zip(params, params0):
        assert torch.equal(p, p0)
    vlmkern.awp_restore_(params, backup, backend=backend)
    assert torch.equal(params[0].view(torch.int32), params0[0].view(torch.int32))  # -0.0 kept


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_sign_minus(impl, dtype):
    dev, backend = impl
    params, grads = make_list([dtype], dev, [(50, 3), (200,)])
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.2, sign=-1, backend=backend)
    check_against_reference(params0, grads, params, backup, norms.cpu(), gamma=0.2, sign=-1.0, rtol=rt(backend))
    plus = [p.clone() for p in params0]
    vlmkern.awp_perturb_(plus, grads, backup, gamma=0.2, sign=+1, backend=backend)
    for p0, pm, pp in zip(params0, params, plus):
        dm, dp = pm.double() - p0.double(), pp.double() - p0.double()
        assert (dm * dp).sum() < 0  # opposite directions
        assert torch.allclose(dm, -dp, rtol=0, atol=float(ulp(p0, dtype).max()) * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_random_matches_reference_generator(impl, dtype):
    dev, backend = impl
    params, _ = make_list([dtype], dev, [(300, 7), (1025,), (2,)])
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    norms = vlmkern.awp_perturb_(params, None, backup, gamma=0.25, mode="random", seed=1234567, backend=backend)
    check_against_reference(params0, None, params, backup, norms.cpu(), gamma=0.25, mode="random", seed=1234567, rtol=rt(backend))
    if dtype == torch.float32:  # ||v|| = gamma ||w|| per tensor
        for w0, w1 in zip(params0, params):
            rel = ((w1.double() - w0.double()).norm() / w0.double().norm()).item()
            assert abs(rel - 0.25) < 1e-5


def test_random_reproducible_and_seed_dependent(impl):
    dev, backend = impl
    base, _ = make_list([torch.float32, torch.bfloat16], dev, [(100, 3), (77,)])

    def run(seed):
        ps = [p.clone() for p in base]
        bk = [torch.empty_like(p) for p in base]
        vlmkern.awp_perturb_(ps, [], bk, gamma=0.1, mode="random", seed=seed, backend=backend)
        return ps

    a, b, c = run(42), run(42), run(43)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
    # only the low 64 bits of the seed count: -1 and 2^64 - 1 are the same seed
    for x, y in zip(run(-1), run(2**64 - 1)):
        assert torch.equal(x, y)


def test_random_generator_statistics():
    r = R.awp_random_direction(7, 3, 200_000)
    assert abs(r.mean().item()) < 0.01 and abs(r.std().item() - 1.0) < 0.01
    # element k depends on (seed, tensor, k) only: a prefix is a prefix
    assert torch.equal(R.awp_random_direction(7, 3, 1000), r[:1000])
    assert not torch.equal(R.awp_random_direction(7, 4, 1000), r[:1000])
    assert not torch.equal(R.awp_random_direction(8, 3, 1000), r[:1000])


def test_reference_hash_matches_python_ints():
    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = torch.randint(0, 2**32, (2000,), dtype=torch.int64)
    xs[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    assert [mix(int(x)) for x in xs] == R._mix32(xs).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_many_tensors_and_misaligned_views(impl, dtype):
    """Hundreds of tensors (one multi-tensor table of 300 on CUDA) and views
    starting at odd element offsets (no vector loads; odd tails for F16C)."""
    dev, backend = impl
    g = torch.Generator().manual_seed(5)
    L = 37
    storage = torch.randn(300 * L + 1, generator=g).to(dtype).to(dev)
    gstore = torch.randn(300 * L + 1, generator=g).to(dtype).to(dev)
    params = [storage[1 + L * i : 1 + L * (i + 1)] for i in range(300)]
    grads = [gstore[1 + L * i : 1 + L * (i + 1)] for i in range(300)]
    params0 = [p.clone() for p in params]
    bstore = torch.empty(300 * L + 1, device=dev, dtype=dtype)
    backup = [bstore[1 + L * i : 1 + L * (i + 1)] for i in range(300)]
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, backend=backend).cpu()
    check_against_reference(params0, grads, params, backup, norms, gamma=0.1, rtol=rt(backend))
    vlmkern.awp_restore_(params, backup, backend=backend)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, params0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_norms_accurate_on_large_tensors(impl, dtype):
    """Norms of multi-million-element tensors stay at fp32 accuracy (blocked
    partial sums combined in double), in every backend."""
    dev, backend = impl
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3_000_001, generator=g).to(dtype)
    d = torch.randn(3_000_001, generator=g).to(dtype)
    ref = [w.double().norm().item(), d.double().norm().item()]
    norms = vlmkern.awp_perturb_([w.to(dev)], [d.to(dev)], [torch.empty_like(w, device=dev)], gamma=1e-3, backend=backend)
    for k in range(2):
        assert abs(norms[0, k].item() - ref[k]) <= 1e-6 * ref[k]


def test_non_contiguous(impl):
    dev, backend = impl
    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 30, generator=g).to(dev).t()  # non-contiguous, dense
    d = torch.randn(60, 40, generator=g).to(dev)[::2]  # non-contiguous, strided
    bk = torch.empty(40, 30, device=dev).t()
    w0 = w.clone()
    norms = vlmkern.awp_perturb_([w], [d], [bk], gamma=0.2, backend=backend).cpu()
    check_against_reference([w0], [d], [w], [bk.contiguous()], norms, gamma=0.2, rtol=rt(backend))
    assert torch.equal(bk, w0)
    vlmkern.awp_restore_([w], [bk], backend=backend)
    assert torch.equal(w, w0)


def test_deterministic_across_thread_counts():
    require_backend("awp", "cpu", "cpu")
    params, grads = make_list([torch.float32], "cpu", [(300000,), (70000,)])
    outs = []
    n0 = torch.get_num_threads()
    try:
        for nt in (1, max(2, n0)):
            torch.set_num_threads(nt)
            ps = [p.clone() for p in params]
            bk = [torch.empty_like(p) for p in ps]
            outs.append((vlmkern.awp_perturb_(ps, grads, bk, gamma=0.1, backend="cpu"), ps))
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_backends_agree_cpu():
    """Compiled CPU and torch fallback: same math, at most one ulp apart."""
    require_backend("awp", "cpu", "cpu")
    for mode in ("adversarial", "random"):
        params, grads = make_list(DTYPES, "cpu", [(64, 9), (513,), (3,)])
        a = [p.clone() for p in params]
        b = [p.clone() for p in params]
        bk = [torch.empty_like(p) for p in params]
        na = vlmkern.awp_perturb_(a, grads, bk, gamma=0.1, mode=mode, seed=9, backend="cpu")
        nb = vlmkern.awp_perturb_(b, grads, bk, gamma=0.1, mode=mode, seed=9, backend="torch")
        torch.testing.assert_close(na, nb, rtol=2e-6, atol=0)
        for x, y, p0 in zip(a, b, params):  # 1 ulp + the norm difference times |v|
            tol = ulp(x, x.dtype) + 2e-6 * (x.double() - p0.double()).abs()
            assert ((x.double() - y.double()).abs() <= tol).all()


# ---------------------------------------------------------------------------
# argument checks (each message names the argument)
# ---------------------------------------------------------------------------


def _ok_lists(n=2):
    p = [torch.randn(3, 4) for _ in range(n)]
    return p, [torch.randn_like(x) for x in p], [torch.empty_like(x) for x in p]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, match",
    [
        (lambda p, g, b: (p, g[:1], b), {}, ValueError, r"grads has 1 tensors"),
        (lambda p, g, b: (p, g, b[:1]), {}, ValueError, r"backup has 1 tensors"),
        (lambda p, g, b: (p, [g[0], torch.randn(4, 3)], b), {}, ValueError, r"grads\[1\] has shape"),
        (lambda p, g, b: (p, g, [b[0], torch.empty(12)]), {}, ValueError, r"backup\[1\] has shape"),
        (lambda p, g, b: (p, [g[0].double(), g[1]], b), {}, TypeError, r"grads\[0\] must have the dtype"),
        (lambda p, g, b: (p, g, [b[0], b[1].half()]), {}, TypeError, r"backup\[1\] must have the dtype"),
        (lambda p, g, b: ([p[0], p[1].long()], [g[0], g[1].long()], [b[0], b[1].long()]), {}, TypeError, r"params\[1\] must be float32"),
        (lambda p, g, b: (p, g, [b[0], torch.empty(3, 4, device="meta")]), {}, ValueError, r"backup\[1\] is on meta"),
        (lambda p, g, b: (p, g, [p[0], b[1]]), {}, ValueError, r"backup\[0\] is params\[0\]"),
        (lambda p, g, b: (p[0], g, b), {}, TypeError, r"params must be a list"),
        (lambda p, g, b: (p, None, b), {}, ValueError, r"grads is required"),
        (lambda p, g, b: (p, g, b), {"mode": "sam"}, ValueError, r"mode must be"),
        (lambda p, g, b: (p, g, b), {"mode": "random"}, ValueError, r"seed is required"),
        (lambda p, g, b: (p, g, b), {"mode": "random", "seed": 1.5}, TypeError, r"seed must be an int"),
        (lambda p, g, b: (p, g, b), {"gamma": -1e-3}, ValueError, r"gamma must be"),
        (lambda p, g, b: (p, g, b), {"gamma": float("nan")}, ValueError, r"gamma must be"),
        (lambda p, g, b: (p, g, b), {"eps": -1.0}, ValueError, r"eps must be"),
        (lambda p, g, b: (p, g, b), {"sign": 0.5}, ValueError, r"sign must be"),
    ],
)
def test_bad_inputs_python(mutate, kwargs, exc, match):
    p, g, b = mutate(*_ok_lists())
    kw = {"gamma": 0.1, **kwargs}
    with pytest.raises(exc, match=match):
        vlmkern.awp_perturb_(p, g, b, **kw)


def test_bad_inputs_restore():
    p, _, b = _ok_lists()
    with pytest.raises(ValueError, match=r"backup has 1 tensors"):
        vlmkern.awp_restore_(p, b[:1])
    with pytest.raises(TypeError, match=r"backup\[0\] must have the dtype"):
        vlmkern.awp_restore_(p, [b[0].bfloat16(), b[1]])
    with pytest.raises(ValueError, match=r"backup\[1\] has shape"):
        vlmkern.awp_restore_(p, [b[0], torch.empty(2)])


def test_bad_inputs_compiled_op():
    """The C++ host checks name the argument too (for callers of torch.ops directly)."""
    require_backend("awp", "cpu", "cpu")
    op = torch.ops.vlmkern.awp_perturb_
    p, g, b = _ok_lists()
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors"):
        op(p, g[:1], b, 0.1, 1e-12, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"direction must be"):
        op(p, g, b, 0.1, 1e-12, 1.0, 2, 0)
    # Value ranges: checked by the public op, not by the compiled one.
    with pytest.raises(ValueError, match=r"gamma must be"):
        vlmkern.awp_perturb_(p, g, b, gamma=-0.1, backend="cpu")
    with pytest.raises(ValueError, match=r"sign must be"):
        vlmkern.awp_perturb_(p, g, b, gamma=0.1, sign=2.0, backend="cpu")
    with pytest.raises(RuntimeError, match=r"backup\[1\] must have the dtype"):
        op(p, g, [b[0], b[1].half()], 0.1, 1e-12, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"backup\[0\] is params\[0\]"):
        op(p, g, [p[0], b[1]], 0.1, 1e-12, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"backup\[1\] has shape"):
        torch.ops.vlmkern.awp_restore_(p, [b[0], torch.empty(2)])


def test_backend_by_name_unavailable():
    p, g, b = _ok_lists()
    with pytest.raises(vlmkern.BackendUnavailableError, match="cuda"):
        vlmkern.awp_perturb_(p, g, b, gamma=0.1, backend="cuda")


# ---------------------------------------------------------------------------
# opcheck and CUDA-only properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("awp", device, device)
    p, g, b = _ok_lists(3)
    p = [x.to(device) for x in p] + [torch.randn(5, device=device).bfloat16()]
    g = [x.to(device) for x in g] + [torch.randn(5, device=device).bfloat16()]
    b = [x.to(device) for x in b] + [torch.empty(5, device=device).bfloat16()]
    torch.library.opcheck(torch.ops.vlmkern.awp_perturb_.default, (p, g, b, 0.1, 1e-12, 1.0, 0, 0))
    torch.library.opcheck(torch.ops.vlmkern.awp_perturb_.default, (p, [], b, 0.1, 1e-12, -1.0, 1, 77))
    torch.library.opcheck(torch.ops.vlmkern.awp_restore_.default, (p, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture_and_no_sync():
    require_backend("awp", "cuda", "cuda")
    params, grads = make_list(DTYPES, "cuda", [(256, 64), (1000,), (70001,)])
    params0 = [p.clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    # warm up on a side stream, then capture perturb + restore
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, backend="cuda")
        vlmkern.awp_restore_(params, backup, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, backend="cuda")
        perturbed = [p.clone() for p in params]
        vlmkern.awp_restore_(params, backup, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(params0, grads, perturbed, backup, norms.cpu(), gamma=0.1)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, params0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_kernel():
    require_backend("awp", "cuda", "cuda")
    require_backend("awp", "cpu", "cpu")
    for mode in ("adversarial", "random"):
        params, grads = make_list(DTYPES, "cpu", [(300, 301), (65537,), (5,)])
        a = [p.clone() for p in params]
        b = [p.cuda() for p in params]
        na = vlmkern.awp_perturb_(a, grads, [torch.empty_like(x) for x in a], gamma=0.1, mode=mode, seed=3, backend="cpu")
        nb = vlmkern.awp_perturb_(b, [x.cuda() for x in grads], [torch.empty_like(x) for x in b], gamma=0.1, mode=mode, seed=3, backend="cuda")
        torch.testing.assert_close(na, nb.cpu(), rtol=2e-6, atol=0)
        for x, y, p0 in zip(a, b, params):
            tol = ulp(x, x.dtype) + 2e-6 * (x.double() - p0.double()).abs()
            assert ((x.double() - y.cpu().double()).abs() <= tol).all()


def test_random_direction_same_bits_on_every_backend(impl):
    """The random direction is one fixed sequence of fp32 operations
    (awp_math.h): every backend draws the same bits as the fallback's generator.
    With w = (0, ..., 0, 1) the op writes fl(s * r_k) for k < n - 1, s from the
    returned norms."""
    from vlmkern.ops import awp as A

    dev, backend = impl
    for n in (1, 17, 4099, 70001):
        ws = [torch.zeros(3, device=dev), torch.zeros(n, device=dev)]
        ws[-1][-1] = 1.0
        norms = vlmkern.awp_perturb_(ws, None, [torch.empty_like(w) for w in ws], gamma=0.5, mode="random",
                                     seed=77, backend=backend).cpu()
        r = A._gaussian(A._tensor_key(77, 1), 0, n, "cpu")
        s = torch.tensor(0.5 * float(norms[1, 0]) / (float(norms[1, 1]) + 1e-12), dtype=torch.float64).float()
        assert torch.equal(ws[-1][:-1].cpu().view(torch.int32), (r[:-1] * s).view(torch.int32)), f"n={n}"
