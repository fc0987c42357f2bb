"""vlmkern: fused kernels and thin trainers for fine-tuning vision-language models.

Public ops (each with ``backend=`` to force one of cuda / triton / cpu / torch):

* :func:`hgcl_loss` and :class:`GlobalContrastiveLoss` - TuneCLIP's hinged
  global contrastive loss (and GCL) with per-sample ``log u`` state.
* :func:`kalman_step_` - the fused diagonal Kalman step (LoKO / Kalman-NGD).
* :func:`awp_perturb_`, :func:`awp_restore_` - layerwise-normalised weight
  perturbation with an exact restore (WRF4CIR / AWP).

``vlmkern.info()`` (or ``vlmkern info`` on the command line) says which
backends are live for which op.  The float64 oracle the tests compare against,
:mod:`vlmkern.reference`, is not imported here: ``from vlmkern import reference``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _C_loader

_C_loader.load()

from . import backends  # noqa: E402
from .backends import BackendUnavailableError  # noqa: E402
from .info import info  # noqa: E402
from .ops.hgcl import GlobalContrastiveLoss, hgcl_loss  # noqa: E402
from .ops.kalman import kalman_step_  # noqa: E402
from .ops.awp import awp_perturb_, awp_restore_  # noqa: E402

__all__ = [
    "__version__",
    "backends",
    "BackendUnavailableError",
    "info",
    "kalman_step_",
    "hgcl_loss",
    "GlobalContrastiveLoss",
    "awp_perturb_",
    "awp_restore_",
]
