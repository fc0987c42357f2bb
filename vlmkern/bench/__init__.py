"""Kernel microbenchmarks: ``vlmkern bench`` (all of them) or ``python -m vlmkern.bench.<op> [--quick]
[--device cuda]``; see :mod:`vlmkern.bench.harness`. Published results: bench/RESULTS*.md in the source tree."""
