"""How fast each way of moving data from global memory reads 4 GiB on this GPU: plain 16-byte
loads into registers (the read ceiling of bench_decode.py), 16-byte cp.async copies into shared
memory through a CTA-wide pipeline like the decode kernel's, and bulk (tensor-memory-accelerator)
copies of several sizes completing on shared-memory barriers. Each CTA streams 32 KB tiles of a
contiguous buffer (tile i of CTA c is c + i * grid); no arithmetic. A tool for choosing the
decode kernel's load path, not a benchmark of record.

    python benchmarks/read_paths.py [--iters 20]
"""

from __future__ import annotations

import argparse

import cupy
import torch
from bench_decode import GiB, median_ms, raw_read_kernels

_PRELUDE = r"""
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}
"""

_CPASYNC = r"""
// cp.async: STAGES tiles of THREADS * PER * 16 bytes; with SYNC the CTA waits for a tile as a
// whole (__syncthreads) before refilling, as the decode kernel does.
extern "C" __global__ void cpasync_read(const char* __restrict__ x, long long tiles,
                                        unsigned int* out) {
  extern __shared__ __align__(16) unsigned char sm[];
  constexpr int TILE = THREADS * PER * 16;
  const unsigned base = smem_u32(sm);
  const long long mine = tiles > blockIdx.x ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto issue = [&](long long k) {
    const char* src = x + (blockIdx.x + k * gridDim.x) * (long long)TILE;
    const unsigned dst = base + (unsigned)(k % STAGES) * TILE;
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const unsigned off = (p * THREADS + threadIdx.x) * 16;
      asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst + off),
                   "l"(src + off));
    }
  };
#pragma unroll
  for (int k = 0; k < STAGES; ++k) {
    if (k < mine) issue(k);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  unsigned acc = 0;
  for (long long k = 0; k < mine; ++k) {
    if (k == 0) asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1) : "memory");
    else asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2) : "memory");
    if (SYNC) __syncthreads();
    if (k > 0) {
      if (k + STAGES - 1 < mine) issue(k + STAGES - 1);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    unsigned v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v)
                 : "r"(base + (unsigned)(k % STAGES) * TILE + threadIdx.x * 16));
    acc ^= v;
  }
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);
}
"""

_BULK = r"""
// Bulk copies: STAGES tiles of 32 KB, each moved as 32 KB / SIZE copies issued by the lanes of
// warp 0, completing on the stage's barrier.
extern "C" __global__ void bulk_read(const char* __restrict__ x, long long tiles,
                                     unsigned int* out) {
  extern __shared__ __align__(16) unsigned char sm[];
  constexpr int TILE = 32768;
  const unsigned base = smem_u32(sm);
  const unsigned bars = base + STAGES * TILE;
  const long long mine = tiles > blockIdx.x ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bars + 8 * s) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](long long k) {
    if (threadIdx.x >= 32) return;
    const char* src = x + (blockIdx.x + k * gridDim.x) * (long long)TILE;
    const unsigned dst = base + (unsigned)(k % STAGES) * TILE;
    const unsigned bar = bars + 8 * (unsigned)(k % STAGES);
    if (threadIdx.x == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                   "r"(TILE) : "memory");
    __syncwarp();
    for (int op = threadIdx.x; op < TILE / SIZE; op += 32)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
          " [%0], [%1], %2, [%3];\n"
          ::"r"(dst + op * SIZE), "l"(src + op * SIZE), "r"(SIZE), "r"(bar) : "memory");
  };
  for (int k = 0; k < STAGES; ++k)
    if (k < mine) issue(k);
  unsigned acc = 0;
  for (long long k = 0; k < mine; ++k) {
    const unsigned bar = bars + 8 * (unsigned)(k % STAGES);
    const unsigned parity = (unsigned)((k / STAGES) & 1);
    asm volatile("{\n .reg .pred done;\nw_%=:\n"
                 " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 " @!done bra w_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
    unsigned v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v)
                 : "r"(base + (unsigned)(k % STAGES) * TILE + (threadIdx.x % 2048) * 16));
    acc ^= v;
    __syncthreads();
    if (k + STAGES < mine) issue(k + STAGES);
  }
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    x = torch.randn(2 * GiB, dtype=torch.float16, device="cuda")
    xc = cupy.from_dlpack(x.view(torch.int32))
    out = cupy.zeros(1, dtype=cupy.uint32)
    tiles = cupy.int64(4 * GiB // 32768)

    def stream():
        return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    cases = {f"16-byte loads to registers, {k}": fn for k, fn in raw_read_kernels(x).items()}
    # (threads, copies per thread per tile, stages, sync, CTAs per SM); tile = threads*per*16.
    for threads, per, stages, sync, per_sm in (
        (128, 16, 3, 1, 2),  # the decode kernel's shape
        (128, 16, 3, 0, 2),
        (128, 8, 6, 1, 2),
        (256, 8, 3, 1, 2),
        (128, 16, 2, 1, 3),
    ):
        opts = (
            f"-DTHREADS={threads}",
            f"-DPER={per}",
            f"-DSTAGES={stages}",
            f"-DSYNC={sync}",
            "-std=c++17",
        )
        k = cupy.RawKernel(_PRELUDE + _CPASYNC, "cpasync_read", options=opts)
        smem = stages * threads * per * 16
        k.max_dynamic_shared_size_bytes = smem

        def cpa(k=k, blocks=sms * per_sm, threads=threads, smem=smem, n=threads * per * 16):
            with stream():
                k((blocks,), (threads,), (xc, cupy.int64(4 * GiB // n), out), shared_mem=smem)

        cases[
            f"cp.async {threads} thr x {per} x 16 B, {stages} stages, "
            f"{'sync' if sync else 'no sync'}, {per_sm}/SM"
        ] = cpa
    for size in (256, 2048, 8192, 32768):
        opts = ("-DSTAGES=3", f"-DSIZE={size}", "-std=c++17")
        k = cupy.RawKernel(_PRELUDE + _BULK, "bulk_read", options=opts)
        smem = 3 * 32768 + 64
        k.max_dynamic_shared_size_bytes = smem

        def bulk(k=k, smem=smem):
            with stream():
                k((sms * 2,), (128,), (xc, tiles, out), shared_mem=smem)

        cases[f"bulk copies of {size} B, 3 x 32 KB stages, 2/SM"] = bulk
    print(f"{props.name}: read of 4 GiB, median of {args.iters} samples")
    for name, fn in cases.items():
        try:
            rate = 4 * GiB / (median_ms(fn, args.iters) * 1e-3)
            print(f"  {rate / 1e12:5.2f} TB/s  {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other paths
            print(f"  failed: {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
