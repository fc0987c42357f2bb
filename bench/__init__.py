"""Kernel microbenchmarks: `python bench/<op>.py [--quick] [--device cuda]`; see bench/harness.py."""
