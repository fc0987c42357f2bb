"""The application floor of vlmkern: trainers for the four methods (methods/), CLIP models and LoRA
(models/), data loaders (data/), metrics (eval/), the demo and fidelity runs, the command line and the
benchmark harness (bench/).

It builds on the kernel library below it (vlmkern.ops, vlmkern.optim, vlmkern.kernels, vlmkern.backends);
nothing in the library imports from here (docs/ARCHITECTURE.md, python_tests/test_architecture.py).
"""
