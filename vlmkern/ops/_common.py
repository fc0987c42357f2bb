"""Argument checks shared by the public op functions (names the argument)."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_list(x, name: str, op: str) -> list:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"vlmkern.{op}: {name} must be a list of tensors, got a single Tensor")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"vlmkern.{op}: {name} must be a list of tensors, got {type(x).__name__}") from None


def check_same_shapes(op: str, a: Sequence[torch.Tensor], an: str, b: Sequence[torch.Tensor], bn: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"vlmkern.{op}: {bn} has {len(b)} tensors but {an} has {len(a)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"vlmkern.{op}: {bn}[{i}] must be a Tensor, got {type(y).__name__}")
        if x.shape != y.shape:
            raise ValueError(f"vlmkern.{op}: {bn}[{i}] has shape {tuple(y.shape)} but {an}[{i}] has shape {tuple(x.shape)}")
        if x.device != y.device:
            raise ValueError(f"vlmkern.{op}: {bn}[{i}] is on {y.device} but {an}[{i}] is on {x.device}")


def device_of(tensors: Sequence[torch.Tensor], fallback: torch.device | None = None) -> torch.device:
    for t in tensors:
        return t.device
    return fallback if fallback is not None else torch.device("cpu")


def scalar_tensor(x, name: str, op: str, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on ``device``; Python numbers are converted (no sync)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"vlmkern.{op}: {name} must be a 0-d tensor, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"vlmkern.{op}: {name} is on {x.device} but the tensors are on {device}")
        return x.reshape(()).to(torch.float32)
    return torch.tensor(float(x), dtype=torch.float32, device=device)
