"""WeightPerturbation on embedding matrices (sparse-gradient layers, SPEC §4, issue 18).

A batch touches a few rows of a token embedding; layerwise normalisation would put
``gamma * ||W||`` of the whole matrix onto them. The default (``embeddings="per_row"``)
normalises every used row by its own norm; ``"exclude"`` leaves embeddings alone;
``"layer"`` is the old whole-matrix behaviour. Checked against the float64 reference
(:func:`vlmkern.reference.awp_perturbation`, one row = one tensor) on every backend the
wrapper can call here: the compiled CPU kernels, the CUDA kernels on the emulator, and
the PyTorch fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vlmkern import reference as R
from vlmkern.optim import WeightPerturbation
from vlmkern.optim.weight_perturbation import used_rows

from conftest import CUDA_EMU, backend_or_emu, require_backend

V, D, USED = 300, 8, (3, 7, 11, 42, 43, 299)


class TinyText(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, 3)

    def forward(self, tokens):
        return self.proj(self.emb(tokens).mean(1))


def batch(seed=1, n=16, length=5):
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(USED)
    tokens = used[torch.randint(0, len(USED), (n, length), generator=g)]
    return tokens, torch.randint(0, 3, (n,), generator=g)


def recording_closure(model, x, y, seen):
    """Closure that records the weights every time it runs (the 2nd call sees w + v)."""
    def closure():
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    return closure


@pytest.fixture(params=["cpu", CUDA_EMU, "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        return "torch"
    require_backend("awp", "cpu", "cpu")
    return backend_or_emu(request.param, "awp", monkeypatch)


def _first_grads(model, x, y):
    m = copy.deepcopy(model)
    nn.functional.cross_entropy(m(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in m.named_parameters()}


@pytest.mark.parametrize("sign", [+1, -1])
def test_per_row_is_the_default_and_matches_the_reference(backend, sign):
    x, y = batch()
    model = TinyText()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    g0 = _first_grads(model, x, y)
    gamma = 0.05
    wp = WeightPerturbation(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=gamma, sign=sign,
                            backend=backend)
    assert wp.embeddings == "per_row" and wp.embedding_names == ["emb.weight"]
    seen = []
    wp.step(recording_closure(model, x, y, seen))
    assert wp.last_step_kind == "adversarial" and len(seen) == 2
    pert = seen[1]
    rows = used_rows(g0["emb.weight"])
    assert rows.tolist() == sorted(USED)
    assert wp.last_row_counts[id(model.emb.weight)] == len(USED)
    # every used row: the float64 reference with that row as a tensor of its own
    ref = R.awp_perturbation([w0["emb.weight"][r] for r in rows], [g0["emb.weight"][r] for r in rows],
                             gamma=gamma, sign=sign)
    for r, v in zip(rows.tolist(), ref):
        torch.testing.assert_close(pert["emb.weight"][r].double(), w0["emb.weight"][r].double() + v,
                                   rtol=0, atol=1e-6)
        moved = (pert["emb.weight"][r] - w0["emb.weight"][r]).norm() / w0["emb.weight"][r].norm()
        assert abs(moved.item() - gamma) < 1e-4  # each used row moves by gamma of its own norm
    unused = torch.ones(V, dtype=torch.bool)
    unused[rows] = False
    assert torch.equal(pert["emb.weight"][unused], w0["emb.weight"][unused])  # bit for bit
    # dense weights: layerwise, as before
    (v,) = R.awp_perturbation([w0["proj.weight"]], [g0["proj.weight"]], gamma=gamma, sign=sign)
    torch.testing.assert_close(pert["proj.weight"].double(), w0["proj.weight"].double() + v, rtol=0, atol=1e-6)
    assert torch.equal(pert["proj.bias"], w0["proj.bias"])
    # exact restore: lr 0 leaves every weight bit for bit where it was
    for k, t in model.state_dict().items():
        assert torch.equal(t, w0[k]), k


def test_layer_mode_concentrates_the_whole_matrix_norm_on_the_used_rows(backend):
    """The pitfall per_row removes: the used rows move by ~sqrt(V / k) x gamma of their own norm."""
    x, y = batch()
    moved = {}
    for mode in ("per_row", "layer"):
        model = TinyText()
        w0 = model.emb.weight.detach().clone()
        wp = WeightPerturbation(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=0.01, embeddings=mode,
                                backend=backend)
        seen = []
        wp.step(recording_closure(model, x, y, seen))
        rows = list(USED)
        moved[mode] = ((seen[1]["emb.weight"][rows] - w0[rows]).norm() / w0[rows].norm()).item()
        assert torch.equal(model.emb.weight, w0)
    assert abs(moved["per_row"] - 0.01) < 2e-3
    assert moved["layer"] > 3 * moved["per_row"]  # sqrt(300 / 6) ~ 7 for rows of similar norm
    # "layer" is exactly the whole-matrix reference
    model = TinyText()
    g0 = _first_grads(model, x, y)
    (v,) = R.awp_perturbation([model.emb.weight], [g0["emb.weight"]], gamma=0.01)
    assert abs(v[list(USED)].norm().item() / model.emb.weight[list(USED)].norm().item() - moved["layer"]) < 1e-4


def test_exclude_leaves_embeddings_alone(backend):
    x, y = batch()
    model = TinyText()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    wp = WeightPerturbation(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=0.05, embeddings="exclude",
                            backend=backend)
    assert wp.perturbed_names == ["proj.weight"] and wp.embedding_names == []
    seen = []
    wp.step(recording_closure(model, x, y, seen))
    assert torch.equal(seen[1]["emb.weight"], w0["emb.weight"])
    assert not torch.equal(seen[1]["proj.weight"], w0["proj.weight"])


def test_per_row_full_step_matches_hand_written_algorithm(backend):
    """AdamW after the perturbed pass: the same weights as the algorithm by hand with the reference."""
    x, y = batch()
    a = TinyText()
    b = copy.deepcopy(a)
    gamma, lr = 0.02, 1e-2
    wp = WeightPerturbation(a, torch.optim.AdamW(a.parameters(), lr=lr), gamma=gamma, backend=backend)
    for _ in range(2):
        wp.step(recording_closure(a, x, y, []))
    opt_b = torch.optim.AdamW(b.parameters(), lr=lr)
    for _ in range(2):
        g0 = _first_grads(b, x, y)
        saved = {k: p.detach().clone() for k, p in b.named_parameters()}
        rows = used_rows(g0["emb.weight"])
        with torch.no_grad():
            ref = R.awp_perturbation([b.emb.weight[r] for r in rows], [g0["emb.weight"][r] for r in rows],
                                     gamma=gamma)
            for r, v in zip(rows.tolist(), ref):
                b.emb.weight[r] = (b.emb.weight[r].double() + v).float()
            (v,) = R.awp_perturbation([b.proj.weight], [g0["proj.weight"]], gamma=gamma)
            b.proj.weight.copy_((b.proj.weight.double() + v).float())
        opt_b.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            for k, p in b.named_parameters():
                p.copy_(saved[k])
        opt_b.step()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=k)


def test_embedding_names_without_a_module_and_bad_mode():
    x, y = batch()
    model = TinyText()
    named = list(model.named_parameters())
    wp = WeightPerturbation(named, torch.optim.SGD(model.parameters(), lr=0.0), gamma=0.05,
                            embedding_names=["emb.weight"])
    assert wp.embedding_names == ["emb.weight"]
    w0 = model.emb.weight.detach().clone()
    seen = []
    wp.step(recording_closure(model, x, y, seen))
    assert wp.last_row_counts[id(model.emb.weight)] == len(USED)
    changed = (seen[1]["emb.weight"] != w0).any(1).nonzero().reshape(-1).tolist()
    assert changed == sorted(USED)
    # a plain list without names: nothing is treated as an embedding (no module to read)
    wp2 = WeightPerturbation(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.0), gamma=0.05)
    assert wp2.embedding_names == []
    with pytest.raises(ValueError, match="embeddings must be one of"):
        WeightPerturbation(model, torch.optim.SGD(model.parameters(), lr=0.0), embeddings="rows")
