"""The CUDA vector-observation Kalman step (csrc/kalman/kalman_vector_cuda.{cu,cpp},
``vlmkern::kalman_vector_step_``) on the CPU emulator (tools/cuda_emu): against
the float64 oracle ``reference.kalman_step_vector`` in fp32/bf16/fp16 for odd
M and tensor sizes, the gate, forgetting and the floor, GradScaler's
grad_scale / found_inf, every skip case (state bit for bit untouched, S and d2
NaN), bitwise identical results for every emulated schedule, and the launch
count per step.  The same checks on a real GPU: test_kalman_vector_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch

from vlmkern import reference as ref

from conftest import use_cuda_emu

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# 0-size, 1, 7x5, 33, 2x3x4, and one of 3 chunks of 4096 (several pass-1/pass-2 blocks)
SHAPES = [(0,), (1,), (7, 5), (33,), (2, 3, 4), (9000,)]


def make_problem(shapes, M, dtypes, seed, scale=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dts = dtypes if isinstance(dtypes, (list, tuple)) else (dtypes,)
    params = [torch.randn(s, generator=g).to(dts[i % len(dts)]) for i, s in enumerate(shapes)]
    grads = [(scale * torch.randn((M, *s), generator=g)).to(p.dtype) for p, s in zip(params, shapes)]
    variances = [torch.rand(s, generator=g) * 0.5 + 0.01 for s in shapes]
    e = torch.randn(M, generator=g)
    Rn = torch.rand(M, generator=g) + 0.1
    mv = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return mv(params), mv(grads), mv(variances), e.to(device), Rn.to(device)


def run_op(ops, params, grads, variances, e, Rn, q=1e-3, lam=0.98, floor=1e-6, gate=None, gs=None, fi=None):
    return ops.kalman_vector_step_(params, grads, variances, e, Rn, q, lam, floor, gate, gs, fi)


def want_d2(e, S):
    """e^T S^-1 e of the ungated innovation, float64."""
    e = e.double().cpu()
    return float(e @ torch.linalg.solve(S.double().cpu(), e))


def check_against_reference(ops, shapes, M, dtype, gate, seed, floor=1e-6, lam=0.98, device="cpu"):
    params, grads, variances, e, Rn = make_problem(shapes, M, dtype, seed, device=device)
    args = ([p.cpu() for p in params], [g.cpu() for g in grads], [v.cpu() for v in variances], e.cpu(), Rn.cpu())
    if gate == "half":  # a gate that is active: chi2 = half the step's d2
        gate = 0.5 * want_d2(e, ref.kalman_step_vector(*args, process_noise=1e-3).S)
    kw = dict(process_noise=1e-3, forgetting=lam, var_floor=floor, gate_chi2=gate)
    want = ref.kalman_step_vector(*args, **kw)
    S, d2 = run_op(ops, params, grads, variances, e, Rn, q=1e-3, lam=lam, floor=floor, gate=gate)
    assert S.shape == (M, M) and S.dtype == torch.float32 and d2.shape == () and d2.dtype == torch.float32
    assert torch.equal(S, S.T)
    assert float((S.double().cpu() - want.S).abs().max() / want.S.abs().max()) < 1e-5
    d2_ref = want_d2(e, want.S)
    assert abs(d2.item() - d2_ref) <= 1e-4 * d2_ref
    tol = TOL[dtype]
    for w, v, rw, rv in zip(params, variances, want.params, want.variances):
        if w.numel():
            # one rounding to the parameter dtype on top of fp32 math
            assert float((w.double().cpu() - rw).abs().max()) <= tol * float(rw.abs().max()) + 1e-6
            assert float((v.double().cpu() - rv).abs().max() / rv.abs().max()) < 1e-4
    return d2_ref


@pytest.fixture
def emu(monkeypatch):
    return use_cuda_emu(monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 17, 96])
@pytest.mark.parametrize("gate", [None, 100.0, "half"], ids=["nogate", "gate-inactive", "gate-active"])
def test_kalman_vector_emu_matches_reference(emu, dtype, M, gate):
    check_against_reference(emu, SHAPES, M, dtype, gate, seed=M * 10 + (gate is not None))


def test_kalman_vector_emu_mixed_dtypes_floor_no_forgetting(emu):
    """Every dtype in one list; a floor that binds for some elements; lambda = 1."""
    params, grads, variances, e, Rn = make_problem(SHAPES, 5, (torch.float32, torch.bfloat16, torch.float16), 7,
                                                   scale=2.0)
    kw = dict(process_noise=0.0, forgetting=1.0, var_floor=0.2, gate_chi2=None)
    want = ref.kalman_step_vector(params, grads, variances, e, Rn, **kw)
    S, d2 = run_op(emu, params, grads, variances, e, Rn, q=0.0, lam=1.0, floor=0.2)
    assert float((S.double() - want.S).abs().max() / want.S.abs().max()) < 1e-5
    floored = 0
    for w, v, rw, rv in zip(params, variances, want.params, want.variances):
        if w.numel():
            assert float((w.double() - rw).abs().max()) <= TOL[w.dtype] * float(rw.abs().max()) + 1e-6
            assert float((v.double() - rv).abs().max()) <= 1e-4 * float(rv.abs().max())
            floored += int((v == 0.2).sum())
    assert floored > 0


def test_kalman_vector_emu_m_above_shared_limit(emu):
    """M = 160 > 128: S^-1 is read from the workspace instead of shared memory."""
    check_against_reference(emu, [(3, 50), (41,)], 160, torch.float32, 2.0, seed=5)


def test_kalman_vector_emu_grad_scale_is_exact(emu):
    """grads scaled by 2^10 with grad_scale = 1024: bit for bit the unscaled step."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = make_problem(SHAPES, 3, dtype, 11)
        b = make_problem(SHAPES, 3, dtype, 11)
        b[1][:] = [g * 1024 for g in b[1]]
        Sa, da = run_op(emu, *a, gate=0.5)
        Sb, db = run_op(emu, *b, gate=0.5, gs=torch.tensor([1024.0]), fi=torch.zeros(1))
        assert torch.equal(Sa, Sb) and torch.equal(da, db)
        assert all(torch.equal(x, y) for x, y in zip(a[0] + a[2], b[0] + b[2]))


def _skip_cases():
    # (name, how to spoil the inputs: f(params, grads, variances, e, R) -> (e, R, gs, fi))
    def fi(p, g, v, e, R):
        return e, R, None, torch.tensor([1.0])

    def gs(val):
        return lambda p, g, v, e, R: (e, R, torch.tensor([val]), None)

    def e_bad(val):
        def f(p, g, v, e, R):
            e = e.clone()
            e[1] = val
            return e, R, None, None
        return f

    def r_bad(val):
        def f(p, g, v, e, R):
            R = R.clone()
            R[2] = val
            return e, R, None, None
        return f

    def var_neg(p, g, v, e, R):
        v[3].view(-1)[5] = -1.0
        return e, R, None, None

    def grad_inf(p, g, v, e, R):
        g[5].view(-1)[1234] = math.inf
        return e, R, None, None

    def grad_overflow(p, g, v, e, R):  # finite gradients whose Gram overflows fp32
        g[3].view(-1)[0] = 1e30
        return e, R, None, None

    return [("found_inf", fi), ("grad_scale_0", gs(0.0)), ("grad_scale_inf", gs(math.inf)),
            ("grad_scale_nan", gs(math.nan)), ("grad_scale_neg", gs(-2.0)), ("grad_scale_tiny", gs(1e-45)),
            ("e_nan", e_bad(math.nan)), ("e_inf", e_bad(-math.inf)), ("R_zero", r_bad(0.0)),
            ("R_neg", r_bad(-1.0)), ("R_nan", r_bad(math.nan)), ("var_negative", var_neg),
            ("grad_inf", grad_inf), ("gram_overflow", grad_overflow)]


@pytest.mark.parametrize("case", _skip_cases(), ids=lambda c: c[0])
def test_kalman_vector_emu_skips_leave_state_untouched(emu, case):
    params, grads, variances, e, Rn = make_problem(SHAPES, 4, torch.bfloat16, 3)
    e, Rn, gs, fi = case[1](params, grads, variances, e, Rn)
    before = [t.clone() for t in params + variances]
    S, d2 = run_op(emu, params, grads, variances, e, Rn, gate=1.0, gs=gs, fi=fi)
    assert S.shape == (4, 4) and torch.isnan(S).all() and torch.isnan(d2)
    assert all(torch.equal(a, b) for a, b in zip(before, params + variances))


def test_kalman_vector_emu_failed_cholesky_skips(emu):
    """S = [[2^100, 2^100], [2^100, 2^100]] (R = 1 lost in the rounding): finite
    but singular, the factorisation fails exactly (second pivot 0), as torch's."""
    params = [torch.ones(1)]
    grads = [torch.full((2, 1), 2.0 ** 50)]
    variances = [torch.ones(1)]
    e, Rn = torch.ones(2), torch.ones(2)
    S, d2 = run_op(emu, params, grads, variances, e, Rn, q=0.0)
    assert torch.isnan(S).all() and torch.isnan(d2)
    assert params[0].item() == 1.0 and variances[0].item() == 1.0
    from vlmkern.ops.kalman import _kalman_vector_torch  # the PyTorch op skips it too
    S_t, d2_t = _kalman_vector_torch(params, grads, variances, e, Rn, 0.0, 1.0, 1e-12)
    assert torch.isnan(S_t).all() and torch.isnan(d2_t)


def test_kalman_vector_emu_all_empty(emu):
    """No elements: S = diag(R), d2 = sum e^2 / R, nothing else written; 2 launches."""
    params = [torch.empty(0), torch.empty(3, 0)]
    grads = [torch.empty(2, 0), torch.empty(2, 3, 0)]
    variances = [torch.empty(0), torch.empty(3, 0)]
    e, Rn = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    before = emu.launch_count()
    S, d2 = run_op(emu, params, grads, variances, e, Rn)
    assert emu.launch_count() - before == 2
    assert torch.equal(S, torch.diag(Rn))
    assert abs(d2.item() - (1 / 0.5 + 4 / 4.0)) < 1e-6


def test_kalman_vector_emu_noncontiguous(emu):
    """Non-contiguous H, params and variances (working copies): the same bits as contiguous ones."""
    a = make_problem([(6, 9), (40,)], 3, torch.float32, 21)
    params = [torch.empty(9, 6).t().copy_(p) if p.dim() == 2 else p.clone() for p in a[0]]
    grads = [torch.empty(9, 6, 3).permute(2, 1, 0).copy_(g) if g.dim() == 3 else g.clone() for g in a[1]]
    variances = [torch.empty(9, 6).t().copy_(v) if v.dim() == 2 else v.clone() for v in a[2]]
    assert not grads[0].is_contiguous() and not params[0].is_contiguous()
    Sa, da = run_op(emu, *a)
    Sb, db = run_op(emu, params, grads, variances, a[3], a[4])
    assert torch.equal(Sa, Sb) and torch.equal(da, db)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[2], params + variances))


def test_kalman_vector_emu_expanded_obs_noise(emu):
    """obs_noise given as one value expanded to [M] (stride 0), as the public wrapper does."""
    a = make_problem([(33,)], 4, torch.float32, 2)
    b = make_problem([(33,)], 4, torch.float32, 2)
    Sa, _ = run_op(emu, *a[:4], torch.full((4,), 0.3))
    Sb, _ = run_op(emu, *b[:4], torch.tensor([0.3]).expand(4))
    assert torch.equal(Sa, Sb) and torch.equal(a[0][0], b[0][0])


def test_kalman_vector_emu_rejects_too_many_observations(emu):
    params, grads, variances, e, Rn = make_problem([(3,)], 257, torch.float32, 0)
    with pytest.raises(RuntimeError, match="at most 256"):
        run_op(emu, params, grads, variances, e, Rn)


@pytest.mark.parametrize("n_tensors,dtypes,want", [(6, 1, 4), (768, 1, 4), (769, 2, 6), (1600, 3, 8)])
def test_kalman_vector_emu_launches(emu, n_tensors, dtypes, want):
    """Gram pass + reduction + solve + update: 4 launches for up to 768 tensors
    of any mix of dtypes, 2 more (one per pass) per further 768."""
    dts = (torch.float32, torch.bfloat16, torch.float16)[:dtypes]
    a = make_problem([(3 + i % 4,) for i in range(n_tensors)], 2, dts, 1)
    before = emu.launch_count()
    S, _ = run_op(emu, *a)
    assert emu.launch_count() - before == want
    assert torch.isfinite(S).all()


def test_kalman_vector_emu_bitwise_identical_for_every_schedule(emu):
    """Several blocks per pass (9000 and 33x65 elements), more than 768 tensors
    (two launches per pass), two Gram tiles per side (M = 40): the same bits
    for every block and thread order."""
    shapes = [(9000,), (33, 65), (1,)] + [(11 + i % 5,) for i in range(800)]
    results = []
    for seed in (0, 1, 2):
        emu.set_schedule_seed(seed)
        params, grads, variances, e, Rn = make_problem(shapes, 40, (torch.float32, torch.bfloat16), 3)
        S, d2 = run_op(emu, params, grads, variances, e, Rn, gate=3.0)
        results.append([S, d2] + params + variances)
    emu.set_schedule_seed(0)
    assert torch.isfinite(results[0][0]).all()
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
