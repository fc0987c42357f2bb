"""Kernel microbenchmarks: ``vlmkern bench`` (all of them) or ``python -m vlmkern.app.bench.<op> [--quick]
[--device cuda]``; see :mod:`vlmkern.app.bench.harness`. Published results: bench/RESULTS*.md in the source tree."""
