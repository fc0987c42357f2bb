"""Plumbing shared by the trainers: run folders, metrics log, seeding,
checkpoint/resume with RNG state, AMP, and torch.distributed helpers.

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per
line: ``{"step"|"epoch": ..., "split": ..., <metric>: value}``), optional
TensorBoard events, and ``checkpoint.pt`` (model, optimizer, scheduler,
method state such as the per-sample ``u`` buffers or APFT's phase history,
and every RNG state) so that a resumed run continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Any, Dict, Iterable, Literal, Optional

import torch
import torch.distributed as dist

Amp = Optional[Literal["bf16", "fp16"]]  # mixed precision of the forward pass (None: fp32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> Dict[str, Any]:
    st: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def allreduce_gradients(params) -> None:
    """Average ``.grad`` over the ranks (what DDP does), one flat buffer per dtype.

    The trainers call this after ``backward()`` instead of wrapping the model
    in DDP, because they call ``encode_image`` / ``encode_text`` rather than
    ``forward`` (DDP's reducer is armed by ``forward``)."""
    if not is_distributed():
        return
    from vlmkern.optim._flat import flat_by_dtype, split_flat

    grads = [p.grad for p in params if p.grad is not None]
    ws = world_size()
    for idx, flat in flat_by_dtype(grads):
        dist.all_reduce(flat)
        flat /= ws
        for i, avg in zip(idx, split_flat(flat, [grads[i].shape for i in idx])):
            grads[i].copy_(avg)


class GradSync:
    """Gradient averaging with a ``no_sync()`` context, as DDP offers.

    ``sync(params)`` averages the gradients over the ranks unless called inside
    ``no_sync()`` (used by WeightPerturbation: the first backward at ``w`` is
    local, only the gradient at ``w + v`` is averaged)."""

    def __init__(self) -> None:
        self._skip = False

    @contextlib.contextmanager
    def no_sync(self):
        prev, self._skip = self._skip, True
        try:
            yield
        finally:
            self._skip = prev

    def sync(self, params) -> None:
        if not self._skip:
            allreduce_gradients(params)


def make_sampler(dataset, shuffle: bool, seed: int, drop_last: bool = False):
    """A DistributedSampler under torch.distributed, else None."""
    if not is_distributed():
        return None
    return torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)


def is_main() -> bool:
    return rank() == 0


def autocast(device: torch.device | str, amp: Amp):
    """``amp`` in (None, "bf16", "fp16"): an autocast context for the forward pass."""
    if amp in (None, "", "none", "fp32"):
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be one of None, 'bf16', 'fp16', got {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class RunLogger:
    """Metrics as JSON lines (+ TensorBoard when asked and installed); writes on rank 0 only."""

    def __init__(self, run_dir: str, config: Optional[Dict[str, Any]] = None, tensorboard: bool = False,
                 resume: bool = False):
        self.run_dir = run_dir
        self.enabled = is_main()
        self.records: list = []
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if config is not None:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(config, f, indent=1, default=str)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(run_dir)
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, **record: Any) -> None:
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if self._tb is not None:
            step = record.get("step", record.get("epoch", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_checkpoint(path: str, **state: Any) -> None:
    """Atomically save ``state`` plus every RNG state (rank 0 writes)."""
    if not is_main():
        return
    state = dict(state)
    state["rng"] = rng_state()
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, restore_rng: bool = True) -> Dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def prompt_classification_loss(model, images: torch.Tensor, labels: torch.Tensor,
                               class_tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each image against every class prompt (``logit_scale * f_img . f_class``).

    The objective of the labelled-data trainers (APFT, Kalman few-shot): retrieval of the right label text.
    """
    import torch.nn.functional as F

    fi = F.normalize(model.encode_image(images), dim=-1)
    ft = F.normalize(model.encode_text(class_tokens), dim=-1)
    return F.cross_entropy(model.logit_scale.exp() * fi @ ft.T, labels, reduction=reduction)


@torch.no_grad()
def encode_labelled(model, class_tokens: torch.Tensor, dataset, device, amp: Optional[str] = None,
                    batch_size: int = 128):
    """Features of a labelled set against its class prompts, for evaluation.

    Returns ``(image_feats, labels, class_feats, mean_loss)`` on the CPU (features
    L2-normalised, float32); ``mean_loss`` is :func:`prompt_classification_loss`
    averaged over the set.
    """
    import torch.nn.functional as F

    model.eval()
    feats, labels, loss_sum, n = [], [], 0.0, 0
    with autocast(device, amp):
        ft = F.normalize(model.encode_text(class_tokens), dim=-1).float()
        for images, y, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, y = images.to(device), torch.as_tensor(y).to(device)
            fi = F.normalize(model.encode_image(images), dim=-1).float()
            loss_sum += F.cross_entropy(model.logit_scale.exp().float() * fi @ ft.T, y, reduction="sum").item()
            n += y.numel()
            feats.append(fi.cpu())
            labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels), ft.cpu(), loss_sum / max(n, 1)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, disable: Optional[bool] = None):
    """A tqdm bar on rank 0 (plain iteration when tqdm is missing or disabled)."""
    if disable is None:
        disable = not is_main() or os.environ.get("VLMKERN_NO_PROGRESS", "") not in ("", "0")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True)
