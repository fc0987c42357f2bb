"""pytest-benchmark entry points for the quick cases of every op benchmark.

    python -m pytest bench/test_pytest_benchmark.py --benchmark-enable   (from the repository root)

(The main test run disables benchmarks: ``--benchmark-disable`` in pyproject,
so there each case runs once as a smoke test.)
"""

from __future__ import annotations

import importlib

import pytest
import torch

from vlmkern.app.bench.run_all import BENCHES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases():
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"vlmkern.app.bench.{name}")
        except ModuleNotFoundError:
            continue
        bench = mod.make_bench(True)
        case = bench.cases[0]
        for mode in bench.modes:
            for prov in bench.providers:
                if prov.modes is not None and mode not in prov.modes:
                    continue
                yield pytest.param(bench, case, mode, prov, id=f"{name}-{mode}-{prov.name}")


@pytest.mark.parametrize("bench,case,mode,prov", list(_cases()))
def test_bench(benchmark, bench, case, mode, prov):
    ok, why = prov.available(case, DEVICE)
    if not ok:
        pytest.skip(why)
    why = prov.skip(case, mode, DEVICE) if prov.skip is not None else None
    if why:
        pytest.skip(why)
    fn = prov.make(case, mode, DEVICE)
    benchmark.group = f"{bench.name}-{mode}"
    benchmark(fn)
