"""KalmanOptimizer under torch.distributed: 2 CPU processes, gloo.

Each rank holds half of a global batch.  Checked against one process on the
concatenated batch (SPEC §3: the ranks' observations enter one update):

* per-sample observations, both routes (``step_per_sample`` and
  ``step(closure)``): parameters, variances and ``R`` equal the single-process
  filter's on the full batch, and are bit-identical on both ranks;
* the scalar observation: with the gradients averaged as DDP does, the
  optimizer observes the mean of the ranks' losses, which equals the
  single-process loss of the full batch;
* unequal sample counts across ranks fail with a clear error on every rank;
  ``distributed=False`` keeps the ranks' filters apart.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import require_backend
from test_hgcl_dist import gloo_rank, run_gloo_workers

WORLD = 2
M_LOCAL = 5
D_IN, D_OUT = 7, 3
STEPS = 3
KW = dict(p0=0.05, obs_noise0=0.5, obs_noise_beta=0.8, backend="cpu")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(D_IN, D_OUT)
        self.extra = torch.nn.Parameter(torch.randn(D_OUT, dtype=torch.float32) * 0.1)

    def forward(self, x):
        return self.lin(x) + self.extra


def _batch(step):
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randn(WORLD * M_LOCAL, D_IN, generator=g)
    y = torch.randint(0, D_OUT, (WORLD * M_LOCAL,), generator=g)
    return x, y


def _sample_loss(m, x, y):
    return torch.nn.functional.cross_entropy(m(x), y, reduction="none")


def _train(route, sl, dist_flag=None, counts=None):
    """Run STEPS steps on the rows ``sl`` of each global batch; return the state."""
    from vlmkern.app.methods.common import allreduce_gradients
    from vlmkern.optim.kalman import KalmanOptimizer

    net = _Net()
    params = list(net.parameters())
    obs = "loss" if route == "scalar" else "per_sample"
    opt = KalmanOptimizer(params, observation=obs, distributed=dist_flag, **KW)
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[sl], y[sl]
        if route == "vmap":
            opt.step_per_sample(net, _sample_loss, x, y)
        elif route == "closure":
            opt.step(lambda: _sample_loss(net, x, y))
        else:
            def closure():
                opt.zero_grad(set_to_none=True)
                loss = _sample_loss(net, x, y).mean()
                loss.backward()
                allreduce_gradients(params)  # DDP's gradient averaging (a no-op in one process)
                return loss

            opt.step(closure)
    return dict(params=[p.detach().clone() for p in params],
                variances=[opt.state[p]["variance"].clone() for p in params],
                R=opt.obs_noise.clone(), taken=bool(opt.last_step_taken))


def _worker(rank, port, route, dist_flag, outdir):
    with gloo_rank(rank, port, WORLD):
        if route == "unequal":  # rank 1 passes one sample fewer
            n = M_LOCAL - rank
            sl = slice(rank * M_LOCAL, rank * M_LOCAL + n)
            try:
                _train("vmap", sl)
                res = dict(error=None)
            except ValueError as exc:
                res = dict(error=str(exc))
        else:
            res = _train(route, slice(rank * M_LOCAL, (rank + 1) * M_LOCAL), dist_flag)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))


def _close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), f"{what}[{i}]: max diff {(x - y).abs().max():.3g}"


@pytest.mark.multiproc
@pytest.mark.parametrize("route", ["vmap", "closure", "scalar"])
def test_ranks_share_one_filter(route):
    require_backend("kalman", "cpu", "cpu")
    ranks = run_gloo_workers(_worker, route, None)
    single = _train(route, slice(0, WORLD * M_LOCAL))
    assert single["taken"] and ranks[0]["taken"]
    for k in ("params", "variances"):
        for a, b in zip(ranks[0][k], ranks[1][k]):
            assert torch.equal(a, b), f"{route}: ranks' {k} differ"
        _close(ranks[0][k], single[k], f"{route} {k}")
    assert torch.equal(ranks[0]["R"], ranks[1]["R"])
    _close([ranks[0]["R"]], [single["R"]], f"{route} R")
    init = list(_Net().parameters())
    assert any(not torch.equal(p, q.detach()) for p, q in zip(ranks[0]["params"], init)), "nothing was trained"
    if route != "scalar":  # P learned from W*M observations: not the prior any more, per parameter
        v = torch.cat([t.flatten() for t in ranks[0]["variances"]])
        assert v.std() > 0 and (v < KW["p0"]).all()


@pytest.mark.multiproc
def test_filters_apart_when_distributed_off():
    require_backend("kalman", "cpu", "cpu")
    ranks = run_gloo_workers(_worker, "vmap", False)
    own = [_train("vmap", slice(r * M_LOCAL, (r + 1) * M_LOCAL), False) for r in range(WORLD)]
    for r in range(WORLD):
        _close(ranks[r]["params"], own[r]["params"], f"rank {r} params")
    assert not torch.equal(ranks[0]["params"][0], ranks[1]["params"][0])


@pytest.mark.multiproc
def test_unequal_sample_counts_fail_on_every_rank():
    require_backend("kalman", "cpu", "cpu")
    ranks = run_gloo_workers(_worker, "unequal", None)
    for r in ranks:
        assert r["error"] is not None and "same number of samples" in r["error"] and "[5, 4]" in r["error"]


def test_distributed_true_needs_a_process_group():
    from vlmkern.optim.kalman import KalmanOptimizer

    net = _Net()
    opt = KalmanOptimizer(net.parameters(), observation="per_sample", distributed=True, **KW)
    x, y = _batch(0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        opt.step_per_sample(net, _sample_loss, x, y)
    with pytest.raises(ValueError, match="distributed must be"):
        KalmanOptimizer(net.parameters(), distributed="yes")


def test_flat_by_dtype_round_trip():
    """The per-dtype flat buffers both collectives use (the filter's all_gather, the trainers' gradient
    all_reduce): one buffer per dtype, tensors in order, and split_flat gives back each tensor's values."""
    from vlmkern.optim._flat import flat_by_dtype, split_flat

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g).to(torch.bfloat16),
          torch.randn(2, 1, 4, generator=g), torch.randn(1, generator=g).to(torch.bfloat16),
          torch.randn(0, 3, generator=g)]
    groups = flat_by_dtype(ts)
    assert [(idx, flat.dtype, flat.numel()) for idx, flat in groups] == [
        ([0, 2, 4], torch.float32, 15 + 8), ([1, 3], torch.bfloat16, 8)]
    for idx, flat in groups:
        back = split_flat(flat, [ts[i].shape for i in idx])
        for i, b in zip(idx, back):
            assert b.shape == ts[i].shape and torch.equal(b, ts[i])
        assert flat.data_ptr() != ts[idx[0]].data_ptr()  # a new buffer: collectives may write it
