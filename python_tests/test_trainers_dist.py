"""Every trainer under torch.distributed: 2 processes with gloo on the CPU stay in sync.

The same code uses NCCL on GPUs (torchrun); here each rank trains on its shard
of the data and the ranks must end with bit-identical weights (gradients, and
for Kalman the observed loss, are averaged over the ranks; per-sample Kalman
gathers every rank's Jacobian rows into one update) that differ from
the initial ones.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("open_clip")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(method, out_dir):
    from vlmkern.app.data import synthetic as S
    from vlmkern.app.models.clip import create_clip

    torch.manual_seed(0)  # same initial weights on every rank
    m, _, tok = create_clip("vlmkern-micro-ViT")
    if method == "tuneclip":
        from vlmkern.app.methods.tuneclip import TuneCLIPConfig, train_tuneclip

        res = train_tuneclip(m, tok, S.pairs(32, seed=1, image_size=16), S.pairs(8, seed=2, image_size=16),
                             TuneCLIPConfig(loss="hgcl", osr_epochs=1, epochs=1, batch_size=8, lr=1e-3), out_dir)
        info = res["osr_steps"]
    elif method == "apft":
        from vlmkern.app.methods.apft import APFTTrainConfig, train_apft
        from vlmkern.app.methods.apft_schedule import APFTConfig

        tr, va = S.labelled(32, 12, seed=1, image_size=16, num_classes=6)
        sched = APFTConfig(window=2, tau_vol=0.0, patience=50, min_epochs=1)  # transition at epoch 2
        res = train_apft(m, tok, tr, va, tr.prompts(), APFTTrainConfig(max_epochs=3, batch_size=8, lr=1e-3,
                                                                       schedule=sched, eval_ks=(1,)), out_dir)
        info = res["phases_used"]
    elif method == "wrf4cir":
        from vlmkern.app.methods.wrf4cir import WRF4CIRConfig, train_wrf4cir

        res = train_wrf4cir(m, tok, S.cir_triplets(32, seed=1, image_size=16), S.cir_triplets(8, seed=2, image_size=16),
                            WRF4CIRConfig(epochs=1, batch_size=8, lr=1e-4, gamma=1e-2, warmup_epochs=0, ks=(1,)),
                            out_dir)
        info = len(res["history"])
    else:
        from vlmkern.app.methods.kalman import KalmanTrainConfig, train_kalman

        tr, va = S.labelled(32, 12, seed=1, image_size=16, num_classes=6)
        obs = "per_sample" if method == "kalman_per_sample" else "loss"  # per sample: the ranks' rows gathered
        res = train_kalman(m, tok, tr, va, tr.prompts(),
                           KalmanTrainConfig(steps=4, batch_size=8, eval_every=2, observation=obs), out_dir)
        info = len(res["curve"])
    return m, info


def _worker(rank, world, port, method, out_dir, q):
    import torch.distributed as dist

    os.environ["VLMKERN_NO_PROGRESS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        m, info = _train(method, os.path.join(out_dir, f"r{rank}"))
        w = torch.cat([p.detach().reshape(-1).float() for p in m.parameters()])
        q.put((rank, w.numpy().copy(), info))  # numpy: pickled by value, not shared memory
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("method,expected", [("tuneclip", 2), ("apft", 2), ("wrf4cir", 1), ("kalman", 3),
                                             ("kalman_per_sample", 3)])
def test_two_gloo_ranks_stay_identical(tmp_path, method, expected):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, method, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        r, w, info = q.get(timeout=300)
        results[r] = (torch.from_numpy(w), info)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (w0, i0), (w1, i1) = results[0], results[1]
    assert i0 == i1 == expected
    assert torch.equal(w0, w1), f"{method}: ranks diverged"
    torch.manual_seed(0)
    from vlmkern.app.methods.common import seed_everything
    from vlmkern.app.models.clip import create_clip

    fresh = create_clip("vlmkern-micro-ViT")[0]
    if method.startswith("kalman"):  # the trainer seeds, then adds LoRA adapters: rebuild that initial state
        from vlmkern.app.models.lora import add_lora

        seed_everything(0)
        add_lora(fresh, rank=4, alpha=8.0)
    init = torch.cat([p.detach().reshape(-1).float() for p in fresh.parameters()])
    assert w0.shape == init.shape
    assert not torch.equal(w0, init), f"{method}: nothing was trained"
