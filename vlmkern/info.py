"""``vlmkern.info()``: versions, devices and live backends per op."""

from __future__ import annotations

import platform
import sys
from typing import Any, Dict

import torch

from . import _C_loader, backends


def registered_ops() -> list:
    """Names of the ops registered under ``torch.ops.vlmkern`` (compiled and Python-defined)."""
    return sorted(
        n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("vlmkern::")
    )


def info(as_text: bool = False) -> Dict[str, Any] | str:
    """Report versions, devices and which backends are live for which op.

    Returns a dict; with ``as_text=True`` a human-readable report (what
    ``vlmkern info`` prints).
    """
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on install
        triton_version = None
    C = _C_loader.module()
    d: Dict[str, Any] = {
        "vlmkern": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backends.triton_interpret(),
        "compiled_library": {
            "loaded": _C_loader.load(),
            "error": _C_loader.error(),
            "path": getattr(C, "__file__", None),
            "built_with_torch": getattr(C, "built_with_torch", None),
            "cuda_kernels_compiled": bool(getattr(C, "with_cuda", 0)),
            "cuda_archs": getattr(C, "cuda_archs", None),
        },
        "registered_ops": registered_ops(),
        "devices": {
            "cpu": {"threads": torch.get_num_threads()},
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else [],
        },
        "backends": backends.table(),
    }
    d["hgcl_triton_config"] = _hgcl_triton_config()
    if not as_text:
        return d
    lines = [
        f"vlmkern {d['vlmkern']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})  triton {d['triton']}",
        f"platform: {d['platform']}",
        f"compiled library: {'loaded' if d['compiled_library']['loaded'] else 'NOT loaded: ' + str(d['compiled_library']['error'])}"
        + (
            f" ({d['compiled_library']['path']}; CUDA kernels compiled in: "
            f"{d['compiled_library']['cuda_kernels_compiled']}, archs {d['compiled_library']['cuda_archs']})"
            if d["compiled_library"]["loaded"]
            else ""
        ),
        f"registered ops: torch.ops.vlmkern.{{{', '.join(d['registered_ops'])}}}",
        f"devices: cpu ({d['devices']['cpu']['threads']} threads)"
        + (f", cuda: {', '.join(d['devices']['cuda'])}" if d["devices"]["cuda"] else ", no CUDA device"),
        f"TRITON_INTERPRET: {d['triton_interpret']}",
        f"HGCL Triton launch configuration: {d['hgcl_triton_config']}",
        "",
        "backends (live, or why not):",
    ]
    for op, per_dev in d["backends"].items():
        for dev, row in per_dev.items():
            lines.append(f"  {op:8s} on {dev:4s}  auto -> {row['auto']}")
            for b in backends.BACKENDS:
                lines.append(f"      {b:7s} {row[b]}")
    return "\n".join(lines)


def _hgcl_triton_config() -> str:
    """Where the HGCL Triton kernels' GPU block sizes come from (defaults, the
    tuned table, the environment override)."""
    import os

    try:
        from .kernels.triton import hgcl as K
    except Exception as exc:  # triton missing or broken
        return f"n/a (triton kernels not importable: {type(exc).__name__})"
    parts = []
    try:
        table = K._tuned_table()
    except Exception as exc:  # a malformed table: say so here instead of failing
        table = {}
        parts.append(f"tuned table INVALID ({exc})")
    if table:
        parts.append(f"tuned table {os.path.basename(K.TUNED_PATH)} for {table.get('arch', '?')} "
                     f"({', '.join(sorted(table.get('entries', {}))) or 'no entries'}; {table.get('date', 'undated')})")
    elif not parts:
        parts.append("untuned defaults (no hgcl_tuned.json)")
    if os.environ.get(K.CONFIG_ENV, "").strip():
        parts.append(f"{K.CONFIG_ENV}={os.environ[K.CONFIG_ENV].strip()}")
    return "; ".join(parts)
