#!/usr/bin/env bash
# Run the test suite on other Python versions than the default .venv's (3.11):
# by default the oldest and the newest supported, 3.10 and 3.13.
#
#   bash tools/test_pythons.sh [VERSION ...]        (make test-pythons)
#
# For each VERSION it finds an interpreter (pythonVERSION on PATH, else pyenv's
# newest VERSION.*), creates .venv-pyVERSION with the pinned dependencies
# (requirements-dev.txt, reinstalled only when that file changes), installs
# vlmkern into it in editable mode (its build directory is build/<wheel tag>,
# so the default .venv's build is left alone) and runs the whole suite.
# A missing interpreter is an error, not a skip.
#
#   VLMKERN_CUDA   default OFF here: the CUDA sources are compiled and tested by
#                  `make test`; these runs check the Python code and the C++
#                  build on each interpreter.
#   PYTEST_ARGS    default "-q -x -p no:cacheprovider --ignore=python_tests/test_qemu_cpus.py"
#                  (the qemu test runs the same C++ code under other CPU models;
#                  `make test` runs it, once is enough: it costs ~3 min a run)
set -euo pipefail
cd "$(dirname "$0")/.."
export VLMKERN_CUDA="${VLMKERN_CUDA:-OFF}"
PYTEST_ARGS="${PYTEST_ARGS:--q -x -p no:cacheprovider --ignore=python_tests/test_qemu_cpus.py}"
[ $# -gt 0 ] || set -- 3.10 3.13

find_python() {  # $1 = X.Y; prints the interpreter's path or returns 1
  local v="$1" p root
  if p="$(command -v "python$v" 2>/dev/null)" && "$p" -c 1 >/dev/null 2>&1; then echo "$p"; return 0; fi
  root="${PYENV_ROOT:-}"
  [ -n "$root" ] || root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  # newest patch release first (3.10.13 before 3.10.9)
  for p in $(ls -d "$root/versions/$v".*/bin/"python$v" 2>/dev/null | sort -rV); do
    if "$p" -c 1 >/dev/null 2>&1; then echo "$p"; return 0; fi
  done
  return 1
}

status=0
summary=()
for v in "$@"; do
  t0=$(date +%s)
  if ! py="$(find_python "$v")"; then
    echo "tools/test_pythons.sh: no Python $v found (looked for python$v on PATH and in" \
         "${PYENV_ROOT:-\$(pyenv root) or ~/.pyenv}/versions/$v.*); install it, e.g. \`pyenv install $v\`" >&2
    exit 2
  fi
  venv=".venv-py$v"
  echo "== Python $v: $py -> $venv"
  stamp="$venv/.deps"
  want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r requirements-dev.txt
    echo "$want" >"$stamp"
  fi
  t1=$(date +%s)
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e . \
    || { echo "tools/test_pythons.sh: vlmkern build failed on Python $v" >&2; exit 1; }
  t2=$(date +%s)
  rc=0
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pytest python_tests $PYTEST_ARGS || rc=$?
  t3=$(date +%s)
  ver="$("$venv/bin/python" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__)')"
  summary+=("Python $ver: deps $((t1 - t0)) s, build $((t2 - t1)) s, tests $((t3 - t2)) s, pytest exit $rc")
  [ "$rc" = 0 ] || status=1
done
printf 'tools/test_pythons.sh: %s\n' "${summary[@]}"
exit $status
