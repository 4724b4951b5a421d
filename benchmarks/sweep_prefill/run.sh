#!/usr/bin/env bash
# Builds every prefill kernel configuration of configs.txt (one unit each, in parallel) with the
# sweep driver (sweep.cu), runs it on the GPU and prints the table last. From the repository root:
#   bash benchmarks/sweep_prefill/run.sh [timed runs per case, default 20]
# Head dims 64, 128 and 256 are swept, each against its shipped configuration (a "shipped D"
# line); the build and run times print too (about 4 minutes in all on a 16-core H200 machine).
# A configuration that fails to build is left out (its log is printed); one that crashes the
# driver is left out of a rerun. BUILD_ONLY=1 builds without running; ARCH (default sm_90a),
# JOBS (default nproc), NVCC (default nvcc, else /usr/local/cuda/bin/nvcc) override the build.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${BUILD:-$here/build}
arch=${ARCH:-sm_90a}
jobs=${JOBS:-$(nproc)}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
mkdir -p "$build"
rm -f "$build"/cfg_*.cu "$build"/*.o "$build"/*.o.log "$build/sweep"
while IFS='|' read -r name args; do
  [[ "$name" =~ ^[[:space:]]*# ]] && continue  # comments may hold quotes, which xargs rejects
  name=$(echo "$name" | xargs)
  { [ -z "$name" ] || [ "${name:0:1}" = "#" ]; } && continue
  args=$(echo "$args" | xargs)
  baseline=false
  if [ "${args%% *}" = shipped ]; then  # "shipped D": PrefillMmaConfig<D>, D's baseline
    type="k::PrefillMmaConfig<${args#shipped }>"
    baseline=true
  else
    type="k::PrefillTile<$(echo "$args" | sed 's/\(k[A-Z][A-Za-z]*\)/k::PrefillPipeline::\1/')>"
  fi
  printf '#include "sweep.cuh"\nnamespace k = tinyserve::kernels::cuda;\n' > "$build/cfg_$name.cu"
  printf 'static sweep::Register<%s> r("%s", %s);\n' "$type" "$name" "$baseline" \
    >> "$build/cfg_$name.cu"
done < "$here/configs.txt"
export NVCC_CMD="$nvcc -std=c++17 -O3 -arch=$arch --expt-relaxed-constexpr -I$root/src \
-I$root/include -I$here -Xptxas -v"
start=$(date +%s)
ls "$build"/cfg_*.cu "$here/sweep.cu" | xargs -P "$jobs" -I{} sh -c \
  'o='"$build"'/$(basename {} .cu).o; $NVCC_CMD -c {} -o "$o" > "$o.log" 2>&1 \
   || { echo "BUILD FAILED: {}"; grep -m5 -i error "$o.log"; rm -f "$o"; }'
[ -f "$build/sweep.o" ] || { echo "the driver did not build"; exit 1; }
"$nvcc" -arch="$arch" "$build"/*.o -o "$build/sweep" || exit 1
echo "build: $(( $(date +%s) - start )) s"
for log in "$build"/cfg_*.o.log; do  # registers and spills per configuration, from ptxas
  printf '%-30s %s\n' "$(basename "$log" .o.log | sed 's/^cfg_//')" \
    "$(grep -hoE 'Used [0-9]+ registers|[0-9]+ bytes spill stores' "$log" | tr '\n' ' ')"
done
[ -n "${BUILD_ONLY:-}" ] && exit 0
skip=" "
start=$(date +%s)
for attempt in 1 2 3 4; do
  SWEEP_SKIP="$skip" "$build/sweep" "$@" | tee "$build/sweep.log"
  [ "${PIPESTATUS[0]}" = 0 ] && echo "run: $(( $(date +%s) - start )) s" && exit 0
  crashed=$(grep '^running: ' "$build/sweep.log" | tail -1 | cut -d' ' -f2)
  { [ -z "$crashed" ] || [ "${crashed#shipped}" != "$crashed" ]; } && exit 1
  echo "CRASHED: $crashed; rerunning without it"
  skip="$skip$crashed "
done
