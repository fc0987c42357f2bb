"""Loads the compiled library ``vlmkern._C`` once, warning once if it is missing."""

from __future__ import annotations

import os
import warnings

_state = {"loaded": False, "error": None, "module": None, "tried": False}


def load() -> bool:
    """Import ``vlmkern._C`` (which registers ``torch.ops.vlmkern.*``).

    Returns True when the compiled ops are available.  When the library is
    missing or fails to load, ops fall back to their PyTorch implementations
    and one warning says so (set ``VLMKERN_NO_COMPILED=1`` to skip loading on
    purpose, e.g. to test the fallback).
    """
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    if os.environ.get("VLMKERN_NO_COMPILED", "") not in ("", "0"):
        _state["error"] = "disabled by VLMKERN_NO_COMPILED"
        return False
    import torch  # noqa: F401  (must be loaded before the extension)

    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "vlmkern: the compiled library vlmkern._C could not be loaded "
            f"({_state['error']}); every op falls back to its PyTorch implementation. "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state["loaded"] = True
    _state["module"] = _C
    return True


def module():
    return _state["module"]


def error() -> str | None:
    return _state["error"]
