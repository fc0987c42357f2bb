#!/usr/bin/env bash
# Development build: compile vlmkern._C into build/inplace and copy it next to
# the Python sources, so `PYTHONPATH=. python ...` (or pytest from the repo
# root) uses this tree without a pip install.  Same CMakeLists as the wheel.
#   VLMKERN_CUDA=auto|ON|OFF   PYTHON=path/to/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
CMAKE="$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || echo cmake)"
mkdir -p build
"$CMAKE" -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DVLMKERN_CUDA="${VLMKERN_CUDA:-auto}" \
  ${VLMKERN_CUDA_ARCHS:+-DVLMKERN_CUDA_ARCHS="$VLMKERN_CUDA_ARCHS"} >build/inplace.configure.log 2>&1 \
  || { cat build/inplace.configure.log; exit 1; }
grep -E "vlmkern:" build/inplace.configure.log || true
"$CMAKE" --build build/inplace -j "${JOBS:-2}"
rm -f vlmkern/_C*.so
cp build/inplace/_C*.so vlmkern/
echo "built $(ls vlmkern/_C*.so)"
