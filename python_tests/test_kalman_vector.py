"""Vector-observation Kalman step (SPEC §3, M observations per step): the op
against the float64 reference, the textbook Kalman filter / recursive least
squares where a diagonal P is exact, a closed-form EKF step for logistic
regression, and evidence that P learns (it does not under the scalar form)."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkern
from vlmkern import reference as R
from vlmkern.optim import KalmanOptimizer

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _problem(shapes, M, dtype, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [(scale * torch.randn((M, *s), generator=g)).to(dtype) for s in shapes]
    variances = [torch.rand(s, generator=g) * 0.5 + 0.01 for s in shapes]
    e = torch.randn(M, generator=g)
    Rn = torch.rand(M, generator=g) + 0.1
    return params, grads, variances, e, Rn


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("gate", [None, 0.5])
def test_matches_reference(dtype, M, gate):
    shapes = [(7, 5), (33,), (1,), (0, 3), (2, 3, 4)]
    params, grads, variances, e, Rn = _problem(shapes, M, dtype, seed=M * 10 + (gate is not None))
    kw = dict(process_noise=1e-3, forgetting=0.98, var_floor=1e-6, gate_chi2=gate)
    ref = R.kalman_step_vector(params, grads, variances, e, Rn, **kw)
    S = vlmkern.kalman_step_(params, grads, variances, e, Rn, **kw)
    assert S.shape == (M, M) and S.dtype == torch.float32
    assert _rel(S, ref.S) < 1e-5
    tol = TOL[dtype]
    for w, v, rw, rv in zip(params, variances, ref.params, ref.variances):
        if w.numel():
            # one rounding to the parameter dtype on top of fp32 math
            assert float((w.double() - rw).abs().max()) <= tol * float(rw.abs().max()) + 1e-6
            assert _rel(v, rv) < 1e-4


def test_m1_vector_equals_scalar_form():
    params, grads, variances, e, Rn = _problem([(9, 4), (5,)], 1, torch.float32, seed=3)
    p2 = [p.clone() for p in params]
    v2 = [v.clone() for v in variances]
    S_vec = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=1e-4)
    S_sc = vlmkern.kalman_step_(p2, [g[0] for g in grads], v2, e[0], Rn[0], process_noise=1e-4)
    assert torch.allclose(S_vec[0, 0], S_sc, rtol=1e-6)
    for a, b in zip(params + variances, p2 + v2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_scalar_parameter_equals_textbook_kalman_filter_and_rls():
    """n = 1, M = 6 observations per step: S is a full 6 x 6 matrix, and a
    diagonal P is the exact covariance, so the op must equal the textbook
    filter (information form) over many steps; with q = 0, lambda = 1 that is
    recursive least squares, whose estimate is the batch least-squares one."""
    g = torch.Generator().manual_seed(0)
    theta_true, r = 1.7, 0.25
    theta = torch.zeros(1)
    p = torch.full((1,), 10.0)
    th_kf, p_kf = 0.0, 10.0
    X, Y = [], []
    for _ in range(20):
        x = torch.randn(6, generator=g, dtype=torch.float64)
        y = theta_true * x + math.sqrt(r) * torch.randn(6, generator=g, dtype=torch.float64)
        # observation b: y_b = x_b theta + noise; H_b = x_b; innovation y - x theta
        e = (y - x * float(theta)).float()
        vlmkern.kalman_step_([theta], [x.float()[:, None]], [p], e, r, process_noise=0.0)
        # textbook, information form
        p_new = 1.0 / (1.0 / p_kf + float((x * x).sum()) / r)
        th_kf = th_kf + p_new * float((x * (y - x * th_kf)).sum()) / r
        p_kf = p_new
        X.append(x), Y.append(y)
        assert abs(float(theta) - th_kf) < 1e-5 * max(1.0, abs(th_kf))
        assert abs(float(p) - p_kf) < 1e-4 * p_kf  # fp32: p_hat - p_hat^2 h S^-1 h cancels (p shrinks 400x)
    X, Y = torch.cat(X), torch.cat(Y)
    # RLS with prior variance p0 = 10 around 0 == ridge regression with penalty r / p0
    ridge = float((X * Y).sum() / ((X * X).sum() + r / 10.0))
    assert abs(float(theta) - ridge) < 1e-5


def test_diagonal_observations_equal_textbook_filter_with_process_noise():
    """Observation b sees parameter b only (H = diag(x)): the textbook filter's
    covariance stays diagonal, so the diagonal filter is exact, with q and lambda."""
    g = torch.Generator().manual_seed(1)
    n, q, lam, r = 5, 1e-2, 0.9, 0.3
    theta = torch.zeros(n)
    p = torch.ones(n)
    th = torch.zeros(n, dtype=torch.float64)
    P = torch.eye(n, dtype=torch.float64)
    for _ in range(10):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        y = torch.randn(n, generator=g, dtype=torch.float64)
        H = torch.diag(x)
        e = y - H @ th
        vlmkern.kalman_step_([theta], [H.float()], [p], (y - x * theta.double()).float(), r,
                             process_noise=q, forgetting=lam, var_floor=0.0)
        Ph = P + q * torch.eye(n, dtype=torch.float64)
        S = H @ Ph @ H.T + r * torch.eye(n, dtype=torch.float64)
        K = Ph @ H.T @ torch.linalg.inv(S)
        th = th + K @ e
        P = (Ph - K @ H @ Ph) / lam
        assert torch.allclose(theta.double(), th, rtol=1e-5, atol=1e-6)
        assert torch.allclose(p.double(), torch.diagonal(P), rtol=1e-5, atol=1e-7)


def test_logistic_regression_closed_form_ekf_step():
    """One EKF step for logistic regression with a scalar weight per feature
    group, written in matrix form (K = P H^T S^-1) with the observation
    y_b ~ sigmoid(x_b . theta), H_b = s_b (1 - s_b) x_b, R_b = s_b (1 - s_b)."""
    g = torch.Generator().manual_seed(2)
    M = 8
    x = torch.randn(M, generator=g, dtype=torch.float64)
    y = (torch.rand(M, generator=g) < 0.5).double()
    theta0, p0 = 0.3, 2.0
    s = torch.sigmoid(x * theta0)
    H = (s * (1 - s) * x)[:, None]  # [M, 1]
    Rb = s * (1 - s)
    S = H @ H.T * p0 + torch.diag(Rb)
    K = p0 * H.T @ torch.linalg.inv(S)  # [1, M]
    th_ekf = theta0 + float(K @ (y - s))
    p_ekf = p0 - float(K @ H) * p0
    theta = torch.tensor([theta0])
    p = torch.tensor([p0])
    vlmkern.kalman_step_([theta], [H.float()], [p], (y - s).float(), Rb.float(), process_noise=0.0)
    assert abs(float(theta) - th_ekf) < 1e-5
    assert abs(float(p) - p_ekf) < 1e-5


def test_covariance_learns_with_vector_observations_not_with_scalar():
    """Linear regression, 256 parameters, 40 steps of 32 samples: per-sample
    observations shrink P (mean |log p/p0| well above 0); one scalar
    observation per step (the batch loss) gains less than one unit of
    information per step, sum_i (p_hat_i - p_i) / p_hat_i = s / (s + R) < 1, so
    its mean |log p/p0| stays near steps / n (SPEC §3)."""
    g = torch.Generator().manual_seed(4)
    n, B, p0, r = 256, 32, 0.3, 1.0
    w_true = torch.randn(n, generator=g) / math.sqrt(n)
    tv, pv = torch.zeros(n), torch.full((n,), p0)
    ts, ps = torch.zeros(n), torch.full((n,), p0)
    for _ in range(40):
        X = torch.randn(B, n, generator=g)
        y = X @ w_true + 0.1 * torch.randn(B, generator=g)
        vlmkern.kalman_step_([tv], [X], [pv], y - X @ tv, r, process_noise=0.0)
        # scalar form: observe the batch loss L = mean (y - X t)^2 / 2, target 0
        resid = y - X @ ts
        loss = 0.5 * (resid * resid).mean()
        h = -(X * resid[:, None]).mean(0)
        vlmkern.kalman_step_([ts], [h], [ps], -loss, r, process_noise=0.0)
    moved_vec = float((pv / p0).log().abs().mean())
    moved_sc = float((ps / p0).log().abs().mean())
    steps = 40
    assert moved_sc < 1.2 * steps / n, moved_sc  # ~ -log(1 - 1/n) per step at most, summed
    assert moved_vec > 1.0 and moved_vec > 10 * moved_sc, (moved_vec, moved_sc)
    # and the vector filter has learned the weights
    assert float((tv - w_true).norm() / w_true.norm()) < 0.3


@pytest.mark.parametrize("where", ["grad", "innovation", "found_inf", "obs_noise"])
def test_bad_values_skip_the_step(where):
    params, grads, variances, e, Rn = _problem([(6, 3), (4,)], 4, torch.float32, seed=5)
    fi = None
    if where == "grad":
        grads[1][2, 1] = math.nan
    elif where == "innovation":
        e[0] = math.inf
    elif where == "found_inf":
        fi = torch.ones(1)
    else:
        Rn[3] = -1.0
    before = [t.clone() for t in params + variances]
    S = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=1e-3, found_inf=fi)
    assert torch.isnan(S).all()
    for a, b in zip(params + variances, before):
        assert torch.equal(a, b)


def test_bad_shapes_name_the_argument():
    params, grads, variances, e, Rn = _problem([(6, 3), (4,)], 4, torch.float32, seed=6)
    with pytest.raises(ValueError, match=r"grads\[1\] must have shape \[M, \*params\[1\]\.shape\]"):
        vlmkern.kalman_step_(params, [grads[0], grads[1][:3]], variances, e, Rn, process_noise=0.0)
    with pytest.raises(ValueError, match="obs_noise must be"):
        vlmkern.kalman_step_(params, grads, variances, e, Rn[:2], process_noise=0.0)
    with pytest.raises(ValueError, match="innovation has 0 observations"):
        vlmkern.kalman_step_(params, [g[:0] for g in grads], variances, e[:0], 1.0, process_noise=0.0)


# ---------------------------------------------------------------------------
# KalmanOptimizer(observation="per_sample")
# ---------------------------------------------------------------------------


def test_per_sample_optimizer_step_is_the_vector_op_with_per_sample_jacobians():
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(5, 1)
    X = torch.randn(8, 5, generator=g)
    y = torch.randn(8, generator=g)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = KalmanOptimizer(lin.parameters(), p0=0.2, obs_noise0=0.5, observation="per_sample")
    losses = opt.step(lambda: 0.5 * (lin(X)[:, 0] - y) ** 2)
    assert losses.shape == (8,)
    # by hand: Jacobian rows d loss_b / d theta = r_b * (x_b, 1)
    r = (X @ W0[0] + b0 - y)
    W, b = W0.clone(), b0.clone()
    vW, vb = torch.full_like(W, 0.2), torch.full_like(b, 0.2)
    S = vlmkern.kalman_step_([W, b], [(r[:, None] * X)[:, None, :], r[:, None]], [vW, vb],
                             -(0.5 * r * r), torch.tensor(0.5), process_noise=0.0)
    assert torch.allclose(lin.weight, W, atol=1e-6) and torch.allclose(lin.bias, b, atol=1e-6)
    assert torch.allclose(opt.state[lin.weight]["variance"], vW, atol=1e-7)
    assert torch.allclose(opt.last_S, S, rtol=1e-6)
    e = -(0.5 * r * r)
    R_expected = max(0.9 * 0.5 + 0.1 * float((e * e - (torch.diagonal(S) - 0.5)).clamp(min=0).mean()), 1e-8)
    assert abs(float(opt.obs_noise) - R_expected) < 1e-6


def test_per_sample_optimizer_learns_a_classifier_and_its_covariance():
    g = torch.Generator().manual_seed(8)
    n_in, n_cls = 10, 3
    centers = 2.0 * torch.randn(n_cls, n_in, generator=g)
    model = torch.nn.Linear(n_in, n_cls)
    opt = KalmanOptimizer(model.parameters(), p0=0.05, observation="per_sample")
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    first = None
    for _ in range(30):
        yb = torch.randint(0, n_cls, (16,), generator=g)
        xb = centers[yb] + torch.randn(16, n_in, generator=g)
        losses = opt.step(lambda: ce(model(xb), yb))
        first = float(losses.mean()) if first is None else first  # losses come back detached
        assert bool(opt.last_step_taken)
    yt = torch.randint(0, n_cls, (256,), generator=g)
    xt = centers[yt] + torch.randn(256, n_in, generator=g)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
        final = float(ce(model(xt), yt).mean())
    assert final < 0.5 * first and acc > 0.8, (first, final, acc)
    moved = float((opt.state[model.weight]["variance"] / 0.05).log().abs().mean())
    assert moved > 0.5, moved


def test_per_sample_closure_must_return_losses_with_graph():
    lin = torch.nn.Linear(3, 1)
    opt = KalmanOptimizer(lin.parameters(), observation="per_sample")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="per-sample losses as a non-empty 1-D tensor"):
        opt.step(lambda: lin(x).sum())
    with pytest.raises(ValueError, match="carry no graph"):
        opt.step(lambda: lin(x)[:, 0].detach())
    with pytest.raises(ValueError, match="observation must be"):
        KalmanOptimizer(lin.parameters(), observation="outputs")


# ---------------------------------------------------------------------------
# KalmanOptimizer.step_per_sample: the torch.func route (vmap(grad) over samples)
# ---------------------------------------------------------------------------


class _Tower(torch.nn.Module):
    """A frozen base with a trainable low-rank adapter and a shared 'class
    prompt' table (no batch input), like LoRA on CLIP with class prompts;
    attention over a per-sample token set, optional dropout."""

    def __init__(self, d=8, n_cls=5, dropout=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.base = torch.nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(0.3 * torch.randn(2, d, generator=g))
        self.b = torch.nn.Parameter(0.3 * torch.randn(d, 2, generator=g))
        self.attn = torch.nn.MultiheadAttention(d, 2, batch_first=True)
        self.attn.requires_grad_(False)
        self.classes = torch.nn.Parameter(torch.randn(n_cls, d, generator=g))
        self.drop = torch.nn.Dropout(dropout)

    def encode(self, x):  # x [B, T, d]
        h = self.base(x) + self.drop(x @ self.a.T) @ self.b.T
        h, _ = self.attn(h, h, h, need_weights=False)
        return h.mean(1)

    def logits(self, x):
        return self.encode(x) @ torch.tanh(self.classes).T


def _ce(model, x, y):
    return torch.nn.functional.cross_entropy(model.logits(x), y, reduction="none")


def _tower_batch(M=6, seed=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, 4, 8, generator=g), torch.randint(0, 5, (M,), generator=g)


def test_per_sample_jacobian_rows_equal_the_batched_backward_rows():
    from vlmkern.optim import per_sample_jacobian

    model = _Tower()
    x, y = _tower_batch()
    params = [model.a, model.b, model.classes]
    rows, losses = per_sample_jacobian(model, params, _ce, x, y)
    ref_losses = _ce(model, x, y)
    ref = torch.autograd.grad(ref_losses, params, grad_outputs=torch.eye(6), is_grads_batched=True)
    assert torch.allclose(losses, ref_losses.detach(), atol=1e-6)
    for r, h in zip(rows, ref):
        assert r.shape == h.shape and r.dtype == h.dtype
        assert torch.allclose(r, h, atol=1e-5, rtol=1e-5), float((r - h).abs().max())
    assert model.a.grad is None and model.base.weight.grad is None  # nothing leaks into .grad
    # chunked vmap gives the same rows
    rows_c, _ = per_sample_jacobian(model, params, _ce, x, y, chunk_size=4)
    for r, rc in zip(rows, rows_c):
        assert torch.allclose(r, rc, atol=1e-6)


def test_step_per_sample_equals_the_closure_route():
    torch.manual_seed(0)
    fast, slow = _Tower(), _Tower()
    slow.load_state_dict(fast.state_dict())
    kw = dict(p0=0.05, obs_noise0=0.5, process_noise=1e-4, observation="per_sample")
    o_fast = KalmanOptimizer([fast.a, fast.b, fast.classes], **kw)
    o_slow = KalmanOptimizer([slow.a, slow.b, slow.classes], **kw)
    for step in range(3):
        x, y = _tower_batch(seed=20 + step)
        lf = o_fast.step_per_sample(fast, _ce, x, y)
        ls = o_slow.step(lambda: _ce(slow, x, y))
        assert torch.allclose(lf, ls, atol=1e-5)
        assert bool(o_fast.last_step_taken)
    for pf, ps in zip([fast.a, fast.b, fast.classes], [slow.a, slow.b, slow.classes]):
        assert torch.allclose(pf, ps, atol=1e-5)
        assert torch.allclose(o_fast.state[pf]["variance"], o_slow.state[ps]["variance"], rtol=1e-4, atol=1e-8)
        assert not torch.equal(o_fast.state[pf]["variance"], torch.full_like(pf, 0.05))  # P moved
    assert abs(float(o_fast.obs_noise) - float(o_slow.obs_noise)) < 1e-5


def test_step_per_sample_rows_match_on_the_method_checks_clip():
    """The real use: LoRA on the method check's tiny open_clip CLIP, loss
    against the class prompts (text tower unbatched)."""
    pytest.importorskip("open_clip")
    from vlmkern.app.bench import kalman_method_check as K
    from vlmkern.app.models.lora import add_lora, lora_parameters
    from vlmkern.optim import per_sample_jacobian

    model = K.tiny_clip(0)
    add_lora(model, rank=2, alpha=4)
    model.train()
    params = lora_parameters(model)
    tokens = K.prompts()
    y = torch.tensor([0, 5, 11, 23])
    x = K.render(y, torch.Generator().manual_seed(1), shifted=True)
    # LoRA B starts at zero: move it so that every row is non-trivial
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def loss(m, xb, yb):
        return torch.nn.functional.cross_entropy(K.class_logits(m, xb, tokens), yb, reduction="none")

    rows, losses = per_sample_jacobian(model, params, loss, x, y)
    ref = torch.autograd.grad(loss(model, x, y), params, grad_outputs=torch.eye(4), is_grads_batched=True)
    scale = max(float(h.abs().max()) for h in ref)
    assert scale > 0
    for r, h in zip(rows, ref):
        assert float((r - h).abs().max()) <= 1e-4 * scale


def test_step_per_sample_randomness_dropout():
    """Dropout under vmap: 'different' draws a mask per sample (two copies of
    one sample get different rows), 'same' one mask for all (identical rows),
    'error' refuses the random op."""
    from vlmkern.optim import per_sample_jacobian

    model = _Tower(dropout=0.5).train()
    x, y = _tower_batch(M=1)
    x2, y2 = x.expand(2, -1, -1).contiguous(), y.expand(2).contiguous()
    torch.manual_seed(3)
    rd, _ = per_sample_jacobian(model, [model.a], _ce, x2, y2, randomness="different")
    assert not torch.allclose(rd[0][0], rd[0][1])
    rs, _ = per_sample_jacobian(model, [model.a], _ce, x2, y2, randomness="same")
    assert torch.equal(rs[0][0], rs[0][1])
    with pytest.raises(RuntimeError, match="randomness"):
        per_sample_jacobian(model, [model.a], _ce, x2, y2, randomness="error")
    model.eval()  # no dropout: every setting gives the rows of the batched backward
    r0, _ = per_sample_jacobian(model, [model.a], _ce, x2, y2, randomness="error")
    assert torch.allclose(r0[0][0], r0[0][1])


def test_step_per_sample_under_bf16_autocast():
    model = _Tower()
    x, y = _tower_batch()
    params = [model.a, model.b, model.classes]
    from vlmkern.optim import per_sample_jacobian

    def loss(m, xb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _ce(m, xb, yb).float()

    rows, _ = per_sample_jacobian(model, params, loss, x, y)
    ref = torch.autograd.grad(loss(model, x, y), params, grad_outputs=torch.eye(6), is_grads_batched=True)
    for r, h in zip(rows, ref):
        assert r.dtype == torch.float32
        assert float((r - h).abs().max()) <= 3e-2 * float(h.abs().max())


@pytest.mark.parametrize("route", ["step_per_sample", "closure"])
def test_per_sample_nonfinite_rows_skip_the_step(route):
    """An fp16 overflow in one sample's forward makes its Jacobian row (and
    loss) non-finite: the step is skipped on the device -- parameters,
    variances and R bit for bit unchanged -- and the next good step is taken."""
    lin = torch.nn.Linear(4, 1)
    opt = KalmanOptimizer(lin.parameters(), p0=0.1, observation="per_sample")
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)

    def loss(m, xb, yb):  # the residual in fp16, as under fp16 autocast
        r = (m(xb)[:, 0] - yb).half() * 30.0
        return (r * r).float() / 900.0

    def good():
        if route == "step_per_sample":
            opt.step_per_sample(lin, loss, x, y)
        else:
            opt.step(lambda: loss(lin, x, y))

    good()
    assert bool(opt.last_step_taken)
    before = [t.detach().clone() for t in (lin.weight, lin.bias, opt.state[lin.weight]["variance"],
                                            opt.state[lin.bias]["variance"], opt.obs_noise)]
    xb = x.clone()
    xb[2] = 1e3  # (30 * residual)^2 overflows fp16 for this sample only
    if route == "step_per_sample":
        opt.step_per_sample(lin, loss, xb, y)
    else:
        opt.step(lambda: loss(lin, xb, y))
    assert not bool(opt.last_step_taken)
    after = (lin.weight, lin.bias, opt.state[lin.weight]["variance"], opt.state[lin.bias]["variance"], opt.obs_noise)
    for a, b in zip(after, before):
        assert torch.equal(a.detach(), b)
    good()
    assert bool(opt.last_step_taken)


def test_step_per_sample_errors_name_the_argument():
    model = _Tower()
    x, y = _tower_batch()
    scalar = KalmanOptimizer([model.a])
    with pytest.raises(ValueError, match="observation='per_sample'"):
        scalar.step_per_sample(model, _ce, x, y)
    opt = KalmanOptimizer([model.a, torch.nn.Parameter(torch.zeros(3))], observation="per_sample")
    with pytest.raises(ValueError, match=r"params\[1\].*not parameters of module"):
        opt.step_per_sample(model, _ce, x, y)
    opt = KalmanOptimizer([model.a], observation="per_sample")
    with pytest.raises(ValueError, match=r"batch\[1\] has 5 samples"):
        opt.step_per_sample(model, _ce, x, y[:5])
    with pytest.raises(ValueError, match="one-element tensor"):
        opt.step_per_sample(model, lambda m, xb, yb: m.logits(xb), x, y)
    with pytest.raises(ValueError, match="randomness must be"):
        opt.step_per_sample(model, _ce, x, y, randomness="per_sample")
    with pytest.raises(ValueError, match="chunk_size"):
        opt.step_per_sample(model, _ce, x, y, chunk_size=0)
    with pytest.raises(TypeError, match=r"batch\[0\] must be a tensor"):
        opt.step_per_sample(model, _ce, [1, 2], y)


def test_method_check_summary_standard_errors_and_target():
    pytest.importorskip("open_clip")
    from vlmkern.app.bench.kalman_method_check import summarise

    runs = [{"optimizer": "kalman-ps", "hp": 0.1, "seconds": 1.0, "mean_abs_log_p_over_p0": m,
             "acc": {0: 0.2, 10: a10, 20: a20}} for m, a10, a20 in [(0.5, 0.5, 0.6), (0.7, 0.3, 0.4), (0.6, 0.4, 0.5)]]
    runs.append({"optimizer": "adamw", "hp": 1e-3, "seconds": 1.0, "acc": {0: 0.2, 10: 0.2, 20: 0.3}})
    rows = {r["optimizer"]: r for r in summarise(runs)}
    ps = rows["kalman-ps"]
    assert ps["target"] == pytest.approx(0.9 * 0.6)
    aucs = [(0.2 + 0.5 + 0.6) / 3, (0.2 + 0.3 + 0.4) / 3, (0.2 + 0.4 + 0.5) / 3]
    mean = sum(aucs) / 3
    sd = (sum((a - mean) ** 2 for a in aucs) / 2) ** 0.5
    assert ps["auc_mean"] == pytest.approx(mean) and ps["auc_se"] == pytest.approx(sd / 3 ** 0.5)
    assert ps["reached"] == 1 and ps["iters_to_target"] == 20  # only the first seed reaches 0.54, at 20
    assert ps["mean_abs_log_p_over_p0"] == pytest.approx(0.6)
    assert rows["adamw"]["reached"] == 0 and rows["adamw"]["iters_to_target"] is None
    assert rows["adamw"]["mean_abs_log_p_over_p0"] is None


def test_jacobian_bench_runs(tmp_path):
    pytest.importorskip("open_clip")
    import json

    from vlmkern.app.bench.kalman_jacobian_bench import main

    out = main(["--M", "2", "--routes", "scalar", "vmap-math", "--reps", "1", "--threads", str(torch.get_num_threads()),
                "--out", str(tmp_path / "j.json")])
    row = out["rows"][0]
    assert row["M"] == 2 and row["vmap-math_ms"] > 0 and row["step_per_sample_ms"] > 0
    assert "step_closure_ms" not in row  # only timed with the batched route
    assert json.loads((tmp_path / "j.json").read_text())["rows"][0]["M"] == 2


# ---------------------------------------------------------------------------
# The compiled op kalman_vector_step_ (CPU kernel: csrc/kalman/kalman_vector_cpu.cpp)
# against the float64 reference and the torch backend
# ---------------------------------------------------------------------------

from conftest import require_backend  # noqa: E402

VEC_BACKENDS = ["cpu", "torch"]
# sizes: empty, one element, 2-D, odd, 3-D, several blocks (64) and chunks (2048) of the CPU kernel
ODD_SHAPES = [(0,), (1,), (7, 5), (33,), (2, 3, 4), (4099,)]


def _d2_ref(S, e):
    e = e.double()
    return float(e @ torch.linalg.solve(S, e))


@pytest.mark.parametrize("backend", VEC_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 3, 17, 96])
@pytest.mark.parametrize("gate", [False, True])
def test_backend_matches_reference_odd_sizes(backend, dtype, M, gate):
    require_backend("kalman", backend, "cpu")
    params, grads, variances, e, Rn = _problem(ODD_SHAPES, M, dtype, seed=1000 + M + gate, scale=0.05)
    kw = dict(process_noise=1e-3, forgetting=0.98, var_floor=1e-6)
    if gate:  # a threshold at half the innovation's d2: the gate acts
        kw["gate_chi2"] = 0.5 * _d2_ref(R.kalman_step_vector(params, grads, variances, e, Rn, **kw).S, e)
    ref = R.kalman_step_vector(params, grads, variances, e, Rn, **kw)
    S, d2 = vlmkern.kalman_step_(params, grads, variances, e, Rn, backend=backend, return_mahalanobis=True, **kw)
    assert S.shape == (M, M) and S.dtype == torch.float32 and d2.shape == () and d2.dtype == torch.float32
    assert _rel(S, ref.S) < 1e-5
    d2r = _d2_ref(ref.S, e)
    assert abs(float(d2) - d2r) <= 1e-4 * d2r, (float(d2), d2r)
    tol = TOL[dtype]
    for w, v, rw, rv in zip(params, variances, ref.params, ref.variances):
        if w.numel():
            assert float((w.double() - rw).abs().max()) <= tol * float(rw.abs().max()) + 1e-6
            assert _rel(v, rv) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [3, 32])
def test_cpu_kernel_agrees_with_torch_backend(dtype, M):
    require_backend("kalman", "cpu", "cpu")
    shapes = [(130, 3), (1,), (65,), (5, 2, 7)]
    pa, g, va, e, Rn = _problem(shapes, M, dtype, seed=M)
    pb, vb = [p.clone() for p in pa], [v.clone() for v in va]
    kw = dict(process_noise=1e-4, forgetting=0.99, var_floor=1e-8, gate_chi2=2.0)
    Sa, da = vlmkern.kalman_step_(pa, g, va, e, Rn, backend="cpu", return_mahalanobis=True, **kw)
    Sb, db = vlmkern.kalman_step_(pb, g, vb, e, Rn, backend="torch", return_mahalanobis=True, **kw)
    torch.testing.assert_close(Sa, Sb, rtol=1e-6, atol=1e-6 * float(Sb.abs().max()))  # off-diagonals cancel
    torch.testing.assert_close(da, db, rtol=1e-4, atol=0)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=1e-6)
    for a, b in zip(va, vb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_cpu_kernel_non_contiguous_and_expanded_inputs():
    require_backend("kalman", "cpu", "cpu")
    M = 5
    params, grads, variances, e, Rn = _problem([(9, 6), (70,)], M, torch.float32, seed=21)
    # transposed views of params / variances / grads, obs_noise as one number
    pt = [params[0].t().contiguous().t(), params[1]]
    vt = [variances[0].t().contiguous().t(), variances[1]]
    gt = [grads[0].transpose(1, 2).contiguous().transpose(1, 2), grads[1]]
    assert not pt[0].is_contiguous() and not gt[0].is_contiguous()
    ref = R.kalman_step_vector(params, grads, variances, e, 0.7, process_noise=1e-3)
    S = vlmkern.kalman_step_(pt, gt, vt, e, 0.7, process_noise=1e-3, backend="cpu")
    assert _rel(S, ref.S) < 1e-5
    for w, v, rw, rv in zip(pt, vt, ref.params, ref.variances):
        assert _rel(w, rw) < 1e-5 and _rel(v, rv) < 1e-4


@pytest.mark.parametrize("backend", VEC_BACKENDS)
@pytest.mark.parametrize("gate", [None, 1.0])
def test_grad_scale_power_of_two_is_the_unscaled_step_and_found_inf_zero_steps(backend, gate):
    require_backend("kalman", backend, "cpu")
    params, grads, variances, e, Rn = _problem([(40, 3), (7,)], 6, torch.float32, seed=31)
    pa, va = [p.clone() for p in params], [v.clone() for v in variances]
    pb, vb = [p.clone() for p in params], [v.clone() for v in variances]
    kw = dict(process_noise=1e-3, gate_chi2=gate, backend=backend, return_mahalanobis=True)
    Sa, da = vlmkern.kalman_step_(pa, grads, va, e, Rn, **kw)
    scale = 1024.0
    Sb, db = vlmkern.kalman_step_(pb, [g * scale for g in grads], vb, e, Rn, grad_scale=torch.tensor([scale]),
                                  found_inf=torch.zeros(1), **kw)
    if backend == "cpu":  # scaling by 2^k is exact all the way through the kernel
        assert torch.equal(Sa, Sb) and torch.equal(da, db)
        for a, b in zip(pa + va, pb + vb):
            assert torch.equal(a, b)
    else:
        torch.testing.assert_close(Sa, Sb)
        for a, b in zip(pa + va, pb + vb):
            torch.testing.assert_close(a, b)


def _non_pd_problem():
    """Two identical observations and R below fp32's resolution of the Gram: S = [[4, 4], [4, 4]] exactly."""
    params = [torch.zeros(4)]
    grads = [torch.ones(2, 4)]
    variances = [torch.ones(4)]
    return params, grads, variances, torch.tensor([1.0, -1.0]), torch.tensor([1e-30, 1e-30])


@pytest.mark.parametrize("backend", VEC_BACKENDS)
@pytest.mark.parametrize("where", ["nan_grad", "inf_grad_bf16", "neg_variance", "nan_variance", "found_inf",
                                   "grad_scale_zero", "nan_innovation", "obs_noise_zero", "non_pd"])
def test_skipped_step_leaves_state_bit_identical_and_returns_nan(backend, where, monkeypatch):
    require_backend("kalman", backend, "cpu")
    monkeypatch.setenv("VLMKERN_DEBUG_POISON_OUTPUTS", "1")
    dtype = torch.bfloat16 if where.endswith("bf16") else torch.float32
    params, grads, variances, e, Rn = _problem([(6, 3), (70,), (0,)], 4, dtype, seed=41)
    extra = {}
    if where == "nan_grad":
        grads[1][2, 66] = math.nan
    elif where == "inf_grad_bf16":
        grads[0][3, 5, 2] = math.inf
    elif where == "neg_variance":
        variances[1][69] = -1e-3
    elif where == "nan_variance":
        variances[0][0, 0] = math.nan
    elif where == "found_inf":
        extra["found_inf"] = torch.ones(1)
    elif where == "grad_scale_zero":
        extra["grad_scale"] = torch.zeros(1)
    elif where == "nan_innovation":
        e[2] = math.nan
    elif where == "obs_noise_zero":
        Rn[1] = 0.0
    else:
        params, grads, variances, e, Rn = _non_pd_problem()
    before = [t.clone() for t in params + variances]
    S, d2 = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=0.0 if where == "non_pd" else 1e-3,
                                 gate_chi2=3.0, backend=backend, return_mahalanobis=True, **extra)
    assert torch.isnan(S).all() and torch.isnan(d2)
    for a, b in zip(params + variances, before):
        assert a.view(torch.int16 if a.element_size() == 2 else torch.int32).equal(
            b.view(torch.int16 if b.element_size() == 2 else torch.int32))  # bit for bit, NaN payloads too


@pytest.mark.parametrize("backend", VEC_BACKENDS)
def test_taken_step_writes_every_output_under_poisoning(backend, monkeypatch):
    require_backend("kalman", backend, "cpu")
    monkeypatch.setenv("VLMKERN_DEBUG_POISON_OUTPUTS", "1")
    from vlmkern.kernels import outputs

    monkeypatch.setattr(outputs, "POISON", True)
    params, grads, variances, e, Rn = _problem([(5, 5), (3,)], 7, torch.float32, seed=51)
    S, d2 = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=1e-3, backend=backend,
                                 return_mahalanobis=True)
    assert torch.isfinite(S).all() and torch.isfinite(d2)
    if backend == "cpu":
        assert torch.equal(S, S.T)  # the kernel writes both triangles from one
    # the empty list: S = diag(R), d2 = sum e^2 / R
    S0, d0 = vlmkern.kalman_step_([], [], [], e, Rn, process_noise=0.0, backend=backend, return_mahalanobis=True)
    torch.testing.assert_close(S0, torch.diag(Rn))
    torch.testing.assert_close(d0, (e * e / Rn).sum())


def test_cpu_kernel_is_independent_of_the_thread_count():
    require_backend("kalman", "cpu", "cpu")
    shapes = [(3000,), (64, 33), (1,), (5000,), (7,)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params, grads, variances, e, Rn = _problem(shapes, 24, torch.float32, seed=61)
            S, d2 = vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=1e-3, gate_chi2=1.0,
                                         backend="cpu", return_mahalanobis=True)
            results.append([S, d2] + params + variances)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_return_mahalanobis_scalar_form():
    params, grads, variances, _, _ = _problem([(9, 4)], 1, torch.float32, seed=71)
    g0 = [g[0] for g in grads]
    e, Rn = torch.tensor(-0.8), torch.tensor(0.3)
    S, d2 = vlmkern.kalman_step_(params, g0, variances, e, Rn, process_noise=1e-4, return_mahalanobis=True)
    assert S.shape == () and d2.shape == ()
    assert torch.equal(d2, e * e / S)
    S, d2 = vlmkern.kalman_step_(params, g0, variances, e, Rn, process_noise=1e-4, return_mahalanobis=True,
                                 found_inf=torch.ones(()))
    assert torch.isnan(S) and torch.isnan(d2)


@pytest.mark.parametrize("gate", [None, 3.0])
def test_opcheck_vector_op(gate):
    require_backend("kalman", "cpu", "cpu")
    M = 3
    params = [torch.randn(5, 3), torch.randn(7).bfloat16()]
    grads = [torch.randn(M, 5, 3), torch.randn(M, 7).bfloat16()]
    variances = [torch.full((5, 3), 0.1), torch.full((7,), 0.1)]
    args = (params, grads, variances, torch.randn(M), torch.full((M,), 0.5), 1e-3, 0.9, 1e-8, gate)
    torch.library.opcheck(torch.ops.vlmkern.kalman_vector_step_.default, args)
    torch.library.opcheck(torch.ops.vlmkern.kalman_vector_step_.default, args,
                          kwargs=dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0)))


def test_compiled_op_checks_name_the_argument():
    """A direct torch.ops call (no Python checks) is refused before any memory is touched."""
    require_backend("kalman", "cpu", "cpu")
    op = torch.ops.vlmkern.kalman_vector_step_
    M = 3
    p, v = [torch.zeros(4), torch.zeros(2, 2)], [torch.ones(4), torch.ones(2, 2)]
    g = [torch.zeros(M, 4), torch.zeros(M, 2, 2)]
    e, Rn = torch.zeros(M), torch.ones(M)
    with pytest.raises(RuntimeError, match=r"grads\[1\] must have shape \[M, \*params\[1\]\.shape\]"):
        op(p, [g[0], torch.zeros(M, 4)], v, e, Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have shape"):
        op(p, [torch.zeros(M + 1, 4), g[1]], v, e, Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="grads has 1 tensors"):
        op(p, g[:1], v, e, Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the dtype of params\[0\]"):
        op(p, [g[0].half(), g[1]], v, e, Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"variances\[1\] must be float32"):
        op(p, g, [v[0], v[1].double()], e, Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="innovation must be \\[M\\]"):
        op(p, g, v, e[None], Rn, 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="obs_noise must be \\[M\\]"):
        op(p, g, v, e, Rn[:2], 0.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_scale must be"):
        op(p, g, v, e, Rn, 0.0, 1.0, 0.0, None, torch.ones(2))
    with pytest.raises(RuntimeError, match="found_inf must be float32"):
        op(p, g, v, e, Rn, 0.0, 1.0, 0.0, None, None, torch.zeros((), dtype=torch.int32))


def test_public_vector_checks_name_the_argument():
    params, grads, variances, e, Rn = _problem([(6, 3), (4,)], 4, torch.float32, seed=81)
    with pytest.raises(TypeError, match=r"grads\[0\] must have the dtype of params\[0\]"):
        vlmkern.kalman_step_(params, [grads[0].double(), grads[1]], variances, e, Rn, process_noise=0.0,
                             backend="cpu")
    with pytest.raises(TypeError, match=r"variances\[1\] must be float32"):
        vlmkern.kalman_step_(params, grads, [variances[0], variances[1].half()], e, Rn, process_noise=0.0)
    with pytest.raises(ValueError, match="forgetting"):
        vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=0.0, forgetting=0.0)
    with pytest.raises(ValueError, match="gate_chi2"):
        vlmkern.kalman_step_(params, grads, variances, e, Rn, process_noise=0.0, gate_chi2=-1.0)


@pytest.mark.parametrize("backend", VEC_BACKENDS)
def test_per_sample_optimizer_gate_and_noise_use_the_ops_d2(backend):
    """The optimizer takes d2 = e^T S^-1 e from the op (no second factorisation):
    gate flag d2 > chi2, R updated with the gated innovation e sqrt(chi2 / d2)."""
    require_backend("kalman", backend, "cpu")
    g = torch.Generator().manual_seed(91)
    lin = torch.nn.Linear(6, 1)
    X = torch.randn(5, 6, generator=g)
    y = 3.0 * torch.randn(5, generator=g)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    chi2 = 0.05
    opt = KalmanOptimizer(lin.parameters(), p0=0.2, obs_noise0=0.5, observation="per_sample", gate_chi2=chi2,
                          backend=backend)
    opt.step(lambda: 0.5 * (lin(X)[:, 0] - y) ** 2)
    r = X @ W0[0] + b0 - y
    e = -(0.5 * r * r)
    W, b = W0.clone(), b0.clone()
    S, d2 = vlmkern.kalman_step_([W, b], [(r[:, None] * X)[:, None, :], r[:, None]],
                                 [torch.full_like(W, 0.2), torch.full_like(b, 0.2)], e, torch.tensor(0.5),
                                 process_noise=0.0, gate_chi2=chi2, backend=backend, return_mahalanobis=True)
    assert float(d2) > chi2 and bool(opt.last_gated)
    assert torch.allclose(lin.weight, W, atol=1e-6) and torch.allclose(lin.bias, b, atol=1e-6)
    eg = e * math.sqrt(chi2 / float(d2))
    R_expected = max(0.9 * 0.5 + 0.1 * float((eg * eg - (torch.diagonal(S) - 0.5)).clamp(min=0).mean()), 1e-8)
    assert abs(float(opt.obs_noise) - R_expected) < 1e-6 * max(1.0, R_expected)
