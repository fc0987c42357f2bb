"""Data loaders on small files made here: stable indices, bad-file reporting, layouts."""

import io
import json
import os
import tarfile

import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from vlmkern.app.data import BadSampleError, CIRTriplets, ImageTextCSV, LabelledImages, WebDatasetTar  # noqa: E402
from vlmkern.app.data import default_transform  # noqa: E402

TF = default_transform(16, normalize=False)


def _img(path, color=(255, 0, 0), size=(20, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_default_transform_normalizes_by_default(tmp_path):
    from vlmkern.app.data.synthetic import normalize

    p = str(tmp_path / "a.png")
    _img(p, (255, 128, 0), (16, 16))
    with Image.open(p) as im:
        im = im.convert("RGB")
        assert torch.allclose(default_transform(16)(im), normalize(TF(im)))


def test_default_transform_shape_and_range(tmp_path):
    p = str(tmp_path / "a.png")
    _img(p, (255, 128, 0), (30, 20))
    with Image.open(p) as im:
        t = TF(im.convert("RGB"))
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t[0].max() == 1.0 and abs(t[1].mean().item() - 128 / 255) < 1e-6


def test_csv_pairs_stable_index_and_bad_rows(tmp_path):
    _img(str(tmp_path / "img" / "0.png"))
    _img(str(tmp_path / "img" / "2.png"), (0, 255, 0))
    (tmp_path / "img" / "3.png").write_bytes(b"not an image")
    rows = "filepath\ttitle\nimg/0.png\ta red box\nimg/missing.png\tlost\nimg/2.png\ta green box\nimg/3.png\tbroken\nimg/0.png\t  \n"
    (tmp_path / "train.tsv").write_text(rows)
    ds = ImageTextCSV(str(tmp_path / "train.tsv"), transform=TF)
    assert len(ds) == 2 and ds.num_samples == 5
    img, cap, idx = ds[1]
    assert cap == "a green box" and idx == 2 and img.shape == (3, 16, 16)
    reasons = sorted(w.split(": ", 1)[0].split(" ")[0] for w, _ in ds.bad)
    assert len(ds.bad) == 3 and "3 bad sample(s)" in ds.report()
    assert any("missing file" in y for _, y in ds.bad) and any("unreadable" in y for _, y in ds.bad)
    assert any("empty caption" in y for _, y in ds.bad)
    with pytest.raises(BadSampleError, match="missing.png"):
        ImageTextCSV(str(tmp_path / "train.tsv"), transform=TF, on_error="raise")
    with pytest.raises(ValueError, match="caption_key"):
        ImageTextCSV(str(tmp_path / "train.tsv"), caption_key="caption")


def test_webdataset_shards(tmp_path):
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    png = buf.getvalue()
    shards = []
    for s in range(2):
        path = str(tmp_path / f"shard-{s}.tar")
        with tarfile.open(path, "w") as tar:
            add(tar, f"{s}000.png", png)
            add(tar, f"{s}000.txt", f"blue {s}".encode())
            add(tar, f"{s}001.png", png)
            add(tar, f"{s}001.json", json.dumps({"caption": f"json {s}"}).encode())
            add(tar, f"{s}002.txt", b"caption without image")
        shards.append(path)
    ds = WebDatasetTar(shards, transform=TF)
    assert len(ds) == 4 and ds.num_samples == 6
    assert [ds[i][1] for i in range(4)] == ["blue 0", "json 0", "blue 1", "json 1"]
    assert [ds[i][2] for i in range(4)] == [0, 1, 3, 4]
    assert ds.bad[0][1] == "no image member"
    # picklable for DataLoader workers
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
    images, caps, idx = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and idx.tolist() == [0, 1]


def test_labelled_folders_and_csv(tmp_path):
    for cls, n in (("cat", 3), ("sea_lion", 1)):
        for i in range(n):
            _img(str(tmp_path / "tree" / cls / f"{i}.png"))
    (tmp_path / "tree" / "cat" / "bad.png").write_bytes(b"xx")
    ds = LabelledImages(root=str(tmp_path / "tree"), transform=TF)
    assert ds.classes == ["cat", "sea_lion"] and ds.labels == [0, 0, 0, 1]
    assert ds.prompts() == ["a photo of a cat.", "a photo of a sea lion."]
    assert len(ds.bad) == 1
    (tmp_path / "lab.csv").write_text("filepath,label\ntree/cat/0.png,cat\ntree/sea_lion/0.png,sea_lion\n")
    ds2 = LabelledImages(csv_path=str(tmp_path / "lab.csv"), transform=TF)
    assert ds2.labels == [0, 1] and ds2[1][1] == 1
    with pytest.raises(ValueError, match="exactly one"):
        LabelledImages()


def test_cir_fashioniq_and_cirr_layouts(tmp_path):
    fiq = tmp_path / "fiq"
    for n in ("a", "b", "c"):
        _img(str(fiq / "images" / f"{n}.png"))
    os.makedirs(fiq / "captions")
    json.dump([{"candidate": "a", "target": "b", "captions": ["is blue", "has sleeves"]},
               {"candidate": "b", "target": "zz", "captions": ["x"]},
               {"candidate": "c", "target": "a", "captions": ["", " "]}],
              open(fiq / "captions" / "cap.dress.val.json", "w"))
    ds = CIRTriplets(str(fiq), layout="fashioniq", categories=["dress"], transform=TF)
    assert len(ds) == 1 and len(ds.bad) == 2
    ref, text, tgt, ri, ti = ds[0]
    assert text == "is blue and has sleeves" and ds.gallery[ri] == "a" and ds.gallery[ti] == "b"
    assert ds.gallery_indices(0) == (ri, ti)  # the same indices without decoding the images
    assert ds.subsets() is None
    assert torch.equal(ds.image(ti), ds.image("b"))  # by gallery index or by name

    cirr = tmp_path / "cirr"
    for n in ("r1", "t1", "m1", "m2"):
        _img(str(cirr / "dev" / f"{n}.png"))
    os.makedirs(cirr / "captions")
    os.makedirs(cirr / "image_splits")
    json.dump({n: f"dev/{n}.png" for n in ("r1", "t1", "m1", "m2")}, open(cirr / "image_splits" / "split.rc2.val.json", "w"))
    json.dump([{"pairid": 0, "reference": "r1", "target_hard": "t1", "caption": "make it red",
                "img_set": {"members": ["t1", "m1", "m2"]}}], open(cirr / "captions" / "cap.rc2.val.json", "w"))
    ds2 = CIRTriplets(str(cirr), layout="cirr", transform=TF)
    assert len(ds2) == 1 and ds2.gallery == ["m1", "m2", "r1", "t1"]
    assert ds2.subsets().tolist() == [[3, 0, 1]]
