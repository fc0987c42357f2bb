"""Backend registry: which implementation of each op runs, and why.

Every op runs on one of four backends:

``cuda``
    compiled CUDA kernels from ``vlmkern._C`` (CUDA tensors).
``triton``
    Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
    which is how the tests exercise them without a GPU).
``cpu``
    compiled C++ kernels from ``vlmkern._C`` (CPU tensors).
``torch``
    plain PyTorch, always available, the fallback.

Automatic choice by the device of the inputs: CUDA tensors take ``cuda``, then
``triton``, then ``torch``; CPU tensors take ``cpu``, then ``torch``.
``VLMKERN_BACKEND`` forces a backend, either for every op (``VLMKERN_BACKEND=torch``)
or per op (``VLMKERN_BACKEND=hgcl=triton,kalman=torch``); every public op also
takes ``backend=...``.  Asking for a backend that cannot run raises
:class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import _C_loader

BACKENDS = ("cuda", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclass
class OpInfo:
    """An op's implementations, by step and backend.

    Each step's table maps a backend to a callable or to the name of a compiled
    ``torch.ops.vlmkern`` op (looked up at every call, so a test can route
    ``torch.ops.vlmkern`` elsewhere); a backend missing from a step runs the
    step's ``torch`` implementation.  ``compiled``: the qualified names of the
    compiled ops the ``cpu``/``cuda`` backends call, collected as steps are
    registered (``compiled_for``: the same, per backend: a step may have a
    compiled CPU kernel and no CUDA one yet, and then only the CPU backend
    needs it).  ``triton``: whether the op has Triton kernels; ``cuda``:
    whether its compiled ops have CUDA kernels (False: CUDA tensors use
    ``triton``, and ``availability`` says so).
    """

    name: str
    triton: bool = False
    cuda: bool = True
    compiled: Tuple[str, ...] = ()
    compiled_for: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    triton_import_error: Optional[str] = field(default=None, repr=False)

    def step(self, step: str, **impls: Union[str, Callable]) -> Callable:
        """Register one step's implementations (``cpu=``, ``cuda=``, ``triton=``,
        ``torch=``); returns ``run(backend, *args, **kwargs)``, the one dispatch
        every op uses."""
        if "torch" not in impls:
            raise ValueError(f"vlmkern: step {self.name}.{step} needs a torch implementation")
        names = {f"vlmkern::{impl}" for b, impl in impls.items() if b in ("cpu", "cuda") and isinstance(impl, str)}
        self.compiled = tuple(sorted(set(self.compiled) | names))
        for b in ("cpu", "cuda"):
            if isinstance(impls.get(b), str):
                self.compiled_for[b] = tuple(sorted(set(self.compiled_for.get(b, ())) | {f"vlmkern::{impls[b]}"}))

        def run(backend: str, *args, **kwargs):
            impl = impls.get(backend, impls["torch"])
            if isinstance(impl, str):
                impl = getattr(torch.ops.vlmkern, impl)
            return impl(*args, **kwargs)

        run.__name__ = f"{self.name}_{step}"
        return run


_OPS: Dict[str, OpInfo] = {}


def register_op(name: str, triton: bool = False, cuda: bool = True) -> OpInfo:
    info = OpInfo(name=name, triton=triton, cuda=cuda)
    _OPS[name] = info
    return info


def ops() -> List[str]:
    return sorted(_OPS)


def triton_available() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _has_kernel(qualname: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    except RuntimeError:
        return False


def availability(op: str, backend: str, device: torch.device | str) -> Tuple[bool, str]:
    """``(True, "")`` if ``backend`` can run ``op`` on ``device``, else ``(False, reason)``."""
    if op not in _OPS:
        raise KeyError(f"vlmkern: unknown op {op!r}; known: {', '.join(ops())}")
    if backend not in BACKENDS:
        raise ValueError(f"vlmkern: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    info = _OPS[op]
    dev = torch.device(device)
    if backend == "torch":
        return True, ""
    if backend in ("cuda", "cpu"):
        want = "cuda" if backend == "cuda" else "cpu"
        if dev.type != want:
            return False, f"backend {backend!r} runs on {want} tensors, the inputs are on {dev}"
        needed = info.compiled_for.get(backend, ())
        if not needed or (backend == "cuda" and not info.cuda):
            return False, f"op {op!r} has no compiled {backend} kernel (use 'triton' or 'torch')"
        if not _C_loader.load():
            return False, f"the compiled library vlmkern._C is not loaded ({_C_loader.error()})"
        key = "CUDA" if backend == "cuda" else "CPU"
        missing = [q for q in needed if not _has_kernel(q, key)]
        if missing:
            why = (
                "vlmkern._C was built without CUDA kernels (rebuild with nvcc and a CUDA torch, or VLMKERN_CUDA=ON)"
                if key == "CUDA"
                else "no CPU kernel registered"
            )
            return False, f"{', '.join(missing)}: {why}"
        return True, ""
    # triton
    if not info.triton:
        return False, f"op {op!r} has no Triton implementation"
    ok, why = triton_available()
    if not ok:
        return False, why
    if dev.type == "cpu" and not triton_interpret():
        return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1 (the interpreter)"
    if dev.type not in ("cpu", "cuda"):
        return False, f"Triton does not run on {dev}"
    if info.triton_import_error:
        return False, f"the Triton kernels failed to import: {info.triton_import_error}"
    return True, ""


def _env_request(op: str) -> Optional[str]:
    raw = os.environ.get("VLMKERN_BACKEND", "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return raw
    for part in raw.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            if k.strip() == op:
                return v.strip()
    return None


def choose(op: str, device: torch.device | str, backend: Optional[str] = None) -> str:
    """Pick the backend for ``op`` on ``device``: the explicit ``backend``
    argument, else ``VLMKERN_BACKEND``, else the automatic order."""
    requested = backend if backend is not None else _env_request(op)
    if requested is not None:
        ok, why = availability(op, requested, device)
        if not ok:
            raise BackendUnavailableError(f"vlmkern.{op}: backend {requested!r} is not available: {why}")
        return requested
    dev = torch.device(device)
    order = ("cuda", "triton", "torch") if dev.type == "cuda" else ("cpu", "torch")
    for b in order:
        if availability(op, b, dev)[0]:
            return b
    return "torch"


def table(devices: Optional[List[str]] = None) -> Dict[str, Dict[str, Dict[str, object]]]:
    """``{op: {device: {backend: "live" | reason, "auto": chosen}}}``."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    for op in ops():
        out[op] = {}
        for d in devices:
            row: Dict[str, object] = {}
            for b in BACKENDS:
                ok, why = availability(op, b, d)
                row[b] = "live" if ok else why
            try:
                row["auto"] = choose(op, d, None)
            except BackendUnavailableError as exc:
                row["auto"] = f"error: {exc}"
            out[op][d] = row
    return out


def compiled_cuda() -> bool:
    """Whether vlmkern._C was built with CUDA kernels (whether or not a GPU is present)."""
    if not _C_loader.load():
        return False
    return bool(getattr(_C_loader.module(), "with_cuda", 0))

