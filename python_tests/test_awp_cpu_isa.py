"""AWP CPU kernels: the bf16 / fp16 conversions and the perturbation rounding
against torch on every bit pattern, the random direction bit for bit equal to
the PyTorch fallback's generator, the accuracy of that generator against the
float64 definition, determinism across thread counts.  test_qemu_cpus.py runs
the kernels under emulated CPUs without AVX-512 / AVX2 and compares their bits
with this CPU's."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkern
from vlmkern import reference as R
from vlmkern.ops import awp as A

from conftest import DTYPES, require_backend


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("awp", "cpu", "cpu")


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
    # overflow to inf), infinities in a direction
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


def _expected(params, grads, norms, gamma, sign=1.0, eps=1e-12):
    """round(fp32(w) + s * fp32(g)) with s from the returned norms, in torch."""
    out = []
    for t, (p, g) in enumerate(zip(params, grads)):
        s = torch.tensor(sign * gamma * float(norms[t, 0]) / (float(norms[t, 1]) + eps), dtype=torch.float64).float()
        out.append((p.float() + g.float() * s).to(p.dtype))
    return out


def _patterns(dtype):
    """Every finite bit pattern of a 16-bit dtype (bf16: |x| < 2^60, so that the
    fp32 sum of squares stays finite)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    keep = torch.isfinite(x.float()) & (x.float().abs() < 2.0**60)
    return x[keep]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma, sign", [(1e-6, 1), (0.7, -1), (40.0, 1)])
def test_conversions_and_rounding_match_torch_on_every_bit_pattern(dtype, gamma, sign):
    """Loads of every finite pattern (exact), the sum (one fp32 rounding) and
    the rounding back to the dtype (nearest even; subnormals; fp16 overflow to
    inf at the larger gammas): the same bits as torch's conversions."""
    w = _patterns(dtype)
    gen = torch.Generator().manual_seed(7)
    mag = torch.pow(10.0, torch.rand(w.numel(), generator=gen) * 12 - 8)  # |g| < 65504: finite in fp16
    g = (torch.randn(w.numel(), generator=gen) * mag).to(dtype)
    ps, gs = [w.clone(), w.flip(0).clone()], [g, g.flip(0).clone()]
    bk = [torch.empty_like(p) for p in ps]
    norms = vlmkern.awp_perturb_(ps, gs, bk, gamma=gamma, sign=sign, backend="cpu")
    for t, (n, ref) in enumerate(zip(norms, (w, w.flip(0)))):
        nw = ref.double().norm().item()
        assert abs(float(n[0]) - nw) <= 1e-5 * nw
    exp = _expected([w, w.flip(0)], gs, norms, gamma, sign)
    for t in range(2):
        assert _same_bits(ps[t], exp[t]), f"tensor {t}: {int((_bits(ps[t]) != _bits(exp[t])).sum())} elements differ"
        assert torch.equal(_bits(bk[t]), _bits(w if t == 0 else w.flip(0)))
    assert bool(torch.isinf(ps[0]).any()) == (dtype == torch.float16 and gamma > 1e-3)  # fp16 overflow reached


@pytest.mark.parametrize("mode", ["adversarial", "random"])
def test_mixed_list_tails_and_misaligned_views(mode):
    """Tensors of every length around the vector widths, misaligned views and
    edge values: the perturbation is the torch formula with the kernel's
    norms, the backup and the restore exact."""
    params, grads = _mixed_list()
    ps = [p.clone() for p in params]
    bk = [torch.empty_like(p) for p in ps]
    norms = vlmkern.awp_perturb_(ps, grads if mode == "adversarial" else None, bk, gamma=0.01, mode=mode,
                                 seed=2024, backend="cpu")
    if mode == "random":
        grads = [A._gaussian(A._tensor_key(2024, t), 0, p.numel(), "cpu").reshape(p.shape) for t, p in enumerate(params)]
    exp = _expected(params, grads, norms, 0.01)
    for t, p in enumerate(params):
        assert _same_bits(ps[t], exp[t]), f"tensor {t} ({p.dtype}, {tuple(p.shape)})"
        assert torch.equal(_bits(bk[t]), _bits(p))
    vlmkern.awp_restore_(ps, bk, backend="cpu")
    assert all(torch.equal(_bits(a), _bits(p)) for a, p in zip(ps, params))


def test_fp16_overflow_and_bf16_nan_rounding():
    """Rounding to the storage dtype: overflow to inf (fp16), NaN -> 0x7FC0
    (bf16, as c10::BFloat16).  The NaN comes from eps = 0 with a zero direction
    (scale inf times 0): a NaN weight would skip the perturbation (SPEC §4)."""
    w16 = torch.tensor([65504.0] * 20, dtype=torch.float16)
    g16 = torch.ones(20, dtype=torch.float16)
    wb = torch.tensor([1.0] * 20, dtype=torch.bfloat16)
    gb = torch.zeros(20, dtype=torch.bfloat16)
    a, b = w16.clone(), wb.clone()
    vlmkern.awp_perturb_([a], [g16], [torch.empty_like(a)], gamma=0.01, backend="cpu")
    vlmkern.awp_perturb_([b], [gb], [torch.empty_like(b)], gamma=0.01, eps=0.0, backend="cpu")
    assert torch.isinf(a).all() and (a > 0).all()  # 65504 + 655 rounds past the largest fp16
    assert (_bits(b) == 0x7FC0).all()  # every element NaN, canonical


@pytest.mark.parametrize("seed, index", [(1234, 3), (-1, 0), (2**63 + 12345, 7)])
def test_kernel_direction_is_the_fallback_generator_bit_for_bit(seed, index):
    """w = (0, ..., 0, 1): the kernel writes fl(s * r_k) for k < n - 1, with s from
    the returned norms; the fallback's _gaussian must give the same r_k bits."""
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
