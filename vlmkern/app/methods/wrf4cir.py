"""WRF4CIR: CLIP-based composed image retrieval fine-tuning with layerwise-
normalised weight perturbation (SPEC §4).

    for each batch (ref image, modification text, target image):
        query  = combiner(f(ref), g(text));  target = f(target)
        loss   = CE(100 * query . target^T, diagonal)
        WeightPerturbation.step: loss/grad at w -> w + v (adversarial, or random
        with probability random_ratio) -> loss/grad at w + v -> restore w -> AdamW step

The first ``warmup_epochs`` epochs take plain steps (no perturbation).
``gamma = 0`` is the baseline (plain CIR fine-tuning: bitwise the base
optimizer). Each epoch logs Recall@K on the training triplets and on the
validation triplets, and their gap (the generalisation gap the paper reports
weight perturbation narrows).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..eval.metrics import cir_recall
from ..models.cir import LearnedCombiner, SumCombiner, cir_loss
from .common import (Amp, GradSync, RunLogger, autocast, load_checkpoint, make_sampler, progress, save_checkpoint,
                     seed_everything)


@dataclass
class WRF4CIRConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-5
    wd: float = 0.05
    gamma: float = field(default=1e-3, metadata={"flag": "awp-gamma",
                                                 "help": "perturbation size (0: plain fine-tuning)"})
    random_ratio: float = 0.0
    warmup_epochs: int = 1
    combiner: Literal["sum", "learned"] = "sum"
    train_image_tower: bool = True
    amp: Amp = None
    seed: int = 0
    ks: Sequence[int] = (1, 5, 10, 50)
    tensorboard: bool = False

    def __post_init__(self):
        if self.combiner not in ("sum", "learned"):
            raise ValueError(f"combiner must be 'sum' or 'learned', got {self.combiner!r}")
        if self.gamma < 0 or not 0 <= self.random_ratio <= 1:
            raise ValueError("gamma must be >= 0 and random_ratio in [0, 1]")


def collate_triplets(batch):
    return (torch.stack([b[0] for b in batch]), [b[1] for b in batch], torch.stack([b[2] for b in batch]),
            torch.tensor([b[3] for b in batch]), torch.tensor([b[4] for b in batch]))


class CIRModel(torch.nn.Module):
    """CLIP towers + a query combiner (one module, so the wrapper sees every parameter)."""

    def __init__(self, clip, combiner: torch.nn.Module):
        super().__init__()
        self.clip = clip
        self.combiner = combiner

    def query(self, ref_images, tokens):
        return self.combiner(self.clip.encode_image(ref_images), self.clip.encode_text(tokens))

    def target(self, images):
        return F.normalize(self.clip.encode_image(images), dim=-1)


def _triplet_indices(dataset, i: int):
    """(reference, target) gallery indices of triplet ``i``: the dataset's ``gallery_indices``
    (no image decoded) where it has one, else read from the item."""
    if hasattr(dataset, "gallery_indices"):
        return dataset.gallery_indices(i)
    item = dataset[i]
    return int(item[3]), int(item[4])


@torch.no_grad()
def evaluate_cir(model: CIRModel, tokenizer, dataset, device, ks=(1, 5, 10, 50), amp=None,
                 max_triplets: Optional[int] = None, batch_size: int = 128,
                 gallery_size: Optional[int] = None) -> Dict[int, float]:
    """Recall@K of the target among the gallery (the reference excluded).

    By default the queries are all triplets and the gallery is the dataset's whole gallery.
    ``max_triplets`` takes the first ``max_triplets`` queries only; ``gallery_size`` then
    ranks them against a gallery of that many images: the images those triplets use, then
    the dataset's other images in order. Recall falls as the gallery grows, so a train/val
    gap is only meaningful with equal galleries: the trainer measures training recall on
    as many triplets and gallery images as the validation set has.
    """
    model.eval()
    n = len(dataset) if max_triplets is None else min(max_triplets, len(dataset))
    gal_index = list(range(len(dataset.gallery)))
    if gallery_size is not None:
        used = list(dict.fromkeys(j for i in range(n) for j in _triplet_indices(dataset, i)))
        seen = set(used)
        rest = [j for j in gal_index if j not in seen]
        gal_index = used + rest[:max(gallery_size - len(used), 0)]
    remap = torch.full((len(dataset.gallery),), -1, dtype=torch.long)
    remap[torch.tensor(gal_index, dtype=torch.long)] = torch.arange(len(gal_index))
    gal = []
    with autocast(device, amp):
        for s in range(0, len(gal_index), batch_size):
            imgs = torch.stack([dataset.image(i) for i in gal_index[s:s + batch_size]])
            gal.append(model.target(imgs.to(device)).float().cpu())
        qs, tg, rf = [], [], []
        for s in range(0, n, batch_size):
            batch = [dataset[i] for i in range(s, min(s + batch_size, n))]
            ref, text, _, ri, ti = collate_triplets(batch)
            qs.append(model.query(ref.to(device), tokenizer(text).to(device)).float().cpu())
            tg.append(remap[ti])
            rf.append(remap[ri])
    return cir_recall(torch.cat(qs), torch.cat(gal), torch.cat(tg), ks=ks, exclude_index=torch.cat(rf))


def train_wrf4cir(clip, tokenizer, train_ds, val_ds, cfg: WRF4CIRConfig, run_dir: str,
                  device: str | torch.device = "cpu", resume: bool = False,
                  stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Fine-tune for composed retrieval; ``stop_after`` ends after that many epochs (resumable)."""
    from vlmkern.optim.weight_perturbation import WeightPerturbation

    device = torch.device(device)
    seed_everything(cfg.seed)
    dim = clip.text_projection.shape[1] if hasattr(clip, "text_projection") else clip.visual.output_dim
    combiner = SumCombiner() if cfg.combiner == "sum" else LearnedCombiner(dim)
    model = CIRModel(clip, combiner).to(device)
    for p in clip.parameters():
        p.requires_grad_(True)
    clip.logit_scale.requires_grad_(False)
    if not cfg.train_image_tower:
        for p in clip.visual.parameters():
            p.requires_grad_(False)
    logger = RunLogger(run_dir, config=asdict(cfg), resume=resume, tensorboard=cfg.tensorboard)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = make_sampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, collate_fn=collate_triplets, generator=gen)
    gsync = GradSync()
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.wd)
    opt = WeightPerturbation(model, base, gamma=cfg.gamma, random_ratio=cfg.random_ratio,
                             warmup_steps=cfg.warmup_epochs * len(loader), seed=cfg.seed, no_sync=gsync.no_sync)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=max(cfg.epochs * len(loader), 1))
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    start, history = 0, []
    if resume and os.path.exists(ckpt):
        st = load_checkpoint(ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["loader_rng"])
        start, history = st["epoch"], st["history"]
    step = start * len(loader)
    end = cfg.epochs if stop_after is None else min(stop_after, cfg.epochs)
    for epoch in range(start, end):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        run_loss, count = 0.0, 0
        for ref, text, tgt, _, _ in progress(loader, f"wrf4cir epoch {epoch + 1}"):
            ref, tgt, tokens = ref.to(device), tgt.to(device), tokenizer(text).to(device)

            def closure():
                with autocast(device, cfg.amp):
                    loss = cir_loss(model.query(ref, tokens), model.target(tgt))
                loss.backward()
                gsync.sync(trainable)  # skipped inside the wrapper's no_sync (first pass at w)
                return loss

            loss = opt.step(closure)
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            count += 1
        tr = evaluate_cir(model, tokenizer, train_ds, device, cfg.ks, cfg.amp, max_triplets=len(val_ds),
                          gallery_size=len(val_ds.gallery))
        va = evaluate_cir(model, tokenizer, val_ds, device, cfg.ks, cfg.amp)
        rec = {"epoch": epoch + 1, "train_loss": run_loss / max(count, 1),
               **{f"train_R{k}": v for k, v in tr.items()}, **{f"val_R{k}": v for k, v in va.items()},
               **{f"gap_R{k}": tr[k] - va[k] for k in tr}}
        history.append(rec)
        logger.log(split="val", **rec)
        save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        loader_rng=gen.get_state(), epoch=epoch + 1, history=history)
    logger.close()
    return {"gamma": cfg.gamma, "random_ratio": cfg.random_ratio, "history": history,
            "final": history[-1] if history else None}
