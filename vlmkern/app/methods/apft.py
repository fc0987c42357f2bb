"""APFT: adaptive progressive fine-tuning of CLIP on labelled images (SPEC §5).

Algorithm 1 of the paper, with its baselines, on any open_clip model:

    phase <- 0; unfreeze phase 0 (projections); AdamW(lr0, wd0); CosineAnnealingWarmRestarts
    for epoch = 1..max_epochs:
        train one epoch on the trainable parameters
        L_val <- validation loss
        if early stopping says stop: break
        if a trigger fires (volatility / worsening / stagnation over the window):
            phase += 1; unfreeze the next group; lr, wd <- adapted values
            reset the optimizer state; re-initialise the scheduler
    restore the best weights

Training objective on labelled data: cross-entropy of the image against every
class prompt (``logit_scale * f_img . f_class``), i.e. retrieval of the right
label text; validation loss is the same on the validation set.

``strategy``:
* ``"apft"`` - the method above (:class:`~vlmkern.app.methods.apft_schedule.APFTSchedule`).
* ``"fixed"`` - progressive unfreezing on a fixed schedule (a phase every
  ``fixed_every`` epochs), same LR/WD adaptation - the paper's ablation.
* ``"full"`` - full fine-tuning, OneCycleLR over the whole run.
* ``"lora"`` - LoRA adapters (``vlmkern.app.models.lora``) only, OneCycleLR.

Every epoch is logged (JSON lines) with the phase, the trigger, LR, WD and
the trainable-parameter fraction; evaluation reports I2T / T2I Recall, mAP
and mP @K per head / torso / tail group.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..eval.metrics import frequency_groups, grouped_label_retrieval
from ..models.groups import apft_phases, clip_layer_groups, set_trainable_phase
from .apft_schedule import APFTConfig, APFTSchedule
from .common import (Amp, RunLogger, allreduce_gradients, autocast, encode_labelled, load_checkpoint, make_sampler,
                     progress, prompt_classification_loss, save_checkpoint, seed_everything)


@dataclass
class APFTTrainConfig:
    strategy: Literal["apft", "fixed", "full", "lora"] = "apft"
    max_epochs: int = field(default=30, metadata={"flag": "epochs"})
    batch_size: int = 32
    lr: float = 1e-5
    wd: float = 1e-2
    blocks_per_phase: int = 1
    fixed_every: int = 5
    schedule: APFTConfig = field(default_factory=APFTConfig)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    amp: Amp = None
    seed: int = 0
    eval_ks: Sequence[int] = (1, 5, 10, 20)
    num_workers: int = 0
    t0_epochs: int = field(default=5, metadata={"help": "CosineAnnealingWarmRestarts period"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (exact: per-sample loss)"})
    tensorboard: bool = False
    checkpoint: bool = field(default=True, metadata={"help": "save a resumable checkpoint after every epoch"})

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.strategy not in ("apft", "fixed", "full", "lora"):
            raise ValueError(f"strategy must be apft, fixed, full or lora, got {self.strategy!r}")


@torch.no_grad()
def evaluate(model, tokenizer, dataset, prompts: List[str], groups, device, batch_size=128, ks=(1, 5, 10, 20),
             amp=None) -> Dict[str, Any]:
    """Validation loss and APFT's retrieval metrics per head / torso / tail."""
    fi, labels, ft, val_loss = encode_labelled(model, tokenizer(prompts).to(device), dataset, device, amp, batch_size)
    return {"val_loss": val_loss, "retrieval": grouped_label_retrieval(fi, labels, ft, groups, ks)}


def _make_optimizer(params, lr, wd):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=wd)


def train_apft(model, tokenizer, train_ds, val_ds, prompts: List[str], cfg: APFTTrainConfig, run_dir: str,
               device: str | torch.device = "cpu", resume: bool = False) -> Dict[str, Any]:
    """Fine-tune ``model`` on labelled images with ``cfg.strategy``; returns the final metrics."""
    device = torch.device(device)
    seed_everything(cfg.seed)
    model.to(device)
    logger = RunLogger(run_dir, config=asdict(cfg), resume=resume, tensorboard=cfg.tensorboard)
    train_labels = (list(train_ds.labels) if hasattr(train_ds, "labels")
                    else [int(train_ds[i][1]) for i in range(len(train_ds))])
    groups = frequency_groups(train_labels, num_classes=len(prompts))
    class_tokens = tokenizer(prompts).to(device)

    if cfg.strategy == "lora":
        from ..models.lora import add_lora  # the LoRA module of the Kalman work

        add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        phases = None
        trainable_frac = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(
            p.numel() for p in model.parameters())
    elif cfg.strategy == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        phases = None
        trainable_frac = 1.0
    else:
        phases = apft_phases(clip_layer_groups(model), cfg.blocks_per_phase)
        trainable_frac = set_trainable_phase(model, phases, 0)

    sched_cfg = copy.deepcopy(cfg.schedule)
    sched_cfg.lr0, sched_cfg.wd0 = cfg.lr, cfg.wd
    state = APFTSchedule(num_phases=len(phases) if phases else 1, config=sched_cfg)
    if phases is None or cfg.strategy == "fixed":  # no triggered transitions; early stopping only
        state.config.tau_vol = state.config.tau_slope = math.inf
        state.config.tau_imp = -math.inf
    sampler = make_sampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=False, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    opt = _make_optimizer(model.parameters(), state.lr, state.wd)
    steps_per_epoch = max(-(-len(loader) // cfg.grad_accum), 1)

    def new_scheduler(optimizer):
        if phases is None:
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=state.lr,
                                                       total_steps=cfg.max_epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.t0_epochs * steps_per_epoch)

    scheduler = new_scheduler(opt)
    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    start_epoch = 0
    if resume and os.path.exists(ckpt):
        st = load_checkpoint(ckpt)
        state = APFTSchedule.from_state_dict(st["schedule"])
        if phases is not None:
            trainable_frac = set_trainable_phase(model, phases, state.phase)
        model.load_state_dict(st["model"])
        opt = _make_optimizer(model.parameters(), state.lr, state.wd)
        opt.load_state_dict(st["optimizer"])
        scheduler = new_scheduler(opt)
        scheduler.load_state_dict(st["scheduler"])
        best_state = st["best_state"]
        loader.generator.set_state(st["loader_rng"])
        start_epoch = state.epoch

    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    for epoch in range(start_epoch, cfg.max_epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        opt.zero_grad(set_to_none=True)
        n_batches = len(loader)
        for bi, (images, labels, _) in enumerate(progress(loader, f"{cfg.strategy} epoch {epoch + 1}")):
            images, labels = images.to(device), labels.to(device)
            # the last group of an epoch may be shorter: weight each micro-batch by its share
            group = min(cfg.grad_accum, n_batches - (bi // cfg.grad_accum) * cfg.grad_accum)
            with autocast(device, cfg.amp):
                loss = prompt_classification_loss(model, images, labels, class_tokens)
            scaler.scale(loss / group).backward()
            total += loss.item() * labels.numel()
            count += labels.numel()
            if (bi + 1) % cfg.grad_accum == 0 or bi + 1 == n_batches:
                allreduce_gradients([p for p in model.parameters() if p.requires_grad])
                scaler.step(opt)
                scaler.update()
                scheduler.step()
                opt.zero_grad(set_to_none=True)
        ev = evaluate(model, tokenizer, val_ds, prompts, groups, device, ks=cfg.eval_ks, amp=cfg.amp)
        lr_now, wd_now, phase_now = state.lr, state.wd, state.phase
        force = cfg.strategy == "fixed" and state.epochs_in_phase + 1 >= cfg.fixed_every
        event = state.step(ev["val_loss"], force_transition=force)
        if state.best_epoch == state.epoch:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        t = state.transitions[-1] if event == "transition" else None
        logger.log(epoch=state.epoch, split="val", strategy=cfg.strategy, train_loss=total / max(count, 1),
                   val_loss=ev["val_loss"], phase=phase_now, lr=lr_now, wd=wd_now, trainable_frac=trainable_frac,
                   event=event, trigger=t.reason if t else None,
                   i2t_R10=ev["retrieval"]["i2t"]["all"]["recall"].get(10),
                   t2i_mAP10=ev["retrieval"]["t2i"]["all"]["mAP"].get(10))
        if event == "stop":
            break
        if event == "transition":
            trainable_frac = set_trainable_phase(model, phases, state.phase)
            opt = _make_optimizer(model.parameters(), state.lr, state.wd)  # optimizer state reset
            scheduler = new_scheduler(opt)
        if cfg.checkpoint:
            save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=scheduler.state_dict(),
                            schedule=state.state_dict(), best_state=best_state,
                            loader_rng=loader.generator.get_state())
    model.load_state_dict(best_state)  # restore the best weights
    final = evaluate(model, tokenizer, val_ds, prompts, groups, device, ks=cfg.eval_ks, amp=cfg.amp)
    result = {"strategy": cfg.strategy, "best_epoch": state.best_epoch, "best_val_loss": state.best_loss,
              "epochs": state.epoch, "phases_used": state.phase + 1,
              "transitions": [asdict(t) for t in state.transitions], "final": final, "groups": groups,
              "trainable_frac": trainable_frac}
    logger.log(epoch=state.epoch, split="final", strategy=cfg.strategy, val_loss=final["val_loss"],
               best_epoch=state.best_epoch)
    logger.close()
    return result
