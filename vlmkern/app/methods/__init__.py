"""Thin trainers, one file per method (they call ops, never kernels)."""
