"""The user's path after ``pip install --no-build-isolation .``: a regular (non-editable) wheel,
installed into a fresh virtual environment and run from a folder outside any checkout. ``vlmkern
bench`` and ``vlmkern demo`` must work there: the benchmark harness ships inside the package
(``vlmkern.app.bench``). Slow (a wheel build, incremental when the build folder is warm, and a real
benchmark and a tiny demo): marked ``slow``, and it runs in CI (``make test`` runs every test)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{module} missing in CI: the wheel cannot be built ({exc})")
        pytest.skip(f"{module} not installed: cannot build the wheel here ({exc})")


def _site_dirs():
    """The running interpreter's package folders (torch, numpy, open_clip...), but not a source tree."""
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p) or os.path.isfile(os.path.join(p, "vlmkern", "__init__.py")):
            continue
        if os.path.basename(p) in ("site-packages", "dist-packages"):
            out.append(os.path.abspath(p))
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    _need("scikit_build_core")
    _need("pip")
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp / "dist"), ROOT], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = glob.glob(str(tmp / "dist" / "vlmkern-*.whl"))
    vdir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(str(vdir))
    vpy = str(vdir / "bin" / "python")
    purelib = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this interpreter's folders; vlmkern only from the wheel
    with open(os.path.join(purelib, "shared_deps.pth"), "w") as f:
        f.write("\n".join(_site_dirs()) + "\n")
    # this pip, run for the new environment's interpreter (the console script's shebang is then its own)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "--no-index", "-q",
                        whl], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = tmp / "elsewhere"  # outside any checkout
    work.mkdir()
    return vdir, work, env


def _run(installed, *args, timeout=900):
    vdir, work, env = installed
    return subprocess.run([str(vdir / "bin" / "vlmkern"), *args], cwd=str(work), env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_installs_the_package_not_the_checkout(installed):
    vdir, work, env = installed
    code = ("import os, vlmkern, vlmkern.app.bench.run_all as r; from vlmkern import _C_loader; "
            "print(os.path.dirname(vlmkern.__file__)); print(r.BENCHES); print(_C_loader.load())")
    r = subprocess.run([str(vdir / "bin" / "python"), "-c", code], cwd=str(work), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, benches, loaded = r.stdout.strip().splitlines()[-3:]
    assert where.startswith(str(vdir)) and not where.startswith(ROOT)
    assert "kalman" in benches and loaded == "True"  # the compiled library came with the wheel


def test_wheel_vlmkern_bench(installed):
    _, work, _ = installed
    r = _run(installed, "bench", "--quick", "--only", "kalman", "--device", "cpu", "--out", "b")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((work / "b" / "kalman_cpu.json").read_text())
    assert any(rec["provider"] == "vlmkern-fused" and rec.get("median_s", 0) > 0 for rec in res["records"])
    assert (work / "b" / "SUMMARY_cpu.md").stat().st_size > 0


def test_wheel_vlmkern_demo_tiny(installed):
    """The demo from the wheel: info and every method at the tiny scale. Its third stage is the same
    call as ``vlmkern bench --quick`` (all three benchmarks), which test_wheel_vlmkern_bench checks on
    one benchmark to stay short."""
    _, work, _ = installed
    r = _run(installed, "demo", "--scale", "tiny", "--skip-bench", "--out", "d")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((work / "d" / "results.json").read_text())["scale"] == "tiny"
    assert "| Kalman | LoRA + kalman per-sample |" in (work / "d" / "report.md").read_text()
