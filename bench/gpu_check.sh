#!/usr/bin/env bash
# The one GPU script: build with CUDA, run the GPU tests and the benchmarks,
# write every result under $OUT (default ./gpu_out).
#
# Meant for a GPU machine without network: pure-Python dependencies missing
# there (open_clip_torch, ftfy, ...) travel as wheels in .whl/ (see
# bench/README.md for the download command) and are installed with --no-index.
#
#   OUT=/some/dir bash bench/gpu_check.sh [--quick] [--tests-only] [--bench-only]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/logs"
QUICK=""; DO_TESTS=1; DO_BENCH=1
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    --tests-only) DO_BENCH=0 ;;
    --bench-only) DO_TESTS=0 ;;
  esac
done
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  >"$OUT/logs/env.txt" 2>&1

echo "== build (CUDA on, sm_90)"
start=$(date +%s)
if ! PYTHON="$PY" VLMKERN_CUDA=ON VLMKERN_CUDA_ARCHS="${VLMKERN_CUDA_ARCHS:-90}" JOBS=16 tools/build_inplace.sh \
    >"$OUT/logs/build.txt" 2>&1; then
  tail -40 "$OUT/logs/build.txt"; echo "BUILD FAILED"
fi
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m vlmkern info >"$OUT/logs/info.txt" 2>&1; tail -30 "$OUT/logs/info.txt"

rc=0
if [ "$DO_TESTS" = 1 ]; then
  echo "== tests"
  "$PY" -m pytest python_tests -q -x -p no:cacheprovider --junitxml="$OUT/logs/junit.xml" >"$OUT/logs/tests.txt" 2>&1 || rc=1
  tail -25 "$OUT/logs/tests.txt"
fi
if [ "$DO_BENCH" = 1 ]; then
  echo "== benchmarks"
  "$PY" bench/run_all.py --device cuda $QUICK --out "$OUT/bench" >"$OUT/logs/bench.txt" 2>&1 || rc=1
  tail -60 "$OUT/logs/bench.txt"
  cp "$OUT/bench/SUMMARY_cuda.md" "$OUT/SUMMARY_cuda.md" 2>/dev/null || true
fi
# The device tool returns at most 8 files: pack everything into one archive.
tar -czf "$OUT/results.tar.gz" -C "$OUT" logs $( [ -d "$OUT/bench" ] && echo bench ) 2>/dev/null
exit $rc
