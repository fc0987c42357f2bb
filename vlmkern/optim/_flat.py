"""Flat per-dtype buffers for collectives over many tensors (one call per dtype, not per tensor)."""

from typing import Dict, List, Sequence, Tuple

import torch


def flat_by_dtype(tensors: Sequence[torch.Tensor]) -> List[Tuple[List[int], torch.Tensor]]:
    """``tensors`` grouped by dtype: for each dtype, the indices of its tensors (in order) and one new
    contiguous 1-D buffer holding them end to end."""
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return [(idx, torch.cat([tensors[i].reshape(-1) for i in idx])) for idx in groups.values()]


def split_flat(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    """Views of the 1-D ``flat`` cut end to end into ``shapes`` (the inverse of :func:`flat_by_dtype`'s
    concatenation for one group)."""
    sizes = [torch.Size(s).numel() for s in shapes]
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]
