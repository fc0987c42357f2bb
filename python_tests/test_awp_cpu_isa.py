"""AWP CPU kernels: the same bits from every instruction set (scalar, AVX2,
AVX-512; VLMKERN_CPU_ISA caps the one used), the random direction bit for bit
equal to the PyTorch fallback's generator, the accuracy of that generator
against the float64 definition, and the non-temporal (large-list) path."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkern
from vlmkern import reference as R
from vlmkern.ops import awp as A

from conftest import DTYPES, require_backend

ISAS = ["scalar", "avx2", "avx512"]  # capped at what the CPU has


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    require_backend("awp", "cpu", "cpu")
    monkeypatch.delenv("VLMKERN_CPU_ISA", raising=False)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that any two NaNs count as equal (x86 propagates
    whichever NaN operand the compiler put first)."""
    nan = torch.isnan(a.float()) & torch.isnan(b.float())
    return bool(((_bits(a) == _bits(b)) | nan.reshape(-1)).all())


def _mixed_list(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (15,), (16,), (17,), (33, 65), (1025,), (70001,), (3, 4, 5), (40000,)]
    ps, gs = [], []
    for i, s in enumerate(shapes):
        dt = DTYPES[i % 3]
        ps.append(torch.randn(s, generator=g).to(dt))
        gs.append((torch.randn(s, generator=g) * 10.0 ** (i % 3 - 1)).to(dt))
    # edge values: subnormals, the largest finite values (the perturbation can
    # overflow to inf; bf16: values whose fp32 squares still sum to a finite
    # norm -- an infinite norm skips the whole perturbation, SPEC §4 "Bad input")
    h = torch.tensor([6.0e-8, -6.0e-8, 65504.0, -65504.0, 1.0, 2.0**-14, 0.0, -0.0] * 3, dtype=torch.float16)
    ps.append(h)
    gs.append(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0, 1.0, 1.0] * 3, dtype=torch.float16))
    b = torch.tensor([1e-39, -1e-39, 5.0e18, -5.0e18, 1.0, 1.0, 0.0, -0.0] * 3, dtype=torch.bfloat16)
    ps.append(b)
    gs.append(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0, 1.0, 1.0] * 3, dtype=torch.bfloat16))
    # misaligned views (odd element offsets)
    store = torch.randn(3 * 37 + 1, generator=g)
    gstore = torch.randn(3 * 37 + 1, generator=g)
    ps += [store[1 + 37 * i: 1 + 37 * (i + 1)] for i in range(3)]
    gs += [gstore[1 + 37 * i: 1 + 37 * (i + 1)] for i in range(3)]
    return ps, gs


def _run(monkeypatch, isa, params, grads, mode, gamma, sign=1, seed=None):
    monkeypatch.setenv("VLMKERN_CPU_ISA", isa)
    ps = [p.clone() for p in params]
    bk = [torch.empty_like(p) for p in ps]
    norms = vlmkern.awp_perturb_(ps, grads if mode == "adversarial" else None, bk, gamma=gamma, sign=sign,
                                 mode=mode, seed=seed, backend="cpu")
    out = [p.clone() for p in ps]
    vlmkern.awp_restore_(ps, bk, backend="cpu")
    return norms, out, bk, ps


@pytest.mark.parametrize("mode", ["adversarial", "random"])
@pytest.mark.parametrize("gamma, sign", [(1e-3, 1), (0.7, -1)])
def test_instruction_sets_give_the_same_bits(monkeypatch, mode, gamma, sign):
    params, grads = _mixed_list()
    runs = {isa: _run(monkeypatch, isa, params, grads, mode, gamma, sign, seed=2024) for isa in ISAS}
    n0, out0, bk0, rest0 = runs["scalar"]
    for t, p in enumerate(params):  # the scalar run itself: backup and restore exact
        assert torch.equal(_bits(bk0[t]), _bits(p)) and torch.equal(_bits(rest0[t]), _bits(p))
    assert any(not _same_bits(o, p) for o, p in zip(out0, params)), "nothing was perturbed"
    for isa in ISAS[1:]:
        n, out, bk, rest = runs[isa]
        assert torch.equal(n, n0), f"{isa}: norms differ from the scalar kernel"
        for t, p in enumerate(params):
            assert _same_bits(out[t], out0[t]), f"{isa}: tensor {t} ({p.dtype}, {tuple(p.shape)}) differs"
            assert torch.equal(_bits(bk[t]), _bits(p)), f"{isa}: backup {t} not bit-exact"
            assert torch.equal(_bits(rest[t]), _bits(p)), f"{isa}: restore {t} not bit-exact"


def test_fp16_overflow_and_bf16_nan_rounding(monkeypatch):
    """Rounding to the storage dtype in the vector code: overflow to inf (fp16),
    NaN -> 0x7FC0 (bf16, as c10::BFloat16), same as the scalar conversions.
    (The NaN comes from eps = 0 with a zero direction: scale = inf, inf * 0;
    a NaN weight would skip the perturbation, SPEC §4 "Bad input".)"""
    w16 = torch.tensor([65504.0] * 20, dtype=torch.float16)
    g16 = torch.ones(20, dtype=torch.float16)
    wb = torch.tensor([1.0] * 20, dtype=torch.bfloat16)
    gb = torch.zeros(20, dtype=torch.bfloat16)
    for isa in ISAS:
        monkeypatch.setenv("VLMKERN_CPU_ISA", isa)
        a, b = w16.clone(), wb.clone()
        vlmkern.awp_perturb_([a], [g16], [torch.empty_like(a)], gamma=0.01, backend="cpu")
        vlmkern.awp_perturb_([b], [gb], [torch.empty_like(b)], gamma=0.01, eps=0.0, backend="cpu")
        assert torch.isinf(a).all() and (a > 0).all()  # 65504 + 655 rounds past the largest fp16
        assert (_bits(b) == 0x7FC0).all()  # scale inf times a zero direction: every element NaN, canonical


def test_unknown_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("VLMKERN_CPU_ISA", "sse9")
    p = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="VLMKERN_CPU_ISA"):
        vlmkern.awp_perturb_(p, [torch.randn(4)], [torch.empty(4)], gamma=0.1, backend="cpu")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("seed, index", [(1234, 3), (-1, 0), (2**63 + 12345, 7)])
def test_kernel_direction_is_the_fallback_generator_bit_for_bit(monkeypatch, isa, seed, index):
    """w = (0, ..., 0, 1): the kernel writes fl(s * r_k) for k < n - 1, with s from
    the returned norms; the fallback's _gaussian must give the same r_k bits."""
    monkeypatch.setenv("VLMKERN_CPU_ISA", isa)
    sizes = [1, 2, 16, 17, 31, 1000, 70001]
    for n in sizes:
        ws = [torch.zeros(3) for _ in range(index)] + [torch.zeros(n)]
        ws[-1][-1] = 1.0
        norms = vlmkern.awp_perturb_(ws, None, [torch.empty_like(w) for w in ws], gamma=0.5, mode="random",
                                     seed=seed, backend="cpu")
        key = A._tensor_key(A._signed64(seed), index)
        r = A._gaussian(key, 0, n, "cpu")
        s = torch.tensor(0.5 * float(norms[-1, 0]) / (float(norms[-1, 1]) + 1e-12), dtype=torch.float64).float()
        assert torch.equal(_bits(ws[-1][:-1]), _bits(r[:-1] * s)), f"n={n}"
        rn = r.double().norm().item()
        assert abs(float(norms[-1, 1]) - rn) <= 2e-7 * rn


def test_generator_accuracy_against_float64_definition():
    """ln and cos of the fp32 generator over every input they can get (2^24
    each), and the Gaussian itself on 2M elements, against float64."""
    ulps_log, ulps_cos = 0.0, 0.0
    step = 1 << 21
    for b in range(0, 1 << 24, step):
        j = torch.arange(b, b + step, dtype=torch.int64)
        ja = j + 1
        ref = torch.log(ja.double() * 2.0**-24)
        got = A._gauss_log(ja).double()
        u = (got - ref).abs() / torch.ldexp(torch.ones_like(ref), torch.frexp(ref.float())[1].to(torch.int64) - 24)
        u[ref == 0] = 0
        assert bool((got[ref == 0] == 0).all())
        ulps_log = max(ulps_log, u.max().item())
        # cos(2 pi j 2^-24) in float64 with the exact quadrant reduction
        q = (j + 0x200000) >> 22
        x = (j - (q << 22)).double() * (2 * math.pi * 2.0**-24)
        ref = torch.where(q % 2 == 1, torch.sin(x), torch.cos(x)) * torch.where(((q + 1) & 2) != 0, -1.0, 1.0)
        got = A._gauss_cos(j).double()
        nz = ref != 0
        assert bool((got[~nz] == 0).all())
        u = (got - ref)[nz].abs() / torch.ldexp(torch.ones_like(ref[nz]), torch.frexp(ref[nz].float())[1].to(torch.int64) - 24)
        ulps_cos = max(ulps_cos, u.max().item())
    assert ulps_log <= 2.0 and ulps_cos <= 2.0, (ulps_log, ulps_cos)
    r = A._gaussian(A._tensor_key(99, 5), 0, 2_000_000, "cpu").double()
    ref = R.awp_random_direction(99, 5, 2_000_000)
    assert (r - ref).abs().max().item() < 1e-6
    big = ref.abs() > 1e-3
    assert ((r - ref).abs() / ref.abs())[big].max().item() < 5e-7


def test_large_list_streaming_path_equals_small_calls():
    """A list over 64 MiB takes the non-temporal-store path: the same bits as
    perturbing each tensor on its own (ordinary stores), exact restore."""
    g = torch.Generator().manual_seed(11)
    sizes = [9_000_001, 8_388_608]  # > 64 MiB of fp32 together, < 64 MiB each
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    for mode in ("adversarial", "random"):
        big = [p.clone() for p in params]
        bk = [torch.empty_like(p) for p in params]
        nb = vlmkern.awp_perturb_(big, grads, bk, gamma=0.01, mode=mode, seed=5, backend="cpu")
        for t, p in enumerate(params):
            # one tensor at a time, with the same key (random mode: tensor index t)
            pad = [torch.zeros(1) for _ in range(t)]
            one = pad + [p.clone()]
            ob = [torch.empty_like(x) for x in one]
            no = vlmkern.awp_perturb_(one, [torch.zeros(1) for _ in range(t)] + [grads[t]], ob, gamma=0.01,
                                      mode=mode, seed=5, backend="cpu")
            assert torch.equal(no[-1], nb[t])
            assert torch.equal(_bits(one[-1]), _bits(big[t]))
            assert torch.equal(_bits(bk[t]), _bits(p))
        vlmkern.awp_restore_(big, bk, backend="cpu")
        assert all(torch.equal(_bits(x), _bits(p)) for x, p in zip(big, params))


@pytest.mark.parametrize("mode", ["adversarial", "random"])
def test_deterministic_across_thread_counts_all_dtypes(mode):
    params, grads = _mixed_list(seed=3)
    params += [torch.randn(300_000).bfloat16(), torch.randn(200_003).half()]
    grads += [torch.randn(300_000).bfloat16(), torch.randn(200_003).half()]
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, max(2, n0), 1, max(2, n0)):
            torch.set_num_threads(nt)
            ps = [p.clone() for p in params]
            bk = [torch.empty_like(p) for p in ps]
            outs.append((vlmkern.awp_perturb_(ps, grads, bk, gamma=0.1, mode=mode, seed=8, backend="cpu"), ps))
    finally:
        torch.set_num_threads(n0)
    for norms, ps in outs[1:]:
        assert torch.equal(norms, outs[0][0])
        assert all(_same_bits(a, b) for a, b in zip(ps, outs[0][1]))
