from .weight_perturbation import WeightPerturbation  # noqa: F401
