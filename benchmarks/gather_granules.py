"""Read rate of random gathers by granule size: a kernel reads N randomly placed blocks of G
contiguous bytes (one warp a block at a time, 16-byte streaming loads) out of a 1 GiB buffer, for
G from 256 bytes to 32 KiB, over 64 MiB (the size of one selection step's summaries or selected
K/V at 8 x 32k) and over 512 MiB; the best of four grid shapes, median of 10 launches (CUDA
events). A probe for what a short gather can reach, not a benchmark of record.

    python benchmarks/gather_granules.py        (GPU, cupy)
"""

import cupy as cp
import numpy as np

src = r"""
extern "C" __global__ void gather(const uint4* __restrict__ data, const int* __restrict__ idx,
                                  int n, int granule16, unsigned long long* out) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int warps = (gridDim.x * blockDim.x) >> 5;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int i = warp; i < n; i += warps) {
    const uint4* g = data + (long long)idx[i] * granule16;
    #pragma unroll 4
    for (int k = lane; k < granule16; k += 32) {
      uint4 v = __ldcs(g + k);
      acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = 1;
}
"""


def main() -> None:
    k = cp.RawKernel(src, "gather")
    total = 1 << 30  # 1 GiB region
    out = cp.zeros(1, cp.uint64)
    data = cp.random.randint(0, 2**31, size=total // 4, dtype=cp.int32)
    props = cp.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    print(props["name"].decode())
    print("| granule bytes | read MB | blocks/SM x threads | us | TB/s |")
    for g in (256, 512, 1024, 2048, 4096, 8192, 32768):
        for mb in (64, 512):
            n = mb * 2**20 // g
            idx = cp.asarray(np.random.default_rng(0).permutation(total // g)[:n].astype(np.int32))
            best = None
            for bps, thr in ((2, 256), (4, 256), (8, 256), (16, 128)):
                grid = sms * bps
                for _ in range(3):
                    k((grid,), (thr,), (data, idx, np.int32(n), np.int32(g // 16), out))
                s, e = cp.cuda.Event(), cp.cuda.Event()
                ts = []
                for _ in range(10):
                    s.record()
                    k((grid,), (thr,), (data, idx, np.int32(n), np.int32(g // 16), out))
                    e.record()
                    e.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(s, e))
                t = float(np.median(ts)) * 1e3
                if best is None or t < best[0]:
                    best = (t, f"{bps} x {thr}")
            print(
                f"| {g} | {mb} | {best[1]} | {best[0]:.1f} | {n * g / best[0] / 1e6:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
