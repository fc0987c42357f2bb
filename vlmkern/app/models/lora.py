"""LoRA adapters for open_clip models (both towers), with merge / unmerge and
adapter-only save / load.

Which weights are adapted is decided from the module structure, not from
parameter-name substrings: every open_clip transformer block
(``open_clip.transformer.ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``)
of the selected towers contributes

``"attn_qkv"``
    the fused q/k/v input projection ``in_proj_weight`` [3d, d] of its attention
    (``nn.MultiheadAttention`` or open_clip's ``Attention``).  ``nn.MultiheadAttention``
    reads ``in_proj_weight`` (and ``out_proj.weight``) *functionally*, never by
    calling a Linear, so these two are adapted with a ``torch.nn.utils.parametrize``
    parametrization that returns ``W + scale * B A`` whenever the module reads
    the attribute.  q, k and v get separate rank-``r`` adapters (the delta is
    ``cat(B_q A_q, B_k A_k, B_v A_v)``), as LoRA is usually applied per projection.
``"attn_out"``
    the attention output projection ``out_proj.weight`` (same mechanism).
``"mlp_fc"``, ``"mlp_proj"``
    the first and last ``nn.Linear`` of the block's MLP (open_clip's ``c_fc`` and
    ``c_proj``), replaced by :class:`LoRALinear` (``base(x) + scale * B A dropout(x)``).

``dropout`` applies to the MLP adapters only: the attention adapters act on the
weight (the input never passes through them), so input dropout is undefined there.

Initialisation as in the LoRA paper: ``A`` Kaiming-uniform, ``B = 0``, so the
adapted model computes exactly what the base model computes until ``B`` moves.
``scale = alpha / rank``.

Typical use::

    model = open_clip.create_model("ViT-B-16", pretrained="openai")   # load weights FIRST
    add_lora(model, rank=8, alpha=16)            # freezes the base, adapters trainable
    opt = KalmanOptimizer(lora_parameters(model), p0=...)
    ...
    save_lora(model, "adapters.pt")              # adapters + config only
    merge_lora(model)                            # fold into the base weights for inference

Adding adapters changes the base weights' state-dict keys (``...attn.parametrizations.
in_proj_weight.original``, ``...mlp.c_fc.base.weight``): load a base checkpoint
before :func:`add_lora`, and adapters with :func:`load_lora`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LoRAConfig",
    "LoRADelta",
    "LoRALinear",
    "add_lora",
    "lora_modules",
    "lora_parameters",
    "mark_only_lora_trainable",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora",
    "load_lora",
]

TARGETS = ("attn_qkv", "attn_out", "mlp_fc", "mlp_proj")
TOWERS = ("visual", "text")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = TARGETS
    towers: Tuple[str, ...] = TOWERS
    adapted: List[str] = field(default_factory=list)  # module paths that received adapters


class LoRADelta(nn.Module):
    """Low-rank delta ``scale * B A`` of a weight [out, in], as ``n_split``
    stacked blocks (``n_split = 3`` for a fused q/k/v projection).

    Used directly as a parametrization (``forward(W) = W + delta``) and as the
    adapter inside :class:`LoRALinear`.  ``merged`` switches the delta off once
    it has been folded into the base weight.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, n_split: int = 1,
                 device=None, dtype=torch.float32):
        super().__init__()
        if out_features % n_split:
            raise ValueError(f"LoRADelta: out_features {out_features} not divisible by n_split {n_split}")
        self.n_split = n_split
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(n_split, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_split, out_features // n_split, rank, device=device, dtype=dtype))
        for i in range(n_split):  # nn.Linear's default init, per block
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        self.merged = False

    def delta(self) -> torch.Tensor:
        """``scale * B A`` as one [out, in] tensor (float32 adapters)."""
        return torch.bmm(self.lora_B, self.lora_A).reshape(-1, self.lora_A.shape[-1]) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # parametrization: W -> W + delta
        if self.merged:
            return weight
        return weight + self.delta().to(weight.dtype)


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA adapter: ``base(x) + scale * B A dropout(x)``.

    Exposes ``weight`` / ``bias`` / ``in_features`` / ``out_features`` of the
    base layer (open_clip reads ``mlp.c_fc.weight.dtype``)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora = LoRADelta(base.out_features, base.in_features, rank, alpha, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora.merged:
            return y
        a = self.lora.lora_A[0].to(x.dtype)
        b = self.lora.lora_B[0].to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.lora.scaling


# ----------------------------------------------------------------------------
# structure: blocks, towers, targets
# ----------------------------------------------------------------------------


def _block_types() -> tuple:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    return (ResidualAttentionBlock, CustomResidualAttentionBlock)


def _towers(model: nn.Module) -> Dict[str, nn.Module]:
    out: Dict[str, nn.Module] = {}
    if isinstance(getattr(model, "visual", None), nn.Module):
        out["visual"] = model.visual
    text = getattr(model, "text", None)  # CustomTextCLIP
    if not isinstance(text, nn.Module):
        text = getattr(model, "transformer", None)  # CLIP: the text transformer is model.transformer
    if isinstance(text, nn.Module):
        out["text"] = text
    return out


def _attention_of(block: nn.Module) -> nn.Module:
    attn = block.attn
    w = getattr(attn, "in_proj_weight", None)
    if w is None or not isinstance(getattr(attn, "out_proj", None), nn.Linear):
        raise ValueError(
            f"add_lora: attention {type(attn).__name__} has no fused in_proj_weight / out_proj Linear "
            "(nn.MultiheadAttention with kdim != embed_dim is not supported)"
        )
    return attn


def _mlp_linears(block: nn.Module) -> List[Tuple[nn.Module, str, nn.Linear]]:
    """(parent, child name, Linear) of the MLP's linears, in forward order."""
    found = []
    for name, child in block.mlp.named_children():
        if isinstance(child, (nn.Linear, LoRALinear)):
            found.append((block.mlp, name, child))
    if len(found) < 2:
        raise ValueError(f"add_lora: the MLP of {type(block).__name__} has {len(found)} Linear layers, expected 2")
    return found


def _is_parametrized_with_lora(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, LoRADelta) for p in module.parametrizations[name]
    )


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = TARGETS,
    towers: Sequence[str] = TOWERS,
    freeze_base: bool = True,
) -> LoRAConfig:
    """Add LoRA adapters to an open_clip model in place (see the module docstring).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (or any module whose
            towers are made of open_clip transformer blocks).
        rank: ``r >= 1``.  alpha: scale numerator (``scale = alpha / r``).
        dropout: input dropout of the MLP adapters, in [0, 1).
        targets: subset of ``("attn_qkv", "attn_out", "mlp_fc", "mlp_proj")``.
        towers: subset of ``("visual", "text")``.
        freeze_base: make only the adapters trainable (default).

    Returns the :class:`LoRAConfig` (also stored as ``model.lora_config``).
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"add_lora: rank must be an int >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"add_lora: alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"add_lora: dropout must be in [0, 1), got {dropout}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"add_lora: targets must be a non-empty subset of {TARGETS}, got {tuple(targets)}")
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ValueError(f"add_lora: towers must be a non-empty subset of {TOWERS}, got {tuple(towers)}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("add_lora: the model already has LoRA adapters")
    found = _towers(model)
    blocks: List[Tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()}
    for tower in towers:
        if tower not in found:
            raise ValueError(f"add_lora: the model has no {tower} tower (found: {sorted(found)})")
        tower_blocks = [m for m in found[tower].modules() if isinstance(m, _block_types())]
        if not tower_blocks:
            raise ValueError(f"add_lora: no open_clip transformer blocks in the {tower} tower "
                             f"({type(found[tower]).__name__}); timm / HF towers are not supported")
        blocks += [(names[b], b) for b in tower_blocks]

    cfg = LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=tuple(targets), towers=tuple(towers))
    for path, block in blocks:
        if "attn_qkv" in targets or "attn_out" in targets:
            attn = _attention_of(block)
            if "attn_qkv" in targets:
                w = attn.in_proj_weight
                parametrize.register_parametrization(
                    attn, "in_proj_weight", LoRADelta(w.shape[0], w.shape[1], rank, alpha, n_split=3, device=w.device))
                cfg.adapted.append(f"{path}.attn.in_proj_weight")
            if "attn_out" in targets:
                w = attn.out_proj.weight
                parametrize.register_parametrization(
                    attn.out_proj, "weight", LoRADelta(w.shape[0], w.shape[1], rank, alpha, device=w.device))
                cfg.adapted.append(f"{path}.attn.out_proj.weight")
        lin = _mlp_linears(block)
        for want, (parent, name, layer) in (("mlp_fc", lin[0]), ("mlp_proj", lin[-1])):
            if want in targets:
                setattr(parent, name, LoRALinear(layer, rank, alpha, dropout))
                cfg.adapted.append(f"{names[parent]}.{name}")
    model.lora_config = cfg
    if freeze_base:
        mark_only_lora_trainable(model)
    return cfg


# ----------------------------------------------------------------------------
# parameters, merge / unmerge
# ----------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRADelta]]:
    """``(name, LoRADelta)`` of every adapter, in a fixed (module) order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRADelta):
            yield name, m


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapters' parameters (A and B of every adapter)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """``requires_grad = False`` everywhere except the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def _merge_targets(model: nn.Module) -> Iterator[Tuple[torch.Tensor, LoRADelta]]:
    """(base weight tensor to modify in place, its adapter)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m.base.weight, m.lora
        for pname in ("in_proj_weight", "weight"):
            if not isinstance(m, LoRALinear) and _is_parametrized_with_lora(m, pname):
                plist = m.parametrizations[pname]
                for par in plist:
                    if isinstance(par, LoRADelta):
                        yield plist.original, par


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``W += scale B A``); the adapters
    then contribute nothing until :func:`unmerge_lora`.  Idempotent.  For an
    fp16/bf16 base the merged weight is rounded to that dtype, so unmerging
    restores it only to that dtype's precision; fp32 round trips to ~1e-7."""
    for w, lora in _merge_targets(model):
        if not lora.merged:
            w.add_(lora.delta().to(w.dtype))
            lora.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (``W -= scale B A``).  Idempotent."""
    for w, lora in _merge_targets(model):
        if lora.merged:
            w.sub_(lora.delta().to(w.dtype))
            lora.merged = False


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in lora_modules(model))


# ----------------------------------------------------------------------------
# adapter-only save / load
# ----------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{"<adapter module path>.lora_A": ..., ".lora_B": ...}`` (detached clones)."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_A"] = m.lora_A.detach().clone()
        sd[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load adapter weights saved by :func:`lora_state_dict` into a model with the
    same adapters.  A merged model is unmerged, loaded and merged again."""
    mods = dict(lora_modules(model))
    want = {f"{n}.{k}" for n in mods for k in ("lora_A", "lora_B")}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if strict and (missing or unexpected):
        raise KeyError(f"load_lora_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    merged = is_merged(model)
    if merged:
        unmerge_lora(model)
    for key, value in state.items():
        if key not in want:
            continue
        name, attr = key.rsplit(".", 1)
        p = getattr(mods[name], attr)
        if p.shape != value.shape:
            raise ValueError(f"load_lora_state_dict: {key} has shape {tuple(value.shape)}, the model's adapter has {tuple(p.shape)}")
        p.copy_(value)
    if merged:
        merge_lora(model)


def save_lora(model: nn.Module, path) -> None:
    """Save the adapters and their config (not the base weights) to ``path``."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_lora: the model has no LoRA adapters (call add_lora first)")
    torch.save({"format": "vlmkern-lora-1", "config": asdict(cfg), "state": lora_state_dict(model)}, path)


def load_lora(model: nn.Module, path, strict: bool = True) -> LoRAConfig:
    """Load adapters saved by :func:`save_lora`.  If the model has no adapters
    yet, they are added first with the saved config."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != "vlmkern-lora-1":
        raise ValueError(f"load_lora: {path} is not a vlmkern LoRA file")
    c = blob["config"]
    if getattr(model, "lora_config", None) is None:
        add_lora(model, rank=c["rank"], alpha=c["alpha"], dropout=c["dropout"], targets=tuple(c["targets"]),
                 towers=tuple(c["towers"]))
    else:
        mine = model.lora_config
        if (mine.rank, mine.targets, mine.towers) != (c["rank"], tuple(c["targets"]), tuple(c["towers"])):
            raise ValueError(f"load_lora: saved adapters (rank {c['rank']}, {c['targets']}, {c['towers']}) do not match "
                             f"the model's (rank {mine.rank}, {mine.targets}, {mine.towers})")
    load_lora_state_dict(model, blob["state"], strict=strict)
    return model.lora_config
