"""Optimizers built on the fused ops."""

from .kalman import KalmanOptimizer  # noqa: F401
from .weight_perturbation import WeightPerturbation  # noqa: F401
