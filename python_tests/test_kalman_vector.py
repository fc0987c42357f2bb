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
