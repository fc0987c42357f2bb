"""Composed image retrieval (CIR) query composers over CLIP features.

* :class:`SumCombiner` - CLIP4Cir's baseline: ``normalize(f_ref + f_text)``.
* :class:`LearnedCombiner` - a small learned combiner: a gate
  ``lambda = sigmoid(MLP([f_ref, f_text]))`` mixes the two normalised features
  and a residual MLP adds what neither carries; the output is normalised.

Targets are ``normalize(f_target)``; the training loss is in-batch
cross-entropy with logits ``scale * q . t`` (``cir_loss``), scale 100 as CLIP4Cir.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SumCombiner(nn.Module):
    def forward(self, f_ref: torch.Tensor, f_text: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.normalize(f_ref, dim=-1) + F.normalize(f_text, dim=-1), dim=-1)


class LearnedCombiner(nn.Module):
    def __init__(self, dim: int, hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or 2 * dim
        self.gate = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.residual = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        nn.init.zeros_(self.residual[-1].weight)  # starts as a gated sum
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, f_ref: torch.Tensor, f_text: torch.Tensor) -> torch.Tensor:
        r, t = F.normalize(f_ref, dim=-1), F.normalize(f_text, dim=-1)
        x = torch.cat([r, t], dim=-1)
        lam = torch.sigmoid(self.gate(x))
        return F.normalize(lam * t + (1 - lam) * r + self.residual(x), dim=-1)


def cir_loss(query: torch.Tensor, target: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """In-batch cross-entropy: query i should retrieve target i."""
    logits = scale * query @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))
