#!/usr/bin/env bash
# Builds every prefill kernel configuration of configs.txt (one unit each, in parallel) with the
# sweep driver, runs it on the GPU and prints the table last. From the repository root:
#   bash benchmarks/sweep_prefill/run.sh [timed runs per case, default 30]
# BUILD_ONLY=1 builds without running. ARCH (default sm_90a), JOBS (default nproc), NVCC (default nvcc) override the build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${BUILD:-$here/build}
arch=${ARCH:-sm_90a}
jobs=${JOBS:-$(nproc)}
nvcc=${NVCC:-nvcc}
mkdir -p "$build"
rm -f "$build"/cfg_*.cu "$build"/*.o "$build"/*.o.log
flags=(-std=c++17 -O3 -arch="$arch" --expt-relaxed-constexpr -I"$root/src" -I"$root/include"
       -I"$here")
while IFS='|' read -r name args; do
  name=$(echo "$name" | xargs)
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  args=$(echo "$args" | xargs)
  if [ "$args" = shipped ]; then
    type="k::PrefillMmaConfig<128>"
  else
    type="k::PrefillTile<$(echo "$args" | sed 's/\(k[A-Z][A-Za-z]*\)/k::PrefillPipeline::\1/')>"
  fi
  printf '#include "sweep.cuh"\nnamespace k = tinyserve::kernels::cuda;\nstatic sweep::Register<%s> r("%s");\n' \
    "$type" "$name" > "$build/cfg_$name.cu"
done < "$here/configs.txt"
start=$(date +%s)
ls "$build"/cfg_*.cu "$here/sweep.cu" | xargs -P "$jobs" -I{} sh -c \
  'f={}; o='"$build"'/$(basename "$f" .cu).o; '"$nvcc ${flags[*]}"' -Xptxas -v -c "$f" -o "$o" \
   > "$o.log" 2>&1 || { cat "$o.log"; exit 255; }'
"$nvcc" -arch="$arch" "$build"/*.o -o "$build/sweep"
echo "build: $(( $(date +%s) - start )) s"
# registers and spills per configuration, from ptxas
for log in "$build"/cfg_*.o.log; do
  printf '%-28s %s\n' "$(basename "$log" .o.log | sed 's/^cfg_//')" \
    "$(grep -hoE 'Used [0-9]+ registers|[0-9]+ bytes spill stores' "$log" | tr '\n' ' ')"
done
[ -n "${BUILD_ONLY:-}" ] && exit 0
"$build/sweep" "$@"
