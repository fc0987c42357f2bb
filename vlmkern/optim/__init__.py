"""Optimizers built on the fused ops."""

from .kalman import KalmanOptimizer, per_sample_jacobian  # noqa: F401
from .weight_perturbation import WeightPerturbation  # noqa: F401
