"""The embedded synthetic world is deterministic and has the structure the tasks need."""

import torch

from vlmkern.app.data import synthetic as S


def test_pairs_deterministic_with_holdout_and_duplicates():
    a = S.pairs(50, seed=3, image_size=16, holdout=[("circle", "red")], dup_frac=0.3)
    b = S.pairs(50, seed=3, image_size=16, holdout=[("circle", "red")], dup_frac=0.3)
    assert [a.caption(i) for i in range(50)] == [b.caption(i) for i in range(50)]
    assert torch.equal(a[7][0], b[7][0]) and a[7][2] == 7
    assert all((x.shape, x.colour) != ("circle", "red") for x in a.attrs)
    assert len(set(a.attrs)) < 50  # near-duplicates present
    img = a[0][0]
    assert img.shape == (3, 16, 16)
    raw = S.render(a.attrs[0], 16, 3, 0)
    assert 0 <= raw.min() and raw.max() <= 1 and torch.allclose(S.normalize(raw), img)


def test_render_differs_by_attribute():
    base = S.Attrs("square", "red", "large", "centre")
    x = S.render(base, 32, 0, 0)
    assert x[0].mean() > x[2].mean()  # red
    y = S.render(S.Attrs("square", "blue", "large", "centre"), 32, 0, 0)
    assert y[2].mean() > y[0].mean()
    small = S.render(S.Attrs("square", "red", "small", "centre"), 32, 0, 0)
    assert (x[0] > 0.7).sum() > 2 * (small[0] > 0.7).sum()


def test_labelled_long_tail_and_cir():
    tr, va = S.labelled(400, 48, seed=1, image_size=16, num_classes=12)
    counts = torch.bincount(torch.tensor(tr.labels), minlength=12)
    assert counts.min() >= 1 and counts.max() > 5 * counts.min()
    assert torch.bincount(torch.tensor(va.labels)).tolist() == [4] * 12
    assert len(tr.prompts()) == 12
    cir = S.cir_triplets(20, seed=2, image_size=16, gallery_size=40)
    assert len(cir.gallery) >= 40
    ref, text, tgt, ri, ti = cir[0]
    assert ri != ti and text.startswith(("make it", "move it"))
