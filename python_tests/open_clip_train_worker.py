"""Runs ``python -m vlmkern.integrations.open_clip_train``'s ``main`` in this process and saves
the loss state this process ended with (under torchrun: this rank's).

    python open_clip_train_worker.py OUTDIR ARGS.json

``ARGS.json``: the list ``[--combined-order WORLD] <launcher arguments>`` (a file, because
torchrun's own parser would take open_clip's ``--logs`` for an abbreviation of its ``--logs-specs``);

writes ``OUTDIR/rank<RANK>.pt`` = ``{"log_u_img", "log_u_txt"}``.  ``--combined-order WORLD``
(one process only): the training sampler yields, for every step, the batches that the
``WORLD`` ranks of a torchrun run with open_clip's ``DistributedSampler`` see, rank 0's rows
first, i.e. the global batch in the order the loss gathers it; a single-process run with
``--batch-size WORLD*b`` then takes the same steps as the ``WORLD``-rank run with ``b``.
Used by python_tests/test_open_clip_integration.py; open_clip's ``main`` runs unmodified.

    python open_clip_train_worker.py --open-clip-loss TAU OUTDIR <open_clip_train.main arguments>

runs open_clip's ``main`` with *open_clip's own loss* (``ClipLoss``), not the launcher, and only
two changes: ``model.logit_scale`` is set to ``log(1/TAU)`` and frozen (``requires_grad=False``,
the launcher's fixed temperature), and the training loader's shuffle is the launcher's
(:func:`vlmkern.integrations.open_clip_train.epoch_seeded_order`), so that a vlmkern run and
this one see the same batches. Writes ``OUTDIR/initial.pt``: the model's state dict as built
(the starting point of the training steps).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class CombinedOrder(DistributedSampler):
    """One process's sampler over the global batches of a ``world``-rank run (see the module doc)."""

    def __init__(self, dataset, world: int, local_batch: int):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        self.parts = [DistributedSampler(dataset, num_replicas=world, rank=r) for r in range(world)]
        self.local_batch = local_batch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for p in self.parts:
            p.set_epoch(epoch)

    def __iter__(self):
        parts = [list(p) for p in self.parts]
        b = self.local_batch
        for t in range(len(parts[0]) // b):
            for p in parts:
                yield from p[t * b:(t + 1) * b]

    def __len__(self) -> int:
        return len(self.parts) * (len(self.parts[0]) // self.local_batch) * self.local_batch


def _use_combined_order(world: int) -> None:
    import dataclasses

    import open_clip_train.main as ocmain

    real = ocmain.get_data

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        data = real(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        info = data["train"]
        dl = info.dataloader
        sampler = CombinedOrder(dl.dataset, world, args.batch_size // world)
        loader = DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, num_workers=dl.num_workers,
                            collate_fn=dl.collate_fn, drop_last=True)
        loader.num_samples, loader.num_batches = len(sampler), len(loader)
        data["train"] = dataclasses.replace(info, dataloader=loader, sampler=sampler)
        return data

    ocmain.get_data = get_data  # the launcher's patch wraps this one


def _open_clip_loss_run(tau: float, outdir: str, argv) -> int:
    import math

    import open_clip
    import open_clip_train.main as ocmain

    from vlmkern.app.models.clip import CONFIG_DIR
    from vlmkern.integrations import open_clip_train as oct

    open_clip.add_model_config(CONFIG_DIR)
    real_create, real_get_data = ocmain.create_model_and_transforms, ocmain.get_data

    def create_model_and_transforms(*a, **k):
        out = real_create(*a, **k)
        with torch.no_grad():
            out[0].logit_scale.fill_(math.log(1.0 / tau))
        out[0].logit_scale.requires_grad_(False)
        torch.save({k: v.detach().clone() for k, v in out[0].state_dict().items()},
                   os.path.join(outdir, "initial.pt"))
        return out

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        data = real_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        data["train"] = oct.epoch_seeded_order(data["train"], int(args.seed), epoch)
        return data

    ocmain.create_model_and_transforms, ocmain.get_data = create_model_and_transforms, get_data
    rc = ocmain.main(argv)
    return 0 if rc in (None, 0) else 1


def main() -> int:
    import json

    if sys.argv[1:2] == ["--open-clip-loss"]:
        return _open_clip_loss_run(float(sys.argv[2]), sys.argv[3], sys.argv[4:])
    outdir = sys.argv[1]
    with open(sys.argv[2]) as f:
        argv = json.load(f)
    if argv[:1] == ["--combined-order"]:
        _use_combined_order(int(argv[1]))
        argv = argv[2:]
    from vlmkern.integrations import open_clip_train as oct

    patches = []
    apply = oct.apply_vlmkern_to_open_clip_train

    def recording_apply(*a, **k):
        patches.append(apply(*a, **k))
        return patches[-1]

    oct.apply_vlmkern_to_open_clip_train = recording_apply
    rc = oct.main(argv)
    loss = patches[0].session.loss.loss
    rank = int(os.environ.get("RANK", "0"))
    torch.save({k: v.detach().cpu() for k, v in loss.state_dict().items()}, os.path.join(outdir, f"rank{rank}.pt"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
