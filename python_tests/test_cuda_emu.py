"""The CUDA kernels of kalman_step_ / awp_perturb_ / awp_restore_ on the CPU
emulator (tools/cuda_emu, built by python_tests/cuda_emu.py).

test_kalman.py and test_awp.py already run every reference comparison against
the emulated kernels (their "cuda-emu" backend).  This file checks what only a
CUDA launch has: the emulator itself (it must catch the mistakes it claims to
catch), launch counts per pass, results that do not depend on the order in
which threads and blocks run, and no writes outside the tensors.
"""

from __future__ import annotations

import pytest
import torch

import vlmkern
from vlmkern import reference as ref

from conftest import require_backend, use_cuda_emu

CUDA_ERR_INVALID_VALUE = 1
CUDA_ERR_INVALID_CONFIGURATION = 9
CUDA_ERR_LAUNCH_FAILURE = 719


@pytest.fixture
def emu(monkeypatch):
    require_backend("kalman", "cpu", "cpu")
    require_backend("awp", "cpu", "cpu")
    ops = use_cuda_emu(monkeypatch)
    ops.set_schedule_seed(0)  # these tests choose their schedules themselves
    yield ops
    ops.set_schedule_seed(0)


# ---------------------------------------------------------------------------
# the emulator itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,threads", [(1, 32), (1000, 128), (4096, 1024), (777, 96), (50, 100)])
def test_emulator_block_reduction(emu, n, threads):
    """Warp shuffles + shared memory + __syncthreads give the right sums, also
    with a partial last warp (100 threads) and under shuffled schedules."""
    x = torch.randn(n)
    blocks = (n + threads - 1) // threads
    want = torch.stack([c.double().sum() for c in x.split(threads)])
    for seed in (0, 5):
        emu.set_schedule_seed(seed)
        out = torch.full((blocks,), float("nan"))
        assert emu.selftest("block_sum", x, out, threads) == 0
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_emulator_reports_divergent_shuffle(emu):
    out = torch.zeros(32)
    assert emu.selftest("divergent_shuffle", out, out, 0) == CUDA_ERR_LAUNCH_FAILURE
    assert "only 16 of 32 lanes" in emu.last_error_message()


def test_emulator_exposes_a_missing_barrier(emu):
    """Reading a neighbour's shared-memory slot without __syncthreads gives
    wrong values on the emulator (threads run until they block); with the
    barrier every schedule gives the right ones."""
    blocks = 3
    want = torch.tensor([float((t + 1) % 256 + 1) for t in range(256)]).repeat(blocks)
    out = torch.zeros(256 * blocks)
    assert emu.selftest("neighbour", out, out, 0) == 0
    assert not torch.equal(out, want)
    for seed in (0, 1, 2):
        emu.set_schedule_seed(seed)
        out = torch.zeros(256 * blocks)
        assert emu.selftest("neighbour", out, out, 1) == 0
        assert torch.equal(out, want)


def test_emulator_checks_launch_configuration(emu):
    out = torch.zeros(4)
    assert emu.selftest("too_many_threads", out, out, 0) == CUDA_ERR_INVALID_CONFIGURATION
    assert "block (2048" in emu.last_error_message()
    assert emu.selftest("big_params", out, out, 0) == CUDA_ERR_INVALID_VALUE
    assert "more than CUDA's 32764" in emu.last_error_message()
    # the error was consumed by cudaGetLastError: the next launch is clean
    x = torch.ones(64)
    assert emu.selftest("block_sum", x, out, 64) == 0 and out[0].item() == 64.0


# ---------------------------------------------------------------------------
# launch counts
# ---------------------------------------------------------------------------


def _kalman_inputs(shapes, dtypes=(torch.float32,), seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [(0.1 * torch.randn(s, generator=g)).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
    grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    variances = [0.05 + 0.1 * torch.rand(s, generator=g) for s in shapes]
    return params, grads, variances


def _launches(emu, fn):
    before = emu.launch_count()
    fn()
    return emu.launch_count() - before


@pytest.mark.parametrize(
    "n_tensors,dtypes,want",
    [(144, 1, 2), (302, 1, 2), (768, 1, 2), (769, 1, 4), (144, 2, 2), (300, 3, 2), (1600, 3, 6)],
)
def test_kalman_launches_one_per_pass(emu, n_tensors, dtypes, want):
    """Two passes: 2 launches for up to 768 tensors of any mix of dtypes (302:
    all of ViT-B/16 CLIP), 2 more per further 768."""
    all_dtypes = (torch.float32, torch.bfloat16, torch.float16)[:dtypes]
    params, grads, variances = _kalman_inputs([(97 + i,) for i in range(n_tensors)], all_dtypes)
    e, R = torch.tensor(1.0), torch.tensor(1.0)
    got = _launches(emu, lambda: vlmkern.kalman_step_(params, grads, variances, e, R, process_noise=0.0, backend="cpu"))
    assert got == want


def test_kalman_all_empty_is_one_launch(emu):
    params = [torch.empty(0), torch.empty(3, 0)]
    n = _launches(emu, lambda: vlmkern.kalman_step_(params, params, [torch.empty_like(p) for p in params],
                                                   torch.tensor(2.0), torch.tensor(0.75), process_noise=0.1, backend="cpu"))
    assert n == 1


@pytest.mark.parametrize("mode", ["adversarial", "random"])
@pytest.mark.parametrize("n_tensors,dtypes,want", [(144, 1, 3), (302, 3, 3), (768, 2, 3), (800, 1, 6)])
def test_awp_perturb_three_launches(emu, mode, n_tensors, dtypes, want):
    """Norm, finalize and perturb: 3 launches for up to 768 tensors of any mix
    of dtypes, 3 more per further 768."""
    all_dtypes = (torch.float32, torch.bfloat16, torch.float16)[:dtypes]
    params = [torch.randn(33 + i).to(all_dtypes[i % dtypes]) for i in range(n_tensors)]
    grads = [torch.randn_like(p) for p in params] if mode == "adversarial" else None
    backup = [torch.empty_like(p) for p in params]
    got = _launches(emu, lambda: vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, mode=mode, seed=1, backend="cpu"))
    assert got == want


@pytest.mark.parametrize("n_tensors,want", [(1, 1), (768, 1), (769, 2), (1600, 3)])
def test_awp_restore_one_launch_per_768_tensors_any_dtypes(emu, n_tensors, want):
    dts = (torch.float32, torch.bfloat16, torch.float16)
    params = [torch.randn(5 + i % 7).to(dts[i % 3]) for i in range(n_tensors)]
    backup = [p.clone() for p in params]
    for p in params:
        p.add_(1)
    assert _launches(emu, lambda: vlmkern.awp_restore_(params, backup, backend="cpu")) == want
    assert all(torch.equal(p, b) for p, b in zip(params, backup))


def test_awp_empty_tensors_launch_nothing(emu):
    params = [torch.empty(0), torch.empty(2, 0)]
    backup = [torch.empty_like(p) for p in params]
    assert _launches(emu, lambda: vlmkern.awp_perturb_(params, params, backup, gamma=0.1, backend="cpu")) == 0
    assert _launches(emu, lambda: vlmkern.awp_restore_(params, backup, backend="cpu")) == 0


# ---------------------------------------------------------------------------
# results independent of the schedule (no missing barrier, no inter-block race)
# ---------------------------------------------------------------------------

# Tensors over several chunks (Kalman: 16384 elements, AWP: 65536) so that
# launches have many blocks, and more than 768 tensors (two launches per pass).
BIG_SHAPES = [(70001,), (33, 65), (40000,), (1,)] + [(11 + i % 5,) for i in range(800)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_kalman_bitwise_identical_for_every_schedule(emu, dtype):
    results = []
    for seed in (0, 1, 2):
        emu.set_schedule_seed(seed)
        params, grads, variances = _kalman_inputs(BIG_SHAPES, (dtype,), seed=3)
        S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(5.0), torch.tensor(0.5),
                                 process_noise=1e-3, gate_chi2=3.0, backend="cpu")
        results.append([S] + params + variances)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # and right: the float64 reference
    params, grads, variances = _kalman_inputs(BIG_SHAPES, (dtype,), seed=3)
    want = ref.kalman_step(params, grads, variances, 5.0, 0.5, process_noise=1e-3, gate_chi2=3.0)
    assert abs(results[0][0].item() - want.S.item()) <= 2e-6 * want.S.item()


@pytest.mark.parametrize("mode", ["adversarial", "random"])
def test_awp_bitwise_identical_for_every_schedule(emu, mode):
    results = []
    for seed in (0, 1, 2):
        emu.set_schedule_seed(seed)
        g = torch.Generator().manual_seed(4)
        params = [torch.randn(s, generator=g) for s in BIG_SHAPES]
        grads = [torch.randn(s, generator=g) for s in BIG_SHAPES] if mode == "adversarial" else None
        backup = [torch.empty_like(p) for p in params]
        norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, mode=mode, seed=9, backend="cpu")
        results.append([norms] + params)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---------------------------------------------------------------------------
# nothing written outside the tensors
# ---------------------------------------------------------------------------

SENTINEL = -12345.0


def _views(n_each, offsets, dtype, fill=None, gen=None):
    """Views of one sentinel-filled buffer with a gap of sentinels before and
    after each; view i starts ``offsets[i]`` elements past a multiple of 16
    elements (offsets 0: every view 16-byte aligned, the vector paths; odd
    offsets: the scalar paths)."""
    gap = 13
    starts, pos = [], 0
    for o, n in zip(offsets, n_each):
        start = (pos + gap + 15) // 16 * 16 + o
        starts.append(start)
        pos = start + n
    buf = torch.full((pos + gap,), SENTINEL, dtype=dtype)
    views = []
    for start, n in zip(starts, n_each):
        v = buf[start: start + n]
        v.copy_(torch.randn(n, generator=gen).to(dtype) if fill is None else torch.full((n,), fill, dtype=dtype))
        views.append(v)
    return buf, views


def _outside(buf, views):
    mask = torch.ones(buf.numel(), dtype=torch.bool)
    base = buf.data_ptr()
    for v in views:
        start = (v.data_ptr() - base) // buf.element_size()
        mask[start: start + v.numel()] = False
    return buf[mask]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 3, 5)], ids=["aligned", "misaligned"])
def test_no_writes_outside_the_tensors(emu, dtype, offsets):
    gen = torch.Generator().manual_seed(2)
    sizes = (16384 * 2 + 7, 65536 + 9, 21)  # chunk tails of both ops
    pbuf, params = _views(sizes, offsets, dtype, gen=gen)
    gbuf, grads = _views(sizes, offsets, dtype, gen=gen)
    vbuf, variances = _views(sizes, offsets, torch.float32, fill=0.1)
    bbuf, backup = _views(sizes, offsets, dtype, fill=0.0)
    vlmkern.kalman_step_(params, grads, variances, torch.tensor(1.0), torch.tensor(1.0), process_noise=1e-3, backend="cpu")
    norms = vlmkern.awp_perturb_(params, grads, backup, gamma=0.1, backend="cpu")
    assert torch.isfinite(norms).all()
    vlmkern.awp_restore_(params, backup, backend="cpu")
    for buf, views in ((pbuf, params), (gbuf, grads), (vbuf, variances), (bbuf, backup)):
        assert all((v.data_ptr() % 16 == 0) == (offsets == (0, 0, 0)) for v in views)
        outside = _outside(buf, views)
        assert outside.numel() > 0 and (outside == SENTINEL).all()
    # and the views themselves were written
    assert all((v != 0.1).any() for v in variances)
