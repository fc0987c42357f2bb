"""GlobalContrastiveLoss under torch.distributed: 2 CPU processes, gloo.

Each rank holds half of a global batch.  Checked against one process on the
concatenated batch: the mean of the ranks' losses equals the single-process
loss, the state is identical on both ranks and equal to the single-process
state (over several steps with overlapping indices, with indices repeated
within and across ranks, and with separate text indices into a longer text
state), and each rank's feature
gradient is ``world_size`` times the single-process gradient of its slice
(the documented convention: DDP's averaging then gives the global gradient).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import rel_err, require_backend

WORLD = 2
B_LOCAL = 6
D = 16
N = 30
# the last step repeats indices within a rank (4) and across ranks (4, 9, 2): one update with the mean Phi
STEPS = [list(range(0, 12)), list(range(6, 18)), [29, 3, 17, 8, 0, 21, 5, 11, 26, 14, 2, 19],
         [0, 4, 9, 4, 13, 2, 9, 20, 4, 25, 2, 7], list(range(12, 24))]
# the text anchors' own indices into a longer text state (multi-caption): the image index on the other
# steps (txt_index is required once the text state has its own length)
N_TXT = 45
TXT_STEPS = {4: [40, 1, 33, 1, 44, 7, 12, 30, 2, 33, 9, 41]}
KW = dict(tau=0.05, gamma=0.7, margin=0.1, num_txt_samples=N_TXT)


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g), dim=1)
    txt_index = torch.tensor(TXT_STEPS.get(step, STEPS[step]))
    return img, txt, torch.tensor(STEPS[step]), txt_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, *args, world: int = WORLD, timeout: float = 120):
    """Spawn ``world`` processes ``worker(rank, port, *args, outdir)`` on a free port (gloo), wait
    for them, fail on a timeout or a non-zero exit, and return what each rank saved to
    ``<outdir>/rank<r>.pt``, in rank order."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, port, *args, outdir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                pytest.fail("a distributed worker timed out")
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]


@contextlib.contextmanager
def gloo_rank(rank: int, port: int, world: int = WORLD):
    """Inside a worker of :func:`run_gloo_workers`: join the gloo group on ``port`` as ``rank`` (one
    torch thread), and leave it on exit."""
    import datetime

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, port, backend, host, outdir):
    with gloo_rank(rank, port):
        from vlmkern import GlobalContrastiveLoss

        loss_fn = GlobalContrastiveLoss(N, backend=backend, state_on_host=host, **KW)
        out = []
        for step in range(len(STEPS)):
            img, txt, index, txt_index = _data(step)
            sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            a = img[sl].clone().requires_grad_()
            t = txt[sl].clone().requires_grad_()
            loss = loss_fn(a, t, index[sl], txt_index=txt_index[sl])
            loss.backward()
            out.append(dict(loss=loss.detach(), grad_img=a.grad, grad_txt=t.grad,
                            log_u_img=loss_fn.log_u_img.clone(), log_u_txt=loss_fn.log_u_txt.clone()))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.mark.parametrize("backend,host", [("cpu", False), ("torch", False), ("triton", False), ("torch", True)])
def test_two_process_gloo_matches_one_process(backend, host):
    # triton: CPU tensors under TRITON_INTERPRET=1 (inherited by the workers);
    # gloo moves CPU tensors, so on a GPU machine this case is skipped.
    # host: the state in host memory (state_on_host=True) on every rank, against the
    # on-device single process (the host mode's own bit-identity is test_hgcl_host_state)
    require_backend("hgcl", backend, "cpu")
    from vlmkern import GlobalContrastiveLoss

    res = run_gloo_workers(_worker, backend, host)

    single = GlobalContrastiveLoss(N, backend=backend, **KW)
    for step in range(len(STEPS)):
        img, txt, index, txt_index = _data(step)
        a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = single(a, t, index, txt_index=txt_index)
        loss.backward()
        mean_loss = sum(r[step]["loss"] for r in res) / WORLD
        assert math.isclose(mean_loss.item(), loss.item(), rel_tol=1e-5, abs_tol=1e-6)
        for r in range(WORLD):
            # identical state on every rank (bit for bit) and equal to one process
            assert torch.equal(res[r][step]["log_u_img"], res[0][step]["log_u_img"])
            assert torch.equal(res[r][step]["log_u_txt"], res[0][step]["log_u_txt"])
            for key in ("log_u_img", "log_u_txt"):
                fin = torch.isfinite(getattr(single, key))
                assert torch.equal(fin, torch.isfinite(res[r][step][key])), (step, key)
                assert torch.allclose(res[r][step][key][fin], getattr(single, key)[fin], rtol=1e-5, atol=1e-5)
            sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
            assert rel_err(res[r][step]["grad_img"], WORLD * a.grad[sl]) < 1e-5
            assert rel_err(res[r][step]["grad_txt"], WORLD * t.grad[sl]) < 1e-5
