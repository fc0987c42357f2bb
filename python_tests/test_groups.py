"""APFT layer groups come from the module structure, never from name substrings."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vlmkern.app.models.groups import apft_phases, clip_layer_groups, set_trainable_phase  # noqa: E402


def tiny_clip(vlayers=3, tlayers=2):
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=vlayers, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=tlayers),
    )


def test_every_parameter_in_exactly_one_group():
    m = tiny_clip()
    g = clip_layer_groups(m)
    ids = [id(p) for p in g.all_params()]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert len(g.visual_blocks) == 3 and len(g.text_blocks) == 2
    name = lambda p: g.names[id(p)]  # noqa: E731
    assert {name(p) for p in g.projections} == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias",
                                                  "text_projection", "ln_final.weight", "ln_final.bias", "logit_scale"}
    assert {name(p) for p in g.visual_frontend} == {"visual.class_embedding", "visual.positional_embedding",
                                                      "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"}
    assert {name(p) for p in g.text_frontend} == {"token_embedding.weight", "positional_embedding"}
    # block 1 of the text tower is not block 1 of the vision tower (the substring bug)
    assert all(name(p).startswith("transformer.resblocks.1.") for p in g.text_blocks[1])
    assert all(name(p).startswith("visual.transformer.resblocks.1.") for p in g.visual_blocks[1])


def test_phases_unfreeze_outside_in():
    m = tiny_clip()
    g = clip_layer_groups(m)
    phases = apft_phases(g)
    assert len(phases) == 1 + 3 + 1  # projections, 3 block phases (vision deeper), frontends
    f0 = set_trainable_phase(m, phases, 0)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {g.names[id(p)] for p in g.projections}
    f1 = set_trainable_phase(m, phases, 1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.2.") for n in trainable)
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("transformer.resblocks.0.") for n in trainable)
    f_last = set_trainable_phase(m, phases, len(phases) - 1)
    assert f0 < f1 < f_last == 1.0
    with pytest.raises(ValueError, match="phase"):
        set_trainable_phase(m, phases, 99)
