"""TuneCLIP: optimizer statistics recovery (OSR) + hinged global contrastive
loss (HGCL) fine-tuning of a pretrained CLIP (SPEC §1-2).

    Stage 1 - OSR (``osr_epochs``; weights frozen at w0):
        for each batch: loss = HGCL(batch), which updates u1, u2 (per sample)
                        g = grad; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2
    Stage 2 - fine-tuning from w0 with AdamW whose state starts at (m*, v*, step
        count) and with u*: so bias correction does not re-amplify the moments.
        Cosine LR; gamma follows FastCLIP's schedule (1 -> gamma over
        ``gamma_decay_epochs``, counted from the start of OSR).

``loss`` picks the objective: ``"hgcl"`` (TuneCLIP), ``"gcl"`` (FastCLIP's
global contrastive loss, no hinge) or ``"clip"`` (open_clip's ClipLoss, the
plain baseline). ``osr_epochs=0`` turns recovery off (the "no recovery" row of
the paper's ablation); ``osr_recover="mv"`` keeps the recovered moments but
starts stage 2 with ``u`` unvisited (the paper's "(m, v)" row);
``osr_reset_step=True`` keeps m, v and u but restarts AdamW's step counter, so
bias correction re-amplifies the recovered moments (the variant SPEC §2 warns
against). ``tau`` is fixed, by default from the checkpoint's
logit scale (``1 / exp(logit_scale)``), as in the paper.

The loss is :class:`vlmkern.GlobalContrastiveLoss` (the fused op); under
``torch.distributed`` it gathers features itself and keeps ``u`` identical on
every rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..eval.metrics import caption_retrieval
from .common import (Amp, RunLogger, allreduce_gradients, autocast, is_distributed, load_checkpoint, progress, rank, save_checkpoint,
                     seed_everything, world_size)


@dataclass
class TuneCLIPConfig:
    loss: Literal["hgcl", "gcl", "clip"] = "hgcl"
    osr_epochs: int = field(default=1, metadata={"help": "optimizer statistics recovery epochs (0: off)"})
    osr_recover: Literal["mvu", "mv"] = field(default="mvu", metadata={
        "help": "state carried into fine-tuning: mvu (m, v and u) or mv (u starts unvisited)"})
    osr_reset_step: bool = field(default=False, metadata={
        "help": "restart AdamW's step counter after recovery (bias correction re-amplifies m, v)"})
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-5
    wd: float = 0.02
    betas: Tuple[float, float] = (0.9, 0.98)
    margin: float = 0.1
    gamma: float = 0.9
    gamma_decay_epochs: int = 2
    tau: Optional[float] = field(default=None, metadata={"help": "temperature (default: the checkpoint's)"})
    eps: float = 1e-14
    warmup_steps: int = 0
    amp: Amp = None
    seed: int = 0
    num_workers: int = 0
    tensorboard: bool = False

    def __post_init__(self):
        if self.loss not in ("hgcl", "gcl", "clip"):
            raise ValueError(f"loss must be hgcl, gcl or clip, got {self.loss!r}")
        if self.osr_epochs < 0 or self.epochs < 0:
            raise ValueError("osr_epochs and epochs must be >= 0")
        if self.osr_recover not in ("mvu", "mv"):
            raise ValueError(f"osr_recover must be mvu or mv, got {self.osr_recover!r}")


def fastclip_gamma(epoch: int, gamma: float, decay_epochs: int) -> float:
    """FastCLIP's gamma schedule (SPEC §1): 1 at epoch 0, cosine down to ``gamma`` at ``decay_epochs``, then
    ``gamma``. (The float64 oracle has its own copy, ``vlmkern.reference.fastclip_gamma``, for the tests.)"""
    if epoch <= 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma
    return 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs)) * (1 - gamma) + gamma


def collate_pairs(batch):
    images = torch.stack([b[0] for b in batch])
    caps = [b[1] for b in batch]
    idx = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, caps, idx


class _Objective:
    def __init__(self, cfg: TuneCLIPConfig, num_samples: int, tau: float, device):
        self.cfg = cfg
        self.tau = tau
        if cfg.loss == "clip":
            from open_clip.loss import ClipLoss

            self.clip = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank(), world_size=world_size())
            self.module = None
        else:
            from vlmkern.ops.hgcl import GlobalContrastiveLoss

            self.module = GlobalContrastiveLoss(num_samples, tau=tau, gamma=1.0,
                                                margin=cfg.margin if cfg.loss == "hgcl" else None,
                                                eps=cfg.eps).to(device)

    def set_epoch(self, epoch: int) -> None:
        if self.module is not None:
            self.module.gamma = fastclip_gamma(epoch, self.cfg.gamma, self.cfg.gamma_decay_epochs)

    def __call__(self, fi, ft, index, logit_scale):
        if self.module is None:
            return self.clip(fi, ft, logit_scale=torch.tensor(1.0 / self.tau, device=fi.device))
        return self.module(fi.float(), ft.float(), index.to(fi.device))

    def state_dict(self):
        return self.module.state_dict() if self.module is not None else {}

    def load_state_dict(self, sd):
        if self.module is not None:
            self.module.load_state_dict(sd)


@torch.no_grad()
def evaluate_pairs(model, tokenizer, dataset, device, batch_size: int = 256, amp=None) -> Dict[str, Any]:
    """Caption-level I2T / T2I R@1/5/10 on a pairs set (duplicate captions count as one text each)."""
    model.eval()
    fis, fts = [], []
    with autocast(device, amp):
        for images, caps, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs):
            fis.append(F.normalize(model.encode_image(images.to(device)), dim=-1).float().cpu())
            fts.append(F.normalize(model.encode_text(tokenizer(caps).to(device)), dim=-1).float().cpu())
    fi, ft = torch.cat(fis), torch.cat(fts)
    r = caption_retrieval(fi, ft, torch.arange(fi.shape[0]), ks=(1, 5, 10))
    return {"i2t_R1": r["i2t"][1], "i2t_R5": r["i2t"][5], "i2t_R10": r["i2t"][10],
            "t2i_R1": r["t2i"][1], "t2i_R5": r["t2i"][5], "t2i_R10": r["t2i"][10],
            "mean_R": (sum(r["i2t"].values()) + sum(r["t2i"].values())) / 6}


def _features(model, images, caps, tokenizer, device):
    fi = F.normalize(model.encode_image(images.to(device)), dim=-1)
    ft = F.normalize(model.encode_text(tokenizer(caps).to(device)), dim=-1)
    return fi, ft


def recover_statistics(model, tokenizer, loader, objective: _Objective, optimizer: torch.optim.AdamW,
                       epochs: int, device, amp=None, logger: Optional[RunLogger] = None, start_epoch: int = 0) -> int:
    """OSR (Algorithm 1): frozen weights; feed gradients into AdamW's moments only.

    Returns the number of recovered steps (AdamW's step count afterwards).
    """
    b1, b2 = optimizer.param_groups[0]["betas"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps = 0
    for epoch in range(start_epoch, epochs):
        objective.set_epoch(epoch)
        model.train()
        for images, caps, idx in progress(loader, f"OSR epoch {epoch + 1}"):
            with autocast(device, amp):
                fi, ft = _features(model, images, caps, tokenizer, device)
            loss = objective(fi, ft, idx, model.logit_scale)
            for p in params:
                p.grad = None
            loss.backward()
            allreduce_gradients(params)
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        continue
                    st = optimizer.state[p]
                    if not st:
                        st["step"] = torch.tensor(0.0)
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    g = p.grad
                    st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    st["step"] += 1
            steps += 1
            if logger is not None:
                logger.log(split="osr", epoch=epoch + 1, osr_step=steps, loss=loss.item())
    for p in params:
        p.grad = None
    return steps


def finish_recovery(optimizer: torch.optim.Optimizer, objective: "_Objective", recover: str = "mvu",
                    reset_step: bool = False) -> None:
    """What stage 2 keeps of the recovered state: ``recover="mv"`` forgets ``u`` (every sample
    unvisited again, as without recovery); ``reset_step`` sets AdamW's step counters to 0, so its
    bias correction divides the recovered m, v by ``1 - beta^t`` for small t again."""
    if recover == "mv" and objective.module is not None:
        objective.module.log_u_img.fill_(-math.inf)
        objective.module.log_u_txt.fill_(-math.inf)
    if reset_step:
        for st in optimizer.state.values():
            if "step" in st:
                st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0


def train_tuneclip(model, tokenizer, train_ds, val_ds, cfg: TuneCLIPConfig, run_dir: str,
                   device: str | torch.device = "cpu", resume: bool = False,
                   stop_after: Optional[int] = None) -> Dict[str, Any]:
    """OSR then fine-tuning (or a baseline, by ``cfg.loss`` / ``cfg.osr_epochs``); returns final metrics.

    ``stop_after`` ends the run after that many epochs in total (OSR epochs
    included), leaving a checkpoint to ``resume`` from - as an interrupted job would.
    """
    device = torch.device(device)
    seed_everything(cfg.seed)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    tau = cfg.tau if cfg.tau is not None else float(1.0 / model.logit_scale.exp().item())
    model.logit_scale.requires_grad_(False)  # fixed temperature, as in the paper
    logger = RunLogger(run_dir, config=dict(asdict(cfg), tau=tau), resume=resume, tensorboard=cfg.tensorboard)
    # fp16 autocast needs loss scaling; the loss itself is computed in fp32 on fp32-cast features.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    num_samples = getattr(train_ds, "num_samples", len(train_ds))
    objective = _Objective(cfg, num_samples, tau, device)
    sampler = None
    gen = torch.Generator().manual_seed(cfg.seed)
    if is_distributed():
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, collate_fn=collate_pairs, num_workers=cfg.num_workers, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd, betas=cfg.betas)
    total = max(cfg.epochs * len(loader), 1)

    def lr_lambda(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    start_epoch, osr_steps = 0, 0
    history = []
    if resume and os.path.exists(ckpt):
        st = load_checkpoint(ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        objective.load_state_dict(st["objective"])
        gen.set_state(st["loader_rng"])
        start_epoch, osr_steps, history = st["epoch"], st["osr_steps"], st["history"]

    def checkpoint(epoch):
        save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        objective=objective.state_dict(), loader_rng=gen.get_state(), epoch=epoch,
                        osr_steps=osr_steps, history=history)

    # epoch counter runs over both stages: [0, osr_epochs) is OSR, then fine-tuning
    n_osr = cfg.osr_epochs if cfg.loss != "clip" else 0
    ev0 = evaluate_pairs(model, tokenizer, val_ds, device, amp=cfg.amp) if start_epoch == 0 else None
    if ev0 is not None:
        history.append({"epoch": 0, "stage": "start", **ev0})
        logger.log(split="val", epoch=0, stage="start", **ev0)
    end = n_osr + cfg.epochs if stop_after is None else min(stop_after, n_osr + cfg.epochs)
    if start_epoch < n_osr:
        for epoch in range(start_epoch, min(n_osr, end)):
            if sampler is not None:
                sampler.set_epoch(epoch)
            osr_steps += recover_statistics(model, tokenizer, loader, objective, opt, epoch + 1, device, cfg.amp,
                                            logger, start_epoch=epoch)
            start_epoch = epoch + 1
            if start_epoch == n_osr:
                finish_recovery(opt, objective, cfg.osr_recover, cfg.osr_reset_step)
            checkpoint(start_epoch)
    step = 0
    for epoch in range(max(start_epoch, n_osr), end):
        if sampler is not None:
            sampler.set_epoch(epoch)
        objective.set_epoch(epoch)
        model.train()
        running, count = 0.0, 0
        for images, caps, idx in progress(loader, f"{cfg.loss} epoch {epoch + 1 - n_osr}"):
            with autocast(device, cfg.amp):
                fi, ft = _features(model, images, caps, tokenizer, device)
            loss = objective(fi, ft, idx, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            allreduce_gradients(params)
            scaler.step(opt)
            scaler.update()
            sched.step()
            running += loss.item()
            count += 1
            step += 1
            logger.log(split="train", epoch=epoch + 1, step=step, loss=loss.item(), lr=sched.get_last_lr()[0])
        ev = evaluate_pairs(model, tokenizer, val_ds, device, amp=cfg.amp)
        rec = {"epoch": epoch + 1 - n_osr, "stage": "finetune", "train_loss": running / max(count, 1), **ev}
        history.append(rec)
        logger.log(split="val", **rec)
        checkpoint(epoch + 1)
    logger.close()
    return {"loss": cfg.loss, "osr_epochs": n_osr, "osr_steps": osr_steps, "tau": tau, "history": history,
            "final": history[-1] if history else None}
