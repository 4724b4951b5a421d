#!/usr/bin/env bash
# Build, test, sanitize and benchmark tinyserve on a GPU machine in one go (the device tool runs
# this: device time is short, so everything that needs the GPU happens in one call).
#   bash benchmarks/gpu_check.sh [pytest args...]
# Logs and results go to $OUT (default /tmp/tinyserve-gpu); a short summary prints last.
set -uo pipefail
RESULTS=${OUT:-/tmp/tinyserve-gpu}
OUT=$RESULTS/logs  # everything lands here; bundled into logs.tgz at the end
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
  | tee "$OUT/device.txt"
$PY -c "import nanobind, scikit_build_core, torch; print('nanobind', nanobind.__version__, \
'scikit-build-core', scikit_build_core.__version__, 'torch', torch.__version__)"

start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s ($(c++ --version | head -1))"
so=$($PY -c "import tinyserve, os; print(os.path.dirname(tinyserve.__file__))")/lib/libtinyserve.so
echo "libstdc++ symbols defined in libtinyserve.so: $(nm -D --defined-only "$so" | c++filt | grep -cE 'std::(basic_ostream|codecvt|locale)')"

pytest_rc=skipped
if [ -z "${QUICK:-}" ]; then  # QUICK=1: build and benchmark only
$PY -m pytest tests/python -q -rfE --tb=short -p no:cacheprovider "$@" > "$OUT/pytest.log" 2>&1
pytest_rc=$?
if [ "$pytest_rc" != skipped ] && [ "$pytest_rc" -ge 128 ]; then  # a crash: find the test, then a host backtrace under cuda-gdb
  crashed=$(grep -m1 -oE 'File "[^"]*tests/python/test_[a-z_]+\.py", line [0-9]+ in test_[a-z_0-9]+' "$OUT/pytest.log" | grep -oE 'test_[a-z_0-9]+$')
  echo "pytest crashed in $crashed; backtrace:"
  cuda-gdb -batch -ex run -ex bt --args $PY -m pytest -x -q -p no:cacheprovider tests/python -k "$crashed" > "$OUT/gdb.log" 2>&1
  grep -E "^#[0-9]+" "$OUT/gdb.log" | head -25
fi
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
tail -3 "$OUT/pytest.log"

# The C++ CUDA driver, compiled directly against the installed package (pytest's test_cpp also
# builds it through find_package): it is what compute-sanitizer runs.
cppt=/tmp/tinyserve-cpp-tests
mkdir -p $cppt
prefix=$($PY -c "import tinyserve, os; print(os.path.dirname(tinyserve.__file__))")
cuda_home=$(dirname "$(dirname "$(command -v nvcc)")")
g++ -O2 -std=c++17 tests/cpp/test_cuda_ops.cpp -Itests/cpp -I"$prefix/include" \
  -I"$cuda_home/include" -L"$prefix/lib" -ltinyserve -L"$cuda_home/lib64" -lcudart \
  -Wl,-rpath,"$prefix/lib" -Wl,-rpath,"$cuda_home/lib64" -o $cppt/test_cuda_ops \
  > "$OUT/cpp-build.log" 2>&1 || tail -20 "$OUT/cpp-build.log"
$cppt/test_cuda_ops > "$OUT/cuda-ops.log" 2>&1; echo "test_cuda_ops rc=$?"
grep -E "attention|failed|passed" "$OUT/cuda-ops.log" | tail -12
# The kernels through the backend interface (per-KV-head tables and lengths), built in-tree
# against the internal object library.
intree=/tmp/tinyserve-intree
cmake -S . -B $intree -DTINYSERVE_CUDA=ON -DTINYSERVE_BUILD_TESTS=ON -DTINYSERVE_BUILD_PYTHON=OFF \
  > "$OUT/intree-build.log" 2>&1 \
  && cmake --build $intree --target test_cuda_kernels >> "$OUT/intree-build.log" 2>&1 \
  || tail -20 "$OUT/intree-build.log"
$intree/tests/cpp/test_cuda_kernels > "$OUT/cuda-kernels.log" 2>&1; echo "test_cuda_kernels rc=$?"
grep -E "failed|passed" "$OUT/cuda-kernels.log" | tail -3
for tool in memcheck racecheck; do
  for prog in $cppt/test_cuda_ops $intree/tests/cpp/test_cuda_kernels; do
    compute-sanitizer --tool $tool --error-exitcode 9 $prog > "$OUT/$tool-$(basename $prog).log" 2>&1
    echo "compute-sanitizer --tool $tool $(basename $prog): rc=$? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool-$(basename $prog).log" | tail -1))"
  done
done
fi

if [ -z "${QUICK:-}" ]; then  # the selection kernels under the sanitizers, through their GPU tests
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider \
    tests/python/test_selection.py tests/python/test_selection_cuda.py -m cuda \
    -k "not graph and not long_sequences and not scoring_paths" > "$OUT/$tool-selection.log" 2>&1
  echo "compute-sanitizer --tool $tool test_selection (cuda): rc=$? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool-selection.log" | tail -1))"
done
fi
for summary in minmax_damped meanstd minmax; do
  $PY benchmarks/bench_selection.py --summary $summary --json "$OUT/bench-selection-$summary.json" \
    > "$OUT/bench-selection-$summary.log" 2>&1
  echo "bench_selection $summary rc=$?"; cat "$OUT/bench-selection-$summary.log"
done

for layout in ${BENCH_LAYOUTS:-NHD}; do
  $PY -X faulthandler benchmarks/bench_decode.py --layout $layout --json "$OUT/bench-$layout.json" \
    > "$OUT/bench-$layout.log" 2>&1
  echo "bench $layout rc=$?"
done
$PY -X faulthandler benchmarks/bench_compactor.py --json "$OUT/bench-compactor.json" \
  > "$OUT/bench-compactor.log" 2>&1
echo "bench_compactor rc=$?"
grep -E "^(#|\|)|FAILED" "$OUT/bench-compactor.log"
if [ -n "${PROFILE:-}" ]; then  # PROFILE="64 4096 NHD": ncu on one launch of the decode kernel
  ncu --kernel-name "regex:${PROFILE_KERNELS:-decode}" --launch-skip ${PROFILE_SKIP:-3} \
    --launch-count ${PROFILE_COUNT:-1} --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section LaunchStats --section SchedulerStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,sm__cycles_elapsed.avg" \
    $PY benchmarks/profile_decode.py $PROFILE > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "^  [a-z_]+.*\(|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per|Block Limit Shared|L2 Hit|Mem Busy|inst_executed|cycles_elapsed" "$OUT/ncu.txt" | head -30
  grep -E "issue_stalled" "$OUT/ncu.txt" | awk '$NF+0 > 0.05' | sort -k3 -g -r | head -12
fi
if [ -n "${SASS:-}" ]; then  # SASS=1: opcode histogram of the float16 head_dim-128 decode kernel
  cuobjdump -sass -fun '_ZN9tinyserve7kernels4cuda45_GLOBAL__N__' "$so" > /dev/null 2>&1
  cuobjdump -sass "$so" > "$OUT/sass.txt" 2>&1
  awk '/Function : .*decode_mma_kernelI6__halfLi128/{f=1;next} /Function :/{f=0} f' "$OUT/sass.txt" \
    > "$OUT/sass-decode-f16-128.txt"
  echo "SASS decode_mma_kernel<half,128>: $(grep -cE '^\s+/\*[0-9a-f]+\*/' "$OUT/sass-decode-f16-128.txt") instructions"
  grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_.]+' "$OUT/sass-decode-f16-128.txt" \
    | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25 | tr '\n' ' '; echo
fi
cp "$OUT"/bench-*.json "$RESULTS"/ 2>/dev/null
tar -czf "$RESULTS/logs.tgz" -C "$RESULTS" logs && rm -rf "$OUT"
OUT=$RESULTS/logs.tgz
echo "================ summary ================"
echo "pytest rc=$pytest_rc"
for layout in ${BENCH_LAYOUTS:-NHD}; do
  $PY -c "
import json; r = json.load(open('$RESULTS/bench-$layout.json')); rc = r['read_ceiling']
print(r['device'], r['date'], 'layout', r['layout'], 'read ceiling %.2f TB/s (%s), copy ceiling %.2f TB/s' % (rc / 1e12, r.get('read_ceiling_method'), r['copy_ceiling'] / 1e12))
for d in r['decode']:
    s = d['sdpa_bandwidth']
    print('  B=%4d ctx=%6d splits=%3d  %.3f ms  %.2f TB/s  %5.1f%% (eager %5.1f%%)  cuDNN %s' % (d['batch'], d['context'], d['splits'], d['ms'], d['bandwidth'] / 1e12, 100 * d['bandwidth'] / rc, 100 * d['bandwidth_eager'] / rc, 'n/a' if s is None else '%.2f TB/s %5.1f%%' % (s / 1e12, 100 * s / rc)))
for k in ('reshape_and_cache', 'copy_blocks'):
    print('  %s %.3f ms %.2f TB/s %.1f%% of copy' % (k, r[k]['ms'], r[k]['bandwidth'] / 1e12, 100 * r[k]['bandwidth'] / r['copy_ceiling']))
" 2>/dev/null || echo "bench $layout: no results"
done
