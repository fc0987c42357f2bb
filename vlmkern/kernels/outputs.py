"""Allocation of kernel outputs: one helper, so tests can poison it.

Every Python-side kernel wrapper of vlmkern (the Triton ops and the PyTorch
fallbacks) allocates the tensors its kernels are meant to overwrite
completely through :func:`empty` - never ``torch.empty`` directly - and calls it
as ``outputs.empty(...)`` (a module attribute looked up at call time).

With ``POISON`` true, :func:`empty` returns tensors filled with NaN instead of
uninitialised memory: an element a kernel forgets to write then shows up as a
NaN in the result instead of as whatever the allocator happened to hand out
(often zeros, which hides the bug).  Tests switch it on with
``monkeypatch.setattr(vlmkern.kernels.outputs, "POISON", True)``; setting the
environment variable ``VLMKERN_DEBUG_POISON_OUTPUTS=1`` before import switches
it on for a whole run.  The compiled C++ kernels read the same environment
variable at every call (``csrc/common/outputs.h``).

Tensors that an algorithm *means* to start from a value (accumulators that
start at zero, ``-inf`` for an empty log-sum-exp) are created with
``torch.zeros`` / ``torch.full`` as usual; only "every element is written"
buffers go through here.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

ENV = "VLMKERN_DEBUG_POISON_OUTPUTS"
POISON: bool = os.environ.get(ENV, "") not in ("", "0")


def empty(shape: Union[int, Sequence[int]], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, or a NaN-filled tensor when :data:`POISON` is set
    (for integer dtypes: the most negative value)."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape if not isinstance(shape, int) else (shape,), fill, dtype=dtype, device=device)
