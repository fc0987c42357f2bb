"""HGCL / GCL (SPEC §1): every live backend against the float64 reference.

Backends: ``cpu`` (compiled C++), ``torch`` (blocked PyTorch), ``triton``
(CUDA tensors on a GPU; without one, CPU tensors under TRITON_INTERPRET=1:
small sizes only).  Output buffers are NaN-poisoned in the ``poisoned`` tests to
prove every element is written.  Run with
``PYTHONPATH=. python -m pytest python_tests/test_hgcl*.py -q``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

from conftest import DEVICES, rel_err, require_backend
from vlmkern import GlobalContrastiveLoss, hgcl_loss
from vlmkern import reference as R

BACKENDS = ["cpu", "torch", "triton"]
MODES = {"gcl": None, "hgcl": 0.1}
# relative (norm-wise) error bounds of gradients, per input dtype
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# The Triton kernels run on the GPU when there is one, else on CPU tensors under
# TRITON_INTERPRET=1 (conftest sets it); the other backends are tested on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def feats(b, d, dtype=torch.float32, device="cpu"):
    x = Fn.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    return x.to(dtype).to(device)


def state(n, visited=None, device="cpu"):
    """A log-u buffer: -inf (never visited) except random values at `visited`."""
    u = torch.full((n,), -math.inf, dtype=torch.float32)
    if visited is not None:
        u[visited] = torch.randn(len(visited)) * 2.0
    return u.to(device)


def run_backend(backend, img, txt, index, lu1, lu2, **kw):
    """Runs hgcl_loss with gradients on the backend's device; returns (loss,
    grad_img, grad_txt) on the CPU and writes the updated state back into lu1, lu2."""
    dev = dev_of(backend)
    a = img.detach().clone().to(dev).requires_grad_()
    t = txt.detach().clone().to(dev).requires_grad_()
    k1, k2 = lu1.to(dev), lu2.to(dev)
    loss = hgcl_loss(a, t, index.to(dev), k1, k2, backend=backend, **kw)
    loss.backward()
    lu1.copy_(k1), lu2.copy_(k2)
    return loss.cpu(), a.grad.cpu(), t.grad.cpu()


def assert_state(got, ref, dtype=torch.float32):
    ref = ref.float()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "visited pattern differs"
    fin = torch.isfinite(ref)
    assert torch.isfinite(got[fin]).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    # log u values are O(l/tau): compare with a scale-aware tolerance
    assert torch.allclose(got[fin].double(), ref[fin].double(), rtol=tol, atol=tol), (
        (got[fin].double() - ref[fin].double()).abs().max()
    )


# --------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b", [2, 5, 17])
def test_reference_grad_is_autograd_of_surrogate(mode, b):
    img, txt = feats(b, 9, torch.float64), feats(b, 9, torch.float64)
    idx = torch.arange(b)
    res = R.hgcl(img, txt, idx, state(b, [0]), state(b), tau=0.07, gamma=0.6, margin=MODES[mode])
    n = res.log_u_img.shape[0]
    ld1 = torch.logaddexp(res.log_u_img[idx], torch.full((b,), math.log(1e-14), dtype=torch.float64))
    ld2 = torch.logaddexp(res.log_u_txt[idx], torch.full((b,), math.log(1e-14), dtype=torch.float64))
    a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    R.hgcl_surrogate(a, t, ld1, ld2, tau=0.07, margin=MODES[mode]).backward()
    assert n == b
    assert rel_err(res.grad_img, a.grad) < 1e-12
    assert rel_err(res.grad_txt, t.grad) < 1e-12


def _clip_loss_grads(img, txt, tau):
    from open_clip.loss import ClipLoss

    a, t = img.detach().double().clone().requires_grad_(), txt.detach().double().clone().requires_grad_()
    loss = ClipLoss()(a, t, torch.tensor(1.0 / tau, dtype=torch.float64))
    loss.backward()
    return loss.detach(), a.grad, t.grad


def test_reference_clip_loss_identity():
    b, tau = 13, 0.05
    img, txt = feats(b, 16, torch.float64), feats(b, 16, torch.float64)
    res = R.hgcl(img, txt, torch.arange(b), state(b), state(b), tau=tau, gamma=1.0, margin=None, eps=1.0 / (b - 1))
    cl, gi, gt = _clip_loss_grads(img, txt, tau)
    assert rel_err(res.grad_img, 2 * tau * gi) < 1e-12
    assert rel_err(res.grad_txt, 2 * tau * gt) < 1e-12
    # loss = tau/b sum log((1 + sum exp)/(B-1)) = 2 tau (ClipLoss - log(B-1))
    assert abs(res.loss.item() - 2 * tau * (cl.item() - math.log(b - 1))) < 1e-12


# --------------------------------------------------------------------------
# backends against the reference
# --------------------------------------------------------------------------


def _compare(backend, b, d, mode, dtype, device=None, tau=0.05, gamma=0.7, global_cols=False):
    device = dev_of(backend) if device is None else device
    require_backend("hgcl", backend, device)
    n = 2 * b + 7
    index = torch.randperm(n)[:b]
    visited = index[::2].tolist() + [n - 1]  # some anchors seen before, some not
    lu1, lu2 = state(n, visited), state(n, visited)
    img, txt = feats(b, d, dtype), feats(b, d, dtype)
    kw = dict(tau=tau, gamma=gamma, margin=MODES[mode])
    if b == 1 and not global_cols:  # B = 1: no negatives, an error (SPEC §1 "Bad input"), state untouched
        k1, k2 = lu1.clone().to(device), lu2.clone().to(device)
        with pytest.raises(ValueError, match=r"img has 1 column\(s\); the loss needs at least 2"):
            run_backend(backend, img.to(device), txt.to(device), index.to(device), k1, k2, **kw)
        assert torch.equal(k1.cpu(), lu1) and torch.equal(k2.cpu(), lu2)
        return
    if not global_cols:
        ref = R.hgcl(img, txt, index, lu1, lu2, **kw)
        k1, k2 = lu1.clone().to(device), lu2.clone().to(device)
        loss, gi, gt = run_backend(backend, img.to(device), txt.to(device), index.to(device), k1, k2, **kw)
    else:
        pre, post = 3, 4
        oi, ot = feats(pre + post, d, dtype), feats(pre + post, d, dtype)
        all_img = torch.cat([oi[:pre], img, oi[pre:]])
        all_txt = torch.cat([ot[:pre], txt, ot[pre:]])
        ref = R.hgcl(img, txt, index, lu1, lu2, all_img=all_img, all_txt=all_txt, offset=pre, **kw)
        k1, k2 = lu1.clone().to(device), lu2.clone().to(device)
        a, t = img.clone().to(device).requires_grad_(), txt.clone().to(device).requires_grad_()
        ga, gt_ = all_img.clone().to(device).requires_grad_(), all_txt.clone().to(device).requires_grad_()
        loss = hgcl_loss(a, t, index.to(device), k1, k2, all_img=ga, all_txt=gt_, offset=pre, backend=backend, **kw)
        loss.backward()
        gi, gt = a.grad, t.grad
        assert ga.grad.dtype == dtype
        assert rel_err(ga.grad, ref.grad_all_img) < GRAD_TOL[dtype]
        assert rel_err(gt_.grad, ref.grad_all_txt) < GRAD_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.loss.item()) <= LOSS_TOL[dtype] * max(1.0, abs(ref.loss.item()))
    assert_state(k1.cpu(), ref.log_u_img, dtype)
    assert_state(k2.cpu(), ref.log_u_txt, dtype)
    # entries not in the batch are untouched, bit for bit
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(k1.cpu()[untouched], lu1[untouched])
    assert gi.dtype == dtype and gt.dtype == dtype
    assert rel_err(gi, ref.grad_img) < GRAD_TOL[dtype]
    assert rel_err(gt, ref.grad_txt) < GRAD_TOL[dtype]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("d", [7, 33])
@pytest.mark.parametrize("b", [1, 2, 3, 97, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_fp32(backend, b, d, mode):
    _compare(backend, b, d, mode, torch.float32)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_dtypes(backend, mode, dtype):
    _compare(backend, 97, 40 if backend == "triton" else 65, mode, dtype)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_global_columns_with_offset(backend, mode):
    _compare(backend, 9, 33, mode, torch.float32, global_cols=True)
    _compare(backend, 9, 20, mode, torch.float16, global_cols=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_clip_loss_identity(backend):
    require_backend("hgcl", backend, dev_of(backend))
    b, tau = 37, 0.05
    img, txt = feats(b, 24), feats(b, 24)
    loss, gi, gt = run_backend(backend, img, txt, torch.arange(b), state(b), state(b), tau=tau, gamma=1.0,
                               margin=None, eps=1.0 / (b - 1))
    cl, ci, ct = _clip_loss_grads(img, txt, tau)
    assert rel_err(gi, 2 * tau * ci) < 2e-5
    assert rel_err(gt, 2 * tau * ct) < 2e-5
    assert abs(loss.item() - 2 * tau * (cl.item() - math.log(b - 1))) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_and_overlapping_indices(backend):
    """State evolves across calls exactly as the reference says."""
    require_backend("hgcl", backend, dev_of(backend))
    n, b, d = 40, 12, 16
    kw = dict(tau=0.03, gamma=0.6, margin=0.2)
    batches = [torch.arange(0, 12), torch.arange(0, 12), torch.arange(6, 18), torch.randperm(n)[:b]]
    r1, r2 = state(n), state(n)
    k1, k2 = r1.clone(), r2.clone()
    for index in batches:
        img, txt = feats(b, d), feats(b, d)
        ref = R.hgcl(img, txt, index, r1, r2, **kw)
        r1, r2 = ref.log_u_img, ref.log_u_txt
        loss, gi, gt = run_backend(backend, img, txt, index, k1, k2, **kw)
        assert_state(k1, r1)
        assert_state(k2, r2)
        assert abs(loss.item() - ref.loss.item()) < 1e-4
        assert rel_err(gi, ref.grad_img) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_visit_takes_log_phi(backend):
    require_backend("hgcl", backend, dev_of(backend))
    n, b = 10, 6
    img, txt = feats(b, 8), feats(b, 8)
    index = torch.tensor([9, 0, 4, 2, 7, 5])
    lu1, lu2 = state(n), state(n, [4])
    ref = R.hgcl(img, txt, index, lu1, lu2, tau=0.1, gamma=0.3, margin=0.1)
    run_backend(backend, img, txt, index, lu1, lu2, tau=0.1, gamma=0.3, margin=0.1)
    # never visited: u = Phi exactly (no (1 - gamma) * 0 + gamma * Phi)
    assert torch.allclose(lu1[index].double(), ref.log_phi_img, rtol=1e-5, atol=1e-5)
    first = index != 4
    assert torch.allclose(lu2[index][first].double(), ref.log_phi_txt[first], rtol=1e-5, atol=1e-5)
    # visited before: the moving average
    k = (index == 4).nonzero().item()
    assert not math.isclose(lu2[4].item(), ref.log_phi_txt[k].item(), rel_tol=1e-3)
    assert math.isclose(lu2[4].item(), ref.log_u_txt[4].item(), rel_tol=1e-5, abs_tol=1e-5)


# --------------------------------------------------------------------------
# state semantics: the stateless call and duplicate indices
# --------------------------------------------------------------------------

DUP_INDEX = torch.tensor([3, 1, 3, 7, 1, 3, 0, 5, 9, 7])  # 3 three times, 1 and 7 twice


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stateless_call_reads_u_and_writes_nothing(backend, mode):
    """update_state=False on the state an updating call left: the same loss and gradient; the
    state is untouched bit for bit; on a fresh state, unvisited entries read Phi (the reference)."""
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    n, b, d = 16, 10, 12
    kw = dict(tau=0.05, gamma=0.6, margin=MODES[mode])
    index = torch.tensor([14, 2, 5, 0, 11, 7, 3, 9, 12, 6])
    img, txt = feats(b, d), feats(b, d)
    lu1, lu2 = state(n, [2, 0, 7, 15]), state(n, [5, 0, 9])
    k1, k2 = lu1.clone(), lu2.clone()
    loss_u, gi_u, gt_u = run_backend(backend, img, txt, index, k1, k2, **kw)
    s1, s2 = k1.clone(), k2.clone()
    loss_s, gi_s, gt_s = run_backend(backend, img, txt, index, k1, k2, update_state=False, **kw)
    assert torch.equal(k1, s1) and torch.equal(k2, s2)  # nothing written
    assert abs(loss_s.item() - loss_u.item()) <= 1e-6 * max(1.0, abs(loss_u.item()))
    assert rel_err(gi_s, gi_u) < 1e-6 and rel_err(gt_s, gt_u) < 1e-6
    # on the original state: current u where visited, Phi where not (the reference's stateless call)
    k1, k2 = lu1.clone(), lu2.clone()
    ref = R.hgcl(img, txt, index, lu1, lu2, update_state=False, **kw)
    loss, gi, gt = run_backend(backend, img, txt, index, k1, k2, update_state=False, **kw)
    assert torch.equal(k1, lu1) and torch.equal(k2, lu2)
    assert torch.equal(ref.log_u_img.float(), lu1)
    assert abs(loss.item() - ref.loss.item()) <= LOSS_TOL[torch.float32] * max(1.0, abs(ref.loss.item()))
    assert rel_err(gi, ref.grad_img) < GRAD_TOL[torch.float32]
    assert rel_err(gt, ref.grad_txt) < GRAD_TOL[torch.float32]
    upd = R.hgcl(img, txt, index, lu1, lu2, **kw)
    assert not math.isclose(upd.loss.item(), ref.loss.item(), rel_tol=1e-3)  # the stateless loss is another one


@pytest.mark.parametrize("update_state", [True, False], ids=["update", "stateless"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_match_the_reference(backend, mode, update_state):
    """Anchors sharing an index: one update with their mean Phi, all read the same new u."""
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    n, d = 12, 16
    b = DUP_INDEX.shape[0]
    kw = dict(tau=0.05, gamma=0.7, margin=MODES[mode], update_state=update_state)
    for visited in ([], [3, 0, 9]):  # a fresh state, then a partly visited one
        lu1, lu2 = state(n, visited), state(n, [1, 3])
        img, txt = feats(b, d), feats(b, d)
        ref = R.hgcl(img, txt, DUP_INDEX, lu1, lu2, **kw)
        k1, k2 = lu1.clone(), lu2.clone()
        loss, gi, gt = run_backend(backend, img, txt, DUP_INDEX, k1, k2, **kw)
        assert_state(k1, ref.log_u_img)
        assert_state(k2, ref.log_u_txt)
        assert abs(loss.item() - ref.loss.item()) <= LOSS_TOL[torch.float32] * max(1.0, abs(ref.loss.item()))
        assert rel_err(gi, ref.grad_img) < GRAD_TOL[torch.float32]
        assert rel_err(gt, ref.grad_txt) < GRAD_TOL[torch.float32]
    # the rule is not "last occurrence wins": the entry of 3 is the mean over its three anchors
    lphi = ref.log_phi_img[DUP_INDEX == 3]  # the three anchors' own Phi differ: the mean is not any one of them
    assert lphi.max() - lphi.min() > 1e-3


def test_reference_duplicate_rule_is_the_mean_of_phi():
    index = torch.tensor([4, 2, 4, 4])
    log_phi = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=torch.float64)
    got = R.duplicate_log_mean(index, log_phi)
    mean4 = math.log((math.exp(0.5) + math.exp(2.0) + math.exp(1.0)) / 3)
    assert torch.allclose(got, torch.tensor([mean4, -1.0, mean4, mean4], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("update_state", [True, False], ids=["update", "stateless"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_are_order_independent(backend, update_state):
    """The state step on a permuted batch gives the permuted result bit for bit (the same log Phi
    values in another order), and every anchor of an index reads the same u; through the whole op
    a permuted batch gives the same state and loss within float32 rounding (the sweeps' sums run
    in another order)."""
    from vlmkern.ops import hgcl as ops

    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    n = 12
    b = DUP_INDEX.shape[0]
    g = torch.Generator().manual_seed(3)
    lphi1, lphi2 = torch.randn(b, generator=g) * 3, torch.randn(b, generator=g) * 3
    base1, base2 = state(n, [3, 7]), state(n, [1])
    no = torch.zeros((), dtype=torch.bool, device=dev)
    results = []
    for perm in (torch.arange(b), torch.randperm(b, generator=g), torch.arange(b).flip(0)):
        k1, k2 = base1.clone().to(dev), base2.clone().to(dev)
        ld1, ld2 = ops._guarded_state_update(backend, k1, k2, DUP_INDEX[perm].to(dev), lphi1[perm].to(dev),
                                             lphi2[perm].to(dev), 0.7, 1e-14, no, update_state)
        inv = torch.argsort(perm)
        results.append((k1.cpu(), k2.cpu(), ld1.cpu()[inv], ld2.cpu()[inv]))
    for r in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(r, results[0]))
    k1, k2, ld1, ld2 = results[0]
    for k in DUP_INDEX.unique():
        same = DUP_INDEX == k
        assert (ld1[same] == ld1[same][0]).all() and (ld2[same] == ld2[same][0]).all()
    # whole op
    d = 16
    img, txt = feats(b, d), feats(b, d)
    perm = torch.randperm(b, generator=g)
    outs = []
    for p in (torch.arange(b), perm):
        k1, k2 = base1.clone(), base2.clone()
        loss, gi, _ = run_backend(backend, img[p], txt[p], DUP_INDEX[p], k1, k2, tau=0.05, gamma=0.7,
                                  update_state=update_state)
        outs.append((loss, gi[torch.argsort(p)], k1, k2))
    assert abs(outs[0][0].item() - outs[1][0].item()) <= 1e-5 * max(1.0, abs(outs[0][0].item()))
    assert rel_err(outs[1][1], outs[0][1]) < 1e-5
    fin = torch.isfinite(outs[0][2])
    assert torch.equal(fin, torch.isfinite(outs[1][2]))
    assert torch.allclose(outs[1][2][fin], outs[0][2][fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("update_state", [True, False], ids=["update", "stateless"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_text_index_and_state_length(backend, update_state):
    """Multi-caption set: 6 images, 15 captions; a batch holds two captions of image 2 (a duplicate
    image index, distinct caption indices); the text state is indexed by txt_index."""
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    index = torch.tensor([2, 0, 2, 5, 1, 4, 3])
    txt_index = torch.tensor([7, 0, 8, 14, 3, 11, 9])
    b, d = index.shape[0], 16
    kw = dict(tau=0.05, gamma=0.7, margin=0.1, update_state=update_state)
    lu1, lu2 = state(6, [2, 4]), state(15, [8, 1])
    for _ in range(2):  # a fresh-ish state, then the state the first call left
        img, txt = feats(b, d), feats(b, d)
        ref = R.hgcl(img, txt, index, lu1, lu2, txt_index=txt_index, **kw)
        k1, k2 = lu1.clone(), lu2.clone()
        loss, gi, gt = run_backend(backend, img, txt, index, k1, k2, txt_index=txt_index, **kw)
        assert k1.shape == (6,) and k2.shape == (15,)
        assert_state(k1, ref.log_u_img)
        assert_state(k2, ref.log_u_txt)
        assert abs(loss.item() - ref.loss.item()) <= LOSS_TOL[torch.float32] * max(1.0, abs(ref.loss.item()))
        assert rel_err(gi, ref.grad_img) < GRAD_TOL[torch.float32]
        assert rel_err(gt, ref.grad_txt) < GRAD_TOL[torch.float32]
        lu1, lu2 = k1, k2
    # txt_index = index is the default
    img, txt = feats(b, d), feats(b, d)
    same = [state(6, [1]), state(6, [1])]
    dflt = [s.clone() for s in same]
    l_a = run_backend(backend, img, txt, index, *same, txt_index=index, **kw)[0]
    l_b = run_backend(backend, img, txt, index, *dflt, **kw)[0]
    assert torch.equal(l_a, l_b) and torch.equal(same[1], dflt[1])


def test_module_with_a_text_state_of_its_own_length():
    m = GlobalContrastiveLoss(6, tau=0.05, gamma=0.9, num_txt_samples=15)
    assert m.log_u_img.shape == (6,) and m.log_u_txt.shape == (15,) and "num_txt_samples=15" in repr(m)
    img, txt = feats(3, 8), feats(3, 8)
    m(img, txt, torch.tensor([0, 0, 5]), txt_index=torch.tensor([0, 1, 14]))
    assert torch.isfinite(m.log_u_txt[[0, 1, 14]]).all() and torch.isneginf(m.log_u_txt[2:14]).all()
    with pytest.raises(ValueError, match="needs txt_index"):
        m(img, txt, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_txt_samples must be > 0"):
        GlobalContrastiveLoss(6, tau=0.05, gamma=0.9, num_txt_samples=0)


def test_duplicate_mean_keeps_unshared_anchors_bit_for_bit():
    from vlmkern.ops import hgcl as ops

    index = torch.tensor([5, 2, 8, 2, 0])
    lphi = torch.tensor([1.2345678, -3.0, 7.5, 0.25, -math.inf])
    got = ops._duplicate_log_mean(index, lphi)
    assert torch.equal(got[[0, 2, 4]], lphi[[0, 2, 4]])
    assert got[1] == got[3] and math.isclose(got[1].item(), math.log((math.exp(-3.0) + math.exp(0.25)) / 2),
                                             rel_tol=1e-6)
    both_neginf = ops._duplicate_log_mean(torch.tensor([1, 1]), torch.full((2,), -math.inf))
    assert torch.isneginf(both_neginf).all()


def _adversarial(b, d, dtype):
    """Positives at the minimum p_i = -1 and half of the negatives at the maximum
    s_ij = +1 (x = 2, the largest possible): img_i = +-e, txt_i = -img_i (nearly)."""
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    sign = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0).double()
    img = e[None, :] * sign[:, None]
    txt = -img
    img = img + 1e-3 * torch.randn(b, d, dtype=torch.float64)
    txt = txt + 1e-3 * torch.randn(b, d, dtype=torch.float64)
    return Fn.normalize(img, dim=1).to(dtype), Fn.normalize(txt, dim=1).to(dtype)


@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_inputs_stay_finite(backend, margin):
    require_backend("hgcl", backend, dev_of(backend))
    b, d, tau = 24, 16, 0.005
    for dtype in (torch.float32, torch.float16):
        img, txt = _adversarial(b, d, dtype)
        n = 30
        index = torch.arange(b)
        lu1, lu2 = state(n, [0, 1, 2]), state(n)
        ref = R.hgcl(img, txt, index, lu1, lu2, tau=tau, gamma=0.9, margin=margin)
        assert ref.log_phi_img.max() > 300  # exp() of this overflows fp32 and fp64
        loss, gi, gt = run_backend(backend, img, txt, index, lu1, lu2, tau=tau, gamma=0.9, margin=margin)
        assert torch.isfinite(loss) and torch.isfinite(gi).all() and torch.isfinite(gt).all()
        assert torch.isfinite(lu1[index]).all() and torch.isfinite(lu2[index]).all()
        assert abs(loss.item() - ref.loss.item()) <= 1e-3 * abs(ref.loss.item())
        assert rel_err(gi, ref.grad_img) < 5e-3
        assert rel_err(gt, ref.grad_txt) < 5e-3


# --------------------------------------------------------------------------
# poisoned outputs: every element a kernel is meant to write is written
# --------------------------------------------------------------------------


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs allocated NaN-filled instead of uninitialised: the Python side
    (Triton ops, PyTorch fallback) through ``vlmkern.kernels.outputs``, the
    compiled kernels through the environment variable they read at each call."""
    from vlmkern.kernels import outputs

    monkeypatch.setattr(outputs, "POISON", True)
    monkeypatch.setenv(outputs.ENV, "1")
    yield


def test_poison_switch_reaches_every_allocator(poisoned):
    from vlmkern.kernels import outputs

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.isnan(outputs.empty((2, 3), dtype=dt, device="cpu")).all()
    assert (outputs.empty(4, dtype=torch.int64, device="cpu") == torch.iinfo(torch.int64).min).all()
    require_backend("hgcl", "cpu", "cpu")
    import vlmkern._C

    assert vlmkern._C.poison_outputs()


def test_poison_catches_a_missing_write(poisoned, monkeypatch):
    """Negative control: skip the Triton sweep that writes grad_txt (and the
    positive pairs of grad_img) - the poisoned buffers must surface as NaN."""
    require_backend("hgcl", "triton", TRITON_DEVICE)
    import vlmkern.kernels.triton.hgcl as K

    real = K._launch_grad
    monkeypatch.setattr(K, "_launch_grad", lambda *a, **kw: None if kw.get("prev") is not None else real(*a, **kw))
    img, txt = feats(5, 8, device=TRITON_DEVICE), feats(5, 8, device=TRITON_DEVICE)
    ld = torch.rand(5, device=TRITON_DEVICE)
    gF, gG, _, _ = torch.ops.vlmkern.hgcl_grad_triton(img, txt, None, None, ld, ld, torch.ones((), device=ld.device),
                                                       0, 0.05, 0.1, True)
    assert torch.isfinite(gF).all()  # written by the first sweep; only the epilogue of the second is missing
    assert torch.isnan(gG).all()


@pytest.mark.parametrize("global_cols", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs_fully_written(poisoned, backend, mode, global_cols, dtype):
    """Loss, both state buffers and every gradient match the reference (and
    are finite) with NaN-poisoned output buffers, at b = 1, 2, 3 and 37 (b = 1
    without global columns is the B < 2 error)."""
    for b in (1, 2, 3, 37):
        _compare(backend, b, 19, mode, dtype, global_cols=global_cols)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_ops_write_every_output(poisoned, backend):
    """The raw stats / grad ops: every output finite, the right shape and dtype
    (including the empty [0, d] column gradients of the one-process form)."""
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    from vlmkern.ops import hgcl as ops

    h = torch.float16
    for b, local in ((1, True), (6, True), (6, False)):
        d = 11
        img, txt = feats(b, d, h, dev), feats(b, d, h, dev)
        ai, at = (None, None) if local else (feats(b + 4, d, h, dev), feats(b + 4, d, h, dev))
        off = 0 if local else 3
        l1, l2, e1, e2 = ops._stats(backend, img, txt, ai, at, off, 0.05, 0.1, True)
        assert e1.shape == e2.shape == (0,)  # lbar not asked for
        _, _, m1, m2 = ops._stats(backend, img, txt, ai, at, off, 0.05, 0.1, True, True)
        assert m1.shape == m2.shape == (b,) and m1.dtype == torch.float32
        assert torch.isfinite(m1).all() and torch.isfinite(m2).all()
        assert l1.shape == l2.shape == (b,) and l1.dtype == torch.float32
        if b == 1 and local:
            assert torch.isneginf(l1).all() and torch.isneginf(l2).all()  # no negatives
            assert (m1 == 0).all() and (m2 == 0).all()
        else:
            assert torch.isfinite(l1).all() and torch.isfinite(l2).all()
        lu = state(b + 2, [0], dev)
        ld = ops._state_update(backend, lu, torch.arange(b, device=dev), l1, 0.5, 1e-14)
        assert ld.shape == (b,) and torch.isfinite(ld).all()
        one = torch.ones((), device=dev)
        outs = ops._grad(backend, img, txt, ai, at, ld, ld.clone(), one, off, 0.05, 0.1, True)
        nB = 0 if local else b + 4
        for t, shape in zip(outs, ((b, d), (b, d), (nB, d), (nB, d))):
            assert t.shape == shape and t.dtype == torch.float16
            assert torch.isfinite(t).all()


# --------------------------------------------------------------------------
# Triton: launch configurations and the fp16 operand of dS @ Y
# --------------------------------------------------------------------------


TRITON_CONFIGS = {
    "chunks": dict(BLOCK_DO=16, ND=3),  # several register accumulators, one d-group
    "groups": dict(BLOCK_DO=16, ND=1),  # d split over program groups (S recomputed per group)
    "mixed": dict(BLOCK_O=16, BLOCK_L=32, BLOCK_DO=16, ND=2),  # 2 groups of 2 chunks, unequal tiles
}


@pytest.mark.parametrize("cfg", list(TRITON_CONFIGS))
def test_triton_launch_configurations(poisoned, monkeypatch, cfg):
    """d = 40 does not fill the last accumulator chunk / d-group: the masked
    columns must be neither read as garbage nor left unwritten."""
    require_backend("hgcl", "triton", TRITON_DEVICE)
    import vlmkern.kernels.triton.hgcl as K

    real = K._config

    def forced(d, gpu, dtype=torch.bfloat16):
        c = real(d, gpu, dtype)
        c["grad"] = dict(c["grad"], **TRITON_CONFIGS[cfg])
        return c

    monkeypatch.setattr(K, "_config", forced)
    g = forced(40, TRITON_DEVICE == "cuda")["grad"]
    assert K._d_groups(40, g) == (1 if cfg == "chunks" else math.ceil(40 / (g["ND"] * 16)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in MODES:
            _compare("triton", 37, 40, mode, dtype)
            _compare("triton", 9, 40, mode, dtype, global_cols=True)


@pytest.mark.parametrize("d", [512, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_gpu_block_shapes(monkeypatch, dtype, d):
    """The GPU launch configurations (``_config(d, gpu=True)``: what a CUDA
    launch uses, and what ``tools/triton_sm90_check.py`` compiles) give the
    reference's result; without a GPU they run under the interpreter."""
    require_backend("hgcl", "triton", TRITON_DEVICE)
    import vlmkern.kernels.triton.hgcl as K

    real = K._config
    monkeypatch.setattr(K, "_config", lambda d_, gpu, dt=torch.bfloat16: real(d_, True, dt))
    _compare("triton", 37, d, "hgcl", dtype)
    _compare("triton", 9, d, "hgcl", dtype, global_cols=True)


def test_triton_fp16_small_weights():
    """A tracked u 10^6 times today's Phi scales every weight by ~1e-6: most of
    the dS tile falls into fp16 subnormals.  The tile is rescaled per row before
    its fp16 cast, so the (GradScaler-scaled) gradient keeps fp16 accuracy
    (2e-4 here); casting the raw tile loses 2e-2 of it to subnormal rounding."""
    require_backend("hgcl", "triton", TRITON_DEVICE)
    b, d, loss_scale = 64, 32, 65536.0
    img, txt = feats(b, d, torch.float16), feats(b, d, torch.float16)
    idx = torch.arange(b)
    kw = dict(tau=0.05, gamma=0.1, margin=0.1)
    first = R.hgcl(img, txt, idx, state(b), state(b), **kw)  # today's log Phi
    lu1 = (first.log_phi_img + math.log(1e6)).float()
    lu2 = (first.log_phi_txt + math.log(1e6)).float()
    ref = R.hgcl(img, txt, idx, lu1, lu2, **kw)
    dev = TRITON_DEVICE
    a, t = img.clone().to(dev).requires_grad_(), txt.clone().to(dev).requires_grad_()
    (hgcl_loss(a, t, idx.to(dev), lu1.to(dev), lu2.to(dev), backend="triton", **kw) * loss_scale).backward()
    assert rel_err(a.grad.float() / loss_scale, ref.grad_img) < 2e-3
    assert rel_err(t.grad.float() / loss_scale, ref.grad_txt) < 2e-3


def test_triton_flop_count():
    """The documented cost: 12 B^2 d for one process while d fits one program
    group (GPU: d <= 768 for bf16 / fp16, d <= 512 for fp32), 20 b B d per rank
    with global columns, 2 B^2 d more per sweep and extra group."""
    pytest.importorskip("triton")
    from vlmkern.kernels.triton.hgcl import flop_count

    for d in (256, 512, 768):
        assert flop_count(4096, 4096, d) == 12 * 4096**2 * d
        assert flop_count(4096, 4096, d, dtype=torch.float16) == 12 * 4096**2 * d
        assert flop_count(1024, 4096, d, local=False) == 20 * 1024 * 4096 * d
    assert flop_count(4096, 4096, 512, dtype=torch.float32) == 12 * 4096**2 * 512
    assert flop_count(4096, 4096, 1024) == (8 + 4 * 2) * 4096**2 * 1024  # two d-groups
    assert flop_count(4096, 4096, 768, dtype=torch.float32) == (8 + 4 * 2) * 4096**2 * 768


def test_triton_kernels_compile_for_sm90():
    """The real GPU compiler (Triton -> PTX -> ptxas, shipped with triton; no GPU
    needed) accepts the kernels - the interpreter does not catch everything it
    rejects (e.g. non-constexpr globals) - and they do not spill registers.
    Every launch variant at d = 512 and 768 (the tool's default set, ~15 s):
    which variant comes closest to spilling changes with the Triton version
    (under triton 3.6, bf16 local-rows at 512 and fp16 global-cols at 768 did)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton tests compile and run the kernels on it")
    pytest.importorskip("triton.backends.nvidia")
    import os
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "triton_sm90_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, tool, "--strict", "--dtypes", "bf16,fp16,fp32", "--dims", "512,768"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for dtype in ("bf16", "fp16", "fp32"):
        for d in (512, 768):
            assert r.stdout.count(f"| {dtype} | {d} |") == 6, r.stdout  # lse, lse lmean + 4 gradient variants


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def _good(b=4, d=8, n=10):
    return dict(img=feats(b, d), txt=feats(b, d), index=torch.arange(b), log_u_img=state(n), log_u_txt=state(n))


BAD = [
    ("txt", lambda a: a.update(txt=feats(5, 8)), ValueError, "txt has shape"),
    ("img dim", lambda a: a.update(img=feats(4, 8)[None], txt=feats(4, 8)[None]), ValueError, "img must be 2-D"),
    ("txt dtype", lambda a: a.update(txt=a["txt"].half()), TypeError, "txt has dtype"),
    ("img dtype", lambda a: a.update(img=a["img"].double(), txt=a["txt"].double()), TypeError, "img must be float32"),
    ("index len", lambda a: a.update(index=torch.arange(3)), ValueError, "index must be 1-D of length"),
    ("index dtype", lambda a: a.update(index=torch.arange(4).float()), TypeError, "index must be int64"),
    ("index range", lambda a: a.update(index=torch.tensor([0, 1, 2, 10])), IndexError, "index values must be in"),
    ("index neg", lambda a: a.update(index=torch.tensor([0, -1, 2, 3])), IndexError, "index values must be in"),
    ("state dtype", lambda a: a.update(log_u_img=state(10).double()), TypeError, "log_u_img must be float32"),
    ("state dim", lambda a: a.update(log_u_txt=state(10)[None]), ValueError, "log_u_txt must be 1-D"),
    ("state len", lambda a: a.update(log_u_txt=state(11)), ValueError, "log_u_txt has shape .* needs txt_index"),
    ("txt_index type", lambda a: a.update(txt_index=[0, 1, 2, 3]), TypeError, "txt_index must be a Tensor"),
    ("txt_index len", lambda a: a.update(txt_index=torch.arange(5)), ValueError, "txt_index must be 1-D of length"),
    ("txt_index dtype", lambda a: a.update(txt_index=torch.arange(4).float()), TypeError, "txt_index must be int64"),
    ("txt_index range", lambda a: a.update(txt_index=torch.tensor([0, 1, 2, 11]), log_u_txt=state(11)), IndexError,
     r"txt_index values must be in \[0, len\(log_u_txt\)\) = \[0, 11\)"),
    ("index range txt", lambda a: a.update(txt_index=torch.tensor([0, 1, 2, 10]), log_u_txt=state(11),
                                           index=torch.tensor([0, 1, 2, 10])), IndexError,
     r"index values must be in \[0, num_samples\) = \[0, 10\)"),
    ("tau", lambda a: a.update(tau=0.0), ValueError, "tau must be"),
    ("tau neg", lambda a: a.update(tau=-1.0), ValueError, "tau must be"),
    ("gamma 0", lambda a: a.update(gamma=0.0), ValueError, "gamma must be in"),
    ("gamma >1", lambda a: a.update(gamma=1.5), ValueError, "gamma must be in"),
    ("margin", lambda a: a.update(margin=-0.1), ValueError, "margin must be"),
    ("eps", lambda a: a.update(eps=0.0), ValueError, "eps must be"),
    ("all one", lambda a: a.update(all_img=feats(6, 8)), ValueError, "both all_img and all_txt"),
    ("all width", lambda a: a.update(all_img=feats(6, 9), all_txt=feats(6, 9)), ValueError, "all_img must be"),
    ("all dtype", lambda a: a.update(all_img=feats(6, 8).half(), all_txt=feats(6, 8)), TypeError, "all_img has dtype"),
    ("all shape", lambda a: a.update(all_img=feats(6, 8), all_txt=feats(7, 8)), ValueError, "all_txt has shape"),
    ("offset", lambda a: a.update(all_img=feats(6, 8), all_txt=feats(6, 8), offset=3), ValueError, "offset must be in"),
    ("offset local", lambda a: a.update(offset=1), ValueError, "offset must be 0"),
    ("meta device", lambda a: a.update(txt=a["txt"].to("meta")), ValueError, "txt is on meta"),
    ("index device", lambda a: a.update(index=a["index"].to("meta")), ValueError, "index is on meta"),
    ("state device", lambda a: a.update(log_u_img=state(10).to("meta")), ValueError, "log_u_img is on meta"),
    ("empty", lambda a: a.update(img=feats(0, 8), txt=feats(0, 8), index=torch.arange(0)), ValueError, "empty batch"),
    ("nan", lambda a: a.update(check_finite=True, img=a["img"].index_fill(0, torch.tensor([1]), float("nan"))),
     ValueError, "img contains NaN"),
    ("inf all", lambda a: a.update(check_finite=True, all_img=feats(6, 8), all_txt=torch.full((6, 8), math.inf)),
     ValueError, "all_txt contains NaN"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, mutate, exc, match = case
    args = dict(_good(), tau=0.1, gamma=0.5)
    mutate(args)
    with pytest.raises(exc, match=match):
        hgcl_loss(args.pop("img"), args.pop("txt"), args.pop("index"), args.pop("log_u_img"),
                  args.pop("log_u_txt"), **args)


def test_validate_false_skips_host_checks():
    a = _good()
    a["index"] = torch.tensor([0, 1, 9, 3])
    a["log_u_img"] = state(9)  # index 9 is out of range: found by the indexing itself, not by validate
    with pytest.raises(IndexError):
        hgcl_loss(a["img"], a["txt"], a["index"], a["log_u_img"], a["log_u_txt"][:9], tau=0.1, gamma=0.5,
                  validate=False, backend="torch")


def test_unknown_backend_is_an_error():
    a = _good()
    from vlmkern import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="cuda"):
        hgcl_loss(a["img"], a["txt"], a["index"], a["log_u_img"], a["log_u_txt"], tau=0.1, gamma=0.5,
                  backend="cuda")


def test_compiled_op_checks_arguments():
    require_backend("hgcl", "cpu", "cpu")
    with pytest.raises(RuntimeError, match="txt has shape"):
        torch.ops.vlmkern.hgcl_stats(feats(3, 4), feats(2, 4), None, None, 0, 0.1, 0.1, True)
    with pytest.raises(RuntimeError, match="index\\[1\\] = 7"):
        torch.ops.vlmkern.hgcl_state_update_(state(5), torch.tensor([0, 7]), torch.zeros(2), 0.5, 1e-14)


# --------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------


def test_module_state_dict_and_gamma():
    m = GlobalContrastiveLoss(20, tau=0.05, gamma=0.9, margin=0.1)
    b = 6
    img, txt = feats(b, 8), feats(b, 8)
    idx = torch.arange(b)
    ref = R.hgcl(img, txt, idx, m.log_u_img.clone(), m.log_u_txt.clone(), tau=0.05, gamma=0.9, margin=0.1)
    loss = m(img.requires_grad_(), txt, idx)
    loss.backward()
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    sd = m.state_dict()
    assert set(sd) == {"log_u_img", "log_u_txt"}
    m2 = GlobalContrastiveLoss(20, tau=0.05, gamma=0.9, margin=0.1)
    m2.load_state_dict(sd)
    assert torch.equal(m2.log_u_img, m.log_u_img) and torch.equal(m2.log_u_txt, m.log_u_txt)
    m2.gamma = R.fastclip_gamma(3, 0.9, 10)
    assert 0.9 < m2.gamma < 1.0
    with pytest.raises(ValueError, match="gamma must be in"):
        m2.gamma = 0.0
    assert "num_samples=20" in repr(m2)


# --------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------


def _op_args(b=7, d=12, local=True):
    img, txt = feats(b, d), feats(b, d)
    cols = (None, None) if local else (feats(b + 3, d), feats(b + 3, d))
    return img, txt, cols


@pytest.mark.parametrize("local", [True, False])
def test_opcheck_compiled_ops(local):
    require_backend("hgcl", "cpu", "cpu")
    img, txt, (ai, at) = _op_args(local=local)
    off = 0 if local else 2
    torch.library.opcheck(torch.ops.vlmkern.hgcl_stats.default, (img, txt, ai, at, off, 0.05, 0.1, True))
    torch.library.opcheck(torch.ops.vlmkern.hgcl_stats.default, (img, txt, ai, at, off, 0.05, 0.1, True, True))
    torch.library.opcheck(torch.ops.vlmkern.hgcl_stats.default, (img, txt, ai, at, off, 0.05, 0.0, False, True))
    ld = torch.rand(7) + 1.0
    torch.library.opcheck(torch.ops.vlmkern.hgcl_grad.default,
                          (img, txt, ai, at, ld, ld.clone(), torch.tensor(1.0), off, 0.05, 0.1, True))
    lu = state(12, [1, 2])
    # mutating op: schema / fake / autograd-registration checks (aot_dispatch needs functional outputs)
    torch.library.opcheck(torch.ops.vlmkern.hgcl_state_update_.default,
                          (lu, torch.tensor([3, 1, 0, 5, 2, 11, 9]), torch.randn(7), 0.7, 1e-14),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("local", [True, False])
def test_opcheck_triton_and_core_ops(local):
    dev = TRITON_DEVICE
    require_backend("hgcl", "triton", dev)
    img, txt, (ai, at) = _op_args(b=5, d=8, local=local)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    img, txt, ai, at = to(img), to(txt), to(ai), to(at)
    off = 0 if local else 1
    # test_aot_dispatch_dynamic is left out for the Triton ops on the CPU: under
    # TRITON_INTERPRET=1 the interpreter dereferences the traced (storage-less)
    # tensors ("invalid python storage"); on a GPU the full opcheck applies.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if dev == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    cast = lambda t, dt: None if t is None else t.to(dt)  # noqa: E731
    for dt in (torch.float32, torch.bfloat16):
        for lmean in (False, True):
            torch.library.opcheck(torch.ops.vlmkern.hgcl_stats_triton.default,
                                  (img.to(dt), txt.to(dt), cast(ai, dt), cast(at, dt), off, 0.05, 0.1, True, lmean),
                                  test_utils=utils)
    ld = torch.rand(5, device=dev) + 1.0
    torch.library.opcheck(torch.ops.vlmkern.hgcl_grad_triton.default,
                          (img, txt, ai, at, ld, ld.clone(), torch.ones((), device=dev), off, 0.05, 0.1, False),
                          test_utils=utils)
    req = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(torch.ops.vlmkern.hgcl_loss_core.default,
                          (req(img), req(txt), req(ai), req(at), ld, ld.clone(), off, 0.05, 0.1, True, "torch"))
    torch.library.opcheck(torch.ops.vlmkern.hgcl_loss_core.default,
                          (req(img), req(txt), req(ai), req(at), ld, ld.clone(), off, 0.05, 0.1, True, "triton"),
                          test_utils=utils)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Whole-graph capture of the loss (no graph break), forward and backward.
    AOTAutograd (``aot_eager``) traces the ops with fake tensors; under
    TRITON_INTERPRET=1 that tracing dereferences the storage-less tensors
    ("invalid python storage", as in opcheck's aot_dispatch test), so there the
    Triton ops are captured by Dynamo alone (``eager`` backend: the fake kernels
    propagate shapes, the ops run as traced).  On a GPU (CUDA tensors) the
    Triton path goes through aot_eager too."""
    dev = dev_of(backend)
    require_backend("hgcl", backend, dev)
    torch._dynamo.reset()
    compile_backend = "eager" if backend == "triton" and dev == "cpu" else "aot_eager"
    b, d, n = 9, 16, 20
    img, txt = feats(b, d, device=dev), feats(b, d, device=dev)
    idx = torch.randperm(n)[:b].to(dev)

    def step(a, t, i, u1, u2):
        return hgcl_loss(a, t, i, u1, u2, tau=0.05, gamma=0.8, margin=0.1, backend=backend, validate=False)

    e1, e2 = state(n, device=dev), state(n, device=dev)
    c1, c2 = state(n, device=dev), state(n, device=dev)
    ea, et = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ca, ct = img.clone().requires_grad_(), txt.clone().requires_grad_()
    le = step(ea, et, idx, e1, e2)
    le.backward()
    lc = torch.compile(step, fullgraph=True, backend=compile_backend)(ca, ct, idx, c1, c2)
    lc.backward()  # the compiled backward graph (AOTAutograd) runs the estimator
    assert torch.allclose(le, lc, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ea.grad, ca.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(torch.isneginf(e1), torch.isneginf(c1))
    assert torch.allclose(e1[idx], c1[idx], rtol=1e-6, atol=1e-6)


def test_torch_compile_inductor_forward_backward():
    """Inductor (C++ codegen on the CPU) around the loss, gradient through a linear layer."""
    require_backend("hgcl", "cpu", "cpu")
    torch._dynamo.reset()
    b, d, n = 8, 12, 16
    lin = torch.nn.Linear(d, d)
    x, y = torch.randn(b, d), torch.randn(b, d)
    idx = torch.arange(b)

    def f(x, y, u1, u2):
        img = Fn.normalize(lin(x), dim=1)
        txt = Fn.normalize(lin(y), dim=1)
        return hgcl_loss(img, txt, idx, u1, u2, tau=0.1, gamma=0.5, margin=0.1, validate=False)

    e1, e2, c1, c2 = state(n), state(n), state(n), state(n)
    le = f(x, y, e1, e2)
    (ge,) = torch.autograd.grad(le, [lin.weight])
    lc = torch.compile(f, fullgraph=True)(x, y, c1, c2)
    (gc,) = torch.autograd.grad(lc, [lin.weight])
    assert torch.allclose(le, lc, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ge, gc, rtol=1e-4, atol=1e-6)
    assert torch.allclose(e1[idx], c1[idx], rtol=1e-5, atol=1e-6)


def test_info_reports_hgcl():
    import vlmkern

    tab = vlmkern.info()["backends"]["hgcl"]["cpu"]
    assert tab["torch"] == "live"
    assert "cuda" in tab and tab["cuda"] != "live"
    assert set(DEVICES) <= set(vlmkern.info()["backends"]["hgcl"])
    # no CUDA kernels: CUDA tensors take Triton, and the registry says why
    ok, why = vlmkern.backends.availability("hgcl", "cuda", "cuda")
    assert not ok and "no compiled cuda kernel" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inf-CL's kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_plain_clip_matches_infcl(dtype):
    """The peer of the GPU benchmark computes the same thing: vlmkern's GCL with
    gamma = 1, no hinge and eps = 1/(B-1) is 2 tau x (CLIP loss - log(B-1)) and
    its gradients 2 tau x the CLIP loss's (the ClipLoss identity above); Inf-CL's
    ``cal_inf_loss`` in both directions gives that CLIP loss.  Inf-CL casts the
    features to fp32 and its dots may use TF32, hence the loose tolerance.
    (``bench/gpu_check.sh`` carries the inf-cl wheel; skipped without it.)  Checked
    on the CPU once, with Inf-CL 1.2.1 under TRITON_INTERPRET=1 (its TF32
    rounding asm removed, asserts off): fp32 gradients agree to 2e-7, bf16 to 3e-3."""
    inf_cl = pytest.importorskip("inf_cl")
    require_backend("hgcl", "triton", "cuda")
    # d: a multiple of Inf-CL's head_dim (256).  b: a multiple of its 64-row blocks - its backward
    # reads lse / dlse past the end unmasked, and padding rows then give 0 * inf = NaN in dk (seen
    # under the interpreter, where such reads return stale memory).
    b, d, tau = 768, 512, 0.05
    img = feats(b, d).to("cuda", dtype)
    txt = feats(b, d).to("cuda", dtype)
    a, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = hgcl_loss(a, t, torch.arange(b, device="cuda"), state(b, device="cuda"), state(b, device="cuda"),
                     tau=tau, gamma=1.0, margin=None, eps=1.0 / (b - 1), backend="triton")
    loss.backward()
    ai, at = img.clone().requires_grad_(), txt.clone().requires_grad_()
    cl = 0.5 * (inf_cl.cal_inf_loss(ai, at, scale=1.0 / tau) + inf_cl.cal_inf_loss(at, ai, scale=1.0 / tau))
    cl.backward()
    tol = 5e-3 if dtype == torch.float32 else 3e-2
    assert abs(loss.item() - 2 * tau * (cl.item() - math.log(b - 1))) < tol * 2 * tau * max(1.0, abs(cl.item()))
    assert rel_err(a.grad.float(), 2 * tau * ai.grad.float()) < tol
    assert rel_err(t.grad.float(), 2 * tau * at.grad.float()) < tol


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_region_gives_the_same_loss_state_and_gradients(backend, dtype):
    """Inside an autocast region (open_clip calls the loss inside --precision amp)
    the op keeps its own fp32 accumulation: same bits as outside it."""
    require_backend("hgcl", backend, "cpu")
    g = torch.Generator().manual_seed(11)
    img0 = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1).to(dtype)
    txt0 = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1).to(dtype)
    out = []
    for amp in (True, False):
        loss_fn = GlobalContrastiveLoss(20, tau=0.05, gamma=0.8, backend=backend)
        img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            loss = loss_fn(img, txt, torch.arange(9) * 2)
        loss.backward()
        out.append((loss.detach(), img.grad, txt.grad, loss_fn.log_u_img.clone(), loss_fn.log_u_txt.clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)
