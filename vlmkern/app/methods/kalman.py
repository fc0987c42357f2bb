"""Kalman / LoKO: LoRA fine-tuning of CLIP with the diagonal Kalman filter as
the optimizer (SPEC §3), for few-shot classification; baseline LoRA + AdamW.

    add LoRA adapters (both towers); only the adapters train
    for each step: loss = CE(logit_scale * f_img . f_class^T, y)   (class prompts)
                   per sample (default): e_b = 0 - loss_b per image, H = per-sample gradients
                   (KalmanOptimizer.step_per_sample: torch.func vmap(grad) over the batch)
      or, --observation loss: KalmanOptimizer.step(closure), e = 0 - loss, h = grad loss
    every ``eval_every`` steps: zero-shot accuracy on the validation set

Logs loss and accuracy against iterations, so "fewer iterations to reach an
accuracy" can be read off the metrics log.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Literal, Optional

import torch
from torch.utils.data import DataLoader

from ..eval.metrics import zero_shot_accuracy
from .common import (Amp, RunLogger, allreduce_gradients, autocast, encode_labelled, load_checkpoint,
                     make_sampler, progress, prompt_classification_loss, save_checkpoint, seed_everything)


@dataclass
class KalmanTrainConfig:
    optimizer: Literal["kalman", "adamw", "polyak"] = field(default="kalman", metadata={
        "help": "'kalman' (KalmanOptimizer); baselines: 'adamw' (--lr, --wd), 'polyak' (SGD with a Polyak step, "
                "--polyak-c: what the scalar filter reduces to, SPEC §3b)"})
    steps: int = 200
    batch_size: int = 16
    lora_rank: int = 4
    lora_alpha: float = 8.0
    # KalmanOptimizer (see its docstring)
    p0: float = field(default=1e-2, metadata={"help": "initial covariance: the learning-rate knob"})
    process_noise: float = 0.0
    obs_noise0: float = 1.0
    obs_noise_beta: float = 0.9
    forgetting: float = 1.0
    gate_chi2: Optional[float] = None
    observation: Literal["loss", "per_sample"] = field(default="per_sample", metadata={
        "help": "'per_sample' (default): one observation per sample, the vector-observation filter whose P "
                "learns (SPEC §3b; under torch.distributed the ranks' samples enter one update); 'loss': one "
                "scalar observation per step, the batch loss (SPEC §3; P stays near p0, docs/FIDELITY.md, "
                "Kalman protocol)"})
    jacobian: Literal["vmap", "batched"] = field(default="vmap", metadata={
        "help": "per_sample only: how the Jacobian rows are taken. 'vmap': torch.func vmap(grad) over the "
                "samples (KalmanOptimizer.step_per_sample, ~ one batched backward); 'batched': one vmapped "
                "backward over the batch graph (step(closure), ~ M backward passes; bench/RESULTS_kalman.md)"})
    # AdamW baseline
    lr: float = 1e-3
    wd: float = 0.0
    # Polyak-step SGD baseline: theta <- theta - c L / ||g||^2 g
    polyak_c: float = 0.1
    eval_every: int = 20
    tensorboard: bool = False
    amp: Amp = None
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("kalman", "adamw", "polyak"):
            raise ValueError(f"optimizer must be 'kalman', 'adamw' or 'polyak', got {self.optimizer!r}")
        if self.observation not in ("loss", "per_sample"):
            raise ValueError(f"observation must be 'loss' or 'per_sample', got {self.observation!r}")
        if self.jacobian not in ("vmap", "batched"):
            raise ValueError(f"jacobian must be 'vmap' or 'batched', got {self.jacobian!r}")


def vmap_attention(device):
    """Attention kernel for a forward under ``torch.func.vmap``: on the CPU the
    fused ``scaled_dot_product_attention`` kernel has no vmap batching rule
    (torch loops over the samples), the math one has, and is about 2x faster
    there (bench/RESULTS_kalman.md); elsewhere the default choice."""
    import contextlib

    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _accuracy(model, class_tokens, dataset, device, amp=None, batch_size=256) -> float:
    fi, labels, ft, _ = encode_labelled(model, class_tokens, dataset, device, amp, batch_size)
    return zero_shot_accuracy(fi, labels, ft)[1]


def train_kalman(model, tokenizer, train_ds, val_ds, prompts: List[str], cfg: KalmanTrainConfig, run_dir: str,
                 device: str | torch.device = "cpu", resume: bool = False,
                 stop_after: Optional[int] = None) -> Dict[str, Any]:
    """LoRA few-shot fine-tuning; ``stop_after`` ends after that many steps (resumable exactly)."""
    from ..models.lora import add_lora, lora_parameters
    from vlmkern.optim.kalman import KalmanOptimizer

    device = torch.device(device)
    seed_everything(cfg.seed)
    add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    model.to(device)
    params = lora_parameters(model)
    if cfg.optimizer == "kalman":
        opt = KalmanOptimizer(params, p0=cfg.p0, process_noise=cfg.process_noise, obs_noise0=cfg.obs_noise0,
                              obs_noise_beta=cfg.obs_noise_beta, forgetting=cfg.forgetting, gate_chi2=cfg.gate_chi2,
                              observation=cfg.observation)
    elif cfg.optimizer == "polyak":
        opt = PolyakSGD(params, c=cfg.polyak_c)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)
    logger = RunLogger(run_dir, config=asdict(cfg), resume=resume, tensorboard=cfg.tensorboard)
    class_tokens = tokenizer(prompts).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = make_sampler(train_ds, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=False, generator=gen)
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    step, curve = 0, []
    # Exact resume: the loader's generator state at the start of the current pass
    # plus how many batches of that pass were used.
    pass_state, pos, epoch = gen.get_state(), 0, 0
    if resume and os.path.exists(ckpt):
        st = load_checkpoint(ckpt)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, curve = st["step"], st["curve"]
        pass_state, pos, epoch = st["pass_state"], st["pass_pos"], st["pass_epoch"]
    if step == 0:
        acc0 = _accuracy(model, class_tokens, val_ds, device, cfg.amp)
        curve.append({"step": 0, "val_acc": acc0})
        logger.log(split="val", step=0, val_acc=acc0)
    def batches():
        nonlocal pass_state, pos, epoch
        skip = pos
        while True:
            gen.set_state(pass_state)
            if sampler is not None:
                sampler.set_epoch(epoch)
            for i, b in enumerate(loader):
                if i < skip:
                    continue
                pos = i + 1
                yield b
            skip, pos, epoch = 0, 0, epoch + 1
            pass_state = gen.get_state()

    it = batches()
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = progress(range(step, end), f"{cfg.optimizer} steps")
    for _ in bar:
        images, labels, _ = next(it)
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        model.train()

        def per_sample_closure():  # the per-sample losses with their graph: the optimizer takes the Jacobian
            with autocast(device, cfg.amp):
                return prompt_classification_loss(model, images, labels, class_tokens, reduction="none").float()

        def sample_loss(m, x, y):  # one sample (leading dim 1), run under vmap by step_per_sample
            with autocast(device, cfg.amp), vmap_attention(device):
                return prompt_classification_loss(m, x, y, class_tokens, reduction="none").float()

        def closure():
            opt.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                loss = prompt_classification_loss(model, images, labels, class_tokens)
            loss.backward()
            # every rank sees the mean gradient; KalmanOptimizer observes the mean of the ranks' losses
            # (and, per sample, gathers every rank's rows), so the filters stay identical
            allreduce_gradients(params)
            return loss

        if cfg.optimizer == "kalman" and cfg.observation == "per_sample" and cfg.jacobian == "vmap":
            loss = opt.step_per_sample(model, sample_loss, images, labels).mean()
        elif cfg.optimizer == "kalman" and cfg.observation == "per_sample":
            loss = opt.step(per_sample_closure).mean()
        elif cfg.optimizer in ("kalman", "polyak"):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        step += 1
        rec = {"step": step, "loss": float(loss.detach())}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["val_acc"] = _accuracy(model, class_tokens, val_ds, device, cfg.amp)
            curve.append({"step": step, "val_acc": rec["val_acc"], "loss": rec["loss"]})
            logger.log(split="val", **rec)
            save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), step=step, curve=curve,
                            pass_state=pass_state, pass_pos=pos, pass_epoch=epoch)
        else:
            logger.log(split="train", **rec)
    save_checkpoint(ckpt, model=model.state_dict(), optimizer=opt.state_dict(), step=step, curve=curve,
                    pass_state=pass_state, pass_pos=pos, pass_epoch=epoch)
    logger.close()
    out = {"optimizer": cfg.optimizer, "curve": curve, "final_acc": curve[-1]["val_acc"]}
    if cfg.optimizer == "kalman":  # how far P moved from its prior (the fidelity report's premise)
        out["observation"] = cfg.observation
        out["p_moved"] = p_moved(opt, params, cfg.p0)
    return out


class PolyakSGD(torch.optim.Optimizer):
    """SGD with a Polyak step (target loss 0), the baseline the scalar Kalman filter reduces to (SPEC §3b):
    ``theta <- theta - c L / ||g||^2 g``, ``||g||`` over all parameters of all groups.  ``step(closure)``:
    the closure zeroes the gradients, computes the loss, calls ``backward()`` and returns the loss.  No host
    synchronisation; a step whose loss or gradients are not finite leaves the parameters unchanged."""

    def __init__(self, params, c: float = 0.1, eps: float = 1e-12):
        if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
            raise ValueError(f"PolyakSGD: c must be a finite number > 0, got {c!r}")
        super().__init__(params, dict(c=float(c), eps=float(eps)))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError("PolyakSGD.step needs closure: a function that zeroes the gradients, computes the "
                             "loss, calls backward() and returns the loss")
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return loss
        g2 = torch.stack([n.double() ** 2 for n in torch._foreach_norm(grads)]).sum()
        L = loss.detach().double()
        ok = torch.isfinite(L) & torch.isfinite(g2)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            eta = torch.where(ok, group["c"] * L / g2.clamp_min(group["eps"]), torch.zeros_like(L))
            for p in ps:  # where not ok, eta = 0 and a non-finite gradient must not reach p: zero it
                p.sub_(torch.where(ok, p.grad, torch.zeros_like(p.grad)) * eta.to(p.dtype))
        return loss


@torch.no_grad()
def p_moved(opt, params, p0: float) -> Dict[str, float]:
    """How far a KalmanOptimizer's P moved from ``p0``: mean over the parameters of |log(p / p0)|, and the
    spread (sd over the parameters) of log p, which any scalar step size leaves at 0."""
    logs = torch.cat([(opt.state[q]["variance"].double() / p0).log().flatten() for q in params
                      if "variance" in opt.state[q]])
    if logs.numel() == 0:
        return {"mean_abs_log_p": 0.0, "sd_log_p": 0.0, "mean_log_p": 0.0}
    return {"mean_abs_log_p": float(logs.abs().mean()), "sd_log_p": float(logs.std()) if logs.numel() > 1 else 0.0,
            "mean_log_p": float(logs.mean())}
