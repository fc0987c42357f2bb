"""WeightPerturbation: layerwise-normalised adversarial (or random) weight
perturbation around any optimizer (AWP, Wu et al. 2020; WRF4CIR; SPEC §4).

One step (``step(closure)``; the closure runs forward + backward and returns the loss)::

    closure()                     at w       (DDP: inside model.no_sync(): no all-reduce)
    awp_perturb_(w, g)            w <- w + v,  v_l = sign * gamma * ||w_l|| g_l / (||g_l|| + eps)
    closure()                     at w + v   (gradients all-reduced; BatchNorm statistics frozen)
    awp_restore_(w)               w <- saved w, bit for bit
    base_optimizer.step()         with the gradient taken at w + v

With probability ``random_ratio`` a step is *random* instead (WRF4CIR's cheap
variant): ``v_l = sign * gamma * ||w_l|| r_l / ||r_l||`` with ``r`` drawn inside
the kernel from a per-step seed, and the first forward/backward is skipped
entirely -- the step costs one forward/backward plus three bandwidth-bound
passes over the perturbed weights.

Recipes
-------

Plain::

    opt = WeightPerturbation(model, torch.optim.AdamW(model.parameters(), lr=1e-5), gamma=1e-3)
    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)          # zeroes the gradients itself before each closure call

AMP (``GradScaler``): pass the scaler; the closure scales the loss, ``step`` calls
``scaler.step(base)`` and ``scaler.update()``::

    scaler = torch.amp.GradScaler("cuda")
    opt = WeightPerturbation(model, base, gamma=1e-3, scaler=scaler)
    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        return loss
    opt.step(closure)

The first gradients are used scaled (the direction ``g / ||g||`` does not
depend on the scale).  If they hold inf/NaN, :func:`~vlmkern.awp_perturb_`
skips the perturbation on the device, the second closure runs at ``w``, and the
first gradient element of the base optimizer's parameters is set to NaN on the
device, so ``scaler.step`` skips the update and ``scaler.update`` lowers the
scale; no host sync.  :attr:`last_perturb_skipped` holds that decision (a 0-d
bool device tensor).  Backward the **scaled** loss in the closure and return
the unscaled one; never call ``scaler.step`` yourself.

DDP: pass the ``DistributedDataParallel`` module (or ``model=ddp_module``, or a
``no_sync`` context factory); the first backward runs inside ``no_sync()``, so
only the gradient at ``w + v`` is all-reduced.  Each rank perturbs along its
own local gradient (as in SAM/AWP data-parallel practice); the restore brings
every rank back to the same synchronised weights.

LR schedulers: construct them on the base optimizer or on the wrapper -- both
work, ``param_groups``/``state`` are the base optimizer's.  ``state_dict`` is
the base optimizer's plus a ``"weight_perturbation"`` entry (step count, random
generator state).

BatchNorm: the running statistics of every ``_NormBase`` module (BatchNorm,
SyncBatchNorm, InstanceNorm with ``track_running_stats``) are saved before the
forward at ``w + v`` and copied back after it, so they are updated once per
step, by the forward at ``w`` (needs the model: pass a module, or ``model=``).
In a random step the only forward is at ``w + v`` and updates them.

``gamma = 0`` (and the first ``warmup_steps`` steps) take exactly the base
optimizer's step: one closure call, bitwise equal to the base optimizer alone.

Embedding matrices (sparse-gradient layers; SPEC §4): a batch touches a few rows
of a token embedding, and only those rows get a gradient, so layerwise
normalisation would put ``gamma * ||W||`` of the *whole* matrix onto them
(``sqrt(V / k)`` times the intended relative size for ``k`` of ``V`` equally sized
rows: 44x for 25 of CLIP's 49,408 tokens).  By default (``embeddings="per_row"``)
an adversarial step therefore treats every *used* row (non-zero gradient) of an
``nn.Embedding`` / ``nn.EmbeddingBag`` weight as a layer of its own:
``v_r = sign * gamma * ||w_r|| g_r / (||g_r|| + eps)``, unused rows untouched, so
every row the loss sees moves by ``gamma`` of its own norm, as a dense layer's
weights do.  The rows are gathered into a compact buffer and go through the same
op (:func:`~vlmkern.awp_perturb_`) as the other tensors, then are scattered back;
the restore copies the saved rows back bit for bit.  Finding the used rows costs
one host sync per embedding per adversarial step.  ``embeddings="exclude"`` leaves
embedding matrices unperturbed, ``"layer"`` treats them like any other tensor
(the AWP code's behaviour).  Random steps perturb embeddings layerwise in every
mode: a Gaussian direction spreads over all rows, so each row gets about ``gamma``
of the root-mean-square row norm.  Embeddings are recognised by module type
(needs the model: pass a module, or ``model=``) or named by ``embedding_names``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..ops.awp import awp_perturb_, awp_restore_, perturb_skipped

_M64 = 0xFFFFFFFFFFFFFFFF


def default_param_filter(name: str, param: torch.Tensor) -> bool:
    """AWP's choice: weights with ``dim > 1`` (no biases, no norm-layer scales)."""
    return param.dim() > 1


EMBEDDING_MODES = ("per_row", "exclude", "layer")


def embedding_param_ids(model: nn.Module) -> List[int]:
    """``id`` of the weight of every ``nn.Embedding`` / ``nn.EmbeddingBag`` in ``model``."""
    return [id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]


def used_rows(grad: torch.Tensor) -> torch.Tensor:
    """Indices (int64, on the gradient's device) of the rows (dim 0) of ``grad`` with a non-zero entry."""
    return grad.reshape(grad.shape[0], -1).ne(0).any(dim=1).nonzero().reshape(-1)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _named_params(params_or_model) -> Tuple[Optional[nn.Module], List[Tuple[str, torch.Tensor]]]:
    if isinstance(params_or_model, nn.Module):
        return params_or_model, list(params_or_model.named_parameters())
    if isinstance(params_or_model, torch.Tensor):
        raise TypeError("WeightPerturbation: params_or_model must be a Module or an iterable of tensors, got a Tensor")
    out: List[Tuple[str, torch.Tensor]] = []
    for i, item in enumerate(params_or_model):
        if isinstance(item, torch.Tensor):
            out.append((f"param{i}", item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append((str(item[0]), item[1]))
        elif isinstance(item, dict) and "params" in item:
            out.extend((f"group{i}.param{j}", p) for j, p in enumerate(item["params"]))
        else:
            raise TypeError(f"WeightPerturbation: params_or_model[{i}] must be a Tensor, (name, Tensor) or a param group dict")
    return None, out


class WeightPerturbation(torch.optim.Optimizer):
    """Adversarial / random weight perturbation around ``base_optimizer`` (see module docstring).

    Args:
        params_or_model: a module (its named parameters; also enables BatchNorm
            handling and DDP ``no_sync``), or an iterable of tensors / ``(name, tensor)``.
        base_optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        gamma: relative perturbation size ``||v_l|| / ||w_l||`` (WRF4CIR: ~1e-3).
        random_ratio: probability that a step uses a random direction instead of
            the adversarial one (0: never, 1: always); drawn from a generator seeded with ``seed``.
        warmup_steps: number of plain base-optimizer steps before perturbing.
        param_filter: ``f(name, param) -> bool`` choosing the perturbed tensors
            (default: ``dim > 1``).  Only tensors with ``requires_grad`` are perturbed.
        sign: ``+1`` ascent (AWP), ``-1`` descent.
        seed: seeds the random/adversarial choice and the random directions.
        eps: added to ``||g_l||``.
        scaler: a ``torch.amp.GradScaler`` (see the AMP recipe).
        model: the module, when ``params_or_model`` is a list of tensors.
        no_sync: a zero-argument callable returning the context manager that
            disables gradient synchronisation (default: ``model.no_sync`` for a DDP model).
        freeze_norm_stats: keep BatchNorm statistics from the forward at ``w + v``.
        backend: forwarded to the ops (``"cuda"``, ``"cpu"``, ``"torch"``).
        embeddings: how adversarial steps perturb embedding matrices (see the module
            docstring): ``"per_row"`` (default: each used row normalised by its own
            norm), ``"exclude"`` (not perturbed) or ``"layer"`` (the whole matrix's
            norm, like any tensor).
        embedding_names: names (as in ``params_or_model``) of further parameters to
            treat as embedding matrices (rows along dim 0).
    """

    def __init__(
        self,
        params_or_model,
        base_optimizer: torch.optim.Optimizer,
        gamma: float = 1e-3,
        random_ratio: float = 0.0,
        warmup_steps: int = 0,
        param_filter: Callable[[str, torch.Tensor], bool] = default_param_filter,
        sign: float = +1,
        seed: int = 0,
        *,
        eps: float = 1e-12,
        scaler=None,
        model: Optional[nn.Module] = None,
        no_sync: Optional[Callable[[], Any]] = None,
        freeze_norm_stats: bool = True,
        backend: Optional[str] = None,
        embeddings: str = "per_row",
        embedding_names: Iterable[str] = (),
    ) -> None:
        if not (gamma >= 0.0 and gamma < float("inf")):
            raise ValueError(f"WeightPerturbation: gamma must be finite and >= 0, got {gamma}")
        if not (0.0 <= random_ratio <= 1.0):
            raise ValueError(f"WeightPerturbation: random_ratio must be in [0, 1], got {random_ratio}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"WeightPerturbation: warmup_steps must be an int >= 0, got {warmup_steps}")
        if sign not in (1, -1):
            raise ValueError(f"WeightPerturbation: sign must be +1 or -1, got {sign}")
        if not hasattr(base_optimizer, "step") or not hasattr(base_optimizer, "param_groups"):
            raise TypeError(f"WeightPerturbation: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if embeddings not in EMBEDDING_MODES:
            raise ValueError(f"WeightPerturbation: embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
        found_model, named = _named_params(params_or_model)
        self.model = model if model is not None else found_model
        self.embeddings = embeddings
        emb_ids = set(embedding_param_ids(self.model)) if self.model is not None else set()
        extra = set(embedding_names)
        emb_ids |= {id(p) for name, p in named if name in extra}
        self.perturbed_names: List[str] = []
        self.perturbed_params: List[torch.Tensor] = []
        self.embedding_names: List[str] = []  # the perturbed tensors treated as embedding matrices
        self._row_ids: set = set()
        for name, p in named:
            if p.requires_grad and param_filter(name, p):
                is_emb = id(p) in emb_ids and p.dim() >= 1
                if is_emb and embeddings == "exclude":
                    continue
                self.perturbed_names.append(name)
                self.perturbed_params.append(p)
                if is_emb:
                    self.embedding_names.append(name)
                    if embeddings == "per_row":
                        self._row_ids.add(id(p))
        if not self.perturbed_params and gamma > 0:
            raise ValueError("WeightPerturbation: no parameter passes param_filter (with requires_grad=True)")
        # torch.optim.Optimizer bookkeeping (hooks, profiling) on a placeholder
        # group; afterwards param_groups / state / defaults are the base optimizer's.
        super().__init__([torch.zeros(0)], {})
        self.base_optimizer = base_optimizer
        self.gamma = float(gamma)
        self.random_ratio = float(random_ratio)
        self.warmup_steps = int(warmup_steps)
        self.sign = int(sign)
        self.seed = int(seed)
        self.eps = float(eps)
        self.scaler = scaler
        self.freeze_norm_stats = bool(freeze_norm_stats)
        self.backend = backend
        self._no_sync_factory = no_sync
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(self.seed & 0x7FFFFFFFFFFFFFFF)
        self._backup: Dict[int, torch.Tensor] = {}
        self.step_count = 0
        self.last_step_kind: Optional[str] = None  # "plain" | "adversarial" | "random"
        self.counts = {"plain": 0, "adversarial": 0, "random": 0}
        # 0-d bool device tensor: the last adversarial step's perturbation was skipped
        # (non-finite first gradients, see the AMP recipe); None before the first one.
        self.last_perturb_skipped: Optional[torch.Tensor] = None
        # per-row embeddings: id(parameter) -> rows perturbed in the last adversarial step
        self.last_row_counts: Dict[int, int] = {}

    # ---- delegation to the base optimizer ----------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_placeholder_groups"]

    @param_groups.setter
    def param_groups(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_placeholder_state"]

    @state.setter
    def state(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_state"] = value
        else:
            base.state = value

    @property
    def defaults(self):  # type: ignore[override]
        base = self.__dict__.get("base_optimizer")
        return base.defaults if base is not None else self.__dict__["_placeholder_defaults"]

    @defaults.setter
    def defaults(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_defaults"] = value
        else:
            base.defaults = value

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during Optimizer.__init__ (placeholder group)
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        if self.model is not None:
            self.model.zero_grad(set_to_none=set_to_none)
        for p in self.perturbed_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> Dict[str, Any]:
        sd = self.base_optimizer.state_dict()
        sd["weight_perturbation"] = {
            "step_count": self.step_count,
            "rng_state": self._rng.get_state(),
            "counts": dict(self.counts),
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        wp = sd.pop("weight_perturbation", None)
        self.base_optimizer.load_state_dict(sd)
        if wp is not None:
            self.step_count = int(wp["step_count"])
            self._rng.set_state(wp["rng_state"])
            self.counts.update(wp.get("counts", {}))

    def __repr__(self) -> str:
        return (
            f"WeightPerturbation(gamma={self.gamma}, random_ratio={self.random_ratio}, warmup_steps={self.warmup_steps}, "
            f"sign={self.sign:+d}, {len(self.perturbed_params)} perturbed tensors, base={self.base_optimizer!r})"
        )

    # ---- helpers -----------------------------------------------------------
    def step_seed(self, step: int) -> int:
        """Seed of the random direction at step ``step`` (same on every rank)."""
        return _splitmix64((self.seed & _M64) ^ _splitmix64(step))

    def _backups(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for p in params:
            b = self._backup.get(id(p))
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                b = torch.empty_like(p, memory_format=torch.contiguous_format)
                self._backup[id(p)] = b
            out.append(b)
        return out

    def _no_sync(self):
        if self._no_sync_factory is not None:
            return self._no_sync_factory()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _norm_stats_frozen(self):
        saved = []
        if self.freeze_norm_stats and self.model is not None:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
                    saved.append((m, [(name, buf.clone()) for name, buf in m.named_buffers(recurse=False) if buf is not None]))
        try:
            yield
        finally:
            with torch.no_grad():
                for m, bufs in saved:
                    for name, val in bufs:
                        getattr(m, name).copy_(val)

    def _base_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.base_optimizer)
            self.scaler.update()
        else:
            self.base_optimizer.step()

    def _kind(self, t: int) -> str:
        if self.gamma == 0.0 or t < self.warmup_steps:
            return "plain"
        if self.random_ratio >= 1.0:
            return "random"
        if self.random_ratio > 0.0 and torch.rand((), generator=self._rng).item() < self.random_ratio:
            return "random"
        return "adversarial"

    # ---- the step ----------------------------------------------------------
    def step(self, closure: Optional[Callable[[], Any]] = None):  # type: ignore[override]
        """One perturbed step; returns the closure's loss at ``w`` (random steps: at ``w + v``)."""
        if closure is None:
            raise ValueError(
                "WeightPerturbation.step needs a closure that runs forward + backward and returns the loss"
            )
        closure = torch.enable_grad()(closure)
        t = self.step_count
        self.step_count += 1
        kind = self._kind(t)
        if kind == "plain":
            self.zero_grad()
            loss = closure()
            self._base_step()
        elif kind == "random":
            loss = self._random_step(closure, self.step_seed(t))
        else:
            loss, kind = self._adversarial_step(closure)
        self.last_step_kind = kind
        self.counts[kind] += 1
        return loss

    def _random_step(self, closure, seed: int):
        params = self.perturbed_params
        backup = self._backups(params)
        self.zero_grad()
        awp_perturb_(params, None, backup, gamma=self.gamma, eps=self.eps, sign=self.sign, mode="random", seed=seed, backend=self.backend)
        try:
            loss = closure()  # the only forward: BatchNorm statistics update here
        finally:
            awp_restore_(params, backup, backend=self.backend)
        self._base_step()
        return loss

    def _adversarial_step(self, closure):
        self.zero_grad()
        with self._no_sync():
            loss = closure()
        params, grads = [], []
        rows = []  # per-row embeddings: (parameter, used row indices, compact rows, compact backup)
        row_params, row_grads, row_backup = [], [], []
        for p in self.perturbed_params:
            if p.grad is not None:  # unused parameters are not perturbed
                if p.grad.is_sparse:
                    raise RuntimeError("WeightPerturbation: sparse gradients are not supported")
                if id(p) in self._row_ids:
                    idx = used_rows(p.grad)
                    wu = p.detach().index_select(0, idx)  # a compact copy of the used rows
                    bu = torch.empty_like(wu)
                    rows.append((p, idx, wu, bu))
                    row_params.extend(wu.unbind(0))
                    row_grads.extend(p.grad.index_select(0, idx).unbind(0))
                    row_backup.extend(bu.unbind(0))
                else:
                    params.append(p)
                    grads.append(p.grad)
        backup = self._backups(params)
        all_params, all_backup = params + row_params, backup + row_backup
        # A non-finite first gradient skips the perturbation on the device (the
        # op's rule); the restore below is exact either way (backup = weights).
        norms = awp_perturb_(all_params, grads + row_grads, all_backup, gamma=self.gamma, eps=self.eps,
                             sign=self.sign, backend=self.backend)
        self.last_row_counts = {id(p): int(idx.numel()) for p, idx, _, _ in rows}
        skipped = perturb_skipped(norms) if len(all_params) else None
        self.last_perturb_skipped = skipped
        self.zero_grad()
        try:
            with torch.no_grad():
                for p, idx, wu, _ in rows:  # the perturbed rows into the embedding matrix
                    p.index_copy_(0, idx, wu)
            with self._norm_stats_frozen():
                closure()
        finally:
            awp_restore_(all_params, all_backup, backend=self.backend)
            with torch.no_grad():
                for p, idx, _, bu in rows:  # the saved rows back, bit for bit
                    p.index_copy_(0, idx, bu)
        if skipped is not None and self.scaler is not None and self.scaler.is_enabled():
            self._poison_first_grad(skipped)
        self._base_step()
        return loss, "adversarial"

    def _poison_first_grad(self, skipped: torch.Tensor) -> None:
        """First gradient element of the base optimizer's parameters <- NaN iff
        ``skipped`` (on the device, no sync): GradScaler then skips the step and
        lowers the scale (see the AMP recipe)."""
        for group in self.base_optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.numel() > 0 and not p.grad.is_sparse:
                    e = p.grad[(0,) * p.grad.dim()]  # a 0-d view, any strides
                    e.copy_(torch.where(skipped.to(e.device), torch.full_like(e, float("nan")), e))
                    return
