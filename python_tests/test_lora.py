"""Tests of ``vlmkern.app.models.lora`` on tiny open_clip models built offline."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vlmkern.app.models import lora as L  # noqa: E402


def tiny_clip(custom: bool = False, seed: int = 0):
    """A 2-layer CLIP (32x32 images, 16-token text); ``custom`` uses open_clip's
    custom blocks (own Attention class, LayerNorm inside the MLP) and CustomTextCLIP."""
    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0)
    text = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=2, mlp_ratio=2.0)
    if custom:
        vision.update(scale_fc=True, qk_norm=True)
        text.update(scale_fc=True)
        model = open_clip.model.CustomTextCLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
    else:
        model = open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(1, 999, (4, 16), generator=g)
    return images, text


def _forward(model):
    images, text = _inputs()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def _randomise_B(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in L.lora_modules(model):
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


@pytest.mark.parametrize("custom", [False, True], ids=["clip", "custom_text_clip"])
def test_adapters_initially_identity_and_only_adapters_trainable(custom):
    model = tiny_clip(custom)
    before = _forward(model)
    n_base = sum(p.numel() for p in model.parameters())
    cfg = L.add_lora(model, rank=4, alpha=8)
    after = _forward(model)
    for a, b in zip(before, after):
        assert torch.equal(a, b)  # B = 0: exactly the base model
    # 2 towers x 2 blocks x 4 targets
    assert len(cfg.adapted) == 16 and len(list(L.lora_modules(model))) == 16
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {id(p) for p in L.lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    # every block of both towers got all four adapters
    assert sum(".visual." in f".{a}" for a in cfg.adapted) == 8
    # nothing of the base model went missing; the adapter sizes are as expected
    n_lora = sum(p.numel() for p in L.lora_parameters(model))
    assert sum(p.numel() for p in model.parameters()) == n_base + n_lora
    # per block: qkv 3*(4*32 + 32*4), out 4*32+32*4, fc 4*32+64*4, proj 4*64+32*4
    assert n_lora == 4 * (3 * 256 + 256 + 384 + 384)


@pytest.mark.parametrize("custom", [False, True], ids=["clip", "custom_text_clip"])
def test_adapters_change_output_and_gradients_reach_them(custom):
    model = tiny_clip(custom)
    base = _forward(model)
    L.add_lora(model, rank=2, alpha=4)
    _randomise_B(model)
    out = _forward(model)
    assert not torch.allclose(out[0], base[0]) and not torch.allclose(out[1], base[1])
    images, text = _inputs()
    model.train()
    loss = model.encode_image(images).square().sum() + model.encode_text(text).square().sum()
    loss.backward()
    for name, m in L.lora_modules(model):
        assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0, name
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("custom", [False, True], ids=["clip", "custom_text_clip"])
def test_merge_unmerge_exact(custom):
    model = tiny_clip(custom)
    L.add_lora(model, rank=4, alpha=8)
    _randomise_B(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapted = _forward(model)
    L.merge_lora(model)
    assert L.is_merged(model)
    merged = _forward(model)
    for a, b in zip(adapted, merged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, base_weights[n])]
    assert len(changed) == 16  # every adapted base weight absorbed its delta
    L.merge_lora(model)  # idempotent
    torch.testing.assert_close(_forward(model)[0], merged[0])
    L.unmerge_lora(model)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)
    for a, b in zip(adapted, _forward(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_save_load_adapters_only(tmp_path):
    model = tiny_clip()
    L.add_lora(model, rank=3, alpha=6, targets=("attn_qkv", "mlp_proj"), towers=("visual", "text"))
    _randomise_B(model)
    want = _forward(model)
    path = tmp_path / "adapters.pt"
    L.save_lora(model, path)
    blob = torch.load(path, weights_only=True)
    assert set(blob["state"]) == set(L.lora_state_dict(model))
    n_saved = sum(t.numel() for t in blob["state"].values())
    assert n_saved == sum(p.numel() for p in L.lora_parameters(model))  # no base weights in the file
    # fresh base model (same base weights), adapters added from the file's config
    fresh = tiny_clip()
    cfg = L.load_lora(fresh, path)
    assert cfg.rank == 3 and cfg.targets == ("attn_qkv", "mlp_proj")
    for a, b in zip(want, _forward(fresh)):
        assert torch.equal(a, b)
    # loading into a merged model keeps it merged and correct
    other = tiny_clip()
    L.add_lora(other, rank=3, alpha=6, targets=("attn_qkv", "mlp_proj"))
    L.merge_lora(other)
    L.load_lora(other, path)
    assert L.is_merged(other)
    for a, b in zip(want, _forward(other)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # mismatching adapters are refused
    wrong = tiny_clip()
    L.add_lora(wrong, rank=2, alpha=4)
    with pytest.raises(ValueError, match="do not match"):
        L.load_lora(wrong, path)
    with pytest.raises(KeyError, match="missing keys"):
        L.load_lora_state_dict(wrong, {})


def test_selection_and_errors():
    model = tiny_clip()
    cfg = L.add_lora(model, rank=2, alpha=2, targets=("attn_out",), towers=("text",))
    assert len(cfg.adapted) == 2 and all(a.startswith("transformer.") for a in cfg.adapted)
    assert all(not n.startswith("visual.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="already has LoRA"):
        L.add_lora(model)
    for kw, msg in [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                    ({"targets": ("q",)}, "targets"), ({"towers": ("audio",)}, "towers")]:
        with pytest.raises(ValueError, match=msg):
            L.add_lora(tiny_clip(), **kw)
    with pytest.raises(ValueError, match="no visual tower"):
        L.add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_dropout_only_in_training():
    model = tiny_clip()
    L.add_lora(model, rank=2, alpha=4, dropout=0.5, targets=("mlp_fc",))
    _randomise_B(model)
    model.eval()
    a, b = _forward(model), _forward(model)
    assert torch.equal(a[0], b[0])
    model.train()
    images, _ = _inputs()
    with torch.no_grad():
        assert not torch.equal(model.encode_image(images), model.encode_image(images))


def test_kalman_optimizer_trains_lora_adapters():
    """End to end: the Kalman optimizer moves only the adapters and lowers a loss."""
    from vlmkern.optim import KalmanOptimizer

    model = tiny_clip()
    L.add_lora(model, rank=2, alpha=4)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, text = _inputs()
    target = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    opt = KalmanOptimizer(L.lora_parameters(model), p0=1.0, obs_noise0=1.0)

    def closure():
        opt.zero_grad()
        loss = (model.encode_image(images) - target).square().mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(15)]
    assert losses[-1] < 0.6 * losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n
