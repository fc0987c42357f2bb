"""Real images from installed packages (vlmkern.app.data.real).

The file-format parsers (idx, Tux Paint stamp folders) are tested on tiny
fabricated fixtures, so they run everywhere. The installed data is tested as
well: scikit-learn's digits and the scikit-learn / scikit-image photographs
always (both packages are in requirements-dev.txt), Fashion-MNIST and the Tux
Paint stamps when their Debian packages are installed (skipped, with the
reason, when not).
"""

from __future__ import annotations

import gzip
import os
import socket
import struct

import numpy as np
import pytest
import torch

from vlmkern.app.data import real as R
from vlmkern.app.data.synthetic import normalize
from vlmkern.app.eval.metrics import frequency_groups


def _status(name):
    return next(s for s in R.sources() if s["name"] == name)


def _skip_unless(name):
    s = _status(name)
    if not s["available"]:
        pytest.skip(f"{name} not installed ({s['why']}); install: {s['how_to_install']}")


def _write_idx(path, arr: np.ndarray, code: int, compress: bool):
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def _fake_fashion(root, n_train_per_class=6, n_test_per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        rng.shuffle(labels)
        # class c's images are uniformly c * 25 (so an image tells its label)
        images = (labels[:, None, None] * 25 + np.zeros((1, 28, 28), np.uint8)).astype(np.uint8)
        _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), images, 0x08, True)
        _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), labels, 0x08, True)
    return root


def _png(path, size, colour, alpha_box=None):
    from PIL import Image

    w, h = size
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    x0, y0, x1, y1 = alpha_box or (0, 0, w, h)
    for x in range(x0, x1):
        for y in range(y0, y1):
            im.putpixel((x, y), colour + (255,))
    im.save(path)


def _fake_stamps(root):
    """animals: 5 stamps (one in a sub-folder, one with a variant), food: 3; plus what must be ignored."""
    spec = {
        "animals/frog": "A frog.", "animals/frog-1": "A frog.", "animals/birds/owl": "An owl.",
        "animals/birds/duck": "A duck.", "animals/fish/trout": "A trout.",
        "food/apple": "A red apple.", "food/fruit/pear": "A pear.", "food/fruit/plum": "A plum.",
    }
    for rel, cap in spec.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _png(path + ".png", (40, 20), (230, 20, 20), (5, 2, 35, 18))
        with open(path + ".txt", "w", encoding="utf-8") as f:
            f.write(f"{cap}\nfr.utf8=Une traduction.\nzh_TW.utf8=青蛙\nca@valencia.utf8=Una granota.\n")
    with open(os.path.join(root, "animals/frog.dat"), "w") as f:
        f.write("noflip\n")
    open(os.path.join(root, "animals/frog.ogg"), "wb").close()
    _png(os.path.join(root, "animals/frog_mirror.png"), (8, 8), (0, 255, 0))          # pre-mirrored copy
    os.makedirs(os.path.join(root, "cartoon/tux"))
    _png(os.path.join(root, "cartoon/tux/tux.png"), (8, 8), (0, 0, 0))                # no description
    with open(os.path.join(root, "food/cheese.txt"), "w") as f:                       # SVG-only stamp
        f.write("Cheese.\n")
    open(os.path.join(root, "food/cheese.svg"), "w").close()
    _png(os.path.join(root, "loose.png"), (8, 8), (0, 0, 255))                         # no category
    with open(os.path.join(root, "loose.txt"), "w") as f:
        f.write("Loose.\n")
    return spec


# ---------------------------------------------------------------------------------------------------- idx format


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    a = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    p = str(tmp_path / ("a.idx.gz" if compress else "a.idx"))
    _write_idx(p, a, 0x08, compress)
    b = R.read_idx(p)
    assert b.dtype == np.uint8 and b.shape == (3, 4, 5) and np.array_equal(a, b)
    c = np.array([[-7, 1 << 20], [3, -(1 << 30)]], dtype=np.int32)
    _write_idx(str(tmp_path / "c.idx"), c, 0x0C, False)
    d = R.read_idx(str(tmp_path / "c.idx"))
    assert d.dtype.byteorder in ("=", "|", "<") and np.array_equal(c, d)
    f = np.array([1.5, -2.25], dtype=np.float32)
    _write_idx(str(tmp_path / "f.idx"), f, 0x0D, False)
    assert np.array_equal(R.read_idx(str(tmp_path / "f.idx")), f)


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab")
    with pytest.raises(ValueError, match="magic"):
        R.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x42\x01" + struct.pack(">I", 2) + b"ab")
    with pytest.raises(ValueError, match="type code"):
        R.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">I", 2))
    with pytest.raises(ValueError, match="truncated"):
        R.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"abcde")  # 6 bytes promised
    with pytest.raises(ValueError, match="6 bytes"):
        R.read_idx(str(p))


def test_fashion_loader_on_fabricated_files(tmp_path):
    root = _fake_fashion(str(tmp_path / "fm"))
    x, y = R.load_fashion_arrays("train", root)
    assert x.shape == (60, 28, 28) and np.bincount(y).tolist() == [6] * 10
    tr, va = R.fashion_labelled(root=root, val_per_class=2, long_tail=True, zipf=1.0, image_size=16)
    # head = 6 (all of the smallest class), rank r gets round(6 / (r + 1)), at least 1
    assert sorted(tr.counts(), reverse=True) == [6, 3, 2, 2, 1, 1, 1, 1, 1, 1]
    assert [tr.counts()[c] for c in range(10)] == [R.long_tail_counts(10, 6, 1.0)[r] for r in tr.class_rank]
    assert va.counts() == [2] * 10
    for ds in (tr, va):
        img, label, i = ds[len(ds) - 1]
        assert img.shape == (3, 16, 16) and i == len(ds) - 1
        raw = ds.render(i)
        assert torch.allclose(raw, torch.full_like(raw, label * 25 / 255), atol=1e-6)  # pixels tell the label
        assert torch.allclose(normalize(raw), img)
    pairs = R.caption_pairs(["fashion"], fashion_dir=root, split="val", per_source=None)
    assert len(pairs) == 30
    for i in range(len(pairs)):
        label = int(round(pairs.render(i)[0, 0, 0].item() * 255 / 25))
        assert R.FASHION_PHRASES[label] in pairs.caption(i)


# ---------------------------------------------------------------------------------------------------- Tux Paint format


def test_parse_stamp_caption(tmp_path):
    p = tmp_path / "s.txt"
    p.write_bytes("\ufeffA frog.\nfr.utf8=Une grenouille.\n".encode("utf-8"))
    assert R.parse_stamp_caption(str(p)) == "A frog."
    p.write_text("\n   A  very   big\tdog.  \nde.utf8=Ein Hund.\n", encoding="utf-8")
    assert R.parse_stamp_caption(str(p)) == "A very big dog."
    p.write_text("A US “Sacagawea” dollar ($1.00).\n", encoding="utf-8")
    assert R.parse_stamp_caption(str(p)) == "A US “Sacagawea” dollar ($1.00)."
    p.write_text("pt_BR.utf8=Um sapo.\nfr.utf8=Une grenouille.\n", encoding="utf-8")
    assert R.parse_stamp_caption(str(p)) is None
    p.write_text("\n\n", encoding="utf-8")
    assert R.parse_stamp_caption(str(p)) is None


def test_scan_stamps_and_loaders_on_fabricated_tree(tmp_path):
    root = str(tmp_path / "stamps")
    spec = _fake_stamps(root)
    stamps = R.scan_stamps(root)
    rels = [os.path.relpath(s.path, root)[:-4] for s in stamps]
    assert rels == sorted(spec, key=lambda r: r + ".png")  # no mirror, no undescribed, no SVG-only, nothing loose in the root
    by = {os.path.relpath(s.path, root)[:-4]: s for s in stamps}
    assert by["animals/birds/owl"].caption == "An owl." and by["animals/birds/owl"].category == "animals"
    assert by["animals/birds/owl"].group == "birds" and by["animals/frog"].group == ""
    assert by["food/fruit/plum"].name == "plum"

    tr, va = R.tuxpaint_labelled(root=root, val_per_class=1, image_size=24)
    assert tr.classes == ["animals", "food"] and tr.counts() == [4, 2] and va.counts() == [1, 1]
    assert tr.prompts() == ["a picture of an animal.", "a picture of food."]
    img, label, i = tr[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32
    raw = tr.render(0)
    assert 0 <= raw.min() and raw.max() <= 1 and torch.allclose(normalize(raw), img)

    pairs = R.caption_pairs(["tuxpaint"], tuxpaint_dir=root, split="all", image_size=24)
    assert sorted(pairs.captions) == sorted(spec.values())
    tr_p = R.caption_pairs(["tuxpaint"], tuxpaint_dir=root, split="train", val_frac=0.25)
    va_p = R.caption_pairs(["tuxpaint"], tuxpaint_dir=root, split="val", val_frac=0.25)
    assert len(tr_p) == 6 and len(va_p) == 2
    assert not {s.path for s in tr_p.stamps} & {s.path for s in va_p.stamps}


def test_render_stamp_composites_on_contrasting_background(tmp_path):
    red = R.Stamp(str(tmp_path / "red.png"), "A red box.", "x", "", "red")
    _png(red.path, (40, 20), (230, 20, 20), (0, 0, 40, 20))
    white = R.Stamp(str(tmp_path / "white.png"), "A white box.", "x", "", "white")
    _png(white.path, (20, 20), (255, 255, 255), (5, 5, 15, 15))
    for bg in ("varied", "plain"):
        img = R.render_stamp(red, 32, seed=3, index=1, background=bg)
        assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
        c = img[:, 16, 16]
        assert c[0] > 0.8 and c[1] < 0.2 and c[2] < 0.2          # the opaque stamp covers the centre
        assert img[:, 0, 0].mean() > 0.6                          # a dark stamp gets a light background
        assert img[:, 16, 16].tolist() != img[:, 0, 0].tolist()
        w = R.render_stamp(white, 32, seed=3, index=1, background=bg)
        assert w[:, 16, 16].min() > 0.9 and w[:, 0, 0].mean() < 0.4  # a light stamp gets a dark one
    a = R.render_stamp(red, 32, seed=3, index=1)
    assert torch.equal(a, R.render_stamp(red, 32, seed=3, index=1))
    assert not torch.equal(a, R.render_stamp(red, 32, seed=3, index=2))  # backgrounds vary by index
    with pytest.raises(ValueError):
        R.render_stamp(red, 32, background="checkered")


# ---------------------------------------------------------------------------------------------------- splits


def test_long_tail_counts_and_split_by_class():
    assert R.long_tail_counts(5, 100, zipf=1.0) == [100, 50, 33, 25, 20]
    assert R.long_tail_counts(4, 10, zipf=3.0, min_per_class=2) == [10, 2, 2, 2]
    labels = np.repeat(np.arange(6), 40)
    tr, va, rank = R.split_by_class(labels, 6, seed=5, val_per_class=10, long_tail=True, zipf=1.2)
    assert sorted(rank) == list(range(6))
    counts = np.bincount(labels[tr], minlength=6)
    assert [counts[c] for c in range(6)] == [R.long_tail_counts(6, 30, 1.2)[rank[c]] for c in range(6)]
    assert np.bincount(labels[va]).tolist() == [10] * 6 and not set(tr) & set(va)
    assert (tr, va, rank) == R.split_by_class(labels, 6, seed=5, val_per_class=10, long_tail=True, zipf=1.2)
    assert R.split_by_class(labels, 6, seed=6, val_per_class=10)[1] != va
    tr3, va3, _ = R.split_by_class(labels, 6, seed=5, val_per_class=10, shots=3)
    assert np.bincount(labels[tr3]).tolist() == [3] * 6 and va3 == va and not set(tr3) & set(va)
    capped, _, _ = R.split_by_class(labels, 6, seed=5, val_per_class=10, train_per_class=7)
    assert np.bincount(labels[capped]).tolist() == [7] * 6
    with pytest.raises(ValueError, match="either"):
        R.split_by_class(labels, 6, 0, 10, long_tail=True, shots=2)
    with pytest.raises(ValueError, match="31 asked"):
        R.split_by_class(labels, 6, 0, 10, shots=31)
    with pytest.raises(ValueError, match="validation"):
        R.split_by_class(labels, 6, 0, 41)


# ---------------------------------------------------------------------------------------------------- availability


def test_sources_table_and_clean_fallback(tmp_path, monkeypatch, capsys):
    rows = R.sources()
    assert [r["name"] for r in rows] == list(R.SOURCE_NAMES)
    for r in rows:
        assert {"name", "available", "count", "licence", "how_to_install", "path"} <= set(r)
        assert r["licence"] and r["how_to_install"]
        assert (r["count"] > 0) == r["available"]
    monkeypatch.setenv(R.FASHION_ENV, str(tmp_path / "no-fashion"))
    monkeypatch.setenv(R.TUXPAINT_ENV, str(tmp_path / "no-stamps"))
    with pytest.raises(R.SourceUnavailable, match="apt-get install dataset-fashion-mnist"):
        R.fashion_labelled()
    with pytest.raises(R.SourceUnavailable, match="apt-get install tuxpaint-stamps-default"):
        R.tuxpaint_labelled()
    with pytest.raises(R.SourceUnavailable, match="tuxpaint-stamps-default"):
        R.caption_pairs(["tuxpaint"])
    with pytest.raises(R.SourceUnavailable, match="dataset-fashion-mnist"):
        R.labelled("fashion")
    capsys.readouterr()
    pairs = R.caption_pairs(per_source=20)  # what is installed; the two Debian sets skipped with a notice
    err = capsys.readouterr().err
    assert "skipping fashion-mnist" in err and "skipping tuxpaint-stamps" in err
    assert len([ln for ln in err.splitlines() if "skipping" in ln]) == 2
    assert set(pairs.counts()) == {"sklearn-digits", "sklearn-photos", "skimage-photos"}
    tr, _ = R.first_labelled(("fashion", "digits"), shots=2)
    assert tr.name == "sklearn-digits" and len(tr) == 20
    assert "skipping fashion-mnist" in capsys.readouterr().err

    real_dir = R._package_dir
    monkeypatch.setattr(R, "_package_dir", lambda m: None if m in ("sklearn", "skimage") else real_dir(m))
    rows = {r["name"]: r for r in R.sources()}
    assert not rows["sklearn-digits"]["available"] and "pip install scikit-learn" in rows["sklearn-digits"]["how_to_install"]
    assert not rows["skimage-photos"]["available"] and "scikit-image" in rows["skimage-photos"]["why"]
    with pytest.raises(R.SourceUnavailable, match="pip install scikit-learn"):
        R.digits_labelled()
    with pytest.raises(R.SourceUnavailable, match="no real-image source"):
        R.caption_pairs()
    with pytest.raises(KeyError, match="unknown data source"):
        R.require("imagenet")


# ---------------------------------------------------------------------------------------------------- installed data


def test_sklearn_digits():
    assert _status("sklearn-digits")["count"] == 1797
    x, y = R.load_digits_arrays()
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() == 1
    tr, va = R.digits_labelled(seed=0)
    assert len(tr) + len(va) == 1797 and va.counts() == [30] * 10
    assert not set(tr.source_index) & set(va.source_index)
    assert tr.classes == list(R.DIGIT_CLASSES) and tr.prompts()[7] == "a handwritten digit seven."
    img, label, i = tr[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and i == 5 and label == tr.labels[5]
    raw = tr.render(5)
    assert 0 <= raw.min() and raw.max() <= 1 and raw.max() > 0.5 and torch.allclose(normalize(raw), img)
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[1], raw[2])  # grey as RGB
    # deterministic; another seed gives another split
    tr2, va2 = R.digits_labelled(seed=0)
    assert tr2.labels == tr.labels and tr2.source_index == tr.source_index and torch.equal(tr2[5][0], img)
    assert R.digits_labelled(seed=1)[1].source_index != va.source_index
    assert R.digits_labelled(image_size=16)[0][0][0].shape == (3, 16, 16)


def test_sklearn_digits_long_tail_and_few_shot():
    tr, va = R.digits_labelled(seed=2, long_tail=True)  # zipf 1.5, head = smallest leftover class
    counts = tr.counts()
    head = min(np.bincount(R.load_digits_arrays()[1])) - 30
    assert max(counts) == head and min(counts) == round(head / 10 ** 1.5)
    assert [counts[c] for c in range(10)] == [R.long_tail_counts(10, head, 1.5)[r] for r in tr.class_rank]
    g = frequency_groups(tr.labels, num_classes=10)
    assert [len(g[k]) for k in ("head", "torso", "tail")] == [2, 4, 4]
    assert min(counts[c] for c in g["head"]) > max(counts[c] for c in g["torso"])
    assert min(counts[c] for c in g["torso"]) >= max(counts[c] for c in g["tail"])
    assert sum(counts[c] for c in g["head"]) > 2 * sum(counts[c] for c in g["tail"])
    assert va.counts() == [30] * 10
    fs, fva = R.digits_labelled(seed=2, shots=4)
    assert fs.counts() == [4] * 10 and fva.source_index == va.source_index
    assert not set(fs.source_index) & set(va.source_index)


def test_photos_load_from_the_installed_packages_without_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a data loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert _status("sklearn-photos")["count"] == 2
    assert _status("skimage-photos")["count"] >= 10  # 12 with scikit-image 0.26
    pairs = R.caption_pairs(["photos"], crops_per_photo=3, per_source=None, image_size=32)
    n_photos = _status("sklearn-photos")["count"] + _status("skimage-photos")["count"]
    assert len(pairs) == 3 * n_photos
    subjects = {p.subject for p in R.PHOTOS}
    for i in range(len(pairs)):
        img, cap, idx = pairs[i]
        assert idx == i and img.shape == (3, 32, 32)
        assert any(s in cap for s in subjects) and "photo" in cap
        raw = pairs.render(i)
        assert 0 <= raw.min() and raw.max() <= 1 and raw.std() > 0.005
    assert any("a cat" in c for c in pairs.captions)
    val = R.caption_pairs(["photos"], crops_per_photo=3, per_source=None, split="val")
    assert not torch.equal(val.render(0), pairs.render(0)) or val.caption(0) != pairs.caption(0)


def test_fashion_mnist_installed():
    _skip_unless("fashion-mnist")
    x, y = R.load_fashion_arrays("train")
    vx, vy = R.load_fashion_arrays("test")
    assert x.shape == (60000, 28, 28) and vx.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(vy).tolist() == [1000] * 10
    tr, va = R.fashion_labelled(seed=0, long_tail=True, train_per_class=600)
    assert sorted(tr.counts(), reverse=True) == R.long_tail_counts(10, 600, 1.5)
    assert va.counts() == [100] * 10 and len(va) == 1000
    assert tr.classes[9] == "ankle boot" and tr.prompts()[9] == "a photo of an ankle boot."
    img, label, i = va[123]
    assert img.shape == (3, 32, 32) and label == vy[va.source_index[123]]
    raw = va.render(123)
    assert 0 <= raw.min() and raw.max() <= 1 and raw.std() > 0.05
    tr2, _ = R.fashion_labelled(seed=0, long_tail=True, train_per_class=600)
    assert tr2.source_index == tr.source_index and torch.equal(tr2[17][0], tr[17][0])
    fs, _ = R.fashion_labelled(seed=0, shots=8)
    assert fs.counts() == [8] * 10


def test_tuxpaint_installed():
    _skip_unless("tuxpaint-stamps")
    stamps = R.scan_stamps()
    assert len(stamps) >= 700  # 785 in tuxpaint-stamps-default 2022.06.04
    assert all(s.caption and "utf8=" not in s.caption for s in stamps)
    assert len({s.path for s in stamps}) == len(stamps)
    frog = [s for s in stamps if s.path.endswith("/animals/amphibians/frog.png")]
    assert frog and frog[0].caption == "A frog."
    tr, va = R.tuxpaint_labelled(seed=0)
    assert len(tr) + len(va) == len(stamps) and set(va.counts()) == {2}
    counts = tr.counts()
    assert "animals" in tr.classes and "symbols" in tr.classes
    assert max(counts) >= 20 * min(counts)  # naturally long-tailed
    g = frequency_groups(tr.labels, num_classes=len(tr.classes))
    assert tr.classes.index("symbols") in g["head"]
    assert all(p.startswith("a picture of ") for p in tr.prompts())
    img, label, i = tr[3]
    raw = tr.render(3)
    assert img.shape == (3, 32, 32) and 0 <= raw.min() and raw.max() <= 1 and torch.allclose(normalize(raw), img)
    assert torch.equal(R.tuxpaint_labelled(seed=0)[0][3][0], img)


def test_caption_pairs_installed():
    pairs = R.caption_pairs(seed=0, per_source=60)
    assert len(pairs) == sum(pairs.counts().values()) and all(v <= 60 for v in pairs.counts().values())
    assert set(pairs.counts()) >= {"sklearn-digits", "sklearn-photos", "skimage-photos"}
    again = R.caption_pairs(seed=0, per_source=60)
    assert again.captions == pairs.captions and again.source == pairs.source
    for i in (0, 7, len(pairs) - 1):  # stable indices: same image, same caption, same index
        a, b = pairs[i], again[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] == i
    for i in range(len(pairs)):
        cap, src = pairs.caption(i), pairs.source[i]
        if src == "sklearn-digits":
            assert any(f" {d}" in cap for d in R.DIGIT_CLASSES) and ("digit" in cap or "number" in cap
                                                                     or "handwritten" in cap)
        elif src == "fashion-mnist":
            assert any(p in cap for p in R.FASHION_PHRASES)
        elif src == "tuxpaint-stamps":
            assert cap[0].isupper() or cap[0].isdigit() or not cap[0].isalpha()
    # train and val never share a stamp or a digit
    tr = R.caption_pairs(["digits"] + (["tuxpaint"] if _status("tuxpaint-stamps")["available"] else []),
                         split="train", per_source=None, seed=4)
    va = R.caption_pairs(["digits"] + (["tuxpaint"] if _status("tuxpaint-stamps")["available"] else []),
                         split="val", per_source=None, seed=4)
    assert tr.counts()["sklearn-digits"] + va.counts()["sklearn-digits"] == 1797
    assert not {s.path for s in tr.stamps} & {s.path for s in va.stamps}
    rows = {split: {ds.source_row(i) for i in range(len(ds))} for split, ds in (("train", tr), ("val", va))}
    assert not rows["train"] & rows["val"]
    assert {r for s, r in rows["train"] | rows["val"] if s == "sklearn-digits"} == set(range(1797))
    # a tokenizer is applied like in synthetic.PairsDataset; batches collate
    tok = R.caption_pairs(["digits"], per_source=8, tokenizer=lambda caps: torch.tensor([[len(c)] for c in caps]))
    assert tok[0][1].tolist() == [len(tok.caption(0))]
    images, caps, idx = next(iter(torch.utils.data.DataLoader(pairs, batch_size=16)))
    assert images.shape == (16, 3, 32, 32) and len(caps) == 16 and idx.tolist() == list(range(16))
