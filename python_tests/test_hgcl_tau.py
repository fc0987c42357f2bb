"""HGCL / GCL with a learnable temperature (SPEC §1 "Learnable temperature").

The tau gradient of every backend against torch.autograd of float64 reference
objectives in tau: ``tau/b sum log(eps + Phi(tau))`` itself for ``gamma = 1``
(u = Phi: autograd of the plain objective *is* the estimator) and
:func:`vlmkern.reference.hgcl_tau_objective` (u held at the updated values) for
``gamma < 1`` with prior state.  Also: the stats' ``lbar`` outputs, the float
path unchanged, bad ``tau`` / ``rho``, the module's ``tau`` / ``logit_scale``
arguments and two gloo processes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import rel_err, require_backend
from vlmkern import GlobalContrastiveLoss, hgcl_loss
from vlmkern import reference as R
from test_hgcl import BACKENDS, MODES, dev_of, feats, state

# |dF/dtau - ref| <= TOL * scale, scale = 1 + |1/b sum log(eps+u)| + |rho|: dF/dtau is a
# difference of two sums of that size (and the loss's own tolerance in test_hgcl is relative too)
TAU_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _setup(b, d, dtype, n_extra=5, visited=True, seed=0):
    torch.manual_seed(seed)
    n = b + n_extra
    index = torch.randperm(n)[:b]
    vis = (index[::2].tolist() + [n - 1]) if visited else None
    return feats(b, d, dtype), feats(b, d, dtype), index, state(n, vis), state(n, vis)


def _op(backend, img, txt, index, lu1, lu2, tau, **kw):
    """hgcl_loss on the backend's device with a learnable tau; returns (loss, dF/dtau, grad_img, grad_txt)."""
    dev = dev_of(backend)
    a = img.clone().to(dev).requires_grad_()
    t = txt.clone().to(dev).requires_grad_()
    tt = torch.tensor(tau, dtype=torch.float32, device=dev, requires_grad=True)
    k1, k2 = lu1.clone().to(dev), lu2.clone().to(dev)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = hgcl_loss(a, t, index.to(dev), k1, k2, tau=tt, backend=backend, **kw)
    loss.backward()
    return loss.detach().cpu(), tt.grad.cpu(), a.grad.cpu(), t.grad.cpu()


def _autograd_tau(img, txt, index, lu1, lu2, tau, *, gamma, margin, eps=1e-14, rho=0.0, **cols):
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    f = R.hgcl_tau_objective(img, txt, lu1[index], lu2[index], t, gamma=gamma, margin=margin, eps=eps, rho=rho,
                             **cols)
    f.backward()
    return f.detach(), t.grad


def _exact_gamma1_objective(img, txt, tau, margin, eps):
    """``tau/b sum_i [log(eps + Phi1_i(tau)) + log(eps + Phi2_i(tau))]`` in float64, one process,
    written out here (independent of the library): with gamma = 1 and u = Phi its autograd
    derivative is the estimator."""
    F, G = img.double(), txt.double()
    b = F.shape[0]
    p = (F * G).sum(1)
    off = ~torch.eye(b, dtype=torch.bool)
    total = 0.0
    for S in (F @ G.T, G @ F.T):
        x = S - p[:, None]
        lx = torch.clamp(x + margin, min=0.0) ** 2 if margin is not None else x
        phi = (torch.exp(lx / tau) * off).sum(1) / (b - 1)
        total = total + torch.log(eps + phi).sum()
    return tau * total / b


def _scale(ref_loss, tau, rho):
    return 1.0 + abs(ref_loss) / tau + abs(rho)


# --------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b", [2, 3, 6])
def test_reference_grad_tau_is_autograd(mode, b):
    margin = MODES[mode]
    img, txt = feats(b, 9, torch.float64), feats(b, 9, torch.float64)
    # gamma = 1, fresh state: the plain objective, differentiated by autograd
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    f = _exact_gamma1_objective(img, txt, t, margin, 1e-14)
    f.backward()
    res = R.hgcl(img, txt, torch.arange(b), state(b), state(b), tau=0.07, gamma=1.0, margin=margin)
    assert abs(f.item() - res.loss.item()) < 1e-12 * max(1.0, abs(f.item()))
    assert abs(t.grad.item() - res.grad_tau.item()) < 1e-10 * _scale(res.loss.item(), 0.07, 0)
    # the objective built for gamma < 1 reduces to it at gamma = 1
    f2, g2 = _autograd_tau(img, txt, torch.arange(b), state(b), state(b), 0.07, gamma=1.0, margin=margin)
    assert abs(g2.item() - t.grad.item()) < 1e-10 * _scale(res.loss.item(), 0.07, 0)
    # gamma < 1 with prior state, rho and global columns: closed form against autograd
    idx = torch.arange(b)
    lu1, lu2 = state(b + 3, [0, b + 1]), state(b + 3, [1])
    ai, at = feats(b + 3, 9, torch.float64), feats(b + 3, 9, torch.float64)
    ai[2:2 + b], at[2:2 + b] = img, txt
    cols = dict(all_img=ai, all_txt=at, offset=2)
    res = R.hgcl(img, txt, idx, lu1, lu2, tau=0.05, gamma=0.6, margin=margin, **cols)
    f3, g3 = _autograd_tau(img, txt, idx, lu1, lu2, 0.05, gamma=0.6, margin=margin, rho=3.0, **cols)
    assert abs(f3.item() - (res.loss.item() + 3.0 * 0.05)) < 1e-12 * max(1.0, abs(f3.item()))
    assert abs(g3.item() - (res.grad_tau.item() + 3.0)) < 1e-10 * _scale(res.loss.item(), 0.05, 3.0)


def test_reference_grad_tau_sign_is_kl():
    """gamma = 1, eps -> 0: dF/dtau = rho - mean_i [KL(q1_i || uniform) + KL(q2_i || uniform)]
    with q_i the softmax weights of anchor i's negatives (the rho-as-KL-radius statement)."""
    b, tau = 7, 0.1
    img, txt = feats(b, 12, torch.float64), feats(b, 12, torch.float64)
    res = R.hgcl(img, txt, torch.arange(b), state(b), state(b), tau=tau, gamma=1.0, margin=0.1, eps=1e-300)
    off = ~torch.eye(b, dtype=torch.bool)
    p = (img * txt).sum(1)
    kl = 0.0
    for S in (img @ txt.T, txt @ img.T):
        z = torch.where(off, R.hinge(S - p[:, None], 0.1) / tau, -math.inf)
        q = torch.softmax(z, 1)
        kl = kl + (torch.where(off, q * (torch.log(q) + math.log(b - 1)), 0.0)).sum(1).mean()
    assert abs(res.grad_tau.item() + kl.item()) < 1e-9


# --------------------------------------------------------------------------
# backends: the stats' lbar and dF/dtau
# --------------------------------------------------------------------------


@pytest.mark.parametrize("global_cols", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_lbar_matches_reference(backend, mode, global_cols):
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    from vlmkern.ops import hgcl as ops

    b, d = 9, 13
    img, txt = feats(b, d), feats(b, d)
    kw = {}
    ai = at = None
    off = 0
    if global_cols:
        ai, at, off = feats(b + 5, d), feats(b + 5, d), 3
        ai[off:off + b], at[off:off + b] = img, txt
        kw = dict(all_img=ai, all_txt=at, offset=off)
    margin = MODES[mode]
    ref = R.hgcl(img, txt, torch.arange(b), state(b + 5), state(b + 5), tau=0.05, gamma=1.0, margin=margin, **kw)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    l1, l2, m1, m2 = ops._stats(backend, img.to(dev), txt.to(dev), to(ai), to(at), off, 0.05,
                                margin or 0.0, margin is not None, True)
    assert rel_err(l1.cpu(), ref.log_phi_img) < 2e-5 and rel_err(l2.cpu(), ref.log_phi_txt) < 2e-5
    assert torch.allclose(m1.cpu().double(), ref.lbar_img, rtol=2e-5, atol=2e-6)
    assert torch.allclose(m2.cpu().double(), ref.lbar_txt, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b,d", [(2, 3), (3, 5), (4, 7), (5, 9), (6, 11), (7, 13)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_tau_matches_autograd_fp32(backend, b, d, mode):
    require_backend("hgcl", backend, dev_of(backend))
    margin, tau, gamma, rho = MODES[mode], 0.05, 0.7, 2.5
    img, txt, index, lu1, lu2 = _setup(b, d, torch.float32, seed=b)
    f, g = _autograd_tau(img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, rho=rho)
    ref = R.hgcl(img, txt, index, lu1, lu2, tau=tau, gamma=gamma, margin=margin)
    loss, gt, gi, gx = _op(backend, img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, rho=rho)
    scale = _scale(ref.loss.item(), tau, rho)
    assert abs(loss.item() - f.item()) <= 2e-5 * max(1.0, abs(f.item()))
    assert abs(gt.item() - g.item()) <= TAU_TOL[torch.float32] * scale, (gt.item(), g.item())
    # the feature gradients are the fixed-tau estimator's
    assert rel_err(gi, ref.grad_img) < 2e-5 and rel_err(gx, ref.grad_txt) < 2e-5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_tau_gamma1_exact_objective(backend, mode):
    """gamma = 1, no prior state: autograd of tau/b sum log(eps + Phi(tau)) itself."""
    require_backend("hgcl", backend, dev_of(backend))
    b, d, tau, margin = 11, 17, 0.03, MODES[mode]
    img, txt = feats(b, d), feats(b, d)
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    f = _exact_gamma1_objective(img, txt, t, margin, 1e-14)
    f.backward()
    loss, gt, _, _ = _op(backend, img, txt, torch.arange(b), state(b), state(b), tau, gamma=1.0, margin=margin)
    assert abs(loss.item() - f.item()) <= 2e-5 * max(1.0, abs(f.item()))
    assert abs(gt.item() - t.grad.item()) <= TAU_TOL[torch.float32] * _scale(f.item(), tau, 0.0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_tau_matches_autograd_dtypes(backend, mode, dtype):
    require_backend("hgcl", backend, dev_of(backend))
    margin, tau, gamma = MODES[mode], 0.05, 0.8
    img, txt, index, lu1, lu2 = _setup(23, 21 if backend == "triton" else 37, dtype, seed=3)
    f, g = _autograd_tau(img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, rho=1.0)
    loss, gt, gi, gx = _op(backend, img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, rho=1.0)
    assert gt.dtype == torch.float32 and gi.dtype == dtype
    assert abs(gt.item() - g.item()) <= TAU_TOL[dtype] * _scale(f.item(), tau, 1.0), (gt.item(), g.item())


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_tau_global_columns(backend, mode, b):
    """Local rows against global columns (b = 1 is allowed there), gamma < 1, prior state."""
    require_backend("hgcl", backend, dev_of(backend))
    margin, tau, gamma, d = MODES[mode], 0.07, 0.5, 9
    img, txt, index, lu1, lu2 = _setup(b, d, torch.float32, seed=10 + b)
    ai, at, off = feats(b + 4, d), feats(b + 4, d), 2
    ai[off:off + b], at[off:off + b] = img, txt
    cols = dict(all_img=ai, all_txt=at, offset=off)
    f, g = _autograd_tau(img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, **cols)
    loss, gt, _, _ = _op(backend, img, txt, index, lu1, lu2, tau, gamma=gamma, margin=margin, **cols)
    assert abs(gt.item() - g.item()) <= TAU_TOL[torch.float32] * _scale(f.item(), tau, 0.0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grad_tau_several_row_blocks(backend):
    """b > 256: the CPU kernel's column log-sum-exps (and their l-weighted sums) are merged
    across row blocks."""
    require_backend("hgcl", backend, "cpu")
    img, txt, index, lu1, lu2 = _setup(300, 8, torch.float32, seed=7)
    f, g = _autograd_tau(img, txt, index, lu1, lu2, 0.05, gamma=0.9, margin=0.1)
    loss, gt, _, _ = _op(backend, img, txt, index, lu1, lu2, 0.05, gamma=0.9, margin=0.1)
    assert abs(gt.item() - g.item()) <= TAU_TOL[torch.float32] * _scale(f.item(), 0.05, 0.0)


# --------------------------------------------------------------------------
# the fixed-tau path, tensors without grad, logit_scale
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_float_tensor_and_learned_tau_agree_bit_for_bit(backend, mode):
    """Float tau, a 0-d tensor without grad, and one with grad (rho = 0) give the same loss,
    state and feature gradients, bit for bit: the lbar reduction does not touch log Phi.
    (Exception: Triton fp32 on a GPU runs the lbar sweep with a narrower looped tile - see
    ``_lse_config`` - so there the learned-tau results match to rounding only.)"""
    require_backend("hgcl", backend, dev_of(backend))
    dev = dev_of(backend)
    img, txt, index, lu1, lu2 = _setup(6, 10, torch.float32, seed=5)
    outs = []
    for tau in (0.05, torch.tensor(0.05, device=dev), torch.tensor(0.05, device=dev, requires_grad=True)):
        a, t = img.clone().to(dev).requires_grad_(), txt.clone().to(dev).requires_grad_()
        k1, k2 = lu1.clone().to(dev), lu2.clone().to(dev)
        loss = hgcl_loss(a, t, index.to(dev), k1, k2, tau=tau, gamma=0.6, margin=MODES[mode], backend=backend)
        loss.backward()
        outs.append((loss.detach(), k1, k2, a.grad, t.grad))
        if isinstance(tau, torch.Tensor) and tau.requires_grad:
            assert tau.grad is not None and torch.isfinite(tau.grad)
    for k, o in enumerate(outs[1:], 1):
        for x, y in zip(o, outs[0]):
            if k == 2 and backend == "triton" and dev == "cuda":
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(x, y)


def test_tensor_tau_without_grad_and_rho():
    img, txt, index, lu1, lu2 = _setup(5, 8, torch.float32)
    base = hgcl_loss(img, txt, index, lu1.clone(), lu2.clone(), tau=0.05, gamma=0.5)
    with_rho = hgcl_loss(img, txt, index, lu1.clone(), lu2.clone(), tau=torch.tensor(0.05), gamma=0.5, rho=4.0)
    assert math.isclose(with_rho.item(), base.item() + 4.0 * 0.05, rel_tol=1e-6, abs_tol=1e-6)
    # a tensor that requires grad under no_grad: the fixed-tau path (no lbar), same value
    t = torch.tensor(0.05, requires_grad=True)
    with torch.no_grad():
        nog = hgcl_loss(img, txt, index, lu1.clone(), lu2.clone(), tau=t, gamma=0.5, rho=4.0)
    assert torch.equal(nog, with_rho) and not nog.requires_grad
    # float64 tau: the loss stays float32, the gradient reaches tau in its own dtype
    t64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = hgcl_loss(img, txt, index, lu1.clone(), lu2.clone(), tau=t64, gamma=0.5, rho=4.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert t64.grad.dtype == torch.float64 and torch.isfinite(t64.grad)


def test_bad_input_gives_nan_tau_gradient():
    """The bad-input rule (NaN features: NaN loss, every gradient entry NaN) covers tau too."""
    img, txt, index, lu1, lu2 = _setup(5, 8, torch.float32)
    img[1, 2] = math.nan
    t = torch.tensor(0.05, requires_grad=True)
    loss = hgcl_loss(img.requires_grad_(), txt, index, lu1, lu2, tau=t, gamma=0.5)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(t.grad)


BAD_TAU = [
    ("tau neg tensor", dict(tau=torch.tensor(-0.1)), ValueError, "tau must be a finite number > 0, got -0.1"),
    ("tau zero tensor", dict(tau=torch.tensor(0.0, requires_grad=True)), ValueError, "tau must be a finite number > 0"),
    ("tau nan", dict(tau=math.nan), ValueError, "tau must be a finite number > 0, got nan"),
    ("tau nan tensor", dict(tau=torch.tensor(math.nan)), ValueError, "tau must be a finite number > 0, got nan"),
    ("tau inf", dict(tau=math.inf), ValueError, "tau must be a finite number > 0, got inf"),
    ("tau shape", dict(tau=torch.tensor([0.1, 0.2])), ValueError, r"tau must be a number or a 0-d tensor, got a "
                                                                  r"tensor of shape \(2,\)"),
    ("tau shape 1", dict(tau=torch.tensor([0.1])), ValueError, r"tau must be a number or a 0-d tensor"),
    ("tau int tensor", dict(tau=torch.tensor(1)), TypeError, "tau must be a floating-point tensor, got torch.int64"),
    ("tau device", dict(tau=torch.tensor(0.1, device="meta")), ValueError, "tau is on meta but img is on cpu"),
    ("tau str", dict(tau="0.1"), TypeError, "tau must be a number or a 0-d floating-point tensor, got str"),
    ("tau bool", dict(tau=True), TypeError, "tau must be a number or a 0-d floating-point tensor, got bool"),
    ("rho nan", dict(rho=math.nan), ValueError, "rho must be a finite number, got nan"),
    ("rho str", dict(rho="1"), ValueError, "rho must be a finite number, got '1'"),
]


@pytest.mark.parametrize("case", BAD_TAU, ids=[c[0] for c in BAD_TAU])
def test_bad_tau_names_the_argument(case):
    _, kw, exc, match = case
    img, txt, index, lu1, lu2 = _setup(4, 8, torch.float32)
    args = dict(tau=0.1, gamma=0.5)
    args.update(kw)
    before = lu1.clone()
    with pytest.raises(exc, match="vlmkern.hgcl_loss: " + match):
        hgcl_loss(img, txt, index, lu1, lu2, **args)
    assert torch.equal(lu1, before)  # checked before anything is updated


def test_module_logit_scale_and_tau_arguments():
    """open_clip's convention: logit_scale = model.logit_scale.exp(), tau = 1/logit_scale; the
    parameter receives -tau dF/dtau."""
    b, n, tau = 6, 20, 0.05
    img, txt = feats(b, 8), feats(b, 8)
    idx = torch.arange(b)
    m = GlobalContrastiveLoss(n, tau=0.3, gamma=0.9, margin=0.1, rho=2.0)
    assert "rho=2.0" in repr(m)
    ref = R.hgcl(img, txt, idx, m.log_u_img.clone(), m.log_u_txt.clone(), tau=tau, gamma=0.9, margin=0.1)
    log_scale = torch.nn.Parameter(torch.tensor([math.log(1 / tau)]))  # open_clip's [1]-shaped variant
    loss = m(img, txt, idx, logit_scale=log_scale.exp())
    loss.backward()
    assert math.isclose(loss.item(), ref.loss.item() + 2.0 * tau, rel_tol=1e-5)
    expect = -tau * (ref.grad_tau.item() + 2.0)  # d/d log_scale of tau = exp(-log_scale)
    assert abs(log_scale.grad.item() - expect) <= 2e-5 * _scale(ref.loss.item(), tau, 2.0) * tau
    # tau= a tensor, and the constructor's fixed tau when neither is given
    m2 = GlobalContrastiveLoss(n, tau=tau, gamma=0.9, margin=0.1)
    fixed = m2(img, txt, idx)
    assert math.isclose(fixed.item(), ref.loss.item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="give tau or logit_scale, not both"):
        m(img, txt, idx, tau=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        m(img, txt, idx, logit_scale=torch.ones(2))
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        m(img, txt, idx, logit_scale=0.0)
    with pytest.raises(ValueError, match="rho must be a finite number"):
        GlobalContrastiveLoss(n, tau=tau, gamma=0.9, rho=math.inf)


# --------------------------------------------------------------------------
# two gloo processes
# --------------------------------------------------------------------------

WORLD, B_LOCAL, D, N = 2, 5, 12, 24
STEPS = [list(range(0, 10)), [23, 3, 17, 8, 0, 21, 5, 11, 2, 19]]
KW = dict(gamma=0.7, margin=0.1, rho=3.0)
TAU = 0.06


def _data(step):
    g = torch.Generator().manual_seed(200 + step)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g), dim=1)
    return img, txt, torch.tensor(STEPS[step])


def _worker(rank, port, backend, outdir):
    from test_hgcl_dist import gloo_rank

    with gloo_rank(rank, port, WORLD):
        loss_fn = GlobalContrastiveLoss(N, tau=1.0, backend=backend, **KW)
        out = []
        for step in range(len(STEPS)):
            img, txt, index = _data(step)
            sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            t = torch.tensor(TAU, requires_grad=True)
            loss = loss_fn(img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_(), index[sl], tau=t)
            loss.backward()
            out.append(dict(loss=loss.detach(), grad_tau=t.grad))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_two_process_tau_gradient_averages_to_one_process(backend):
    """Each rank's tau gradient covers its local anchors: the mean over ranks (what DDP's
    averaging computes) equals the single-process tau gradient of the concatenated batch."""
    require_backend("hgcl", backend, "cpu")
    from test_hgcl_dist import run_gloo_workers

    res = run_gloo_workers(_worker, backend, world=WORLD)

    single = GlobalContrastiveLoss(N, tau=1.0, backend=backend, **KW)
    for step in range(len(STEPS)):
        img, txt, index = _data(step)
        t = torch.tensor(TAU, requires_grad=True)
        loss = single(img, txt, index, tau=t)
        loss.backward()
        mean_grad = sum(r[step]["grad_tau"] for r in res) / WORLD
        mean_loss = sum(r[step]["loss"] for r in res) / WORLD
        assert math.isclose(mean_loss.item(), loss.item(), rel_tol=1e-5, abs_tol=1e-6)
        assert abs(mean_grad.item() - t.grad.item()) <= 2e-5 * _scale(loss.item(), TAU, KW["rho"])
        assert not math.isclose(res[0][step]["grad_tau"].item(), res[1][step]["grad_tau"].item())  # local parts
