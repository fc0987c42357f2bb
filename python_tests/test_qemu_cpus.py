"""The compiled library on CPUs this machine does not have (issue 14).

The library is compiled for baseline x86-64 (no -march flag, no hand-written
SIMD), but torch picks its own kernels by CPU, and a stray instruction-set flag
or intrinsic would only show on a CPU without it.  This test runs the compiled ops in one
subprocess per CPU model under ``qemu-x86_64 -cpu MODEL`` (user-mode
emulation: the same Python, torch and vlmkern, on an emulated CPU):

* ``Haswell``: AVX2 + F16C + FMA, no AVX-512 (most AMD Zen 2/3 and Intel
  client CPUs);
* ``Nehalem``: SSE4.2, no AVX at all (baseline-class x86-64).

The subprocess (``_SCRIPT``: torch import alone takes ~35-60 s under qemu, so
one compact script does every check) runs AWP perturb + restore in fp32, bf16
and fp16, adversarial and random, the Kalman step and the HGCL CPU kernels
(loss, state update, gradients); it checks each against the float64 oracle
(vlmkern/reference.py) itself, and writes the AWP results, which the kernels
promise bit for bit on every CPU, for the test to compare with the same script
run natively.  A CPU instruction the emulated model lacks kills the
subprocess with SIGILL, which the test reports.

Needs ``qemu-x86_64`` (Debian/Ubuntu: ``apt-get install qemu-user``).  Without
it the test skips, except when ``CI`` is set: there it fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import require_backend

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")
MODELS = {"Haswell": "AVX2", "Nehalem": "DEFAULT"}  # model -> torch's CPU capability there
TIMEOUT_S = 1200

_SCRIPT = r'''
import sys, time
t0 = time.time()
import torch
import vlmkern
from vlmkern import reference as R
from vlmkern.ops import hgcl as H
t_import = time.time() - t0
torch.set_num_threads(2)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "import_s": t_import}

def bits(x):
    return x.reshape(-1).view({4: torch.int32, 2: torch.int16}[x.element_size()]).clone()

def rnd(shape, gen, scale=1.0):
    # inputs from integers: torch.randn's own CPU kernel gives different values
    # on different CPUs (vectorized per instruction set), these are exact everywhere
    return torch.randint(-(2**20), 2**20, shape, generator=gen).double() * (scale * 2.0**-19)

# ---- AWP: every dtype, both modes; tails and several 32K-element work items
gen = torch.Generator().manual_seed(0)
shapes = [(1,), (17,), (33, 65), (70001,)]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    ps = [rnd(s, gen).to(dt) for s in shapes]
    gs = [rnd(s, gen).to(dt) for s in shapes]
    out[f"awp/{dt}/inputs"] = [bits(x) for x in ps + gs]
    for mode in ("adversarial", "random"):
        w = [p.clone() for p in ps]
        bk = [torch.empty_like(p) for p in ps]
        norms = vlmkern.awp_perturb_(w, gs if mode == "adversarial" else None, bk, gamma=0.02, mode=mode,
                                     seed=123, backend="cpu")
        want = R.awp_perturbation(ps, gs, gamma=0.02, mode=mode, seed=123)
        for t, p in enumerate(ps):
            assert torch.equal(bits(bk[t]), bits(p)), (dt, mode, t, "backup not bit-exact")
            v = w[t].double() - p.double()
            ulp = (p.double().abs() + want[t].abs()) * {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dt]
            err = (v - want[t]).abs() - (ulp + 2e-6 * want[t].abs() + 1e-30)
            assert bool((err <= 0).all()), (dt, mode, t, float(err.max()))
            nw = p.double().norm().item()
            assert abs(float(norms[t, 0]) - nw) <= 1e-5 * nw, (dt, mode, t)
        out[f"awp/{dt}/{mode}"] = (norms, [bits(x) for x in w])
        vlmkern.awp_restore_(w, bk, backend="cpu")
        assert all(torch.equal(bits(a), bits(p)) for a, p in zip(w, ps)), (dt, mode, "restore not bit-exact")

# ---- Kalman step, fp32 and bf16 parameters, three steps
for dt in (torch.float32, torch.bfloat16):
    g2 = torch.Generator().manual_seed(1)
    shp = [(40,), (7, 9), (70001,)]
    params = [rnd(s, g2).to(dt) for s in shp]
    variances = [(rnd(s, g2, 0.05) + 0.1).float() for s in shp]
    rp, rv = [p.double() for p in params], [v.double() for v in variances]
    for step in range(3):
        grads = [rnd(s, g2, 0.1).to(dt) for s in shp]
        e, Rn = 3.0 + step, 0.7
        S = vlmkern.kalman_step_(params, grads, variances, torch.tensor(e), torch.tensor(Rn), process_noise=1e-3,
                                 forgetting=0.95, var_floor=1e-8, backend="cpu")
        ref = R.kalman_step(rp, grads, rv, e, Rn, process_noise=1e-3, forgetting=0.95, var_floor=1e-8)
        assert abs(S.item() - ref.S.item()) <= 2e-6 * abs(ref.S.item()), ("kalman S", dt, step)
        tol = 1e-5 if dt == torch.float32 else 1e-2
        for p, q in zip(params, ref.params):
            assert torch.allclose(p.double(), q, rtol=tol, atol=tol), ("kalman params", dt, step)
        for v, q in zip(variances, ref.variances):
            assert torch.allclose(v.double(), q, rtol=1e-5, atol=1e-9), ("kalman variances", dt, step)
        rp = [p.double() for p in params]  # continue from the stored (rounded) parameters
        rv = [v.double() for v in variances]

# ---- HGCL CPU kernels (stats, state update, gradients) through hgcl_loss
g3 = torch.Generator().manual_seed(2)
b, d, n = 48, 24, 120
for margin in (0.1, None):
    img = torch.nn.functional.normalize(rnd((b, d), g3), dim=1).float()
    txt = torch.nn.functional.normalize(rnd((b, d), g3), dim=1).float()
    index = torch.randperm(n, generator=g3)[:b]
    lu1 = torch.full((n,), float("-inf"))
    lu1[index[::2]] = rnd((len(index[::2]),), g3).float()
    lu2 = lu1.clone()
    ref = R.hgcl(img, txt, index, lu1, lu2, tau=0.05, gamma=0.7, margin=margin)
    a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    k1, k2 = lu1.clone(), lu2.clone()
    loss = vlmkern.hgcl_loss(a, t, index, k1, k2, tau=0.05, gamma=0.7, margin=margin, backend="cpu")
    loss.backward()
    assert abs(loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item())), ("hgcl loss", margin)
    for got, want in ((k1, ref.log_u_img), (k2, ref.log_u_txt)):
        fin = torch.isfinite(want)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want.float())), ("hgcl state", margin)
        assert torch.allclose(got[fin].double(), want[fin], rtol=2e-5, atol=2e-5), ("hgcl state", margin)
    for got, want in ((a.grad, ref.grad_img), (t.grad, ref.grad_txt)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 1e-4, ("hgcl grad", margin, rel)

torch.save(out, sys.argv[1])
print(f"ok: capability {out['capability']}, torch import {t_import:.0f} s, total {time.time() - t0:.0f} s")
'''


def _run(tmp_path: Path, model: str | None) -> dict:
    script = tmp_path / "qemu_check.py"
    script.write_text(_SCRIPT)
    res = tmp_path / f"out_{model or 'native'}.pt"
    cmd = [sys.executable, str(script), str(res)]
    if model is not None:
        cmd = [QEMU, "-cpu", model] + cmd
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("VLMKERN_BACKEND", None)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    took = time.time() - t0
    err = "\n".join(line for line in p.stderr.splitlines() if "TCG doesn't support requested feature" not in line)
    if p.returncode != 0:
        how = f"exit {p.returncode}"
        if p.returncode in (-signal.SIGILL, 128 + signal.SIGILL) or "Illegal instruction" in err:
            how = "SIGILL (an instruction this CPU model lacks)"
        pytest.fail(f"{' '.join(cmd[:3]) if model else 'native run'}: {how} after {took:.0f} s\n"
                    f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{err[-3000:]}")
    out = torch.load(res, weights_only=False)
    out["wall_s"] = took
    return out


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    for op in ("awp", "kalman", "hgcl"):
        require_backend(op, "cpu", "cpu")  # the compiled library is loaded (in CI: must be)
    _require_qemu()
    return _run(tmp_path_factory.mktemp("native"), None)


def _require_qemu():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    if QEMU is None:
        msg = "qemu-x86_64 not found: install it with `apt-get install -y qemu-user` (Debian/Ubuntu)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI is set: this test must run there, not skip")
        pytest.skip(msg)


@pytest.mark.parametrize("model", list(MODELS))
def test_compiled_ops_on_cpu_model(model, native, tmp_path, capsys):
    got = _run(tmp_path, model)
    assert got["capability"] == MODELS[model], f"-cpu {model} not in effect: torch sees {got['capability']}"
    for dt in ("float32", "bfloat16", "float16"):  # the same inputs on every CPU
        k = f"awp/torch.{dt}/inputs"
        assert all(torch.equal(a, b) for a, b in zip(native[k], got[k])), f"{model}: {k} differ"
    awp_keys = [k for k in native if k.startswith("awp/") and not k.endswith("/inputs")]
    assert len(awp_keys) == 6
    for k in awp_keys:
        (n0, w0), (n1, w1) = native[k], got[k]
        assert torch.equal(n0, n1), f"{model}: {k} norms differ from the native run"
        for t, (a, b) in enumerate(zip(w0, w1)):  # bit patterns (the inputs hold no NaN)
            assert torch.equal(a, b), f"{model}: {k} tensor {t} differs from the native run"
    with capsys.disabled():
        print(f"\n[qemu -cpu {model}] {got['wall_s']:.0f} s (torch import {got['import_s']:.0f} s)")
