"""Trainers under torch.distributed: 2 processes with gloo on the CPU stay in sync."""

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


def _worker(rank, world, port, out_dir, q):
    import torch.distributed as dist

    os.environ["VLMKERN_NO_PROGRESS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from vlmkern.data import synthetic as S
        from vlmkern.methods.tuneclip import TuneCLIPConfig, _Objective, train_tuneclip
        from vlmkern.models.clip import create_clip

        torch.manual_seed(0)  # same initial weights on every rank
        m, _, tok = create_clip("vlmkern-micro-ViT")
        tr, va = S.pairs(32, seed=1, image_size=16), S.pairs(8, seed=2, image_size=16)
        res = train_tuneclip(m, tok, tr, va, TuneCLIPConfig(loss="hgcl", osr_epochs=1, epochs=1, batch_size=8,
                                                            lr=1e-3), os.path.join(out_dir, f"r{rank}"))
        w = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        q.put((rank, w.numpy().copy(), res["osr_steps"]))  # numpy: pickled by value, not shared memory
    finally:
        dist.destroy_process_group()


def test_tuneclip_two_gloo_ranks_stay_identical(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict()
    for _ in range(2):
        r, w, steps = q.get(timeout=240)
        results[r] = (torch.from_numpy(w), steps)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    w0, s0 = results[0]
    w1, s1 = results[1]
    assert s0 == s1 == 2  # 32 samples / (2 ranks x batch 8)
    assert torch.equal(w0, w1), "ranks diverged: gradients were not averaged"
    torch.manual_seed(0)
    from vlmkern.models.clip import create_clip

    init = torch.cat([p.detach().reshape(-1) for p in create_clip("vlmkern-micro-ViT")[0].parameters()])
    assert not torch.equal(w0, init)  # and they trained
