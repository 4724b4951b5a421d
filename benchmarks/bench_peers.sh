#!/usr/bin/env bash
# Build tinyserve and measure it beside its peers on a GPU machine in one call: the decode grid
# (bench_decode.py --grid) and prefill (bench_prefill.py), FlashInfer from carried wheels.
#   bash benchmarks/bench_peers.sh [extra bench_decode.py --grid arguments, e.g. --kv-dtype fp8]
# Wheels: .whl/*.whl (flashinfer-python and apache-tvm-ffi, see .whl/INSTALL.txt), installed into
# /tmp/site when present; without them both benchmarks run without FlashInfer and say so.
# Results (JSON and logs) go to $OUT (default /tmp/tinyserve-peers); the tables print last.
set -uo pipefail
RESULTS=${OUT:-/tmp/tinyserve-peers}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer-ws}
PY=${PYTHON:-python3}
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -q . > "$RESULTS/build.log" 2>&1; then
  tail -40 "$RESULTS/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
$PY -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
# Time limits keep the whole call inside the device tool's ten minutes; each script writes its
# JSON after every case, so a stopped run keeps what it measured.
timeout "${GRID_TIMEOUT:-270}" $PY -X faulthandler benchmarks/bench_decode.py --grid \
  --json "$RESULTS/grid.json" "$@" > "$RESULTS/grid.log" 2>&1
echo "grid rc=$? ($(( $(date +%s) - start )) s since the build began)"
timeout "${PREFILL_TIMEOUT:-150}" $PY -X faulthandler benchmarks/bench_prefill.py \
  --json "$RESULTS/prefill.json" > "$RESULTS/prefill.log" 2>&1
echo "prefill rc=$? ($(( $(date +%s) - start )) s since the build began)"
grep -A3 "JIT build failed" "$RESULTS/grid.log" "$RESULTS/prefill.log" | head -20
tail -36 "$RESULTS/grid.log"
tail -14 "$RESULTS/prefill.log"
