"""``KalmanOptimizer``: a diagonal extended Kalman filter as a PyTorch optimizer.

The form of LoKO (Low-rank Kalman Optimizer, arXiv:2410.11551) and of the
Kalman-NGD CLIP paper (arXiv:2511.01694) restricted to a diagonal covariance,
exactly as SPEC §3 fixes it: the state is the trainable parameters, the
observation is the scalar batch loss with target ``y*`` (0 by default), the
Jacobian is the gradient of the loss.  One step is one fused
:func:`vlmkern.kalman_step_` (two passes over all tensors) plus a few 0-d
device ops for the observation-noise EMA and the gate; nothing synchronises
with the host.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..ops.kalman import _DEFAULT_VAR_FLOOR, gate_innovation, kalman_step_
from ._flat import flat_by_dtype, split_flat

__all__ = ["KalmanOptimizer", "per_sample_jacobian"]


class KalmanOptimizer(torch.optim.Optimizer):
    r"""Diagonal-covariance extended Kalman filter over the trainable parameters.

    Each :meth:`step` observes the batch loss ``L(theta)`` with target ``y*``
    (``target``, default 0) and Jacobian ``h = grad L``::

        e      = y* - L                              innovation (0-d, on the device)
        p_hat  = p + q                               predict (q = process_noise of the group)
        S      = sum_i h_i^2 p_hat_i + R             over ALL tensors of the step
        e_g    = clamp(e, -sqrt(chi2 S), sqrt(chi2 S))   Mahalanobis gate (if gate_chi2)
        theta += (e_g / S) p_hat h
        p      = max((p_hat - (p_hat h)^2 / S) / lambda, var_floor)
        R      = max(beta R + (1 - beta) e_g^2, obs_noise_floor)     after the update

    **How p0 acts as a step size.**  With ``y* = 0`` the update is
    ``delta theta_i = -(L p_hat_i / S) dL/dtheta_i``: gradient descent with a
    per-coordinate learning rate ``eta_i = L p_hat_i / S``.  At the start every
    ``p_i = p0`` (take ``q << p0``), so ``S = p0 ||h||^2 + R`` and

        eta = p0 L / (p0 ||h||^2 + R).

    * Noise-dominated regime, ``p0 ||h||^2 << R``: ``eta ~= p0 L / R``.  Once the
      EMA has warmed up ``R ~= E[e^2] ~= L^2``, so ``eta ~= p0 / L`` and the step
      is ``-p0 grad L / L = -p0 grad log L``: **p0 is the learning rate** of
      gradient descent on ``log L`` (scaled by ``1/S``, as the papers note: the
      larger the observation noise, the smaller the step).
    * Information-dominated regime, ``p0 ||h||^2 >> R``: ``eta ~= L / ||h||^2``,
      the Polyak / Gauss-Newton step that drives the *linearised* loss exactly
      to the target: ``L + h . delta theta = 0``.  Here p0 no longer matters,
      and the step is aggressive (a cross-entropy loss cannot reach 0), so keep
      ``p0 < R / ||h||^2`` unless that is what you want; the gate limits it.

    The crossover is ``p0* = R / ||h||^2``.  Afterwards each variance shrinks by
    the information it has received: ``1/p_i`` grows by about ``h_i^2 / S`` per
    step (``p_i ~= 1 / (1/p0 + sum_t h_{i,t}^2 / S_t)``), an Adagrad-like
    per-coordinate decay of the step size; ``process_noise`` (``q``) and
    ``forgetting`` (``lambda < 1``) keep it from vanishing on long runs.  The
    papers' observation that initialising P is the key is this: p0 is the
    learning rate.

    Args:
        params: parameters or param groups.  Per group: ``p0``, ``process_noise``.
            The innovation variance ``S`` is one reduction over **all** tensors
            of the step (every group), because there is one scalar observation.
        p0: initial variance of every parameter (> 0): the learning-rate knob
            (see above; tune it like a learning rate).  Default ``0.1``, the
            better of the two settings in ``vlmkern/app/bench/kalman_method_check.py``
            (LoRA on a tiny CLIP, cross-entropy loss).
        process_noise: ``q >= 0`` added to every variance before each update.
            Default 0.  Groups with different ``q`` cost two extra passes over
            the variances (the fused op takes one q: the predicted variances go
            into copies, kept only if the step is taken, so a skipped step
            leaves them exact).
        obs_noise0: initial observation noise ``R > 0``.  Default 1.
        obs_noise_beta: EMA factor ``beta`` in [0, 1) of ``R``.  Default 0.9.
        forgetting: ``lambda`` in (0, 1]; 1 = no forgetting.  Global.
        gate_chi2: Mahalanobis gate threshold (> 0) or ``None`` (default, off).
            When ``e^2 / S > gate_chi2`` the innovation is **clamped** to
            ``sign(e) sqrt(gate_chi2 S)`` for both the parameter update and the
            R update (a Huber-type robust filter: an outlier batch moves the
            parameters by at most the gate's worth and cannot blow up R); the
            variance update does not depend on ``e``.  Decided on the device
            (``torch.where``); :attr:`last_gated` holds the 0-d bool.
        var_floor: lower clamp of the variances (> = 0).  Global.
        obs_noise_floor: lower clamp of ``R`` (> 0), keeps ``S > 0``.  Global.
        target: observation target ``y*``.  Default 0 (minimise the loss).
        backend: force the ``kalman_step_`` backend (``"cuda"``, ``"cpu"``,
            ``"torch"``); default: by device.
        observation: ``"loss"`` (default: the scalar batch loss, the form
            above) or ``"per_sample"``: the vector-observation filter of SPEC
            §3b, one observation per sample.  Two ways to step it:

            * :meth:`step_per_sample` ``(module, loss_fn, *batch)`` (fast; use
              it whenever each sample's loss depends only on that sample): the
              rows of the Jacobian (per-sample gradients) come from
              ``torch.func.vmap(grad(...))`` over the samples, about one
              batched backward.
            * :meth:`step` ``(closure)`` (general; any coupling between the
              samples): the closure returns the per-sample losses ``[M]``
              *with their graph* and does not call ``backward()``; the rows
              come from one vmapped backward over the rows of I_M, which runs
              M passes over the whole batch's graph (cost ~ M^2:
              bench/RESULTS_kalman.md measures both).

            Either way the step solves the M x M system on the device and
            estimates ``R`` (one value for every sample) as
            ``max(beta R + (1 - beta) mean_b (e_b^2 - (H P H^T)_bb)_+, floor)``.
            Here P learns: each step brings up to M units of information
            instead of less than one.  No ``GradScaler`` in this mode (there
            is no ``.grad`` to scale); a NaN/inf per-sample gradient or loss
            (an fp16 overflow) skips the step on the device: parameters,
            variances and ``R`` unchanged, no host sync.
        distributed: how the ranks of ``torch.distributed`` share one filter.
            ``None`` (default): on when a process group of more than one rank
            is initialized; ``True``: required (error if not initialized);
            ``False``: every rank filters alone.  When on, every rank's
            observations enter **one** update and the ranks stay identical:

            * ``observation="loss"``: the observation is the global batch
              loss, the mean of the ranks' losses (one ``all_reduce`` of a 0-d
              tensor); the Jacobian is the mean gradient, which the caller
              provides as under DDP (DDP's own averaging, or an all_reduce of
              ``.grad``).
            * ``observation="per_sample"``: the Jacobian rows and losses of all
              ranks are gathered (one ``all_gather`` per dtype of the rows,
              ``W x`` the bytes of DDP's gradient all_reduce times M) into one
              ``W*M``-observation step that every rank runs on the same data.
              Take the rows on the local samples only: call
              :meth:`step_per_sample` with the unwrapped module
              (``ddp_model.module``), not through DDP.  Every rank must pass
              the same M (checked, with one host read, the first time each M
              is seen).
        process_group: the group for ``distributed`` (default: the world).

    :meth:`step` takes a ``closure`` that zeroes the gradients, computes the
    loss, calls ``backward()`` and returns the loss, or ``loss=`` when the
    gradients are already computed.  Parameters whose ``.grad`` is ``None`` are
    not part of the step (no predict, no update).  All parameters of a step
    must live on one device.  State: ``state[p]["variance"]`` (float32, shape of
    p); the observation noise ``R`` (a 0-d float32 device tensor) and the step
    count are saved by :meth:`state_dict` under the key ``"kalman"`` and
    restored by :meth:`load_state_dict`; the global hyperparameters come from
    the constructor.

    **AMP** (``torch.amp.GradScaler``, fp16): the optimizer declares
    ``_step_supports_amp_scaling``, so ``scaler.step(opt, loss=loss)`` does not
    unscale the gradients or synchronise: it hands the step its scale and its
    ``found_inf`` flag (device tensors), the fused step divides the gradients
    by the scale on the fly and, when ``found_inf`` is set, skips on the
    device -- parameters, variances and ``R`` unchanged -- and
    ``scaler.update()`` lowers the scale::

        scaler = torch.amp.GradScaler(device)
        opt = KalmanOptimizer(model.parameters(), p0=0.1)
        with torch.autocast(device, dtype=torch.float16):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt, loss=loss)     # the UNSCALED loss: it is the observation
        scaler.update()

    (``scaler.unscale_(opt)`` beforehand also works: then the gradients are
    already unscaled.)  Bad values skip the step the same way without a
    scaler: the fused op's rule (:func:`vlmkern.kalman_step_`: a NaN/inf
    gradient, loss or variance, found_inf set) leaves parameters, variances and
    ``R`` untouched; :attr:`last_step_taken` is the 0-d bool device flag and
    :attr:`last_S` is NaN for a skipped step.  :attr:`step_count` counts calls.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        p0: float = 0.1,
        process_noise: float = 0.0,
        obs_noise0: float = 1.0,
        obs_noise_beta: float = 0.9,
        forgetting: float = 1.0,
        gate_chi2: Optional[float] = None,
        var_floor: float = _DEFAULT_VAR_FLOOR,
        obs_noise_floor: float = 1e-8,
        target: float = 0.0,
        backend: Optional[str] = None,
        observation: str = "loss",
        distributed: Optional[bool] = None,
        process_group: Any = None,
    ):
        _check_group_hparams(p0, process_noise)
        if observation not in ("loss", "per_sample"):
            raise ValueError(f"KalmanOptimizer: observation must be 'loss' or 'per_sample', got {observation!r}")
        if not obs_noise0 > 0:
            raise ValueError(f"KalmanOptimizer: obs_noise0 must be > 0, got {obs_noise0}")
        if not 0.0 <= obs_noise_beta < 1.0:
            raise ValueError(f"KalmanOptimizer: obs_noise_beta must be in [0, 1), got {obs_noise_beta}")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"KalmanOptimizer: forgetting must be in (0, 1], got {forgetting}")
        if gate_chi2 is not None and not gate_chi2 > 0:
            raise ValueError(f"KalmanOptimizer: gate_chi2 must be > 0 or None, got {gate_chi2}")
        if not var_floor >= 0:
            raise ValueError(f"KalmanOptimizer: var_floor must be >= 0, got {var_floor}")
        if not obs_noise_floor > 0:
            raise ValueError(f"KalmanOptimizer: obs_noise_floor must be > 0, got {obs_noise_floor}")
        if not math.isfinite(target):
            raise ValueError(f"KalmanOptimizer: target must be finite, got {target}")
        if distributed not in (None, True, False):
            raise ValueError(f"KalmanOptimizer: distributed must be None (auto), True or False, got {distributed!r}")
        super().__init__(params, dict(p0=p0, process_noise=process_noise))
        for i, g in enumerate(self.param_groups):
            _check_group_hparams(g["p0"], g["process_noise"], f" (param group {i})")
        self.obs_noise0 = float(obs_noise0)
        self.obs_noise_beta = float(obs_noise_beta)
        self.forgetting = float(forgetting)
        self.gate_chi2 = None if gate_chi2 is None else float(gate_chi2)
        self.var_floor = float(var_floor)
        self.obs_noise_floor = float(obs_noise_floor)
        self.target = float(target)
        self.backend = backend
        self.observation = observation
        self.distributed = distributed
        self.process_group = process_group
        self._dist_counts_checked: set = set()  # observation counts already checked equal on every rank
        self.obs_noise: Optional[torch.Tensor] = None  # R, created on the params' device at the first step
        self.step_count = 0
        # Diagnostics of the last step (0-d device tensors; reading them syncs, the step does not).
        self.last_S: Optional[torch.Tensor] = None
        self.last_innovation: Optional[torch.Tensor] = None
        self.last_gated: Optional[torch.Tensor] = None
        self.last_step_taken: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None, *, loss: Optional[torch.Tensor] = None):
        """One Kalman update.  Returns the loss (a tensor; not synchronised)."""
        if (closure is None) == (loss is None):
            raise ValueError(
                "KalmanOptimizer.step: pass exactly one of closure= (zero grads, compute the loss, backward, "
                "return the loss) or loss= (gradients already computed): the loss is the observation"
            )
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"KalmanOptimizer.step: closure must return the loss as a tensor, got {type(loss).__name__}")
        elif not isinstance(loss, torch.Tensor):
            raise TypeError(f"KalmanOptimizer.step: loss must be a tensor, got {type(loss).__name__}")
        if self.observation == "per_sample":
            return self._step_per_sample(loss)
        if loss.numel() != 1:
            raise ValueError(f"KalmanOptimizer.step: loss must be a scalar, got shape {tuple(loss.shape)}")

        params: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        variances: List[torch.Tensor] = []
        q_of: List[float] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KalmanOptimizer does not support sparse gradients")
                state = self.state[p]
                if "variance" not in state:
                    state["variance"] = torch.full(p.shape, float(group["p0"]), dtype=torch.float32, device=p.device)
                params.append(p)
                grads.append(p.grad)
                variances.append(state["variance"])
                q_of.append(float(group["process_noise"]))
        device = params[0].device if params else loss.device
        for i, p in enumerate(params):
            if p.device != device:
                raise ValueError(f"KalmanOptimizer: all parameters must be on one device; params[{i}] is on {p.device}, params[0] on {device}")
        R = self._obs_noise_on(device)
        obs = loss.detach().reshape(()).to(device=device, dtype=torch.float32)
        dist_group = self._dist_group()
        if dist_group is not None:  # one observation: the global batch's loss, the mean of the ranks' losses
            import torch.distributed as dist

            obs = obs.clone()
            dist.all_reduce(obs, group=dist_group[0])
            obs = obs / dist_group[1]
        e = (self.target - obs).contiguous()

        qs = set(q_of)
        step_vars = variances
        if len(qs) <= 1:
            q = qs.pop() if qs else 0.0
        else:
            # groups with different process noise: predict into copies, q = 0 in the
            # fused step, and keep the copies only if the step is taken (exact skip)
            step_vars = [v + qi if qi != 0.0 else v.clone() for v, qi in zip(variances, q_of)]
            q = 0.0

        # Set by GradScaler.step for optimizers with _step_supports_amp_scaling.
        grad_scale = _amp_scalar(getattr(self, "grad_scale", None), device)
        found_inf = _amp_scalar(getattr(self, "found_inf", None), device)
        S = kalman_step_(
            params, grads, step_vars, e, R,
            process_noise=q, forgetting=self.forgetting, var_floor=self.var_floor,
            gate_chi2=self.gate_chi2, grad_scale=grad_scale, found_inf=found_inf, backend=self.backend,
        )
        taken = torch.isfinite(S)  # S is NaN iff the fused step skipped
        if step_vars is not variances:
            for v, vq in zip(variances, step_vars):
                v.copy_(torch.where(taken, vq, v))
        e_used = gate_innovation(e, S, self.gate_chi2)
        beta = self.obs_noise_beta
        R_new = torch.clamp(beta * R + (1.0 - beta) * e_used * e_used, min=self.obs_noise_floor)
        R.copy_(torch.where(taken, R_new, R))
        if self.gate_chi2 is None:
            gated = torch.zeros((), dtype=torch.bool, device=device)
        else:
            gated = e * e > self.gate_chi2 * S
        self.step_count += 1
        self.last_S, self.last_innovation, self.last_gated = S, e, gated
        self.last_step_taken = taken
        return loss

    def _owned_per_sample(self):
        owned = [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]
        return [p for p, _ in owned], [float(g["process_noise"]) for _, g in owned], [g for _, g in owned]

    def _step_per_sample(self, losses: torch.Tensor) -> torch.Tensor:
        """SPEC §3b from a closure's per-sample losses: the Jacobian rows come
        from one batched backward (``is_grads_batched``: vmap over the rows of
        I_M).  General (any coupling between the samples), but every one of
        the M vmapped backward passes runs over the whole batch's graph, so the
        cost grows like M^2; :meth:`step_per_sample` is the fast route."""
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError("KalmanOptimizer.step (observation='per_sample'): the closure must return the "
                             f"per-sample losses as a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
        if not losses.requires_grad:
            raise ValueError("KalmanOptimizer.step (observation='per_sample'): the losses carry no graph; "
                             "return them from the closure without calling backward()")
        params, q_of, groups = self._owned_per_sample()
        if not params:
            return losses.detach()
        M = losses.shape[0]
        with torch.enable_grad():
            eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
            hs = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        grads = [torch.zeros((M, *p.shape), dtype=p.dtype, device=p.device) if h is None else h.to(p.dtype)
                 for h, p in zip(hs, params)]
        self._vector_update(losses.detach(), params, grads, q_of, groups)
        return losses.detach()

    @torch.no_grad()
    def step_per_sample(self, module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], *batch: torch.Tensor,
                        randomness: str = "different", chunk_size: Optional[int] = None) -> torch.Tensor:
        """One vector-observation step (SPEC §3b) with the Jacobian rows from
        ``torch.func``: ``vmap(grad(...))`` over the samples of ``batch``.

        ``loss_fn(module, *sample)`` is called on one sample at a time: every
        tensor of ``batch`` sliced to a leading dimension of 1 (``x[m:m+1]``),
        so the batched loss of a training loop usually works unchanged; it
        returns that sample's loss (one element: ``[1]`` or 0-d).  Inside,
        the optimizer's parameters are substituted into ``module``
        (``torch.func.functional_call``) and differentiated; the module's other
        parameters and buffers are held fixed.  Under ``vmap`` every operation
        runs once, batched over the M samples (a forward that does not depend
        on the sample, e.g. the class-prompt text tower's, runs once
        unbatched; its backward is batched over the M samples like the rest),
        so the M rows cost about one batched backward instead of the closure
        route's M passes over the whole batch (bench/RESULTS_kalman.md: 1.1 s
        against 42 s at M = 96 on a tiny CLIP).  On the CPU, run attention
        with ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` inside
        ``loss_fn``: the fused CPU kernel has no vmap batching rule (torch
        warns and loops over the samples; 2x slower there).

        **Use it when** each sample's loss depends only on that sample (and
        the parameters): a per-sample cross-entropy against shared class
        prompts, regression, and the like.  It does **not** apply to losses
        that couple samples (in-batch contrastive losses, batch norm in
        training mode, which also cannot update running statistics under
        vmap): use :meth:`step` with a closure returning the per-sample losses
        (``observation="per_sample"``), which allows any coupling.

        Args:
            module: the ``nn.Module`` that holds every parameter of this
                optimizer (matched by identity in ``module.named_parameters()``).
            loss_fn: ``loss_fn(module, *sample) -> loss`` for one sample.
            *batch: tensors with the same leading dimension M (the samples).
            randomness: ``vmap``'s ``randomness``: ``"different"`` (default:
                every sample draws its own dropout mask, as in a batched
                forward), ``"same"``, or ``"error"`` (raise on any random op).
            chunk_size: ``vmap``'s ``chunk_size``: samples per vectorised chunk
                (bounds the memory of the batched backward); ``None`` = all M.

        Returns the per-sample losses ``[M]`` (detached, float32).  Needs
        ``observation="per_sample"``.  Autocast: wrap the body of ``loss_fn``
        (the rows are taken w.r.t. the parameters in their own dtype).  A row
        with a NaN/inf entry (e.g. an fp16 overflow) skips the step on the
        device, as in :meth:`step`.  ``GradScaler`` is not used here: there is
        no ``.grad`` for it to scale.
        """
        if self.observation != "per_sample":
            raise ValueError("KalmanOptimizer.step_per_sample: needs KalmanOptimizer(..., observation='per_sample'), "
                             f"this one has observation={self.observation!r}")
        params, q_of, groups = self._owned_per_sample()
        if not params:
            raise ValueError("KalmanOptimizer.step_per_sample: none of the optimizer's params requires grad; "
                             "there is nothing to update")
        grads, losses = per_sample_jacobian(module, params, loss_fn, *batch, randomness=randomness,
                                            chunk_size=chunk_size)
        self._vector_update(losses, params, grads, q_of, groups)
        return losses

    def _vector_update(self, losses, params, grads, q_of, groups) -> None:
        """The filter update shared by both per-sample routes: innovation,
        fused vector step, observation-noise estimate; no host sync."""
        device = params[0].device
        dist_group = self._dist_group()
        if dist_group is not None:
            losses, grads = self._gather_observations(dist_group, losses.to(device=device, dtype=torch.float32), grads)
        M = losses.shape[0]
        variances = []
        for p, g in zip(params, groups):
            st = self.state[p]
            if "variance" not in st:
                st["variance"] = torch.full(p.shape, float(g["p0"]), dtype=torch.float32, device=p.device)
            variances.append(st["variance"])
        R = self._obs_noise_on(device)
        e = self.target - losses.to(device=device, dtype=torch.float32)
        step_vars, q = variances, q_of[0]
        if len(set(q_of)) > 1:  # as in the scalar step: predict into copies, kept only if the step is taken
            step_vars, q = [v + qi if qi != 0.0 else v.clone() for v, qi in zip(variances, q_of)], 0.0
        S, d2 = kalman_step_(params, grads, step_vars, e, R, process_noise=q, forgetting=self.forgetting,
                             var_floor=self.var_floor, gate_chi2=self.gate_chi2, backend=self.backend,
                             return_mahalanobis=True)
        taken = torch.isfinite(S).all()
        if step_vars is not variances:
            for v, vq in zip(variances, step_vars):
                v.copy_(torch.where(taken, vq, v))
        # observation noise, innovation-based: R <- beta R + (1 - beta) mean_b (e_b^2 - Gram_bb)_+, with the
        # op's d2 = e^T S^-1 e (NaN on a skipped step: not gated, and R is kept below)
        Ssafe = torch.where(taken, S, torch.eye(M, device=device))
        gated = torch.zeros((), dtype=torch.bool, device=device) if self.gate_chi2 is None else d2 > self.gate_chi2
        e_used = e if self.gate_chi2 is None else e * torch.where(gated, torch.sqrt(self.gate_chi2 / d2), 1.0)
        gram_diag = torch.diagonal(Ssafe) - R
        beta = self.obs_noise_beta
        R_new = torch.clamp(beta * R + (1.0 - beta) * (e_used * e_used - gram_diag).clamp(min=0).mean(),
                            min=self.obs_noise_floor)
        R.copy_(torch.where(taken, R_new, R))
        self.step_count += 1
        self.last_S, self.last_innovation, self.last_gated, self.last_step_taken = S, e, gated, taken

    # ------------------------------------------------------------ distributed
    def _dist_group(self):
        """``(group, world_size)`` when the ranks' observations enter one update, else ``None``."""
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if self.distributed is False:
            return None
        if not initialized:
            if self.distributed:
                raise RuntimeError("KalmanOptimizer(distributed=True): torch.distributed is not initialized; "
                                   "call torch.distributed.init_process_group first, or pass distributed=None/False")
            return None
        world = dist.get_world_size(self.process_group)
        return None if world == 1 else (self.process_group, world)

    def _gather_observations(self, dist_group, losses: torch.Tensor, grads: List[torch.Tensor]):
        """All ranks' observations, rank-major: losses ``[W*M]`` and Jacobian rows ``[W*M, *shape]``
        (one all_gather per dtype of the rows).  Every rank then runs the same update on the same
        data, so the parameters, variances and ``R`` stay identical without a broadcast.  The
        number of observations M must be the same on every rank: checked with one small
        all_gather (and a host read) the first time each M is seen."""
        import torch.distributed as dist

        group, world = dist_group
        M = losses.shape[0]
        if M not in self._dist_counts_checked:
            counts = [torch.zeros(1, dtype=torch.int64, device=losses.device) for _ in range(world)]
            dist.all_gather(counts, torch.full((1,), M, dtype=torch.int64, device=losses.device), group=group)
            counts = [int(c) for c in counts]
            if len(set(counts)) != 1:
                raise ValueError("KalmanOptimizer (distributed, observation='per_sample'): every rank must pass the "
                                 f"same number of samples per step; the ranks have {counts} (drop the last, short "
                                 "batch: DistributedSampler(drop_last=True) / DataLoader(drop_last=True))")
            self._dist_counts_checked.add(M)
        parts = [torch.empty_like(losses) for _ in range(world)]
        dist.all_gather(parts, losses.contiguous(), group=group)
        all_losses = torch.cat(parts)
        out: List[Optional[torch.Tensor]] = [None] * len(grads)
        for idx, flat in flat_by_dtype(grads):
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat, group=group)
            pieces = [split_flat(part, [grads[i].shape for i in idx]) for part in parts]  # [rank][tensor]
            for j, i in enumerate(idx):
                out[i] = torch.cat([rank_pieces[j] for rank_pieces in pieces])
        return all_losses, out

    def _obs_noise_on(self, device: torch.device) -> torch.Tensor:
        if self.obs_noise is None:
            self.obs_noise = torch.tensor(self.obs_noise0, dtype=torch.float32, device=device)
        elif self.obs_noise.device != device:
            self.obs_noise = self.obs_noise.to(device)
        return self.obs_noise

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> Dict[str, Any]:
        """The usual optimizer state (variances, param groups) plus
        ``"kalman": {"obs_noise": R (0-d tensor or None), "step": int}``."""
        sd = super().state_dict()
        sd["kalman"] = {
            "obs_noise": None if self.obs_noise is None else self.obs_noise.detach().clone(),
            "step": self.step_count,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kalman", None)
        if extra is None:
            raise ValueError("KalmanOptimizer.load_state_dict: state_dict has no 'kalman' entry (R and the step count)")
        # torch.optim casts floating state to the parameter's dtype on load; the
        # variances must stay float32 (bf16 params), so restore them ourselves.
        saved_vars = {k: st["variance"] for k, st in state_dict.get("state", {}).items() if "variance" in st}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        for i, g in enumerate(self.param_groups):
            _check_group_hparams(g["p0"], g["process_noise"], f" (param group {i})")
        id_to_param = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for k, v in saved_vars.items():
            p = id_to_param[k]
            self.state[p]["variance"] = v.detach().to(device=p.device, dtype=torch.float32).clone()
        R = extra.get("obs_noise")
        self.obs_noise = None if R is None else R.detach().to(torch.float32).clone()
        self.step_count = int(extra.get("step", 0))


def per_sample_jacobian(module: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                    *batch: torch.Tensor, randomness: str = "different",
                    chunk_size: Optional[int] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Per-sample gradients of ``loss_fn`` w.r.t. ``params`` by
    ``torch.func.vmap(grad(...))`` over the samples of ``batch``.

    ``loss_fn(module, *sample)`` gets every batch tensor sliced to one sample
    (``x[m:m+1]``, leading dimension 1) and returns that sample's loss (one
    element).  ``params`` (parameters of ``module``, matched by identity) are
    substituted with ``torch.func.functional_call`` and differentiated; the
    module's other parameters and buffers are held fixed.  Returns
    ``(rows, losses)``: ``rows[t]`` of shape ``[M, *params[t].shape]`` in
    ``params[t].dtype`` and the losses ``[M]`` (float32, no graph).  See
    :meth:`KalmanOptimizer.step_per_sample` for ``randomness`` and ``chunk_size``.
    """
    op = "per_sample_jacobian"
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{op}: module must be an nn.Module, got {type(module).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if randomness not in ("different", "same", "error"):
        raise ValueError(f"{op}: randomness must be 'different', 'same' or 'error', got {randomness!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"{op}: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if not batch:
        raise ValueError(f"{op}: batch is empty; pass the batch tensors after loss_fn")
    for i, b in enumerate(batch):
        if not isinstance(b, torch.Tensor) or b.dim() == 0:
            got = type(b).__name__ if not isinstance(b, torch.Tensor) else "a 0-d tensor"
            raise TypeError(f"{op}: batch[{i}] must be a tensor with a leading sample dimension, got {got}")
    M = batch[0].shape[0]
    for i, b in enumerate(batch):
        if b.shape[0] != M:
            raise ValueError(f"{op}: batch[{i}] has {b.shape[0]} samples, batch[0] has {M}")
    if M == 0:
        raise ValueError(f"{op}: the batch has 0 samples")
    name_of = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        name_of.setdefault(id(p), n)
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(f"{op}: {len(missing)} of params (first: params[{missing[0]}], shape "
                         f"{tuple(params[missing[0]].shape)}) are not parameters of module; pass the module that "
                         "holds them")
    names = [name_of[id(p)] for p in params]
    wrapper = _LossOf(module, loss_fn)
    from torch.func import functional_call, grad, vmap

    def sample_loss(theta, *sample):
        out = functional_call(wrapper, {"module." + n: t for n, t in theta.items()},
                              tuple(s.unsqueeze(0) for s in sample))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{op}: loss_fn must return one sample's loss as a one-element tensor, got {got}")
        out = out.reshape(()).float()
        return out, out.detach()

    theta = {n: p.detach() for n, p in zip(names, params)}
    rows, losses = vmap(grad(sample_loss, has_aux=True), in_dims=(None,) + (0,) * len(batch),
                        randomness=randomness, chunk_size=chunk_size)(theta, *batch)
    return [rows[n].to(p.dtype) for n, p in zip(names, params)], losses


class _LossOf(torch.nn.Module):
    """``forward(*sample) = loss_fn(module, *sample)``: lets
    ``torch.func.functional_call`` substitute parameters for a loss that calls
    any method of the module (not only its ``forward``)."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, *sample):
        return self.loss_fn(self.module, *sample)


def _amp_scalar(t, device) -> Optional[torch.Tensor]:
    """GradScaler's scale / found_inf (shape [1] float32 tensors) as the fused
    step takes them; ``None`` stays ``None``."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=torch.float32)
    return t.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def _check_group_hparams(p0, process_noise, where: str = "") -> None:
    if not (isinstance(p0, (int, float)) and p0 > 0):
        raise ValueError(f"KalmanOptimizer: p0 must be > 0{where}, got {p0}")
    if not (isinstance(process_noise, (int, float)) and process_noise >= 0):
        raise ValueError(f"KalmanOptimizer: process_noise must be >= 0{where}, got {process_noise}")
