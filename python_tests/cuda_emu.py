"""Build and load vlmkern's CUDA kernels on the CPU emulator (tools/cuda_emu/).

The kernel sources (``csrc/<op>/<op>_cuda.cu``) and their torch-facing host code
(``csrc/<op>/<op>_cuda.cpp``) are compiled by the host C++ compiler against the
emulator's shim headers, with three mechanical rewrites done here:

* ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::emu::Launch(grid, block, smem, stream)(kernel, args)`` (C++ has no ``<<<``);
* the host code registers its implementations for the ``vlmkern_emu`` namespace
  on the CPU dispatch key instead of ``vlmkern`` on CUDA;
* its "must be a CUDA tensor" checks accept CPU tensors (the emulated device).

Every rewrite must match (a source that changed shape fails the build loudly
rather than silently testing something else).  The schemas of the emulated ops
are copied from the real ``torch.ops.vlmkern`` ops, so the two cannot drift.

Use ``load()``: it returns ``torch.ops.vlmkern_emu`` with ``kalman_step_``,
``awp_perturb_``, ``awp_restore_`` (same signatures as the real ops, on CPU
tensors) and the emulator controls ``launch_count``, ``set_schedule_seed``,
``last_error_message``.  The build (about 30 s on two cores) is cached in
``build/cuda-emu/<hash of the sources and flags>``.  ``VLMKERN_EMU_UCONTEXT=1``
builds the portable ucontext fiber switch instead of the x86-64 one.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = ROOT / "tools" / "cuda_emu"

# Every op's CUDA translation units (relative to csrc/), and the ops their host
# code registers: a new op's csrc/<op>/<op>_cuda.{cu,cpp} is picked up as is.
KERNEL_SOURCES = sorted(str(p.relative_to(CSRC)) for p in CSRC.glob("*/*_cuda.cu"))
HOST_SOURCES = sorted(str(p.relative_to(CSRC)) for p in CSRC.glob("*/*_cuda.cpp"))
# Shared headers that launch kernels: rewritten like the kernel sources into
# build/.../src/<same path>, which the rewritten sources include first.
KERNEL_HEADERS = ["common/multi_tensor_apply.cuh"]
OPS = [name for rel in HOST_SOURCES for name in re.findall(r'm\.impl\("(\w+)"', (CSRC / rel).read_text())]

_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.S)

_ops = None
_lib = None


def _write(path: Path, text: str) -> None:
    """Write only when the text changed: a rewrite with a fresh mtime would make
    ninja recompile the whole cached build at every load()."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def rewrite_kernels(src: str, name: str) -> str:
    def launch(m):
        tail = ")" if m.group(3) else ", "  # kernel() takes no arguments / takes some
        return f"::emu::Launch({m.group(2)})({m.group(1)}{tail}"

    out, n = _LAUNCH.subn(launch, src)
    if n == 0:
        raise RuntimeError(f"cuda_emu: no <<<...>>> launch found in {name}")
    if "<<<" in out:
        raise RuntimeError(f"cuda_emu: a launch in {name} was not rewritten")
    return out


def rewrite_host(src: str, name: str) -> str:
    before = "TORCH_LIBRARY_IMPL(vlmkern, CUDA, m)"
    if src.count(before) != 1:
        raise RuntimeError(f"cuda_emu: expected one `{before}` in {name}")
    out = src.replace(before, "TORCH_LIBRARY_IMPL(vlmkern_emu, CPU, m)")
    return out.replace(".is_cuda()", ".is_cpu()")


def _cflags() -> list:
    flags = ["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    if os.environ.get("VLMKERN_EMU_UCONTEXT", "0") not in ("", "0"):
        flags.append("-DVLMKERN_EMU_UCONTEXT")
    return flags


def _sources_hash() -> str:
    """Of everything the build reads: the emulator, csrc/common and the folders
    of the emulated ops (their sources and the headers they include)."""
    h = hashlib.sha256(torch.__version__.encode())
    h.update(" ".join(_cflags()).encode())
    folders = {EMU, CSRC / "common"} | {(CSRC / rel).parent for rel in KERNEL_SOURCES + HOST_SOURCES}
    for p in sorted(f for d in folders for f in d.rglob("*") if f.is_file()):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _define_schemas():
    """The vlmkern_emu ops take the real ops' schemas."""
    global _lib
    import vlmkern  # noqa: F401  (vlmkern.ops defines the torch.ops.vlmkern schemas)

    _lib = torch.library.Library("vlmkern_emu", "FRAGMENT")
    for op in OPS:
        schema = str(getattr(torch.ops.vlmkern, op).default._schema)
        assert schema.startswith("vlmkern::"), schema
        _lib.define(schema[len("vlmkern::"):])


def load(verbose: bool = False):
    """Build (cached) and load the emulated CUDA ops; returns ``torch.ops.vlmkern_emu``."""
    global _ops
    if _ops is not None:
        return _ops
    from torch.utils import cpp_extension

    key = _sources_hash()
    build = ROOT / "build" / "cuda-emu" / key
    gen = build / "src"
    gen.mkdir(parents=True, exist_ok=True)
    sources = [EMU / "emu_runtime.cpp"]
    for src in [CSRC / rel for rel in KERNEL_SOURCES] + [EMU / "selftest.cu"]:
        path = gen / (src.stem + "_kernels_emu.cpp")
        _write(path, rewrite_kernels(src.read_text(), src.name))
        sources.append(path)
    for rel in KERNEL_HEADERS:
        path = gen / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, rewrite_kernels((CSRC / rel).read_text(), rel))
    for rel in HOST_SOURCES:
        path = gen / (Path(rel).stem + "_host_emu.cpp")
        _write(path, rewrite_host((CSRC / rel).read_text(), rel))
        sources.append(path)
    _define_schemas()
    cpp_extension.load(
        name=f"vlmkern_cuda_emu_{key}",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(EMU / "include"), str(gen), str(CSRC)],
        extra_cflags=_cflags(),
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    _ops = torch.ops.vlmkern_emu
    return _ops
