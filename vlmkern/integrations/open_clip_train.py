"""TuneCLIP's (H)GCL loss inside open_clip's own trainer (``open_clip_train.main``).

    python -m vlmkern.integrations.open_clip_train --vlmkern-loss hgcl --vlmkern-margin 0.1 \\
        --vlmkern-gamma 0.9 [--vlmkern-tau 0.03] [--vlmkern-eps 1e-14] [--vlmkern-learn-tau [--vlmkern-rho 16]] \\
        [--vlmkern-state-on-host] [--vlmkern-num-samples N] \\
        <any open_clip_train.main arguments>

The ``--vlmkern-*`` flags are taken off, the repo's tiny model configs
(``vlmkern-micro-ViT``, ``vlmkern-tiny-ViT``) are registered with open_clip, and
``open_clip_train.main.main(rest)`` runs unmodified after
:func:`apply_vlmkern_to_open_clip_train` has patched five names in the
``open_clip_train.main`` module (nothing else of open_clip is touched):

``create_loss``
    returns :class:`OpenClipLoss`: a :class:`vlmkern.GlobalContrastiveLoss`
    (``margin=None`` for ``gcl``) in open_clip's call convention
    ``loss(image_features=, text_features=, logit_scale=, output_dict=True)`` ->
    ``{"contrastive_loss": loss}``; ``num_samples`` = the training set's length.
``get_data``
    the sample index. A map-style training dataset (``--dataset-type csv``,
    or ``synthetic``) is wrapped so that every item is ``(image, text, index)``
    and the DataLoader is rebuilt with the same sampler and settings: the index
    travels *inside the batch* through the DataLoader workers, collate and
    pin-memory. Without torchrun, open_clip's ``shuffle=True`` sampler (its order drawn
    from the global RNG, which open_clip's checkpoints do not hold) is replaced by
    open_clip's torchrun sampler with one replica (:func:`epoch_seeded_order`: the order
    of epoch ``e`` is a function of ``(--seed, e)``), so that ``--resume`` continues the
    data order of the run it resumes. Webdataset training data (``--dataset-type webdataset``,
    or ``--train-data`` ending in ``.tar``): the index is a field of the sample, ``<key>.idx``,
    written by ``python -m vlmkern.integrations.wds_index`` (:mod:`vlmkern.integrations.wds_index`:
    ``0..N-1`` in shard then sample order, plus ``vlmkern_index.json`` and ``sizes.json``).
    open_clip's pipeline shuffles shards and samples, splits them over ranks and workers
    and, with ``--dataset-resampled``, draws shards with replacement, so neither a stream
    position nor a hash of ``__key__`` (collisions would merge samples) is a stable index;
    a field of the sample goes wherever the sample goes. :func:`with_wds_index` replaces
    the ``to_tuple("image", "text")`` stage of the pipeline open_clip built with one that
    adds that field (:class:`_ImageTextIndex`; a sample without it, or outside
    ``[0, N)``, raises naming its shard and key), and open_clip's tar reader with the
    same reader with webdataset's end-of-shard marker off (:func:`_tarfile_to_samples_eof_none`,
    open_clip issue #935); everything else is open_clip's. ``N``, the state's size, must be
    known before training (:func:`wds_num_samples`): ``--vlmkern-num-samples`` or the
    ``vlmkern_index.json`` next to the shards, which must list every ``--train-data``
    shard; else the launcher stops before building the model. ``--train-num-samples``
    stays open_clip's epoch length. Resampled repeats inside a batch are allowed (one
    update per repeated index, with the mean ``Phi``). The loader open_clip iterates is
    :class:`IndexedLoader`: it
    yields the ``(images, texts)`` that ``train_one_epoch`` unpacks and, in the
    main process and the same thread, hands that batch's index to the loss
    (:class:`IndexHandoff`), which takes it exactly once: a batch whose index is
    not taken by the loss, or a loss call without a batch, raises instead of
    pairing features with another batch's indices. (Nothing is set in a
    DataLoader worker, and ``train_one_epoch`` is not copied or changed.)
``create_model_and_transforms``
    by default the temperature is fixed (as in TuneCLIP): ``model.logit_scale`` is set to
    ``log(1/tau)`` when ``--vlmkern-tau`` is given and frozen
    (``requires_grad=False``) before DDP and the optimizer see it; the loss uses
    ``tau = exp(-logit_scale)`` as the model holds it once a ``--resume`` has
    loaded its weights, so the saved model's ``logit_scale`` is the temperature
    the loss trained with.  With ``--vlmkern-learn-tau`` the temperature is learned
    (FastCLIP-v3's RGCL-g objective, ``+ rho * tau``): ``logit_scale`` stays trainable
    (``--vlmkern-tau``, if given, is its starting value), the loss takes the
    ``logit_scale`` open_clip passes it (``model.logit_scale.exp()``, ``tau = 1/that``) and
    gives it the gradient of ``dF/dtau`` through autograd, so open_clip's optimizer, its
    ``[0, ln 100]`` clamp (``tau`` in ``[0.01, 1]``) and DDP (no unused parameter) treat it
    like any parameter.  ``--vlmkern-rho`` (default 16.0, FastCLIP's default 8.0 in this
    loss's scale: the two directions are summed, not averaged) is a KL radius: below
    ``2 ln(B-1)`` (``B`` the global batch) or ``tau`` only shrinks to the clamp.
``pt_load`` and ``torch``
    the ``u`` state lives *in open_clip's checkpoint*, under the key
    ``"vlmkern_loss"`` (open_clip's resume ignores unknown keys, and a plain
    open_clip model still loads the checkpoint's ``"state_dict"``). ``main``'s
    module-level name ``torch`` is a proxy of the real module whose ``save``
    adds that key to the training checkpoints ``main`` writes
    (``epoch_<n>.pt``, ``epoch_latest.pt``): whatever ``main``'s rules for
    when and where to save are, the state goes with them. ``pt_load`` (used by
    ``main`` for ``--resume`` only) keeps the entry of the checkpoint it loads,
    and ``create_loss`` restores it. The proxy's
    ``torch.nn.parallel.DistributedDataParallel`` drops the ``device_ids=[cpu]``
    that ``main`` passes for a model on the CPU (DDP accepts none for CPU
    modules), so torchrun with ``--device cpu --dist-backend gloo`` runs.

open_clip calls the loss inside its ``--precision amp`` region; the op keeps
its own fp32 accumulation there (``hgcl_loss`` turns autocast off for its
kernels).

``--accum-freq k``
    open_clip caches the features of ``k`` micro-batches, then calls the loss
    ``k`` times on their concatenation (each call carrying one micro-batch's
    gradient) before one optimizer step. :class:`IndexHandoff` concatenates the
    ``k`` micro-batches' indices in that order; the first call updates ``u``,
    the ``k - 1`` others are stateless calls that read the updated ``u`` (SPEC §1):
    the step is the one ``--batch-size k*b --accum-freq 1`` takes, up to
    floating point (python_tests/test_open_clip_integration.py checks the state
    and the logged losses of the two).
torchrun (``torch.distributed``, e.g. ``--dist-backend gloo`` on CPUs)
    each rank's loader hands its own batch's index (open_clip's
    ``DistributedSampler`` is kept); :class:`vlmkern.GlobalContrastiveLoss`
    gathers every rank's features (with gradient) and indices, so ``u`` is the
    same on every rank and the step is the single-process step on the global
    batch (rank 0's rows, then rank 1's, ...). That is open_clip's
    ``--gather-with-grad`` (``--local-loss`` or not: same gradient), which is
    therefore required: open_clip's gradient-free gather gives another gradient.
    Checkpoints are written by rank 0 only, with the one ``u``.

What this slice does not honour raises :class:`UnsupportedOption` naming the
option: ``--siglip``, CoCa models, ``--distill-*``, ``--horovod``, more than
one rank without ``--gather-with-grad``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import math
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vlmkern import GlobalContrastiveLoss

_log = logging.getLogger("vlmkern.open_clip_train")

CHECKPOINT_KEY = "vlmkern_loss"
_ENTRY_FORMAT = 1
INSTALL_HINT = "pip install 'vlmkern[open_clip_train]' (or: pip install open_clip_torch braceexpand webdataset pandas)"
LOSSES = ("hgcl", "gcl")


class UnsupportedOption(ValueError):
    """An open_clip_train option this integration does not (yet) honour."""


# ----------------------------------------------------------------------------
# configuration and the checks of open_clip's arguments
# ----------------------------------------------------------------------------


@dataclass
class LossConfig:
    """The ``--vlmkern-*`` flags. ``margin=None``: 0.1 for HGCL (GCL has none). ``tau=None``: the
    model's ``logit_scale`` decides."""
    loss: str = "hgcl"
    gamma: float = 0.9
    margin: Optional[float] = None
    tau: Optional[float] = None
    eps: float = 1e-14
    learn_tau: bool = False  # learn logit_scale (RGCL-g) instead of freezing it
    rho: float = 16.0  # RGCL-g's rho in our scale (2 x FastCLIP's 8.0); used with learn_tau only
    state_on_host: bool = False  # the u state in (pinned) host memory (GlobalContrastiveLoss(state_on_host=True))

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"vlmkern loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "hgcl" and self.margin is None:
            self.margin = 0.1
        if self.loss == "gcl" and self.margin is not None:
            raise ValueError("--vlmkern-margin is HGCL's hinge margin; plain GCL (--vlmkern-loss gcl) has none")
        if self.loss == "hgcl" and (self.margin is None or not (math.isfinite(self.margin) and self.margin >= 0)):
            raise ValueError(f"--vlmkern-margin must be a number >= 0, got {self.margin}")
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"--vlmkern-gamma must be in (0, 1], got {self.gamma}")
        # open_clip clamps logit_scale to [0, ln 100] after every step: tau outside [0.01, 1] would not hold
        if self.tau is not None and not (0.01 <= self.tau <= 1.0):
            raise ValueError(f"--vlmkern-tau must be in [0.01, 1] (open_clip clamps logit_scale = log(1/tau) "
                             f"to [0, ln 100]), got {self.tau}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"--vlmkern-eps must be a number > 0, got {self.eps}")
        if not math.isfinite(self.rho):
            raise ValueError(f"--vlmkern-rho must be a finite number, got {self.rho}")


def _is_webdataset(args) -> bool:
    if args.dataset_type == "webdataset":
        return True
    if args.dataset_type == "auto" and args.train_data:
        return args.train_data.split(".")[-1] not in ("csv", "tsv")  # open_clip's rule: csv/tsv, else tar
    return False


def _world_size(args) -> int:
    """open_clip's world size: ``args.world_size`` once ``main`` has initialised the processes,
    before that the ``WORLD_SIZE`` that torchrun sets."""
    if getattr(args, "distributed", False):
        return int(args.world_size)
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_open_clip_args(args) -> None:
    """Raise :class:`UnsupportedOption` for an open_clip_train option this slice cannot honour."""
    def no(option, why):
        raise UnsupportedOption(f"vlmkern.integrations.open_clip_train: {option} is not supported: {why}")

    if args.siglip:
        no("--siglip", "the vlmkern loss replaces open_clip's contrastive loss; SigLIP's sigmoid loss is another loss")
    if "coca" in args.model.lower():
        no(f"--model {args.model} (CoCa)", "CoCa's captioning loss is not combined with the vlmkern loss")
    if args.distill_model is not None or args.distill_pretrained is not None:
        no("--distill-model/--distill-pretrained", "distillation is not combined with the vlmkern loss")
    if args.horovod:
        no("--horovod", "the vlmkern loss gathers across ranks with torch.distributed (use torchrun)")
    if _world_size(args) > 1 and not args.gather_with_grad:
        no("torchrun without --gather-with-grad", "the vlmkern loss always gathers every rank's features with "
           "their gradient (each rank's anchors against the global batch, the exact global-batch gradient: what "
           "open_clip computes with --gather-with-grad, with or without --local-loss); open_clip's gather without "
           "gradient gives another gradient. Add --gather-with-grad (and --local-loss, which it implies here)")


# ----------------------------------------------------------------------------
# the sample index: through the DataLoader inside the batch, then to the loss
# ----------------------------------------------------------------------------


class IndexHandoff:
    """The batches' indices, from the loader (``put``) to the loss (``take_step``).

    ``accum_freq = k`` (open_clip's ``--accum-freq``): open_clip's ``train_one_epoch``
    caches the features of ``k`` micro-batches, then calls the loss ``k`` times on
    their concatenation (in loader order), each call with the gradient of one
    micro-batch. So the loss takes the ``k`` pending indices at once, concatenated
    in that order, on its first call of the step (which updates the ``u`` state)
    and gets the same index, stateless, on the ``k - 1`` calls that follow (they
    see the updated ``u``, as the estimator wants: the ``k`` calls together are the
    one step on the ``k``-times larger batch). Any other interleaving raises
    rather than pairing features with another batch's indices."""

    def __init__(self, accum_freq: int = 1):
        self.accum_freq = int(accum_freq)
        self.clear()

    def clear(self) -> None:
        self._pending: List[Tensor] = []
        self._step_index: Optional[Tensor] = None
        self._calls_left = 0

    def put(self, index: Tensor) -> None:
        if self._calls_left:
            raise RuntimeError(f"vlmkern.integrations.open_clip_train: a new training batch arrived after "
                               f"{self.accum_freq - self._calls_left} of the {self.accum_freq} loss calls of an "
                               "accumulation step (--accum-freq); the trainer skipped loss calls")
        if len(self._pending) >= self.accum_freq:
            raise RuntimeError("vlmkern.integrations.open_clip_train: a new training batch arrived before the loss "
                               "took the previous batch's sample index (the trainer skipped the loss for a batch?)")
        self._pending.append(index)

    def take_step(self) -> Tuple[Tensor, bool]:
        """``(index, update_state)`` for one loss call: the first call of a step takes the pending
        indices (``update_state=True``), the ``accum_freq - 1`` calls after it reuse them (``False``)."""
        if self._calls_left:
            self._calls_left -= 1
            return self._step_index, False
        if len(self._pending) < self.accum_freq:
            raise RuntimeError("vlmkern.integrations.open_clip_train: the loss was called without a pending training "
                               f"batch index ({len(self._pending)} of the {self.accum_freq} micro-batches of a step "
                               f"have arrived; each step's indices serve accum_freq = {self.accum_freq} loss calls)")
        index = self._pending[0] if self.accum_freq == 1 else torch.cat(self._pending)
        self._pending = []
        self._step_index, self._calls_left = index, self.accum_freq - 1
        return index, True

    def take(self) -> Tensor:
        """The next loss call's index (see :meth:`take_step`)."""
        return self.take_step()[0]


class IndexedDataset(Dataset):
    """``dataset[i] + (i,)``: every item carries its dataset index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class IndexedLoader:
    """Iterates a loader of ``(images, texts, index)`` batches as ``(images, texts)``, handing each
    batch's index to ``handoff`` before yielding it. Carries open_clip's ``num_samples`` /
    ``num_batches``; other attributes are the wrapped DataLoader's."""

    def __init__(self, loader: DataLoader, handoff: IndexHandoff, num_samples: int, num_batches: int):
        self.loader = loader
        self.handoff = handoff
        self.num_samples = num_samples
        self.num_batches = num_batches

    def __len__(self) -> int:
        try:
            return len(self.loader)
        except TypeError:  # a webdataset loader has no length: open_clip's num_batches is its epoch
            return self.num_batches

    def __iter__(self):
        self.handoff.clear()
        try:
            for images, texts, index in self.loader:
                self.handoff.put(index)
                yield images, texts
        finally:  # an epoch cut short leaves no stale index for the next one
            self.handoff.clear()

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)


def epoch_seeded_order(info, seed: int, epoch: int):
    """open_clip's single-process training loader with its shuffle made a function of ``(seed, epoch)``.

    open_clip's CSV loader without torchrun is ``DataLoader(shuffle=True)``: its order is drawn from the
    global torch RNG, whose state after epoch ``e`` depends on everything drawn before (the model's
    initialisation, the augmentations of epochs ``0..e``) and is not in open_clip's checkpoints, so a
    ``--resume``d run sees another order than the run it continues. The default ``RandomSampler`` of that
    loader is replaced by the sampler open_clip uses under torchrun, ``DistributedSampler`` (here with
    ``num_replicas=1``, ``seed=--seed``), which open_clip's ``DataInfo.set_epoch`` already advances
    every epoch: epoch ``e``'s order is ``randperm(N)`` of a generator seeded with ``seed + e``, the same
    in a resumed run. Any other sampler (torchrun's ``DistributedSampler``, a user's) is kept."""
    dl = info.dataloader
    sampler = getattr(dl, "sampler", None)
    if not (type(sampler) is torch.utils.data.RandomSampler and sampler.generator is None
            and not sampler.replacement and sampler._num_samples is None):
        return info
    ordered = torch.utils.data.distributed.DistributedSampler(dl.dataset, num_replicas=1, rank=0, shuffle=True,
                                                              seed=seed)
    ordered.set_epoch(epoch)
    kw: Dict[str, Any] = dict(
        batch_size=dl.batch_size, sampler=ordered, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
        pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context, persistent_workers=dl.persistent_workers)
    if dl.num_workers > 0:
        kw["prefetch_factor"] = dl.prefetch_factor
    loader = DataLoader(dl.dataset, **kw)
    loader.num_samples = getattr(dl, "num_samples", len(dl.dataset))
    loader.num_batches = getattr(dl, "num_batches", len(loader))
    return dataclasses.replace(info, dataloader=loader, sampler=ordered)


class _ImageTextIndex:
    """The webdataset stage that replaces open_clip's ``to_tuple("image", "text")``: ``(image,
    text, index)`` with ``index`` the sample's ``idx`` field (:mod:`vlmkern.integrations.wds_index`)
    as a 0-d int64 tensor (the batching stage stacks it). A sample without the field, or with an
    index outside ``[0, num_samples)``, raises naming its shard and key."""

    def __init__(self, num_samples: int):
        from vlmkern.integrations.wds_index import FIELD
        self.num_samples = int(num_samples)
        self.field = FIELD

    def __call__(self, sample):
        field = self.field
        raw = sample.get(field)
        try:
            i = int(raw.decode("ascii") if isinstance(raw, (bytes, bytearray)) else raw)
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            where = f"sample {sample.get('__key__')!r} of the shard {sample.get('__url__')!r}"
            if raw is None:
                raise ValueError(f"vlmkern.integrations.open_clip_train: {where} has no '.{field}' field: the loss "
                                 "needs a stable sample index in the data; index the shards with python -m "
                                 "vlmkern.integrations.wds_index (see its --help)") from None
            raise ValueError(f"vlmkern.integrations.open_clip_train: {where}: its '.{field}' field {raw!r} is "
                             "not an integer") from exc
        if not 0 <= i < self.num_samples:
            where = f"sample {sample.get('__key__')!r} of the shard {sample.get('__url__')!r}"
            raise ValueError(f"vlmkern.integrations.open_clip_train: {where} has index {i}, outside the loss "
                             f"state's [0, {self.num_samples}) (--vlmkern-num-samples or the shards' "
                             "vlmkern_index.json is too small for these shards)")
        return sample["image"], sample["text"], torch.tensor(i, dtype=torch.int64)


def wds_num_samples(train_data: str, num_samples: Optional[int] = None) -> int:
    """The size of the ``u`` state for webdataset training data: ``num_samples``
    (``--vlmkern-num-samples``) when given, else the ``num_samples`` of the ``vlmkern_index.json``
    that :mod:`vlmkern.integrations.wds_index` wrote next to the shards (every shard of
    ``--train-data`` must be listed in it). ``--train-num-samples`` is open_clip's epoch length,
    not the size of the index space, and is not used."""
    from vlmkern.integrations import wds_index
    if num_samples is not None:
        if int(num_samples) < 1:
            raise ValueError(f"--vlmkern-num-samples must be >= 1, got {num_samples}")
        return int(num_samples)
    try:
        return int(wds_index.read_index(wds_index.expand_shards(train_data))["num_samples"])
    except ValueError as exc:
        raise ValueError(f"--train-data {train_data}: the vlmkern loss keeps per-sample state and needs to know "
                         f"the number of indexed samples up front: {exc}. Index the shards with python -m "
                         "vlmkern.integrations.wds_index, or give --vlmkern-num-samples N for shards whose "
                         f"samples already carry a '.{wds_index.FIELD}' field in [0, N)") from exc


def _tarfile_to_samples_eof_none(src):
    """open_clip's ``tarfile_to_samples_nothrow`` with webdataset's end-of-shard marker turned off.

    webdataset >= 0.2.96 (``tar_file_expander(eof_value={})``) yields an empty dict after each
    shard, on which open_clip's ``group_by_keys_nothrow`` (3.3.0) fails with ``KeyError: 'fname'``
    at the end of the first shard (open_clip issue #935, webdataset issue #384): open_clip's own
    webdataset training crashes with the webdataset this repo pins. This is that function with
    ``eof_value=None``, the fix given in those threads: open_clip's reading as it was written for
    (its grouping, its ``log_and_continue`` handler)."""
    from open_clip_train import data as ocdata
    streams = ocdata.url_opener(src, handler=ocdata.log_and_continue)
    files = ocdata.tar_file_expander(streams, handler=ocdata.log_and_continue, eof_value=None)
    return ocdata.group_by_keys_nothrow(files, handler=ocdata.log_and_continue)


def with_wds_index(info, handoff: IndexHandoff, num_samples: int):
    """open_clip's webdataset training ``DataInfo`` (``get_wds_dataset``) with its pipeline's
    ``to_tuple("image", "text")`` stage replaced by :class:`_ImageTextIndex`, so that the sample's
    index is batched with its image and caption (after every shard/sample shuffle, the node/worker
    split and resampling), and the loader wrapped in :class:`IndexedLoader`. Everything else
    (shuffles, epoch, ``num_samples``/``num_batches``, workers) is open_clip's."""
    import webdataset as wds
    from webdataset import filters

    loader = info.dataloader
    inner = getattr(loader, "pipeline", [None])[0]  # wds.WebLoader = DataPipeline(DataLoader(dataset))
    pipeline = getattr(getattr(inner, "dataset", None), "pipeline", None)
    hits = [i for i, st in enumerate(pipeline or []) if getattr(st, "f", None) is filters._to_tuple
            and tuple(getattr(st, "args", ())) == ("image", "text")]
    if len(hits) != 1:
        raise UnsupportedOption("vlmkern.integrations.open_clip_train: open_clip's webdataset training pipeline has "
                                "no single to_tuple('image', 'text') stage to carry the sample index (an open_clip "
                                "version this integration does not know)")
    pipeline[hits[0]] = wds.map(_ImageTextIndex(num_samples))
    from open_clip_train import data as ocdata
    if "eof_value" in inspect.signature(ocdata.tar_file_expander).parameters:  # open_clip #935 (see above)
        pipeline[:] = [_tarfile_to_samples_eof_none if st is ocdata.tarfile_to_samples_nothrow else st
                       for st in pipeline]
    return dataclasses.replace(info, dataloader=IndexedLoader(loader, handoff, loader.num_samples,
                                                              loader.num_batches))


def with_index(info, handoff: IndexHandoff):
    """open_clip's training ``DataInfo`` with its DataLoader rebuilt over :class:`IndexedDataset`
    (same sampler, batch size, workers, collate, drop_last, ...) and wrapped in :class:`IndexedLoader`."""
    dl = info.dataloader
    ds = dl.dataset
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise UnsupportedOption(
            f"vlmkern.integrations.open_clip_train: the training dataset ({type(ds).__name__}) is not a map-style "
            "dataset with a stable index; the vlmkern loss needs one (use --dataset-type csv)")
    kw: Dict[str, Any] = dict(
        batch_size=dl.batch_size, sampler=dl.sampler, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
        pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
        persistent_workers=dl.persistent_workers)
    if dl.num_workers > 0:
        kw["prefetch_factor"] = dl.prefetch_factor
    loader = DataLoader(IndexedDataset(ds), **kw)
    num_samples = getattr(dl, "num_samples", len(ds))
    num_batches = getattr(dl, "num_batches", len(loader))
    return dataclasses.replace(info, dataloader=IndexedLoader(loader, handoff, num_samples, num_batches))


# ----------------------------------------------------------------------------
# the loss in open_clip's call convention
# ----------------------------------------------------------------------------


class OpenClipLoss(torch.nn.Module):
    """:class:`vlmkern.GlobalContrastiveLoss` called the way open_clip calls its losses.

    ``forward(image_features, text_features, logit_scale=None, output_dict=False, index=None,
    update_state=True)``: ``index`` (the batch's dataset indices) defaults to the one ``handoff``
    holds, and then ``update_state`` is the handoff's (stateless on the repeated calls of an
    ``--accum-freq`` step); ``update_state=False``: the stateless call. Returns the loss,
    or ``{"contrastive_loss": loss}`` with ``output_dict=True``. ``logit_scale`` is used only with
    ``learn_tau=True`` (open_clip's convention, ``model.logit_scale.exp()``: ``tau = 1/logit_scale``,
    which then receives its gradient); otherwise the temperature is the loss's fixed ``tau``.
    ``logit_bias`` (SigLIP) or any other model output
    (CoCa's logits, distillation features) raises :class:`UnsupportedOption`."""

    def __init__(self, loss: GlobalContrastiveLoss, handoff: Optional[IndexHandoff] = None, learn_tau: bool = False):
        super().__init__()
        self.loss = loss
        self.handoff = handoff
        self.learn_tau = learn_tau

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale=None, logit_bias=None,
                output_dict: bool = False, index: Optional[Tensor] = None, update_state: bool = True, **other):
        if logit_bias is not None:
            raise UnsupportedOption("vlmkern.integrations.open_clip_train: the model returns logit_bias (a SigLIP "
                                    "model); the vlmkern loss is not a sigmoid loss")
        if other:
            raise UnsupportedOption(f"vlmkern.integrations.open_clip_train: unexpected model outputs {sorted(other)} "
                                    "(CoCa logits/labels or --distill features are not supported)")
        if index is None:
            if self.handoff is None:
                raise ValueError("vlmkern.integrations.open_clip_train: no index given and no loader hands one over")
            index, update_state = self.handoff.take_step()
        # a host-memory state takes the loader's CPU index as it is (no device-to-host copy)
        target = torch.device("cpu") if getattr(self.loss, "state_on_host", False) else image_features.device
        index = torch.as_tensor(index).to(device=target, dtype=torch.int64)
        if index.dim() != 1 or index.shape[0] != image_features.shape[0]:
            raise RuntimeError(f"vlmkern.integrations.open_clip_train: the batch index has shape {tuple(index.shape)} "
                               f"but the features have {image_features.shape[0]} rows")
        if self.learn_tau:
            if logit_scale is None:
                raise ValueError("vlmkern.integrations.open_clip_train: learn_tau needs the model's logit_scale "
                                 "(open_clip passes it to the loss)")
            loss = self.loss(image_features, text_features, index, logit_scale=logit_scale, update_state=update_state)
        else:
            loss = self.loss(image_features, text_features, index, update_state=update_state)
        return {"contrastive_loss": loss} if output_dict else loss


# ----------------------------------------------------------------------------
# the patches
# ----------------------------------------------------------------------------


def _checkpoint_entry(loss: GlobalContrastiveLoss, kind: str) -> Dict[str, Any]:
    return {"format": _ENTRY_FORMAT, "loss": kind, "num_samples": int(loss.log_u_img.shape[0]),
            "tau": loss.tau, "gamma": loss.gamma, "margin": loss.margin, "eps": loss.eps,
            "state_dict": {k: v.detach().cpu().clone() for k, v in loss.state_dict().items()}}


def _is_train_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and {"epoch", "state_dict", "optimizer"} <= obj.keys()


class _Overlay(types.ModuleType):
    """A module whose attributes are ``real``'s, except the ``overrides``."""

    def __init__(self, real: types.ModuleType, **overrides):
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_real"], name)


def _ddp_on_any_device(module, device_ids=None, *args, **kwargs):
    """``DistributedDataParallel`` as open_clip's ``main`` calls it (``device_ids=[args.device]``),
    without ``device_ids`` for a model on the CPU, which DDP refuses them for (gloo on CPUs)."""
    if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids, *args, **kwargs)


class _TorchSavingLossState(types.ModuleType):
    """``torch`` for ``open_clip_train.main``'s namespace: every attribute is the real module's,
    except that ``save`` of a training checkpoint (a dict with epoch/state_dict/optimizer)
    adds the loss state under :data:`CHECKPOINT_KEY`, and that
    ``torch.nn.parallel.DistributedDataParallel`` is :func:`_ddp_on_any_device`."""

    def __init__(self, real: types.ModuleType, session: "Session"):
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self._session = session
        self.nn = _Overlay(real.nn, parallel=_Overlay(real.nn.parallel, DistributedDataParallel=_ddp_on_any_device))

    def __getattr__(self, name):
        return getattr(self._real, name)

    def save(self, obj, f, *args, **kwargs):
        s = self._session
        if s.loss is not None and _is_train_checkpoint(obj):
            obj = dict(obj)
            obj[CHECKPOINT_KEY] = _checkpoint_entry(s.loss.loss, s.config.loss)
        return self._real.save(obj, f, *args, **kwargs)


@dataclass
class Session:
    """What the patches share during one ``open_clip_train.main.main`` run."""
    config: LossConfig
    handoff: IndexHandoff = dataclasses.field(default_factory=IndexHandoff)
    model: Optional[torch.nn.Module] = None
    num_samples: Optional[int] = None
    resume_path: Optional[str] = None
    resume_entry: Optional[Dict[str, Any]] = None
    loss: Optional[OpenClipLoss] = None
    wds_num_samples: Optional[int] = None  # --vlmkern-num-samples (webdataset data)


class OpenClipTrainPatch:
    """The patches applied to ``open_clip_train.main``; :meth:`undo` restores the originals."""

    NAMES = ("create_model_and_transforms", "get_data", "create_loss", "pt_load", "torch")

    def __init__(self, session: Session, module, originals: Dict[str, Any]):
        self.session = session
        self.module = module
        self.originals = originals

    def undo(self) -> None:
        for name, value in self.originals.items():
            setattr(self.module, name, value)


def _freeze_temperature(session: Session, model) -> None:
    """Sets ``logit_scale`` to ``log(1/--vlmkern-tau)`` when given; freezes it unless the
    temperature is learned (``--vlmkern-learn-tau``: it stays trainable)."""
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise UnsupportedOption(f"vlmkern.integrations.open_clip_train: the model ({type(model).__name__}) has no "
                                "logit_scale parameter to fix or learn the temperature with")
    with torch.no_grad():
        if session.config.tau is not None:
            scale.fill_(math.log(1.0 / session.config.tau))
    scale.requires_grad_(session.config.learn_tau)
    session.model = model


def _model_tau(session: Session) -> float:
    return math.exp(-float(session.model.logit_scale.detach().float().reshape(-1)[0]))


def _build_loss(session: Session, args) -> OpenClipLoss:
    cfg = session.config
    check_open_clip_args(args)
    if session.num_samples is None:
        raise RuntimeError("vlmkern.integrations.open_clip_train: create_loss ran before get_data built the "
                           "training data (the loss state needs the dataset size)")
    if session.model is None:
        raise RuntimeError("vlmkern.integrations.open_clip_train: create_loss ran before the model was built")
    if cfg.tau is not None and not cfg.learn_tau and abs(_model_tau(session) - cfg.tau) > 1e-6 * cfg.tau:
        _log.warning(f"vlmkern: the resumed checkpoint's logit_scale gives tau = {_model_tau(session):.6g}; "
                     f"using --vlmkern-tau {cfg.tau:.6g} as asked")
        with torch.no_grad():
            session.model.logit_scale.fill_(math.log(1.0 / cfg.tau))
    tau = _model_tau(session)
    margin = cfg.margin if cfg.loss == "hgcl" else None
    gcl = GlobalContrastiveLoss(session.num_samples, tau=tau, gamma=cfg.gamma, margin=margin, eps=cfg.eps,
                                rho=cfg.rho if cfg.learn_tau else 0.0, state_on_host=cfg.state_on_host)
    gcl = gcl.to(args.device)  # with state_on_host the state stays in host memory
    if cfg.learn_tau:
        how = (f"the temperature is learned (RGCL-g, rho={cfg.rho}): model.logit_scale = {math.log(1 / tau):.6g} "
               "gets its gradient from the loss")
        global_batch = args.batch_size * getattr(args, "world_size", 1)
        big = 2 * math.log(max(global_batch - 1, 1))
        if cfg.rho >= big:
            _log.warning(f"vlmkern: --vlmkern-rho {cfg.rho} >= 2 ln(B-1) = {big:.3g} (B = the global batch "
                         f"{global_batch}): dF/dtau > 0 always, tau will shrink to open_clip's clamp (0.01)")
    else:
        how = f"the temperature is fixed: model.logit_scale = {math.log(1 / tau):.6g} is frozen (requires_grad=False)"
    _log.info(f"vlmkern: loss {cfg.loss.upper()} (vlmkern.GlobalContrastiveLoss: num_samples={session.num_samples}, "
              f"tau={tau:.6g}, gamma={cfg.gamma}, margin={margin}"
              f"{', state_on_host=True: the u state is in host memory' if cfg.state_on_host else ''}); {how}")
    if args.distributed and args.world_size > 1:
        _log.info(f"vlmkern: {args.world_size} ranks: the loss gathers every rank's features and indices with the "
                  "gradient (--gather-with-grad; each rank's anchors against the global batch, --local-loss) and "
                  "keeps the same u state on every rank")
    entry = session.resume_entry
    if entry is not None:
        n = int(entry.get("num_samples", -1))
        if entry.get("format") != _ENTRY_FORMAT or n != session.num_samples:
            raise ValueError(f"vlmkern.integrations.open_clip_train: the checkpoint {session.resume_path} holds loss "
                             f"state for {n} samples (format {entry.get('format')}) but the training data has "
                             f"{session.num_samples}: resume with the same --train-data")
        gcl.load_state_dict(entry["state_dict"])
        keys = (("loss", cfg.loss),) + ((("tau", tau),) if not cfg.learn_tau else ()) + (
            ("gamma", cfg.gamma), ("margin", margin))
        for key, now in keys:
            if entry.get(key) != now and not (isinstance(now, float) and isinstance(entry.get(key), float)
                                              and abs(entry[key] - now) <= 1e-6 * abs(now)):
                _log.warning(f"vlmkern: the checkpoint's loss state was trained with {key}={entry.get(key)}; "
                             f"continuing with {key}={now}")
        visited = int(torch.isfinite(gcl.log_u_img).sum())
        _log.info(f"vlmkern: restored the loss state from {session.resume_path}: "
                  f"{visited} of {session.num_samples} samples visited")
    elif session.resume_path is not None:
        _log.warning(f"vlmkern: the checkpoint {session.resume_path} has no vlmkern loss state "
                     f"('{CHECKPOINT_KEY}'); the u state starts empty")
    session.loss = OpenClipLoss(gcl, session.handoff, learn_tau=cfg.learn_tau)
    return session.loss


def apply_vlmkern_to_open_clip_train(loss: str = "hgcl", gamma: float = 0.9, margin: Optional[float] = None,
                                     tau: Optional[float] = None, eps: float = 1e-14, learn_tau: bool = False,
                                     rho: float = 16.0, state_on_host: bool = False,
                                     num_samples: Optional[int] = None) -> OpenClipTrainPatch:
    """Patch ``open_clip_train.main`` so that its ``main()`` trains with vlmkern's (H)GCL loss
    (see the module docstring for what is patched and why). ``loss="gcl"`` needs ``margin=None``.
    ``margin=None``: 0.1 for HGCL. ``learn_tau``: learn ``logit_scale`` with RGCL-g's ``rho``
    (our scale). ``state_on_host``: the ``u`` state in (pinned) host memory. ``num_samples``: the
    state's size for webdataset training data whose shards have no ``vlmkern_index.json``
    (:func:`wds_num_samples`). Returns the patch;
    ``.undo()`` restores open_clip."""
    try:
        import open_clip_train.main as ocmain
    except ImportError as exc:
        raise ImportError(f"open_clip_train cannot be imported ({exc}): {INSTALL_HINT}") from exc
    session = Session(LossConfig(loss=loss, gamma=float(gamma), margin=None if margin is None else float(margin),
                                 tau=None if tau is None else float(tau), eps=float(eps),
                                 learn_tau=bool(learn_tau), rho=float(rho), state_on_host=bool(state_on_host)),
                      wds_num_samples=None if num_samples is None else int(num_samples))
    originals = {name: getattr(ocmain, name) for name in OpenClipTrainPatch.NAMES}

    def create_model_and_transforms(*a, **k):
        out = originals["create_model_and_transforms"](*a, **k)
        _freeze_temperature(session, out[0])
        return out

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        check_open_clip_args(args)
        data = originals["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        session.handoff.accum_freq = int(args.accum_freq)
        session.handoff.clear()
        if "train" in data and _is_webdataset(args):
            n = wds_num_samples(args.train_data, session.wds_num_samples)
            data["train"] = with_wds_index(data["train"], session.handoff, n)
            session.num_samples = n
        elif "train" in data:
            data["train"] = with_index(epoch_seeded_order(data["train"], int(args.seed), epoch), session.handoff)
            session.num_samples = len(data["train"].dataloader.dataset)
        return data

    def create_loss(args):
        return _build_loss(session, args)

    def pt_load(file_path, map_location=None):
        ck = originals["pt_load"](file_path, map_location=map_location)
        if isinstance(ck, dict) and "epoch" in ck:
            session.resume_path = file_path
            session.resume_entry = ck.get(CHECKPOINT_KEY)
        return ck

    ocmain.create_model_and_transforms = create_model_and_transforms
    ocmain.get_data = get_data
    ocmain.create_loss = create_loss
    ocmain.pt_load = pt_load
    ocmain.torch = _TorchSavingLossState(originals["torch"], session)
    return OpenClipTrainPatch(session, ocmain, originals)


# ----------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlmkern.integrations.open_clip_train", allow_abbrev=False, add_help=False,
        description="open_clip's trainer (open_clip_train.main) with vlmkern's TuneCLIP loss. The --vlmkern-* "
                    "flags are this launcher's; every other argument goes to open_clip_train.main.")
    p.add_argument("--vlmkern-loss", choices=LOSSES, required=True,
                   help="hgcl: hinged global contrastive loss (TuneCLIP); gcl: plain global contrastive loss")
    p.add_argument("--vlmkern-gamma", type=float, default=0.9, help="moving-average rate of the u state, (0, 1]")
    p.add_argument("--vlmkern-margin", type=float, default=None, help="HGCL's hinge margin (default 0.1; not for gcl)")
    p.add_argument("--vlmkern-tau", type=float, default=None,
                   help="fixed temperature (default: 1/exp(logit_scale) of the model as built, pretrained or "
                        "resumed); model.logit_scale is frozen. With --vlmkern-learn-tau: the starting value")
    p.add_argument("--vlmkern-learn-tau", action="store_true",
                   help="learn the temperature (model.logit_scale) with the loss's RGCL-g objective "
                        "(FastCLIP-v3) instead of freezing it")
    p.add_argument("--vlmkern-eps", type=float, default=1e-14,
                   help="eps in log(eps + u) (default 1e-14); 1/(B-1) with --vlmkern-gamma 1 and gcl makes the "
                        "loss open_clip's ClipLoss x 2*tau up to a constant (docs/SPEC.md section 1)")
    p.add_argument("--vlmkern-rho", type=float, default=None,
                   help="RGCL-g's rho for --vlmkern-learn-tau, in this loss's scale (2 x FastCLIP's rho; "
                        "default 16.0 = FastCLIP's 8.0); keep it below 2 ln(global batch - 1)")
    p.add_argument("--vlmkern-state-on-host", action="store_true",
                   help="keep the per-sample u state in (pinned) host memory instead of on every GPU (8 bytes x "
                        "N each): each step gathers its batch's entries and writes them back asynchronously")
    p.add_argument("--vlmkern-num-samples", type=int, default=None,
                   help="webdataset training data: the number of indexed samples N (the u state's size; every "
                        "sample's .idx field in [0, N)). Default: read from the vlmkern_index.json that python -m "
                        "vlmkern.integrations.wds_index writes next to the shards")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nopen_clip_train.main's arguments follow.\n")
        from open_clip_train.params import parse_args
        parse_args(["--help"])  # exits
    ours, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--vlmkern")]
    if stray:
        parser.error(f"unknown vlmkern flag(s) {stray}")
    margin = ours.vlmkern_margin
    if ours.vlmkern_rho is not None and not ours.vlmkern_learn_tau:
        parser.error("--vlmkern-rho is the learned temperature's regulariser: give it with --vlmkern-learn-tau")
    rho = 16.0 if ours.vlmkern_rho is None else ours.vlmkern_rho
    try:
        LossConfig(ours.vlmkern_loss, ours.vlmkern_gamma, margin, ours.vlmkern_tau, eps=ours.vlmkern_eps,
                   learn_tau=ours.vlmkern_learn_tau, rho=rho)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        import open_clip
        from open_clip_train.params import parse_args
    except ImportError as exc:
        parser.error(f"open_clip_train cannot be imported ({exc}): {INSTALL_HINT}")
    from vlmkern.app.models.clip import CONFIG_DIR
    open_clip.add_model_config(CONFIG_DIR)  # --model vlmkern-micro-ViT / vlmkern-tiny-ViT
    oc_args = parse_args(rest)
    try:
        check_open_clip_args(oc_args)  # fail before any model is built
    except UnsupportedOption as exc:
        parser.error(str(exc))
    if ours.vlmkern_num_samples is not None and not (oc_args.train_data and _is_webdataset(oc_args)):
        parser.error("--vlmkern-num-samples is the index space of webdataset training data (--dataset-type "
                     "webdataset); a CSV dataset's size is its number of rows")
    if oc_args.train_data and _is_webdataset(oc_args):
        try:
            wds_num_samples(oc_args.train_data, ours.vlmkern_num_samples)
        except ValueError as exc:
            parser.error(str(exc))
    patch = apply_vlmkern_to_open_clip_train(ours.vlmkern_loss, ours.vlmkern_gamma, margin, ours.vlmkern_tau,
                                             eps=ours.vlmkern_eps, learn_tau=ours.vlmkern_learn_tau, rho=rho,
                                             state_on_host=ours.vlmkern_state_on_host,
                                             num_samples=ours.vlmkern_num_samples)
    import open_clip_train.main as ocmain
    try:
        rc = ocmain.main(rest)
    finally:
        patch.undo()
    return 0 if rc in (None, 0) else 1  # main returns -1 on some errors (e.g. an existing --name)


if __name__ == "__main__":
    sys.exit(main())
