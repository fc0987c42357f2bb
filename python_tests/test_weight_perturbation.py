"""vlmkern.optim.WeightPerturbation (SPEC §4): the step against a hand-written
reference, exact restore, gamma = 0 / warmup = the base optimizer bit for bit,
BatchNorm statistics updated once, random steps, LR schedulers, state_dict,
GradScaler, DDP no_sync."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from vlmkern import reference as R
from vlmkern.optim import WeightPerturbation

from conftest import CUDA_EMU, backend_or_emu, require_backend


@pytest.fixture(params=["cpu", CUDA_EMU])
def kernels(request, monkeypatch):
    """The compiled AWP kernels the wrapper calls: the CPU ones, or the CUDA ones
    (and their host code) on the CPU emulator."""
    require_backend("awp", "cpu", "cpu")
    backend_or_emu(request.param, "awp", monkeypatch)
    return request.param


class WithUnused(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


def mlp(seed=0, bn=False, dropout=False, unused=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(16, 3))
    m = nn.Sequential(*layers)
    return WithUnused(m) if unused else m


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def closure_for(model, x, y, calls=None, scaler=None):
    def closure():
        if calls is not None:
            calls.append(1)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    return closure


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_step_matches_hand_written_algorithm(kernels):
    x, y = data()
    a = mlp(bn=False)
    b = copy.deepcopy(a)
    plain = copy.deepcopy(a)
    gamma, lr = 0.05, 0.1
    wp = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=lr), gamma=gamma)
    assert wp.perturbed_names == ["0.weight", "2.weight"]  # dim > 1 only: no biases
    loss = wp.step(closure_for(a, x, y))
    assert wp.last_step_kind == "adversarial"

    # by hand on b, with the float64 reference perturbation
    closure_for(b, x, y)()
    W = [p for p in b.parameters() if p.dim() > 1]
    vs = R.awp_perturbation(W, [p.grad for p in W], gamma=gamma)
    w0 = [p.detach().clone() for p in b.parameters()]
    with torch.no_grad():
        for p, v in zip(W, vs):
            p.copy_((p.double() + v).float())
    b.zero_grad()
    closure_for(b, x, y)()
    with torch.no_grad():
        for p, p0 in zip(b.parameters(), w0):
            p.copy_(p0 - lr * p.grad)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    # and it is not the plain step
    closure_for(plain, x, y)()
    torch.optim.SGD(plain.parameters(), lr=lr).step()
    assert max((pa - pp).abs().max().item() for pa, pp in zip(a.parameters(), plain.parameters())) > 1e-5
    assert torch.isfinite(loss)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_gamma_zero_and_warmup_equal_base_bitwise(opt):
    x, y = data()
    a = mlp(bn=True, dropout=True)
    b = copy.deepcopy(a)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt == "sgd" else (lambda p: torch.optim.AdamW(p, lr=1e-2))
    wp = WeightPerturbation(a, make(a.parameters()), gamma=0.0)
    base = make(b.parameters())
    for step in range(5):
        torch.manual_seed(100 + step)  # same dropout masks
        wp.step(closure_for(a, x, y))
        torch.manual_seed(100 + step)
        base.zero_grad()
        closure_for(b, x, y)()
        base.step()
        assert wp.last_step_kind == "plain"
    assert params_equal(a, b)
    # warmup steps are plain steps too
    c = mlp(bn=True)
    d = copy.deepcopy(c)
    wpc = WeightPerturbation(c, make(c.parameters()), gamma=0.1, warmup_steps=3)
    based = make(d.parameters())
    for _ in range(3):
        wpc.step(closure_for(c, x, y))
        based.zero_grad()
        closure_for(d, x, y)()
        based.step()
    assert params_equal(c, d) and wpc.counts["plain"] == 3


def test_two_pass_with_gamma_zero_is_bitwise_base_including_batchnorm():
    """The full perturbed path (forced) with gamma = 0: restore exact, BN stats
    from the first forward only -> bitwise the base optimizer."""
    x, y = data()
    a = mlp(bn=True)
    b = copy.deepcopy(a)
    with torch.no_grad():
        a[0].weight[0, 0] = -0.0  # w + 0 * g turns -0.0 into +0.0: the restore must undo it
        b[0].weight[0, 0] = -0.0
    wp = WeightPerturbation(a, torch.optim.AdamW(a.parameters(), lr=1e-2), gamma=0.0)
    base = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for _ in range(4):
        wp._adversarial_step(closure_for(a, x, y))
        base.zero_grad()
        closure_for(b, x, y)()
        base.step()
    assert params_equal(a, b)  # includes running_mean / running_var / num_batches_tracked
    assert a[1].num_batches_tracked.item() == 4


def test_batchnorm_statistics_updated_once():
    x, y = data()
    a = mlp(bn=True)
    ref = copy.deepcopy(a)
    wp = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=0.1), gamma=0.2)
    wp.step(closure_for(a, x, y))
    ref(x)  # one training-mode forward at w
    assert a[1].num_batches_tracked.item() == 1
    assert torch.equal(a[1].running_mean, ref[1].running_mean)
    assert torch.equal(a[1].running_var, ref[1].running_var)
    # without the freeze the second forward (at w + v) would update them again
    c = mlp(bn=True)
    wpc = WeightPerturbation(c, torch.optim.SGD(c.parameters(), lr=0.1), gamma=0.2, freeze_norm_stats=False)
    wpc.step(closure_for(c, x, y))
    assert c[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_restore_exact_inside_step(dtype, ratio, kernels):
    """With lr = 0 the base step changes nothing: the weights after step() must be
    the weights before, bit for bit (in every dtype, adversarial and random)."""
    x, y = data()
    a = mlp(bn=True).to(dtype)
    before = copy.deepcopy(a.state_dict())
    wp = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=0.0), gamma=0.1, random_ratio=ratio)
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in wp.perturbed_params])
        loss = nn.functional.cross_entropy(a(x.to(dtype)).float(), y)
        loss.backward()
        return loss

    for _ in range(3):
        wp.step(closure)
    after = a.state_dict()
    for k, v in before.items():
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(v, after[k]), k
    # and the closure did see perturbed weights (the last call of each step)
    assert any(not torch.equal(s, p) for s, p in zip(seen[-1], wp.perturbed_params))


def test_random_step_one_closure_and_reference_direction(kernels):
    x, y = data()
    a = mlp()
    b = copy.deepcopy(a)
    calls = []
    lr, gamma = 1.0, 0.1
    wp = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=lr), gamma=gamma, random_ratio=1.0, seed=11)
    wp.step(closure_for(a, x, y, calls))
    assert calls == [1] and wp.last_step_kind == "random"
    # by hand: v from the reference generator with the step's seed
    W = [p for p in b.parameters() if p.dim() > 1]
    vs = R.awp_perturbation(W, None, gamma=gamma, mode="random", seed=wp.step_seed(0))
    w0 = [p.detach().clone() for p in b.parameters()]
    with torch.no_grad():
        for p, v in zip(W, vs):
            p.copy_((p.double() + v).float())
    closure_for(b, x, y)()
    with torch.no_grad():
        for p, p0 in zip(b.parameters(), w0):
            p.copy_(p0 - lr * p.grad)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_random_ratio_sequence_is_seeded():
    x, y = data()

    def kinds(seed):
        m = mlp()
        wp = WeightPerturbation(m, torch.optim.SGD(m.parameters(), lr=0.01), gamma=0.01, random_ratio=0.5, seed=seed)
        calls = []
        out = []
        for _ in range(24):
            wp.step(closure_for(m, x, y, calls))
            out.append(wp.last_step_kind)
        assert len(calls) == 2 * out.count("adversarial") + out.count("random")
        return out, m

    k1, m1 = kinds(3)
    k2, m2 = kinds(3)
    k3, _ = kinds(4)
    assert k1 == k2 and params_equal(m1, m2)
    assert k1 != k3
    assert 4 <= k1.count("random") <= 20


@pytest.mark.parametrize("on", ["base", "wrapper"])
def test_lr_scheduler(on):
    x, y = data()
    a = mlp()
    base = torch.optim.SGD(a.parameters(), lr=0.1)
    wp = WeightPerturbation(a, base, gamma=0.01)
    assert wp.param_groups is base.param_groups and wp.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(base if on == "base" else wp, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            wp.step(closure_for(a, x, y))
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # the lr really drives the base step: with lr 0 nothing moves
    for g in wp.param_groups:
        g["lr"] = 0.0
    snap = copy.deepcopy(a.state_dict())
    wp.step(closure_for(a, x, y))
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in snap.items())


def test_state_dict_round_trip():
    x, y = data()
    a = mlp(bn=True)
    wp = WeightPerturbation(a, torch.optim.AdamW(a.parameters(), lr=1e-2), gamma=0.05, random_ratio=0.5, seed=5)
    for _ in range(2):
        wp.step(closure_for(a, x, y))
    saved_model = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(wp.state_dict())
    assert "weight_perturbation" in saved_opt and saved_opt["weight_perturbation"]["step_count"] == 2
    kinds = []
    for _ in range(4):
        wp.step(closure_for(a, x, y))
        kinds.append(wp.last_step_kind)

    b = mlp(bn=True, seed=99)
    b.load_state_dict(saved_model)
    wpb = WeightPerturbation(b, torch.optim.AdamW(b.parameters(), lr=1e-2), gamma=0.05, random_ratio=0.5, seed=5)
    wpb.load_state_dict(saved_opt)
    kb = []
    for _ in range(4):
        wpb.step(closure_for(b, x, y))
        kb.append(wpb.last_step_kind)
    assert kinds == kb
    assert params_equal(a, b)


def test_grad_scaler_matches_unscaled_and_skips_on_overflow():
    x, y = data()
    a = mlp()
    b = copy.deepcopy(a)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    wpa = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=0.1), gamma=0.05, scaler=scaler)
    wpb = WeightPerturbation(b, torch.optim.SGD(b.parameters(), lr=0.1), gamma=0.05)
    for _ in range(3):
        wpa.step(closure_for(a, x, y, scaler=scaler))
        wpb.step(closure_for(b, x, y))
        assert wpa.last_step_kind == "adversarial"
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)

    # overflowing first backward (inf gradients): the perturbation is skipped on
    # the device, the step skipped by the scaler, the scale lowered (no host sync)
    c = mlp()
    before = copy.deepcopy(c.state_dict())
    big = torch.amp.GradScaler("cpu", init_scale=3e38)
    wpc = WeightPerturbation(c, torch.optim.SGD(c.parameters(), lr=0.1), gamma=0.05, scaler=big)
    calls = []

    def overflowing():
        calls.append(1)
        loss = 1e4 * nn.functional.cross_entropy(c(x), y)
        big.scale(loss).backward()
        return loss

    wpc.step(overflowing)
    assert not all(torch.isfinite(p.grad).all() for p in c.parameters())
    assert wpc.last_step_kind == "adversarial" and bool(wpc.last_perturb_skipped) and len(calls) == 2
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in before.items())
    assert big.get_scale() < 3e38


def test_ddp_first_backward_does_not_all_reduce(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x, y = data()
        a = mlp()
        b = copy.deepcopy(a)
        ddp = DDP(a)
        reduced = []

        def hook(state, bucket):
            reduced.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        wp = WeightPerturbation(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), gamma=0.05)
        assert wp.perturbed_names == ["module.0.weight", "module.2.weight"]
        wp.step(closure_for(ddp, x, y))
        per_step = len(reduced)
        assert per_step >= 1
        # a plain backward all-reduces the same number of buckets: only one backward synced
        reduced.clear()
        ddp.zero_grad()
        closure_for(ddp, x, y)()
        assert len(reduced) == per_step
        # and the DDP result equals the single-process wrapper
        wpb = WeightPerturbation(b, torch.optim.SGD(b.parameters(), lr=0.1), gamma=0.05)
        wpb.step(closure_for(b, x, y))
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_filters_unused_params_and_backends():
    x, y = data()
    a = mlp(unused=True)
    wp = WeightPerturbation(a, torch.optim.SGD(a.parameters(), lr=0.1), gamma=0.05,
                            param_filter=lambda n, p: n.startswith("body.0.") or n.startswith("unused"))
    assert wp.perturbed_names == ["body.0.weight", "body.0.bias", "unused.weight", "unused.bias"]
    wp.step(closure_for(a, x, y))  # unused.* have no gradient: not perturbed, no error
    # the torch fallback backend gives the same step up to rounding
    b1, b2 = mlp(), mlp()
    w1 = WeightPerturbation(b1, torch.optim.SGD(b1.parameters(), lr=0.1), gamma=0.05)
    w2 = WeightPerturbation(b2, torch.optim.SGD(b2.parameters(), lr=0.1), gamma=0.05, backend="torch")
    w1.step(closure_for(b1, x, y))
    w2.step(closure_for(b2, x, y))
    for p1, p2 in zip(b1.parameters(), b2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    # a plain list of parameters works too (no BN / DDP handling then)
    c = mlp()
    wl = WeightPerturbation(list(c.parameters()), torch.optim.SGD(c.parameters(), lr=0.1), gamma=0.05)
    assert len(wl.perturbed_params) == 2
    wl.step(closure_for(c, x, y))


def test_bad_arguments():
    a = mlp()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gamma"):
        WeightPerturbation(a, opt, gamma=-1.0)
    with pytest.raises(ValueError, match="random_ratio"):
        WeightPerturbation(a, opt, random_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        WeightPerturbation(a, opt, warmup_steps=-1)
    with pytest.raises(ValueError, match="sign"):
        WeightPerturbation(a, opt, sign=0)
    with pytest.raises(ValueError, match="param_filter"):
        WeightPerturbation(a, opt, param_filter=lambda n, p: False)
    with pytest.raises(TypeError, match="base_optimizer"):
        WeightPerturbation(a, object())
    with pytest.raises(ValueError, match="closure"):
        WeightPerturbation(a, opt).step()
