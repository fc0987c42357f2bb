"""APFT's event-triggered phase transitions, hyperparameter adaptation and
early stopping (SPEC §5, Algorithm 1 of the APFT paper), independent of any
model: feed it one validation loss per epoch.

Transition triggers over the window of the last ``window`` validation losses
(only once the current phase has at least ``window`` epochs), any of:

* volatility:  std / mean of the window > ``tau_vol`` (0.15)
* worsening:   slope of the least-squares line through the window > ``tau_slope`` (1e-4)
* stagnation:  mean improvement between consecutive epochs, ``mean(L[t-1] - L[t])``,
  < ``tau_imp`` (1e-4) **and** ``|L_now - L_best| > delta_min``

The paper names the factors of the new learning rate but not their formulas;
the ones used here are (each documented and configurable):

* ``f_phase = phase_decay ** phase``                                  (0.5: exponential decay with phase)
* ``f_stability = clamp(L_best / L_now, stability_min, 1)``            (1 near the best, smaller when worse)
* ``f_window = (window_ref / window) ** window_exp``                   (a minor correction, 1 at w = 10)
* ``lr = lr0 * f_phase * f_stability * f_window``
* ``wd = wd0 * (1 + wd_growth * phase)``                              (grows linearly with phase)

Early stopping: patience ``patience`` (5) epochs without an improvement of at
least ``min_delta``, never before ``min_epochs`` (10) epochs in total; the
patience counter restarts at every transition (``epsilon.reset()`` in the
algorithm box). The best validation loss seen is tracked for restoring the
best weights at the end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class APFTConfig:
    window: int = 10
    tau_vol: float = 0.15
    tau_slope: float = 1e-4
    tau_imp: float = 1e-4
    delta_min: float = 1e-3
    lr0: float = field(default=1e-5, metadata={"cli": False})  # the trainer sets lr0, wd0 from its lr, wd
    wd0: float = field(default=1e-2, metadata={"cli": False})
    phase_decay: float = 0.5
    stability_min: float = 0.1
    window_ref: int = 10
    window_exp: float = 0.1
    wd_growth: float = 1.0
    patience: int = 5
    min_epochs: int = 10
    min_delta: float = 0.0

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0 < self.phase_decay <= 1:
            raise ValueError(f"phase_decay must be in (0, 1], got {self.phase_decay}")


def slope(values: List[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ..."""
    n = len(values)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2
    ym = sum(values) / n
    num = sum((i - xm) * (v - ym) for i, v in enumerate(values))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


def coefficient_of_variation(values: List[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return math.sqrt(var) / abs(mean) if mean != 0 else math.inf


def mean_pairwise_improvement(values: List[float]) -> float:
    return sum(values[i - 1] - values[i] for i in range(1, len(values))) / (len(values) - 1)


@dataclass
class Transition:
    epoch: int
    from_phase: int
    to_phase: int
    reason: str
    lr: float
    wd: float
    stats: Dict[str, float]


@dataclass
class APFTSchedule:
    """State machine of APFT: call :meth:`step` once per epoch with the validation loss.

    ``step`` returns ``"continue"``, ``"transition"`` (then read :attr:`phase`,
    :attr:`lr`, :attr:`wd` and re-create the optimizer / scheduler) or
    ``"stop"``. ``num_phases`` bounds the phases; at the last phase no more
    transitions happen and only early stopping ends training.
    The whole state is a plain dict (:meth:`state_dict`), so a run resumes exactly.
    """

    num_phases: int
    config: APFTConfig = field(default_factory=APFTConfig)
    phase: int = 0
    epoch: int = 0
    epochs_in_phase: int = 0
    phase_losses: List[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: List[Dict] = field(default_factory=list)
    transitions: List[Transition] = field(default_factory=list)

    def __post_init__(self):
        if self.num_phases < 1:
            raise ValueError(f"num_phases must be >= 1, got {self.num_phases}")
        self.lr = self.config.lr0
        self.wd = self.config.wd0

    # -- criteria -------------------------------------------------------------
    def window_stats(self) -> Optional[Dict[str, float]]:
        w = self.config.window
        if len(self.phase_losses) < w:
            return None
        win = self.phase_losses[-w:]
        return {
            "cv": coefficient_of_variation(win),
            "slope": slope(win),
            "pair_improvement": mean_pairwise_improvement(win),
            "gap_to_best": abs(win[-1] - self.best_loss),
        }

    def trigger(self) -> Optional[str]:
        s = self.window_stats()
        if s is None:
            return None
        c = self.config
        if s["cv"] > c.tau_vol:
            return "volatility"
        if s["slope"] > c.tau_slope:
            return "worsening"
        if s["pair_improvement"] < c.tau_imp and s["gap_to_best"] > c.delta_min:
            return "stagnation"
        return None

    def adapted_hparams(self, phase: int, current_loss: float) -> Dict[str, float]:
        c = self.config
        f_phase = c.phase_decay ** phase
        ratio = self.best_loss / current_loss if current_loss > 0 and math.isfinite(self.best_loss) else 1.0
        f_stability = min(1.0, max(c.stability_min, ratio))
        f_window = (c.window_ref / c.window) ** c.window_exp
        return {
            "lr": c.lr0 * f_phase * f_stability * f_window,
            "wd": c.wd0 * (1 + c.wd_growth * phase),
            "f_phase": f_phase,
            "f_stability": f_stability,
            "f_window": f_window,
        }

    # -- the epoch step --------------------------------------------------------
    def step(self, val_loss: float, force_transition: bool = False) -> str:
        """Record one epoch's validation loss; ``force_transition`` moves to the
        next phase regardless of the triggers (fixed-schedule baseline)."""
        if not math.isfinite(val_loss):
            raise ValueError(f"val_loss must be finite, got {val_loss}")
        c = self.config
        self.epoch += 1
        self.epochs_in_phase += 1
        self.phase_losses.append(float(val_loss))
        if val_loss < self.best_loss - c.min_delta:
            self.best_loss = float(val_loss)
            self.best_epoch = self.epoch
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        rec = {"epoch": self.epoch, "phase": self.phase, "val_loss": float(val_loss), "lr": self.lr, "wd": self.wd,
               "best_loss": self.best_loss, "event": "continue"}
        self.history.append(rec)
        if self.epoch >= c.min_epochs and self.bad_epochs >= c.patience:
            rec["event"] = "stop"
            return "stop"
        if self.phase + 1 < self.num_phases:
            reason = "fixed" if force_transition else self.trigger()
            if reason is not None:
                stats = self.window_stats() or {}
                hp = self.adapted_hparams(self.phase + 1, val_loss)
                self.transitions.append(Transition(self.epoch, self.phase, self.phase + 1, reason, hp["lr"], hp["wd"],
                                                   dict(stats, **{k: hp[k] for k in ("f_phase", "f_stability", "f_window")})))
                self.phase += 1
                self.lr, self.wd = hp["lr"], hp["wd"]
                self.epochs_in_phase = 0
                self.phase_losses = []
                self.bad_epochs = 0  # the early stopper restarts with the new phase
                rec["event"] = f"transition:{reason}"
                return "transition"
        return "continue"

    def state_dict(self) -> Dict:
        return {
            "num_phases": self.num_phases, "config": asdict(self.config), "phase": self.phase, "epoch": self.epoch,
            "epochs_in_phase": self.epochs_in_phase, "phase_losses": list(self.phase_losses),
            "best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": [dict(h) for h in self.history], "transitions": [asdict(t) for t in self.transitions],
            "lr": self.lr, "wd": self.wd,
        }

    @classmethod
    def from_state_dict(cls, sd: Dict) -> "APFTSchedule":
        s = cls(num_phases=sd["num_phases"], config=APFTConfig(**sd["config"]))
        for k in ("phase", "epoch", "epochs_in_phase", "best_loss", "best_epoch", "bad_epochs", "lr", "wd"):
            setattr(s, k, sd[k])
        s.phase_losses = list(sd["phase_losses"])
        s.history = [dict(h) for h in sd["history"]]
        s.transitions = [Transition(**t) for t in sd["transitions"]]
        return s
