"""The APFT protocol's data (shifted style, long-tail counts, splits), its premise and claim rows, and a tiny
end-to-end run (the whole protocol through ``run_fidelity``)."""

import math
import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app import apft_protocol as A  # noqa: E402
from vlmkern.app import fidelity as FI  # noqa: E402
from vlmkern.app.data import synthetic as S  # noqa: E402
from vlmkern.app.eval.metrics import frequency_groups  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")

TINY_BASE = dict(n_train=32, n_val=16, batch=16, steps=4, warmup=2, eval_every=2, max_doublings=0)
TINY_PROTOCOL = dict(num_classes=12, head_count=8, val_per_class=1, test_per_class=2, plain_per_class=1, batch=8,
                     max_epochs=3, min_epochs=2, patience=2, window=2, lr_mults=(0.1, 0.3), lora_rank=2,
                     arms=("full", "lora", "apft"))


def test_longtail_counts():
    c = S.longtail_counts(30, 64, zipf=1.2)
    assert len(c) == 30 and c[0] == 64 and min(c) == 1
    assert all(a >= b for a, b in zip(c, c[1:]))  # non-increasing: class 0 is the head
    assert c[1] == round(64 / 2 ** 1.2)
    assert S.longtail_counts(5, 2, zipf=2.0, min_count=2) == [2, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        S.longtail_counts(0, 10)


def test_shifted_longtail_sets_have_a_long_tail_of_at_least_ten_classes():
    sets = S.shifted_longtail(seed=3, num_classes=30, head_count=64, image_size=16)
    tr, va, te = sets["train"], sets["val"], sets["test"]
    counts = [tr.labels.count(k) for k in range(30)]
    assert counts == S.longtail_counts(30, 64, 1.2)
    assert [va.labels.count(k) for k in range(30)] == [4] * 30 and [te.labels.count(k) for k in range(30)] == [8] * 30
    g = frequency_groups(tr.labels, 30)
    assert len(g["tail"]) >= 10 and max(counts[k] for k in g["tail"]) <= 2 < min(counts[k] for k in g["head"])
    assert tr.classes == va.classes == te.classes and len(set(tr.classes)) == 30
    assert all(a.shape == tr.classes[y][0] and a.colour == tr.classes[y][1] for a, y in zip(tr.attrs, tr.labels))
    img, y, i = tr[5]
    assert img.shape == (3, 16, 16) and y == tr.labels[5] and i == 5
    assert tr.prompts()[0] == f"a photo of a {tr.classes[0][1]} {tr.classes[0][0]}."
    # deterministic, and other seeds draw other classes
    again = S.shifted_longtail(seed=3, num_classes=30, head_count=64, image_size=16)
    assert torch.equal(again["test"].images, te.images) and again["train"].classes == tr.classes
    assert S.shifted_longtail(seed=4, num_classes=30, image_size=16)["train"].classes != tr.classes
    # splits are different renders
    assert not torch.equal(va.images[:4], te.images[:4])


def test_archival_style_is_a_shift_and_plain_is_render():
    a = S.Attrs("circle", "blue", "large", "centre")
    plain = S.render(a, 16, 7, 3)
    assert torch.equal(S.render_styled(a, 16, 7, 3, "plain"), plain)
    arch = S.render_styled(a, 16, 7, 3, "archival")
    assert arch.shape == plain.shape and 0 <= arch.min() and arch.max() <= 1
    assert torch.equal(arch, S.render_styled(a, 16, 7, 3, "archival"))  # deterministic
    # lighter background, lower contrast, warm cast, less saturated object
    corner = (slice(None), slice(0, 3), slice(0, 3))
    assert arch[corner].mean() > plain[corner].mean() + 0.1
    assert arch.std() < plain.std()
    bg = arch[corner].mean(dim=(1, 2))
    assert bg[0] > bg[1] > bg[2]
    centre = (slice(None), 8, 8)
    assert plain[centre][2] - plain[centre][0] > 2 * (arch[centre][2] - arch[centre][0])
    with pytest.raises(ValueError, match="unknown style"):
        S.render_styled(a, 16, 0, 0, "cubist")


def test_make_sets_adds_the_unshifted_domain():
    sets = A.make_sets(0, TINY_PROTOCOL)
    plain = sets["plain"]
    assert len(plain.classes) == len(S.SHAPES) * len(S.COLOUR_NAMES) and len(plain) == len(plain.classes)
    assert plain.style == "plain" and sets["test"].style == "archival"
    a, y = plain.attrs[3], plain.labels[3]
    assert torch.equal(plain[3][0], S.normalize(S.render(a, 16, 100, 3_000_000 + 3)))
    assert plain.classes[y] == (a.shape, a.colour)


def _m(tail_i2t, tail_t2i, plain):
    return {"shifted": {"i2t": {"tail": {"recall": {1: tail_i2t}}}, "t2i": {"tail": {"mAP": {10: tail_t2i}}}},
            "plain_acc": plain}


def _run(seed, base, full, apft, lora):
    return {"seed": seed, "base": _m(*base),
            "arms": {"0.3": {"full": {"test": _m(*full)}, "apft": {"test": _m(*apft)}, "lora": {"test": _m(*lora)}}}}


def test_premise_and_claim_rows():
    # full FT forgets the unshifted domain (every seed ~ -20 pts); APFT forgets less and wins on the tail
    runs = [_run(i, (0.2, 0.3, 0.8), (0.5, 0.5, 0.6 + 0.01 * i), (0.6, 0.55, 0.75), (0.55, 0.5, 0.78))
            for i in range(3)]
    rows = A.claim_rows(runs)
    assert {r["lr_mult"] for r in rows} == {"0.3"} and len(rows) == len(A.COMPARISONS)
    assert all(r["premise"]["holds"] is True for r in rows)
    assert all(r["verdict"] == "reproduced" for r in rows)
    forget = [r for r in rows if "forgets" in r["claim"]][0]
    assert forget["values"][0] == pytest.approx(0.15)
    # full FT keeps the unshifted accuracy and gains on the tail: premise absent for every claim
    runs = [_run(i, (0.2, 0.3, 0.8), (0.5, 0.5, 0.8 + 0.01 * (i - 1)), (0.6, 0.55, 0.75), (0.5, 0.5, 0.8))
            for i in range(3)]
    rows = A.claim_rows(runs)
    assert all(r["verdict"] == "premise absent" for r in rows)
    # the tail loss alone carries the tail claims but not the forgetting claim
    runs = [_run(i, (0.6, 0.3, 0.8), (0.4 + 0.01 * i, 0.5, 0.8 + 0.01 * (i - 1)), (0.6, 0.55, 0.75),
                 (0.5, 0.5, 0.8)) for i in range(3)]
    rows = A.claim_rows(runs)
    for r in rows:
        if "forgets" in r["claim"]:
            assert r["verdict"] == "premise absent"
        else:
            assert r["premise"]["holds"] is True and r["verdict"] != "premise absent"


def test_demo_apft_rows_point_to_the_protocol():
    rows = [c for c in FI.CLAIMS if c["paper"] == "APFT"]
    assert len(rows) == 2 and "apft" in FI.CLAIM_GROUPS
    for c in rows:
        p = c["premise"]([])
        assert p["holds"] is False and "APFT protocol section" in p["text"]
        assert FI.verdict([0.1, 0.2], +1, p) == "premise absent"


def test_apft_protocol_end_to_end(tmp_path):
    torch.set_num_threads(1)
    report = str(tmp_path / "FIDELITY.md")
    FI.upsert_section(report, "osr", "kept\n")
    rows = FI.run_fidelity(seeds=[0, 1], claims=["apft"], out=str(tmp_path / "fid"), report=report,
                           command="vlmkern fidelity --claims apft --seeds 0 1", cache_dir=str(tmp_path / "cache"),
                           protocol=TINY_PROTOCOL, base_settings=TINY_BASE)
    keys = {r["lr_mult"] for r in rows}
    assert keys == {"0.1", "0.3", A.SELECTED}
    for r in rows:
        assert len(r["values"]) == 2 and all(math.isfinite(v) for v in r["values"])
        assert r["verdict"] in ("reproduced", "partly reproduced", "not reproduced", "premise absent")
        assert r["premise"]["holds"] in (True, False, None)
    secs = FI._sections(report)
    assert secs["osr"] == "kept\n" and "APFT protocol" in secs["apft"]
    text = secs["apft"]
    assert "--claims apft --seeds 0 1" in text and "base model (zero-shot)" in text and "premise" in text
    assert "48-way" in text and "tail" in text
    import json

    res = json.load(open(tmp_path / "fid" / "apft" / "apft.json"))
    run = res["runs"][0]
    assert set(run["arms"]["0.1"]) == {"full", "lora", "apft"}
    assert set(run["selected"].values()) <= {"0.1", "0.3"}
    assert run["n"]["plain"] == 48 and len(run["groups"]["tail"]) >= 4
    for arm in ("full", "lora", "apft"):
        a = run["arms"]["0.1"][arm]
        assert 1 <= a["epochs"] <= 3 and 0 <= a["test"]["plain_acc"] <= 1
    # the section can be rendered again from the saved results, word for word
    assert A.rerender(str(tmp_path / "fid" / "apft")) == text
