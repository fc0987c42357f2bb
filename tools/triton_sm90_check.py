"""Compile the HGCL Triton kernels for a GPU target without a GPU; report registers and spills.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels as numpy code: it
accepts things the GPU compiler rejects (e.g. a plain Python float global read
inside a ``@triton.jit`` function) and says nothing about register pressure.
This script runs the real compiler pipeline (Triton -> TTGIR -> LLVM -> PTX ->
``ptxas``, all shipped with the triton wheel) for ``sm_90`` on this CPU-only
machine, with the argument specialisation a real launch gets (16-byte aligned
pointers, sizes divisible by 16), and reads the resource usage of the cubin
(``cuobjdump --dump-resource-usage``): ``REG`` registers per thread and
``STACK`` bytes of local memory per thread (non-zero = register spills).

    python tools/triton_sm90_check.py [--dtypes bf16,fp16,fp32] [--dims 512,768] [--kernels lse,grad]
                                      [--variants local-rows,...] [--arch 90] [--strict]

``--strict`` exits non-zero when a variant spills.  Timing still needs a GPU.
Uses Triton internals (``ASTSource``, ``GPUTarget``, the ``attrs`` format,
``kernel.asm`` / ``metadata``) that are the same in triton 3.6 (the GPU
machine's version) and 3.8; register counts differ between the two versions
(bench/RESULTS_hgcl.md).  To check another version without touching the venv:

    pip install --no-deps --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 python tools/triton_sm90_check.py --strict
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# The real compiler, not the interpreter: @triton.jit picks its mode when the
# kernel module is imported, so run this as its own process.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vlmkern.kernels.triton import hgcl as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The gradient launches of hgcl_grad_triton: (OWN, LOOP, STORE_OSUM, POS)
GRAD_VARIANTS = {
    "local-rows": (True, True, True, False),  # (F, G): dF, row sums
    "local-cols+pos": (True, True, False, True),  # (G, F): dG + positive pairs
    "global-rows": (True, False, True, False),  # (F, Gg): dF
    "global-cols": (False, True, False, False),  # (Gg, F): dGg
}


def _attrs(fn, sig):
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
            if v.startswith("*") or k in ("D", "NO", "NL")}


def _compile(fn, sig, const, opts, arch):
    for k in const:
        sig[k] = "constexpr"
    attrs = _attrs(fn, sig)
    src = ASTSource(fn, sig, const, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    # The attrs format is internal to Triton: a version that reads it differently
    # would silently compile without the launch's alignment hints.
    hints = kernel.asm["ttir"].count("tt.divisibility = 16")
    if hints != len(attrs):
        raise RuntimeError(f"triton {triton.__version__}: {hints} of {len(attrs)} divisibility hints reached "
                           f"the TTIR of {fn.__name__}; the ASTSource attrs format has changed")
    return kernel


def resources(kernel) -> dict:
    """``{"regs": int, "stack": int, "shared": int}`` of a compiled kernel (from its cubin)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{out}")
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=kernel.metadata.shared)


def compile_lse(dtype: str, d: int, arch: int = 90, lmean: bool = False):
    cfg, opts = K._launch_options(K._lse_config(d, True, DTYPES[dtype], lmean))
    p = "*" + dtype
    sig = {"X": p, "Y": p, "P": "*fp32", "OUT": "*fp32", "WOUT": "*fp32", "NO": "i32", "NL": "i32", "D": "i32",
           "off_o": "i32", "inv_tau": "fp32", "margin": "fp32", "log_nm1": "fp32"}
    const = dict(HINGE=True, LMEAN=lmean, IEEE=K._precision(DTYPES[dtype], False)["IEEE"], **cfg)
    return _compile(K._lse_kernel, sig, const, opts, arch), cfg


def compile_grad(dtype: str, d: int, variant: str, arch: int = 90):
    own, loop, store, pos = GRAD_VARIANTS[variant]
    cfg, opts = K._launch_options(K._config(d, True, DTYPES[dtype])["grad"])
    p = "*" + dtype
    sig = {"X": p, "Y": p, "P": "*fp32", "LD_O": "*fp32", "LD_L": "*fp32", "SCALE": "*fp32", "OUT": "*fp32",
           "OSUM": "*fp32", "PREV": "*fp32", "PARTNER": p, "OTHER": "*fp32", "NO": "i32", "NL": "i32", "D": "i32",
           "off_o": "i32", "off_l": "i32", "inv_tau": "fp32", "margin": "fp32", "inv_nm1": "fp32"}
    const = dict(HINGE=True, OWN=own, LOOP=loop, STORE_OSUM=store, POS=pos,
                 **K._precision(DTYPES[dtype], False), **cfg)
    return _compile(K._grad_kernel, sig, const, opts, arch), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--dims", default="512,768")
    ap.add_argument("--kernels", default="lse,grad")
    ap.add_argument("--variants", default=",".join(GRAD_VARIANTS), help="gradient launch variants")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--strict", action="store_true", help="exit 1 if any variant spills registers")
    args = ap.parse_args(argv)
    spills = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print("| kernel | dtype | d | config | registers | spill bytes (STACK) | shared |")
    print("|---|---|---:|---|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            kinds = args.kernels.split(",")
            jobs = [("lse", lambda: compile_lse(dtype, d, args.arch)),  # fixed tau
                    ("lse lmean", lambda: compile_lse(dtype, d, args.arch, lmean=True))  # learnable tau
                    ] if "lse" in kinds else []
            if "grad" in kinds:
                jobs += [(f"grad {v}", (lambda v=v: compile_grad(dtype, d, v, args.arch)))
                         for v in args.variants.split(",")]
            for name, job in jobs:
                kernel, cfg = job()
                r = resources(kernel)
                spills += r["stack"] > 0
                print(f"| {name} | {dtype} | {d} | {cfg} | {r['regs']} | {r['stack']} | {r['shared']} |", flush=True)
    if spills:
        print(f"{spills} variant(s) spill registers")
    return 1 if (spills and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
