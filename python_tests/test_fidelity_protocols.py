"""Fidelity harness: premise checks and the "premise absent" verdict; the OSR protocol's cached
converged base model (cache key, reuse) and its per-step arms at a tiny scale."""

import copy
import math
import os

import pytest
import torch

pytest.importorskip("open_clip")

from vlmkern.app import fidelity as FI  # noqa: E402
from vlmkern.app import osr_protocol as O  # noqa: E402

os.environ.setdefault("VLMKERN_NO_PROGRESS", "1")

TINY_BASE = dict(n_train=32, n_val=16, batch=16, steps=4, warmup=2, eval_every=2, max_doublings=0)
TINY_PROTOCOL = dict(ft_n=32, eval_n=16, batch=16, osr_steps=2, steps=16, dip_window=4, lr_mults=(1.0,))


def test_verdict_with_premise():
    present = {"holds": True, "text": "x"}
    absent = {"holds": False, "text": "x"}
    unchecked = dict(FI.NOT_CHECKED)
    assert FI.verdict([0.1, 0.2], +1, absent) == "premise absent"
    assert FI.verdict([-0.1, -0.2], +1, absent) == "premise absent"  # absent wins whatever the values
    assert FI.verdict([0.1, 0.2], +1, present) == "reproduced"
    assert FI.verdict([0.3, -0.1], +1, present) == "partly reproduced"
    assert FI.verdict([-0.3, 0.1], +1, present) == "not reproduced"
    assert FI.verdict([0.1, 0.2], +1, unchecked) == "reproduced"
    assert FI.verdict([0.1, 0.2], +1) == "reproduced"


def test_premise_checks_use_seed_to_seed_standard_error():
    # mean -0.05, sd 0.01, se 0.00577: far below -2 se
    p = FI.premise_below_zero([-0.04, -0.05, -0.06], "dip")
    assert p["holds"] is True and "present" in p["text"] and "-5.0 pts" in p["text"]
    # mean -0.01, sd 0.03: not 2 se below zero
    p = FI.premise_below_zero([-0.04, -0.01, 0.02], "dip")
    assert p["holds"] is False and "absent" in p["text"]
    assert FI.premise_below_zero([-0.5], "dip")["holds"] is None  # one seed cannot show it
    assert FI.premise_above_zero([0.04, 0.05, 0.06], "gap")["holds"] is True
    assert FI.premise_above_zero([-0.04, -0.05, -0.06], "gap")["holds"] is False
    st = FI.summarize([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and math.isclose(st["se"], 1 / math.sqrt(3))
    assert math.isclose(st["ci"][0], 2.0 - 4.303 / math.sqrt(3)) and math.isclose(st["ci"][1], 2.0 + 4.303 / math.sqrt(3))


def test_demo_claims_carry_premises():
    for c in FI.CLAIMS:
        assert "premise" in c
    papers = [c["paper"] for c in FI.CLAIMS]
    assert "TuneCLIP (Table 2, Fig. 2/9)" in papers and "TuneCLIP (Fig. 3/4/7)" in papers
    assert not any("Table 3" in p for p in papers)
    with pytest.raises(ValueError, match="unknown claims"):
        FI.run_fidelity(seeds=[0], claims=["nope"])


def test_parameter_count_is_measured():
    n = FI.parameter_count("vlmkern-micro-ViT")
    from vlmkern.app.models.clip import create_clip

    m, _, _ = create_clip("vlmkern-micro-ViT")
    assert n == sum(p.numel() for p in m.parameters()) and n > 1_000_000


def test_report_sections_are_replaced_in_place(tmp_path):
    path = str(tmp_path / "F.md")
    FI.upsert_section(path, "osr", "first\n")
    FI.upsert_section(path, "other", "x\n")
    FI.upsert_section(path, "osr", "second\n")
    text = open(path).read()
    assert text.count("<!-- section:osr -->") == 1 and "second" in text and "first" not in text
    assert text.index("section:osr") < text.index("section:other")  # replaced where it was
    assert FI._sections(path) == {"osr": "second\n", "other": "x\n"}


def test_base_key_covers_every_setting():
    s = {**O.BASE_DEFAULTS, **TINY_BASE}
    k = O.base_key(s)
    assert O.base_key(dict(s)) == k
    for name, value in [("tau", 0.015), ("steps", 5), ("seed", 1), ("data_seed", 1), ("n_train", 48),
                        ("peak_lr", 3e-4), ("size", 32), ("warmup", 3), ("batch", 8)]:
        assert O.base_key({**s, name: value}) != k, name


def test_base_model_is_cached_and_reused(tmp_path):
    msgs = []
    m1, _, info1 = O.base_model(TINY_BASE, str(tmp_path), log=msgs.append)
    assert info1["cached"] is False and info1["steps"] == 4 and len(info1["curve"]) == 2
    assert os.path.exists(tmp_path / info1["key"] / "model.pt")
    m2, _, info2 = O.base_model(TINY_BASE, str(tmp_path), log=msgs.append)
    assert info2["cached"] is True and info2["key"] == info1["key"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert math.isclose(m2.logit_scale.exp().item(), 1 / O.BASE_DEFAULTS["tau"], rel_tol=1e-5)
    _, _, info3 = O.base_model({**TINY_BASE, "tau": 0.015}, str(tmp_path), log=msgs.append)
    assert info3["cached"] is False and info3["key"] != info1["key"]


def test_osr_protocol_smoke(tmp_path):
    torch.set_num_threads(1)
    fresh, _, _ = O.base_model(TINY_BASE, str(tmp_path), log=lambda m: None)
    base, tok, info = O.base_model(TINY_BASE, str(tmp_path), log=lambda m: None)  # the cached copy, as seeds 2+ get
    assert info["cached"] and not base.logit_scale.requires_grad
    assert [n for n, q in fresh.named_parameters() if q.requires_grad] == [
        n for n, q in base.named_parameters() if q.requires_grad]
    r = O.run_seed(base, tok, info, seed=0, protocol=TINY_PROTOCOL, log=lambda m: None)
    assert r["osr_steps"] == 2
    curves, upd = r["curves"]["1"], r["first_update"]["1"]
    assert set(curves) == set(O.ARMS)
    for arm in O.ARMS:
        assert len(curves[arm]) == 16 + 1 and curves[arm][0] == r["start"]
        assert all(0.0 <= v <= 1.0 for v in curves[arm])
    # a fresh AdamW's first update is ~lr * sign(g) per coordinate; recovered moments change it
    assert not math.isclose(upd["none"], upd["mvu"], rel_tol=1e-3)
    assert not math.isclose(upd["mvu"], upd["mvu_reset"], rel_tol=1e-3)
    # the base model is untouched by the arms
    assert O.attribute_r1(base, tok, O._base_data({**O.BASE_DEFAULTS, **TINY_BASE})[1]) == pytest.approx(
        info["curve"][-1]["val_attr_R1"])


def _fake_run(seed, none, mvu, mv=None, reset=None):
    mv = mv if mv is not None else mvu
    reset = reset if reset is not None else mvu
    return {"seed": seed, "protocol": {**O.PROTOCOL_DEFAULTS},
            "curves": {"0.3": {"none": none, "mv": mv, "mvu": mvu, "mvu_reset": reset}}}


def test_osr_claim_rows_verdicts():
    assert O.dip([0.6, 0.55, 0.5, 0.58, 0.62, 0.1], 4) == pytest.approx(-0.1)  # step 5 is outside the window
    flat = [0.6] * 17
    dips = [[0.6, 0.52, 0.50, 0.55, 0.58] + [0.6] * 12, [0.6, 0.55, 0.49, 0.56, 0.59] + [0.6] * 12,
            [0.6, 0.53, 0.51, 0.57, 0.6] + [0.6] * 12]
    # premise present (the no-recovery arm dips ~10 pts every seed) and OSR flat: reproduced
    rows = O.claim_rows([_fake_run(i, d, flat) for i, d in enumerate(dips)])
    main = [x for x in rows if x["arm"] == "mvu" and x["baseline"] == "none"][0]
    assert main["premise"]["holds"] is True and main["verdict"] == "reproduced"
    assert main["values"][0] == pytest.approx(0.10)
    # no dip without recovery: premise absent, whatever OSR does
    rows = O.claim_rows([_fake_run(i, flat, d) for i, d in enumerate(dips)])
    assert all(x["verdict"] == "premise absent" for x in rows)
    assert "absent" in rows[0]["premise"]["text"]
    # premise present, OSR dips as much as no recovery on two seeds and better on one: partly / not
    worse = copy.deepcopy(dips)
    worse[0] = [0.6, 0.40] + [0.6] * 15
    rows = O.claim_rows([_fake_run(i, d, w) for i, (d, w) in enumerate(zip(dips, worse))])
    main = [x for x in rows if x["arm"] == "mvu" and x["baseline"] == "none"][0]
    assert main["verdict"] == "not reproduced"
    better = [[0.6] * 17, dips[1], [0.6, 0.55] + [0.6] * 15]
    rows = O.claim_rows([_fake_run(i, d, b) for i, (d, b) in enumerate(zip(dips, better))])
    main = [x for x in rows if x["arm"] == "mvu" and x["baseline"] == "none"][0]
    assert main["verdict"] == "partly reproduced"


# ----------------------------------------------------------------------------------- WRF4CIR

from vlmkern.app import wrf4cir_protocol as W  # noqa: E402

TINY_WRF = dict(n_train=32, n_tune=16, n_val=16, gallery=64, batch=16, epochs=4, warmup_epochs=1, lr=1e-3,
                gammas=(1e-3, 1e-2), eval_every=2)


def test_wrf4cir_protocol_end_to_end(tmp_path):
    torch.set_num_threads(1)
    msgs = []
    res = W.run_wrf4cir(seeds=(0, 1), out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                        base_settings=TINY_BASE, protocol=TINY_WRF, command="vlmkern fidelity --claims wrf4cir",
                        log=msgs.append)
    assert res["selection"]["gamma"] in TINY_WRF["gammas"]
    arms = set(res["runs"][0]["arms"])
    assert arms == {"plain", "adversarial 0.001", "adversarial 0.01", f"random {res['selection']['gamma']:g}"}
    for r in res["runs"]:
        assert r["scale"] == pytest.approx(1 / O.BASE_DEFAULTS["tau"], rel=1e-5)  # the checkpoint's, not 100
        plain, adv = r["arms"]["plain"], r["arms"]["adversarial 0.01"]
        assert [c["epoch"] for c in plain["curve"]] == [0, 1, 2, 4]
        assert plain["counts"] == {"plain": 8, "adversarial": 0, "random": 0}
        assert adv["counts"] == {"plain": 2, "adversarial": 6, "random": 0}  # warm-up: 1 epoch of 2 steps
        rnd = r["arms"][f"random {res['selection']['gamma']:g}"]
        assert rnd["counts"]["random"] == 6 and rnd["embeddings"] == "per_row"
        assert "clip.token_embedding.weight" in adv["perturbed"]
        assert not any(n.startswith("clip.visual") for n in adv["perturbed"])  # frozen image tower
        for c in plain["curve"]:
            assert 0.0 <= c["train"] <= 1.0 and 0.0 <= c["val"] <= 1.0
        assert "tune" in plain["final"]
        # same start in every arm of a seed (same weights, combiner, batches before the perturbation starts)
        assert plain["curve"][1]["val"] == adv["curve"][1]["val"]
    assert len(res["rows"]) == 4 and all(len(x["values"]) == 2 for x in res["rows"])
    assert {x["verdict"] for x in res["rows"]} <= {"reproduced", "partly reproduced", "not reproduced",
                                                  "premise absent"}
    text = res["section"]
    assert "Premise" in text and "Selected: **" in text and "Table 4" in text and "min wall" in text
    assert os.path.exists(tmp_path / "out" / "wrf4cir.json") and os.path.exists(tmp_path / "out" / "wrf4cir.md")
    report = tmp_path / "FIDELITY.md"
    FI.upsert_section(str(report), "wrf4cir", text)
    assert "<!-- section:wrf4cir -->" in report.read_text()
    assert "wrf4cir" in FI.CLAIM_GROUPS


def test_wrf4cir_compact_vocab_is_exact():
    from vlmkern.app.models.clip import create_clip

    torch.manual_seed(0)
    clip, _, tok = create_clip("vlmkern-micro-ViT")
    texts = ["make it blue and move it to the left", "a smaller one", "same but red"]
    t = tok(texts)
    small, (t2,), rows = W.compact_vocab(clip, [t])
    assert rows == len(torch.unique(t)) and small.token_embedding.num_embeddings == rows
    with torch.no_grad():
        torch.testing.assert_close(small.encode_text(t2), clip.encode_text(t), rtol=0, atol=0)


def _wrf_run(seed, plain_gaps, adv_val, plain_val=0.3, gamma=1e-3):
    curve = [{"epoch": e, "gap": g, "val": plain_val, "train": plain_val + g} for e, g in plain_gaps]
    adv = [{"epoch": e, "gap": g - 0.05, "val": adv_val, "train": adv_val + g - 0.05} for e, g in plain_gaps]
    return {"seed": seed, "protocol": {**W.PROTOCOL_DEFAULTS}, "selected_gamma": gamma,
            "arms": {"plain": {"curve": curve, "final": curve[-1]},
                     W.arm_name("adversarial", gamma): {"curve": adv, "final": adv[-1]}}}


def test_wrf4cir_premise_and_claim_rows():
    w, e = W.PROTOCOL_DEFAULTS["warmup_epochs"], W.PROTOCOL_DEFAULTS["epochs"]
    grows = [_wrf_run(i, [(w, 0.1), (e, 0.3 + 0.01 * i)], 0.32) for i in range(3)]
    rows = W.claim_rows(grows)
    assert [x["claim"] for x in rows] == [c[0] for c in W.COMPARISONS[:2]]  # no random arm: its rows are left out
    assert rows[0]["premise"]["holds"] is True
    assert rows[0]["verdict"] == "reproduced" and rows[0]["values"][0] == pytest.approx(-0.05)
    assert rows[1]["verdict"] == "reproduced"
    flat = [_wrf_run(i, [(w, 0.1), (e, 0.1 + 0.01 * (i - 1))], 0.32) for i in range(3)]
    rows = W.claim_rows(flat)
    assert all(x["verdict"] == "premise absent" for x in rows) and "absent" in rows[0]["premise"]["text"]


def test_wrf4cir_gamma_selection_keeps_the_paper_value_inside_noise():
    def run(seed, tune):
        return {"seed": seed, "arms": {"plain": {"final": {"tune": 0.3}},
                                       **{W.arm_name("adversarial", g): {"final": {"tune": v}} for g, v in tune.items()}}}

    noisy = [run(0, {1e-3: 0.30, 1e-2: 0.33}), run(1, {1e-3: 0.30, 1e-2: 0.28}), run(2, {1e-3: 0.30, 1e-2: 0.31})]
    assert W.select_gamma(noisy, (1e-3, 1e-2))["gamma"] == 1e-3
    clear = [run(i, {1e-3: 0.30, 1e-2: 0.33 + 0.001 * i}) for i in range(3)]
    sel = W.select_gamma(clear, (1e-3, 1e-2))
    assert sel["gamma"] == 1e-2 and [t["beats"] for t in sel["table"]] == [False, True]


def test_demo_wrf4cir_rows_point_to_the_protocol_when_their_premise_is_absent():
    def demo(seed, growth):
        return {"wrf4cir": {"plain": {"history": [{"gap_R5": 0.05}, {"gap_R5": 0.05 + growth}]}}}

    rows = [c for c in FI.CLAIMS if c["paper"] == "WRF4CIR"]
    assert len(rows) == 2
    absent = rows[0]["premise"]([demo(0, 0.01), demo(1, -0.02), demo(2, 0.0)])
    assert absent["holds"] is False and "--claims wrf4cir" in absent["text"]
    present = rows[1]["premise"]([demo(0, 0.20), demo(1, 0.21), demo(2, 0.22)])
    assert present["holds"] is True and "--claims wrf4cir" not in present["text"]


def test_published_report_was_made_by_one_command_within_the_budget():
    """docs/FIDELITY.md ends with the whole run's section (issue 18: every section from one command, at most
    60 min on 2 cores), and every protocol section names that command."""
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "FIDELITY.md")
    sections = FI._sections(path)
    whole = sections["whole_run"]
    m = re.search(r"`(vlmkern fidelity [^`]*)` wrote every section above in ([0-9.]+) min wall time on \S+ \((\d+) cores",
                  whole)
    assert m, whole
    command, minutes, cores = m.group(1), float(m.group(2)), int(m.group(3))
    assert minutes <= 60 and cores <= 2
    for name in ("osr", "hgcl", "kalman", "apft", "wrf4cir"):
        assert f"Command: `{command}`" in sections[name], name
    text = FI.whole_run_text("vlmkern fidelity --seeds 0 1", 125.0)
    assert "`vlmkern fidelity --seeds 0 1` wrote every section above in 2.1 min" in text
