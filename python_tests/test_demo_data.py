"""The demo's data preparation (``vlmkern.app.demo.prepare`` without the training) at the DEFAULT scale,
with each optional real-image source missing in turn, with all of them missing, with whatever is
installed (all five when the Debian packages and both wheels are there), and with small fabricated
stand-ins for the two Debian packages.

``make demo`` once stopped after six minutes of pretraining because the scikit-learn digits fallback
(used without ``dataset-fashion-mnist``) could not supply the default scale's APFT split; these tests
run that exact path in seconds. A missing Debian package is simulated by pointing its
``VLMKERN_*_DIR`` at an empty folder, a missing wheel by hiding its package folder."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app import demo  # noqa: E402
from vlmkern.app.data import real as R  # noqa: E402
from vlmkern.app.methods.tuneclip import collate_pairs  # noqa: E402

DEMO_SOURCES = ("fashion-mnist", "tuxpaint-stamps", "sklearn-photos", "skimage-photos", "sklearn-digits")
# what each simulated absence removes
CASES = {
    "installed": (),
    "no-fashion-mnist": ("fashion-mnist",),
    "no-tuxpaint-stamps": ("tuxpaint-stamps",),
    "no-debian-packages": ("fashion-mnist", "tuxpaint-stamps"),
    "no-scikit-image": ("skimage-photos",),
    "no-scikit-learn": ("sklearn-photos", "sklearn-digits"),
    "no-scikit-learn-no-fashion-mnist": ("sklearn-photos", "sklearn-digits", "fashion-mnist"),
    "nothing-installed": DEMO_SOURCES,
    # small stand-ins for both Debian packages (so this runs where they are not installed):
    # Fashion-MNIST with just enough images for the default scale's sizes, and 8 stamps
    "fabricated-debian-packages": (),
}


def _hide(monkeypatch, tmp_path, missing):
    """Make the sources in ``missing`` look uninstalled, the way a machine without them looks."""
    if "fashion-mnist" in missing:
        os.makedirs(tmp_path / "empty-fashion", exist_ok=True)
        monkeypatch.setenv(R.FASHION_ENV, str(tmp_path / "empty-fashion"))
    if "tuxpaint-stamps" in missing:
        os.makedirs(tmp_path / "empty-stamps", exist_ok=True)
        monkeypatch.setenv(R.TUXPAINT_ENV, str(tmp_path / "empty-stamps"))
    hidden = set()
    if "sklearn-digits" in missing or "sklearn-photos" in missing:
        hidden.add("sklearn")
    if "skimage-photos" in missing:
        hidden.add("skimage")
    if hidden:
        real_dir = R._package_dir
        monkeypatch.setattr(R, "_package_dir", lambda m: None if m in hidden else real_dir(m))


def _prepare_without_training(monkeypatch, tmp_path, scale="default"):
    """``demo.prepare`` as the demo runs it, with ``pretrain`` building its data but not training."""
    built = {}

    def pretrain_data_only(s, out, seed=0, sources=None):
        data, info = demo.pretrain_data(s, seed, sources)
        built["pretrain"] = data
        return None, None, {**info, "losses": []}

    monkeypatch.setattr(demo, "pretrain", pretrain_data_only)
    ctx = demo.prepare(scale, 0, str(tmp_path / "out"))
    return ctx, built["pretrain"]


def _check_items(ds, size, n=2):
    for i in sorted({0, len(ds) - 1})[:n]:
        img = ds[i][0]
        assert img.shape == (3, size, size) and img.dtype == torch.float32 and torch.isfinite(img).all()


@pytest.mark.parametrize("case", list(CASES))
def test_demo_data_default_scale(case, tmp_path, monkeypatch, capsys):
    if case == "fabricated-debian-packages":
        from test_real_data import _fake_fashion, _fake_stamps

        monkeypatch.setenv(R.FASHION_ENV, _fake_fashion(str(tmp_path / "fm"), n_train_per_class=200,
                                                        n_test_per_class=100))
        _fake_stamps(str(tmp_path / "stamps"))
        monkeypatch.setenv(R.TUXPAINT_ENV, str(tmp_path / "stamps"))
    installed = set(R.available(DEMO_SOURCES, quiet=True))
    missing = set(CASES[case])  # a source already absent here stays absent: the case still runs
    _hide(monkeypatch, tmp_path, missing)
    present = installed - missing
    assert set(demo.real_sources()) == present
    expected_labelled = ("fashion-mnist" if "fashion-mnist" in present else
                         "sklearn-digits" if "sklearn-digits" in present else "synthetic")

    s = demo.SCALES["default"]
    ctx, pre = _prepare_without_training(monkeypatch, tmp_path)
    err = capsys.readouterr()
    for name in missing & installed:
        assert f"skipping {name}" in err.err  # each absence is named, with how to install it

    # pretraining: the synthetic world plus every installed captioned source (digits only when not held out)
    assert ctx.labelled_source == expected_labelled
    info = ctx.pretrain_info
    pre_expected = present - ({"sklearn-digits"} if expected_labelled == "sklearn-digits" else set())
    assert set(info["real_sources"]) == pre_expected
    assert (info["real_pairs"] > 0) == bool(pre_expected) and info["real_pairs"] <= s["pre_real"]
    assert len(pre) == s["pre_n"] + info["real_pairs"]
    images, caps, idx = collate_pairs([pre[i] for i in range(len(pre) - s["batch"], len(pre))])
    assert images.shape == (s["batch"], 3, s["size"], s["size"]) and all(isinstance(c, str) and c for c in caps)

    # TuneCLIP and WRF4CIR: synthetic, always the scale's sizes
    assert [len(d) for d in ctx.tuneclip] == [s["tc_n"], s["tc_val"]]
    assert [len(d) for d in ctx.wrf4cir] == [s["cir_n"], s["cir_val"]]

    # APFT (long-tailed) and Kalman (few-shot) on the labelled source, at sizes it can supply
    atr, ava = ctx.apft
    ktr, kva = ctx.kalman
    z = ctx.labelled_sizes
    for d in (atr, ava, ktr, kva):
        _check_items(d, s["size"])
    if expected_labelled == "synthetic":
        assert len(atr) == s["ap_n"] and len(ava) == s["ap_val"]
        assert len(ktr) == s["k_classes"] * s["k_shots"]
    else:
        ac, vc = atr.counts(), ava.counts()
        assert min(ac) >= 1 and max(ac) == z["ap_head"] > min(ac)  # every class, long-tailed from the head
        assert set(vc) == {z["ap_vpc"]}                             # balanced validation
        assert set(ktr.counts()) == {z["k_shots"]} and set(kva.counts()) == {z["k_vpc"]}
        train_min, val_min = R.labelled_pool_sizes(expected_labelled)
        if expected_labelled == "fashion-mnist":  # enough data: the scale's own sizes
            assert z == {k: s[k] for k in ("ap_head", "ap_vpc", "k_shots", "k_vpc")}
        else:  # one pool per class: training and validation are disjoint and fit in it
            assert val_min is None
            assert z["ap_head"] + z["ap_vpc"] <= train_min and z["k_shots"] + z["k_vpc"] <= train_min
            assert not set(atr.source_index) & set(ava.source_index)
            assert not set(ktr.source_index) & set(kva.source_index)
            assert z["ap_vpc"] >= 50 and z["ap_head"] >= 100  # shrunk in proportion, not to a token size
            if z["ap_head"] < s["ap_head"]:
                assert "dataset-fashion-mnist gives the full sizes" in err.out


def test_demo_data_scales_shrink_only_when_needed(monkeypatch):
    if "sklearn-digits" not in R.available(quiet=True):
        pytest.skip("scikit-learn not installed")
    tiny = demo.SCALES["tiny"]
    assert demo.labelled_sizes(tiny, "sklearn-digits") == {k: tiny[k] for k in ("ap_head", "ap_vpc", "k_shots",
                                                                                   "k_vpc")}
    d = demo.SCALES["default"]
    z = demo.labelled_sizes(d, "sklearn-digits")
    train_min, _ = R.labelled_pool_sizes("sklearn-digits")
    assert z["ap_head"] + z["ap_vpc"] == train_min  # the whole smallest class, split in the scale's ratio
    assert abs(z["ap_vpc"] / train_min - d["ap_vpc"] / (d["ap_vpc"] + d["ap_head"])) < 0.01
    assert (z["k_shots"], z["k_vpc"]) == (d["k_shots"], d["k_vpc"])  # these fit as they are


def test_demo_data_small_fashion_folder(tmp_path, monkeypatch):
    """A Fashion-MNIST folder with few images (separate training and test files): each split is capped."""
    from test_real_data import _fake_fashion

    root = _fake_fashion(str(tmp_path / "fm"), n_train_per_class=20, n_test_per_class=7)
    monkeypatch.setenv(R.FASHION_ENV, root)
    assert R.labelled_pool_sizes("fashion-mnist") == (20, 7)
    s = demo.SCALES["default"]
    d = demo.task_data(s, 0, ["fashion-mnist"])
    assert d.labelled_source == "fashion-mnist"
    assert d.labelled_sizes == {"ap_head": 20, "ap_vpc": 7, "k_shots": 16, "k_vpc": 7}
    assert max(d.apft[0].counts()) == 20 and set(d.apft[1].counts()) == {7}


def test_demo_data_too_small_source_says_what_to_install(monkeypatch):
    monkeypatch.setattr(R, "labelled_pool_sizes", lambda name, **kw: (1, None))
    with pytest.raises(R.SourceUnavailable, match=r"sklearn-digits has only 1 images.*apt-get install "
                                                  r"dataset-fashion-mnist"):
        demo.labelled_sizes(demo.SCALES["default"], "sklearn-digits")
