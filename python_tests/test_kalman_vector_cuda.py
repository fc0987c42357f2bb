"""The CUDA vector-observation Kalman step (``vlmkern::kalman_vector_step_``,
csrc/kalman/kalman_vector_cuda.cu) on a real GPU: the checks of
test_kalman_vector_cuda_emu.py (which runs the same sources on the CPU
emulator) on CUDA tensors, plus what only a device shows: bitwise repeatable
runs with real concurrency, and capture in a CUDA graph (no host sync).
bench/gpu_check.sh runs these (``-k "cuda and not emu"``); without a GPU they skip."""

from __future__ import annotations

import pytest
import torch

import vlmkern

from conftest import require_backend
from test_kalman_vector_cuda_emu import SHAPES, _skip_cases, check_against_reference, make_problem, run_op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BIG = SHAPES + [(300001,), (257, 129)]


@pytest.fixture
def ops():
    require_backend("kalman", "cuda", "cuda")
    return torch.ops.vlmkern


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 17, 96, 160])
@pytest.mark.parametrize("gate", [None, "half"], ids=["nogate", "gate-active"])
def test_kalman_vector_cuda_matches_reference(ops, dtype, M, gate):
    shapes = BIG if M <= 17 else SHAPES
    check_against_reference(ops, shapes, M, dtype, gate, seed=M * 10 + (gate is not None), device="cuda")


@pytest.mark.parametrize("case", _skip_cases(), ids=lambda c: c[0])
def test_kalman_vector_cuda_skips_leave_state_untouched(ops, case):
    params, grads, variances, e, Rn = make_problem(SHAPES, 4, torch.bfloat16, 3)
    e, Rn, gs, fi = case[1](params, grads, variances, e, Rn)
    cu = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    params, grads, variances = cu(params), cu(grads), cu(variances)
    gs = None if gs is None else gs.cuda()
    fi = None if fi is None else fi.cuda()
    before = [t.clone() for t in params + variances]
    S, d2 = run_op(ops, params, grads, variances, e.cuda(), Rn.cuda(), gate=1.0, gs=gs, fi=fi)
    assert torch.isnan(S).all() and torch.isnan(d2)
    assert all(torch.equal(a, b) for a, b in zip(before, params + variances))


def test_kalman_vector_cuda_bitwise_repeatable(ops):
    shapes = BIG + [(11 + i % 5,) for i in range(800)]
    results = []
    for _ in range(3):
        params, grads, variances, e, Rn = make_problem(shapes, 40, (torch.float32, torch.bfloat16), 3, device="cuda")
        S, d2 = run_op(ops, params, grads, variances, e, Rn, gate=3.0)
        results.append([S, d2] + params + variances)
    assert torch.isfinite(results[0][0]).all()
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_kalman_vector_cuda_graph_capture(ops):
    """The step captures in a CUDA graph (it would fail on any host sync) and
    the replay gives the eager step's bits."""
    problem = make_problem(BIG, 17, torch.bfloat16, 8, device="cuda")
    eager = [[t.clone() for t in ts] if isinstance(ts, list) else ts.clone() for ts in problem]
    gs, fi = torch.tensor([8.0], device="cuda"), torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm the allocator up outside the capture
        warm = [[t.clone() for t in ts] if isinstance(ts, list) else ts.clone() for ts in problem]
        run_op(ops, *warm, gate=2.0, gs=gs, fi=fi)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S, d2 = run_op(ops, *problem, gate=2.0, gs=gs, fi=fi)
    graph.replay()
    S_e, d2_e = run_op(ops, *eager, gate=2.0, gs=gs, fi=fi)
    torch.cuda.synchronize()
    assert torch.isfinite(S).all()
    assert torch.equal(S, S_e) and torch.equal(d2, d2_e)
    assert all(torch.equal(a, b) for a, b in zip(problem[0] + problem[2], eager[0] + eager[2]))


def test_kalman_vector_cuda_public_wrapper(ops):
    params, grads, variances, e, Rn = make_problem(SHAPES, 5, torch.float32, 4, device="cuda")
    S = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=1e-3, backend="cuda")
    assert S.shape == (5, 5) and S.is_cuda and torch.isfinite(S).all()
