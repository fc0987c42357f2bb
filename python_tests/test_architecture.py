"""The import contract of docs/ARCHITECTURE.md, read from the source with ``ast``:

* the kernel library (every module of ``vlmkern`` outside the application floor) imports nothing from
  the application floor - ``vlmkern.app`` and ``vlmkern.integrations`` (the latter imports other
  projects' trainers, e.g. open_clip_train) - absolute or relative imports, at module level or inside
  functions, and ``importlib.import_module`` / ``__import__`` with a literal name;
* runtime code does not import the float64 test oracle ``vlmkern.reference`` (only the benchmark
  harness may, for its baseline);
* ``import vlmkern`` loads neither the application floor nor ``vlmkern.reference``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

import vlmkern

PKG_DIR = Path(vlmkern.__file__).resolve().parent
APP = "vlmkern.app"
# the application floor: the trainers and everything around them, and the integrations into other
# projects' trainers (they may import the library and vlmkern.app; the library imports neither)
APP_FLOOR = (APP, "vlmkern.integrations")
ORACLE = "vlmkern.reference"
# `python -m vlmkern` is the command line: the one module at the top that reaches up (nothing imports it)
ENTRY_POINTS = {"vlmkern.__main__"}
# the benchmark harness times the oracle as a baseline (bench/RESULTS*.md); it is a measuring tool
ORACLE_USERS = ("vlmkern.app.bench",)


def _module_name(path: Path) -> Tuple[str, bool]:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _modules() -> Dict[str, Tuple[Path, bool]]:
    out = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        name, is_pkg = _module_name(path)
        out[name] = (path, is_pkg)
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(source: str, module: str, is_pkg: bool) -> Iterator[Tuple[int, str]]:
    """(line, fully qualified name) of everything ``source`` (module ``module``) may import, anywhere
    in the file. ``from X import a`` yields X and X.a (``a`` may be a submodule)."""
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _violations(check) -> List[str]:
    bad = []
    for name, (path, is_pkg) in _modules().items():
        for line, target in imports_of(path.read_text(encoding="utf-8"), name, is_pkg):
            if check(name, target):
                bad.append(f"{path.relative_to(PKG_DIR.parent)}:{line}: {name} imports {target}")
    return sorted(set(bad))


def _on_app_floor(name: str) -> bool:
    return any(_under(name, p) for p in APP_FLOOR)


def _library_imports_app(module: str, target: str) -> bool:
    return not _on_app_floor(module) and module not in ENTRY_POINTS and _on_app_floor(target)


def _runtime_imports_oracle(module: str, target: str) -> bool:
    return (module != ORACLE and not any(_under(module, p) for p in ORACLE_USERS)
            and _under(target, ORACLE))


def test_the_floors_exist():
    mods = _modules()
    assert APP in mods and ORACLE in mods and "vlmkern.ops.hgcl" in mods
    assert "vlmkern.integrations.open_clip_train" in mods
    assert any(_under(m, APP + ".methods") for m in mods) and any(_under(m, "vlmkern.optim") for m in mods)


def test_library_does_not_import_the_application():
    bad = _violations(_library_imports_app)
    assert not bad, "the kernel library imports the application (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_runtime_code_does_not_import_the_test_oracle():
    bad = _violations(_runtime_imports_oracle)
    assert not bad, "runtime code imports vlmkern.reference (the test oracle):\n" + "\n".join(bad)


def test_the_stair_goes_up_only():
    """The scan sees real imports: the application does use the library."""
    found = {t for m, (p, pkg) in _modules().items() if _under(m, APP)
             for _, t in imports_of(p.read_text(encoding="utf-8"), m, pkg)}
    assert "vlmkern.optim.kalman" in found and "vlmkern.ops.hgcl" in found
    found = {t for m, (p, pkg) in _modules().items() if _under(m, "vlmkern.integrations")
             for _, t in imports_of(p.read_text(encoding="utf-8"), m, pkg)}
    assert "vlmkern.GlobalContrastiveLoss" in found and "vlmkern.app.models.clip" in found


@pytest.mark.parametrize("module, target", [
    ("vlmkern.integrations.open_clip_train", "vlmkern.app.models.clip"),
    ("vlmkern.integrations.open_clip_train", "vlmkern.GlobalContrastiveLoss"),
    ("vlmkern.app.cli", "vlmkern.integrations.open_clip_train"),
])
def test_the_application_floor_may_import_itself_and_the_library(module, target):
    assert not _library_imports_app(module, target)


@pytest.mark.parametrize("module, is_pkg, source", [
    ("vlmkern.ops.x", False, "from ..app import demo\n"),
    ("vlmkern.ops.x", False, "def f():\n    from ..app.methods.tuneclip import fastclip_gamma\n"),
    ("vlmkern.ops", True, "from .. import app\n"),
    ("vlmkern.info", False, "import vlmkern.app.cli\n"),
    ("vlmkern.info", False, "from vlmkern import app\n"),
    ("vlmkern.info", False, "import importlib\nimportlib.import_module('vlmkern.app.bench.run_all')\n"),
    ("vlmkern.ops.x", False, "from ..integrations import open_clip_train\n"),
    ("vlmkern.optim.kalman", False, "def f():\n    import vlmkern.integrations.open_clip_train\n"),
    ("vlmkern", True, "from .integrations.open_clip_train import OpenClipLoss\n"),
])
def test_the_scan_catches_a_library_import_of_the_application(module, is_pkg, source):
    assert any(_library_imports_app(module, t) for _, t in imports_of(source, module, is_pkg))


@pytest.mark.parametrize("module, is_pkg, source", [
    ("vlmkern.app.methods.tuneclip", False, "from ...reference import fastclip_gamma\n"),
    ("vlmkern", True, "from . import backends, reference\n"),
    ("vlmkern.optim.kalman", False, "def f():\n    import vlmkern.reference as R\n"),
])
def test_the_scan_catches_runtime_imports_of_the_oracle(module, is_pkg, source):
    assert any(_runtime_imports_oracle(module, t) for _, t in imports_of(source, module, is_pkg))


def test_import_vlmkern_loads_neither_the_application_nor_the_oracle():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_DIR.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    code = ("import sys, vlmkern; print(vlmkern.__file__); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vlmkern'))))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    where, loaded = r.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve().parent == PKG_DIR
    loaded = loaded.split()
    assert "vlmkern.ops.hgcl" in loaded  # the library itself did load
    assert not [m for m in loaded if _on_app_floor(m) or _under(m, ORACLE)], loaded
    # and the oracle stays importable on its own
    r = subprocess.run([sys.executable, "-c", "from vlmkern import reference; print(reference.fastclip_gamma(0, 0.2, 10))"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "1.0", r.stderr[-3000:]
