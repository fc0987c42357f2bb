"""Shared fixtures: seeding, devices, dtypes with tolerances, capability skips.

Triton kernels are tested on the CPU through the interpreter: when no GPU is
present, TRITON_INTERPRET=1 is set here, before anything imports triton.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vlmkern  # noqa: E402
from vlmkern import _C_loader, backends  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Per-dtype tolerances for comparing a kernel (fp32 accumulation) with the
# float64 reference, as (rtol, atol) on values of order one.
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (4e-3, 5e-4),
    torch.float64: (1e-10, 1e-12),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tol(dtype: torch.dtype) -> dict:
    r, a = TOL[dtype]
    return {"rtol": r, "atol": a}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, tiny), computed in float64."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values in the result"
    den = ref.norm().item()
    return (x - ref).norm().item() / max(den, 1e-30)


def require_backend(op: str, backend: str, device: str) -> None:
    """Skip (with the reason) when ``backend`` cannot run ``op`` on ``device``.

    In CI (CI=true) a missing *compiled CPU* backend is a failure, not a skip:
    the build must have produced the library.
    """
    ok, why = backends.availability(op, backend, device)
    if not ok:
        if backend == "cpu" and os.environ.get("CI") and device == "cpu":
            pytest.fail(f"compiled CPU backend missing in CI: {why}")
        pytest.skip(f"{op}/{backend} on {device}: {why}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


def pytest_report_header(config):
    return [
        f"vlmkern {vlmkern.__version__}: compiled library loaded={_C_loader.load()} "
        f"(error: {_C_loader.error()}), CUDA kernels compiled in={backends.compiled_cuda()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, devices={DEVICES}"
    ]


# ---------------------------------------------------------------------------
# The CUDA kernels on the CPU emulator (python_tests/cuda_emu.py)
# ---------------------------------------------------------------------------

CUDA_EMU = "cuda-emu"  # a backend id in the op tests' parametrisations


def use_cuda_emu(monkeypatch):
    """Route ``torch.ops.vlmkern`` to the emulated CUDA kernels for one test.

    The public wrappers (``vlmkern.kalman_step_``, ``vlmkern.awp_perturb_``, ...)
    look the compiled op up in ``torch.ops.vlmkern`` at every call, so with this
    patch ``backend="cpu"`` on CPU tensors runs the real CUDA kernel sources and
    their host code (csrc/*/*_cuda.{cu,cpp}) on the emulator.  Returns the
    emulator's ops (``launch_count``, ``set_schedule_seed``, ...).  A failed
    build fails the test in CI and skips it elsewhere (with the compiler's
    message).  ``VLMKERN_EMU_SCHEDULE_SEED=s`` runs every emulated test with
    shuffled block and thread orders (seed s; 0 = natural order)."""
    import cuda_emu

    try:
        ops = cuda_emu.load()
    except Exception as exc:  # compiler missing, non-Linux, ...
        if os.environ.get("CI"):
            raise
        pytest.skip(f"CUDA emulator unavailable: {str(exc).splitlines()[-1][:300]}")
    monkeypatch.setattr(torch.ops, "vlmkern", ops)
    ops.set_schedule_seed(int(os.environ.get("VLMKERN_EMU_SCHEDULE_SEED", "0")))
    return ops


def backend_or_emu(backend: str, op: str, monkeypatch) -> str:
    """The backend name to call for a test's ``backend`` parameter: CUDA_EMU
    routes ``torch.ops.vlmkern`` to the emulated CUDA kernels and returns
    ``"cpu"`` (the wrappers then call them on CPU tensors)."""
    if backend != CUDA_EMU:
        return backend
    require_backend(op, "cpu", "cpu")
    use_cuda_emu(monkeypatch)
    return "cpu"
