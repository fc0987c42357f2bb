"""APFT triggers, hyperparameter adaptation, early stopping and resume."""

import math

import pytest

from vlmkern.app.methods.apft_schedule import (APFTConfig, APFTSchedule, coefficient_of_variation,
                                           mean_pairwise_improvement, slope)


def test_window_statistics():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([3.0, 3.0]) == 0.0
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert mean_pairwise_improvement([4.0, 3.0, 1.0]) == pytest.approx(1.5)


def cfg(**kw):
    base = dict(window=3, patience=50, min_epochs=1, delta_min=0.0)
    base.update(kw)
    return APFTConfig(**base)


def test_no_trigger_before_window_is_full_and_while_improving():
    s = APFTSchedule(num_phases=3, config=cfg())
    assert [s.step(v) for v in (1.0, 0.9, 0.8, 0.7, 0.6)] == ["continue"] * 5
    assert s.phase == 0


def test_stagnation_triggers_with_adapted_hparams():
    s = APFTSchedule(num_phases=3, config=cfg(delta_min=1e-3))
    for v in (1.0, 0.5):
        assert s.step(v) == "continue"
    # flat after the best but 0.1 above it: stagnation
    assert s.step(0.6) == "transition"  # window [1.0, 0.5, 0.6]: slope -0.2, cv 0.29 -> volatility first
    assert s.transitions[0].reason == "volatility"
    s2 = APFTSchedule(num_phases=3, config=cfg(delta_min=1e-3, tau_vol=10.0))
    for v in (0.50, 0.60, 0.60):
        ev = s2.step(v)
    assert ev == "transition" and s2.transitions[0].reason in ("worsening", "stagnation")
    s3 = APFTSchedule(num_phases=3, config=cfg(delta_min=1e-3, tau_vol=10.0, tau_slope=10.0))
    for v in (0.50, 0.70, 0.70):
        ev = s3.step(v)
    assert ev == "transition" and s3.transitions[0].reason == "stagnation"
    t = s3.transitions[0]
    c = s3.config
    assert s3.phase == 1 and s3.epochs_in_phase == 0
    assert s3.lr == pytest.approx(c.lr0 * 0.5 * (0.5 / 0.7) * 1.0 ** 0 * (10 / 3) ** 0.1)
    assert s3.wd == pytest.approx(c.wd0 * 2)
    assert t.lr == s3.lr and t.wd == s3.wd


def test_stagnation_needs_gap_to_best():
    s = APFTSchedule(num_phases=3, config=cfg(delta_min=0.05, tau_vol=10.0, tau_slope=10.0))
    for v in (0.5, 0.5, 0.5):
        ev = s.step(v)
    assert ev == "continue"  # stagnating at the best: no transition


def test_last_phase_never_transitions_and_early_stopping():
    s = APFTSchedule(num_phases=1, config=APFTConfig(window=3, patience=2, min_epochs=4))
    events = [s.step(v) for v in (1.0, 2.0, 3.0)]
    assert events == ["continue"] * 3  # patience reached but min_epochs not yet
    assert s.step(4.0) == "stop"
    assert s.best_epoch == 1 and s.best_loss == 1.0


def test_transition_resets_patience():
    s = APFTSchedule(num_phases=2, config=APFTConfig(window=2, patience=2, min_epochs=1, tau_vol=10.0, delta_min=0.0))
    assert s.step(1.0) == "continue"
    assert s.step(1.5) == "transition"  # worsening slope
    assert s.bad_epochs == 0
    assert s.step(1.4) == "continue"
    assert s.step(1.3) == "stop"


def test_state_dict_round_trip_continues_identically():
    losses = [1.0, 0.8, 0.79, 0.9, 0.85, 0.84, 0.7, 0.71, 0.72, 0.73, 0.74]
    a = APFTSchedule(num_phases=4, config=cfg(delta_min=1e-3, patience=3))
    ev_a = [a.step(v) for v in losses]
    b = APFTSchedule(num_phases=4, config=cfg(delta_min=1e-3, patience=3))
    ev_b = [b.step(v) for v in losses[:5]]
    b = APFTSchedule.from_state_dict(b.state_dict())
    ev_b += [b.step(v) for v in losses[5:]]
    assert ev_a == ev_b
    assert a.state_dict() == b.state_dict()


def test_bad_inputs():
    with pytest.raises(ValueError, match="window"):
        APFTConfig(window=1)
    with pytest.raises(ValueError, match="num_phases"):
        APFTSchedule(num_phases=0)
    with pytest.raises(ValueError, match="val_loss"):
        APFTSchedule(num_phases=2).step(math.nan)
