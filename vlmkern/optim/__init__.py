from .kalman import KalmanOptimizer  # noqa: F401
