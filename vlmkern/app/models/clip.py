"""Building open_clip models: any architecture, a pretrained tag or a local checkpoint.

Tiny architectures for tests and the demo ship with vlmkern
(``vlmkern/app/models/configs/*.json``, registered with open_clip on import):

* ``vlmkern-micro-ViT``: 16 px images, 2+2 layers of width 64 (tests)
* ``vlmkern-tiny-ViT``: 32 px images, 4+4 layers of width 128 (demo)

Both use open_clip's standard BPE tokenizer (shipped inside open_clip, no download).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_registered = False


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover
        raise ImportError("vlmkern.app.models needs open_clip_torch: pip install open_clip_torch torchvision") from exc
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def create_clip(model_name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu",
                precision: str = "fp32", **kwargs):
    """``(model, preprocess_val, tokenizer)`` for an open_clip architecture.

    ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``,
    ... - needs network or a populated cache) or a path to a local checkpoint
    (a state dict, or a dict with ``"state_dict"``, as open_clip and vlmkern
    write them). ``None`` builds the architecture with random weights.
    """
    oc = _open_clip()
    local = pretrained is not None and os.path.isfile(pretrained)
    model, _, preprocess = oc.create_model_and_transforms(
        model_name, pretrained=None if local else pretrained, precision=precision, device=device, **kwargs)
    if local:
        load_checkpoint_weights(model, pretrained)
    tokenizer = oc.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def load_checkpoint_weights(model: torch.nn.Module, path: str, strict: bool = True) -> Tuple[list, list]:
    """Load a local checkpoint (plain state dict, or {"state_dict"|"model": ...}); strips ``module.``."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    res = model.load_state_dict(sd, strict=strict)
    return list(res.missing_keys), list(res.unexpected_keys)
