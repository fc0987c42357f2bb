"""Layer groups of a CLIP model, taken from the module structure (SPEC §5).

APFT partitions CLIP into five functional groups:

* ``visual_frontend``: patch embedding, class / positional embedding, ``ln_pre``
* ``visual_blocks``: the vision transformer blocks, input to output
* ``text_frontend``: token and positional embedding
* ``text_blocks``: the text transformer blocks, input to output
* ``projections``: ``visual.proj``, ``visual.ln_post``, ``text_projection``,
  ``ln_final`` and ``logit_scale`` (everything after the last block)

Blocks are found as the ``nn.ModuleList`` of transformer blocks of each tower
(``resblocks`` in open_clip, ``encoder.layer`` / ``layers`` in Hugging Face
text towers) and parameters are assigned by module identity, never by name
substring: the public APFT code matches ``"transformer.resblocks.1"`` and so
also unfreezes ``visual.transformer.resblocks.1`` and text blocks 10-19.
Every trainable parameter ends in exactly one group (checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn


@dataclass
class LayerGroups:
    visual_frontend: List[nn.Parameter] = field(default_factory=list)
    visual_blocks: List[List[nn.Parameter]] = field(default_factory=list)
    text_frontend: List[nn.Parameter] = field(default_factory=list)
    text_blocks: List[List[nn.Parameter]] = field(default_factory=list)
    projections: List[nn.Parameter] = field(default_factory=list)
    names: Dict[int, str] = field(default_factory=dict)  # id(param) -> qualified name

    def all_params(self) -> List[nn.Parameter]:
        out = list(self.visual_frontend) + list(self.text_frontend) + list(self.projections)
        for blk in self.visual_blocks + self.text_blocks:
            out += blk
        return out

    def summary(self) -> Dict[str, int]:
        n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        return {
            "visual_frontend": n(self.visual_frontend),
            "visual_blocks": sum(n(b) for b in self.visual_blocks),
            "text_frontend": n(self.text_frontend),
            "text_blocks": sum(n(b) for b in self.text_blocks),
            "projections": n(self.projections),
        }


def _find_blocks(tower: nn.Module) -> Optional[nn.ModuleList]:
    """The ModuleList of transformer blocks inside a tower (largest one found)."""
    candidates: List[Tuple[int, nn.ModuleList]] = []
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("resblocks", "layer", "layers", "blocks", "h"):
                candidates.append((sum(p.numel() for p in mod.parameters()), mod))
    if not candidates:
        return None
    return max(candidates, key=lambda t: t[0])[1]


def _towers(model: nn.Module) -> Tuple[nn.Module, nn.Module, bool]:
    """(vision tower, text tower, text tower is the model itself)."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise TypeError(f"clip_layer_groups: {type(model).__name__} has no `visual` tower (expected an open_clip model)")
    if hasattr(model, "text"):  # CustomTextCLIP / CoCa: separate text module
        return visual, model.text, False
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):  # open_clip.CLIP
        return visual, model, True
    raise TypeError(f"clip_layer_groups: cannot find the text tower of {type(model).__name__}")


_VISUAL_HEAD = ("proj", "ln_post", "head", "attn_pool", "ln_head")
_TEXT_HEAD = ("text_projection", "ln_final", "proj", "pooler")


def clip_layer_groups(model: nn.Module) -> LayerGroups:
    """Partition an open_clip model's parameters into APFT's five groups."""
    if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(model, "visual"):
        model = model.module  # DDP wrapper
    visual, text, text_is_model = _towers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    g = LayerGroups(names=names)
    assigned: Dict[int, str] = {}

    def take(params: Iterable[nn.Parameter], group: str, into: list) -> None:
        for p in params:
            if id(p) in assigned:
                continue
            assigned[id(p)] = group
            into.append(p)

    vblocks = _find_blocks(visual)
    tblocks = _find_blocks(text.transformer if text_is_model else text)
    if vblocks is None or tblocks is None:
        raise TypeError("clip_layer_groups: could not find the transformer blocks of "
                        + ("the vision tower" if vblocks is None else "the text tower"))
    for blk in vblocks:
        lst: List[nn.Parameter] = []
        take(blk.parameters(), "visual_blocks", lst)
        g.visual_blocks.append(lst)
    for blk in tblocks:
        lst = []
        take(blk.parameters(), "text_blocks", lst)
        g.text_blocks.append(lst)

    # heads: direct children / direct parameters named as projections
    def head_params(tower: nn.Module, head_names: Sequence[str]) -> List[nn.Parameter]:
        out = []
        for n, p in tower.named_parameters(recurse=False):
            if n in head_names:
                out.append(p)
        for n, child in tower.named_children():
            if n in head_names:
                out += list(child.parameters())
        return out

    take(head_params(visual, _VISUAL_HEAD), "projections", g.projections)
    take(head_params(text, _TEXT_HEAD), "projections", g.projections)
    if not text_is_model:
        take(head_params(model, ("logit_scale", "logit_bias")), "projections", g.projections)
    else:
        take([p for n, p in model.named_parameters(recurse=False) if n in ("logit_scale", "logit_bias")],
             "projections", g.projections)
    # everything else in a tower is its frontend
    take(visual.parameters(), "visual_frontend", g.visual_frontend)
    if text_is_model:
        rest = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
        take(rest, "text_frontend", g.text_frontend)
    else:
        take(text.parameters(), "text_frontend", g.text_frontend)
        take(model.parameters(), "projections", g.projections)  # any remaining top-level parameter
    missing = [n for n, p in model.named_parameters() if id(p) not in assigned]
    if missing:  # pragma: no cover - defensive
        raise RuntimeError(f"clip_layer_groups: parameters in no group: {missing}")
    return g


def apft_phases(groups: LayerGroups, blocks_per_phase: int = 1, include_frontends: bool = True) -> List[List[nn.Parameter]]:
    """The parameters *newly* unfrozen at each phase (SPEC §5).

    Phase 0: projections. Phase k >= 1: the next ``blocks_per_phase`` blocks of
    each tower, from the output inwards (a tower with fewer blocks simply runs
    out earlier). Last phase: both frontends.
    """
    if blocks_per_phase < 1:
        raise ValueError(f"blocks_per_phase must be >= 1, got {blocks_per_phase}")
    phases: List[List[nn.Parameter]] = [list(groups.projections)]
    vb = list(reversed(groups.visual_blocks))
    tb = list(reversed(groups.text_blocks))
    k = 0
    while k < max(len(vb), len(tb)):
        new: List[nn.Parameter] = []
        for blocks in (vb, tb):
            for blk in blocks[k:k + blocks_per_phase]:
                new += blk
        phases.append(new)
        k += blocks_per_phase
    if include_frontends:
        phases.append(list(groups.visual_frontend) + list(groups.text_frontend))
    return phases


def set_trainable_phase(model: nn.Module, phases: List[List[nn.Parameter]], phase: int) -> float:
    """Freeze everything, unfreeze phases 0..phase; return the trainable fraction."""
    if not 0 <= phase < len(phases):
        raise ValueError(f"phase must be in [0, {len(phases)}), got {phase}")
    for p in model.parameters():
        p.requires_grad_(False)
    for ps in phases[: phase + 1]:
        for p in ps:
            p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train / max(total, 1)
