"""Memory movement for the compactor, on caches held in a tinyserve.CachePool (GPU only).

1. Compaction: tinyserve.copy_blocks moving many scattered blocks over every layer's K and V in
   one launch, against a device-to-device copy ceiling measured in the same run (counting bytes
   read and written; the issue's target is >= 3 TB/s).
2. Offload and recall: tinyserve.swap_blocks of 1,000+ scattered 32 KiB blocks per call between
   the pool and a pinned host pool, each way, against one pinned cudaMemcpyAsync of the same bytes
   (target >= 90%) and against one copy call per block (target >= 2x faster); timed from an idle
   device to the copies' end (host time included), and as device time alone (CUDA graph
   replays of the swap and of the ceiling's copy).
3. Shrink and grow of 1 GiB of pool memory: time, and what cudaMemGetInfo shows freed and taken.
4. Giving memory back end to end on a fragmented pool: tinyserve.compact_and_shrink (plan_compact,
   execute_plan = one copy_blocks launch over every tensor, commit, BlockManager.resize,
   CachePool.shrink): the moves' bandwidth, the host time of each step, the bytes
   cudaMemGetInfo shows returned, and the memory held after against the live blocks (1.0x).
5. Host cost per plan (plan and commit, each kind) on a 100k-block pool, from
   bench_compactor_host.py (3 repeats here; run that script for more).

    python benchmarks/bench_compactor.py [--layers 32] [--blocks 8192] [--moves 2048]
        [--swap-blocks 2048] [--iters 20] [--json out.json]

About 30 s on an H200 with the defaults.

Every section checks its own result once (the moved blocks hold what they should) and exits
non-zero with a message if anything is off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import bench_compactor_host
import numpy as np
import torch
from bench_decode import commit, copy_ceiling, median_ms

import tinyserve as ts

GiB = 1 << 30
MiB = 1 << 20
BLOCK = dict(block_size=16, num_kv_heads=8, head_dim=128)  # fp16: 32 KiB per block and tensor


def fail(message: str) -> None:
    print(f"bench_compactor: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def wall_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median wall-clock time of one call, from an idle device until the device is done: counts
    the host's time to issue the work as well as the copies."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn, iters: int) -> float:
    """Median device time of one call, replayed from a CUDA graph (timed with events): the copies
    alone, without the host's time to issue them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, iters, warmup=3)


def free_bytes() -> int:
    """The driver's free device memory, with torch's cached blocks given back."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def compaction(layers: int, blocks: int, moves: int, iters: int) -> dict:
    """Live blocks scattered over the top of the pool move to free ids scattered over the bottom,
    in every K and V of every layer, in one copy_blocks call."""
    pool = ts.CachePool(layers, blocks, dtype="float16", device="cuda", num_blocks=blocks, **BLOCK)
    tensors = [torch.from_dlpack(t) for t in pool.tensors()]
    for t in tensors:
        t.normal_()
    gen = torch.Generator(device="cpu").manual_seed(1)
    half = blocks // 2
    if moves > half:
        fail(f"--moves must be at most half of --blocks, got {moves} of {blocks}")
    src = (half + torch.randperm(blocks - half, generator=gen)[:moves]).to(torch.int32).cuda()
    dst = torch.randperm(half, generator=gen)[:moves].to(torch.int32).cuda()
    probe = [0, moves // 2, moves - 1]
    expected = [tensors[-1][src[i].item()].clone() for i in probe]

    ms = median_ms(lambda: ts.copy_blocks(tensors, src, dst), iters, warmup=3)
    for i, e in zip(probe, expected):
        if not torch.equal(tensors[-1][dst[i].item()], e):
            fail(f"copy_blocks: block {src[i].item()} did not arrive at {dst[i].item()}")
    moved = 2 * moves * pool.bytes_per_block  # read + written
    result = {
        "layers": layers,
        "tensors": len(tensors),
        "moves": moves,
        "bytes_moved": moves * pool.bytes_per_block,
        "ms": ms,
        "bandwidth": moved / (ms * 1e-3),
    }
    return result


def copy_per_block(dst_base: int, src_base: int, pairs, block_bytes: int, kind: int, stream: int):
    """One cudaMemcpyAsync call per block (the baseline a batched swap must beat), issued through
    the thinnest binding at hand: CuPy's runtime wrapper, else torch's copy_."""
    try:
        import cupy
    except ImportError:
        return None
    memcpy = cupy.cuda.runtime.memcpyAsync

    def run():
        for s, d in pairs:
            memcpy(
                dst_base + d * block_bytes, src_base + s * block_bytes, block_bytes, kind, stream
            )

    return run


def offload_recall(swap_blocks: int, iters: int) -> dict:
    """swap_blocks of `swap_blocks` scattered 32 KiB blocks each way between one pool tensor and
    a pinned host tensor, against one contiguous pinned copy of the same bytes and against one
    copy call per block."""
    device_blocks = 4 * swap_blocks
    host_blocks = 2 * swap_blocks
    pool = ts.CachePool(1, device_blocks, dtype="float16", device="cuda", **BLOCK)
    pool.grow(device_blocks)
    dev = torch.from_dlpack(pool.key(0))
    dev.normal_()
    host = torch.empty((host_blocks,) + tuple(dev.shape[1:]), dtype=dev.dtype, pin_memory=True)
    host.normal_()
    block_bytes = dev[0].numel() * dev.element_size()
    rng = np.random.default_rng(2)
    dev_ids = rng.choice(device_blocks, swap_blocks, replace=False).astype(np.int32)
    host_ids = rng.choice(host_blocks, swap_blocks, replace=False).astype(np.int32)
    nbytes = swap_blocks * block_bytes
    stream = torch.cuda.current_stream().cuda_stream

    out = {"blocks": swap_blocks, "block_bytes": block_bytes, "bytes": nbytes}
    # offload (device -> host) then recall (host -> device)
    off_ms = wall_ms(lambda: ts.swap_blocks(dev, host, dev_ids, host_ids), iters)
    if not torch.equal(host[int(host_ids[7])], dev[int(dev_ids[7])].cpu()):
        fail("swap_blocks offload: a block did not arrive in the host pool")
    rec_ms = wall_ms(lambda: ts.swap_blocks(host, dev, host_ids, dev_ids), iters)
    if not torch.equal(dev[int(dev_ids[9])].cpu(), host[int(host_ids[9])]):
        fail("swap_blocks recall: a block did not arrive in the pool")

    # ceilings: one pinned cudaMemcpyAsync of the same bytes, each way
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h_ms = wall_ms(lambda: flat_host.copy_(flat_dev, non_blocking=True), iters)
    h2d_ms = wall_ms(lambda: flat_dev.copy_(flat_host, non_blocking=True), iters)

    # device time alone (graph replays), for the swaps and the ceilings alike
    off_dev_ms = graph_ms(lambda: ts.swap_blocks(dev, host, dev_ids, host_ids), iters)
    rec_dev_ms = graph_ms(lambda: ts.swap_blocks(host, dev, host_ids, dev_ids), iters)
    d2h_dev_ms = graph_ms(lambda: flat_host.copy_(flat_dev, non_blocking=True), iters)
    h2d_dev_ms = graph_ms(lambda: flat_dev.copy_(flat_host, non_blocking=True), iters)

    # baseline: one copy call per block
    pairs_off = list(zip(dev_ids.tolist(), host_ids.tolist()))
    pairs_rec = list(zip(host_ids.tolist(), dev_ids.tolist()))
    per_off = copy_per_block(host.data_ptr(), dev.data_ptr(), pairs_off, block_bytes, 2, stream)
    per_rec = copy_per_block(dev.data_ptr(), host.data_ptr(), pairs_rec, block_bytes, 1, stream)
    if per_off is None:  # no CuPy: torch's copy_ per block

        def per_off():
            for s, d in pairs_off:
                host[d].copy_(dev[s], non_blocking=True)

        def per_rec():
            for s, d in pairs_rec:
                dev[d].copy_(host[s], non_blocking=True)

        out["per_block_call"] = "torch copy_"
    else:
        out["per_block_call"] = "cudaMemcpyAsync (CuPy)"
    per_off_ms = wall_ms(per_off, max(3, iters // 4))
    per_rec_ms = wall_ms(per_rec, max(3, iters // 4))

    for name, ms in [
        ("offload", off_ms),
        ("recall", rec_ms),
        ("d2h_ceiling", d2h_ms),
        ("h2d_ceiling", h2d_ms),
        ("offload_per_block", per_off_ms),
        ("recall_per_block", per_rec_ms),
        ("offload_device", off_dev_ms),
        ("recall_device", rec_dev_ms),
        ("d2h_ceiling_device", d2h_dev_ms),
        ("h2d_ceiling_device", h2d_dev_ms),
    ]:
        out[name + "_ms"] = ms
        out[name + "_bandwidth"] = nbytes / (ms * 1e-3)
    return out


def shrink_grow(nbytes: int, iters: int, granule_bytes: int) -> dict:
    """Grow a pool from 0 to `nbytes` of mapped memory and shrink it back to 0, timing each and
    reading what cudaMemGetInfo shows taken and freed."""
    block_bytes = BLOCK["block_size"] * BLOCK["num_kv_heads"] * BLOCK["head_dim"] * 2
    blocks = nbytes // (2 * block_bytes)  # K and V of one layer
    pool = ts.CachePool(
        1, blocks, dtype="float16", device="cuda", granule_bytes=granule_bytes, **BLOCK
    )
    grow_ms, shrink_ms, taken, freed = [], [], [], []
    for i in range(iters + 1):  # the first round warms up (the fill kernel's first load)
        before = free_bytes()
        start = time.perf_counter()
        pool.grow(blocks)
        grow_ms.append((time.perf_counter() - start) * 1e3)
        mid = free_bytes()
        torch.from_dlpack(pool.key(0))[-1].fill_(1)  # the memory is usable
        torch.from_dlpack(pool.value(0))[-1].fill_(1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pool.shrink(0)
        shrink_ms.append((time.perf_counter() - start) * 1e3)
        after = free_bytes()
        if i == 0:
            grow_ms.clear()
            shrink_ms.clear()
            continue
        taken.append(before - mid)
        freed.append(after - mid)
    g = pool.granule_bytes
    mapped = 2 * (-(-blocks * block_bytes // g) * g)
    for name, values in [("taken", taken), ("freed", freed)]:
        worst = max(abs(v - mapped) for v in values)
        if worst >= g:
            fail(f"cudaMemGetInfo showed {values} bytes {name}, the pool mapped {mapped}")
    pool.check()
    return {
        "bytes": mapped,
        "granule_bytes": g,
        "granules": mapped // g,
        "grow_ms": statistics.median(grow_ms),
        "shrink_ms": statistics.median(shrink_ms),
        "taken_bytes": statistics.median(taken),
        "freed_bytes": statistics.median(freed),
    }


def compact_and_shrink_end_to_end(layers: int, blocks: int) -> dict:
    """A pool of `blocks` blocks filled with sequences of 1-64 blocks, a random half of them freed
    (live blocks scattered over the whole id range), then handed back with compact_and_shrink.
    The moves must go through execute_plan as one copy_blocks call; every live block's content is
    checked in the last tensor afterwards."""
    pool = ts.CachePool(layers, blocks, dtype="float16", device="cuda", num_blocks=blocks, **BLOCK)
    bm = ts.BlockManager(blocks, BLOCK["block_size"])
    comp = ts.Compactor(bm)
    rng = np.random.default_rng(3)
    seq = 0
    while True:
        n = int(rng.integers(1, 65))
        if n > bm.num_free_blocks:
            break
        bm.add_sequence(seq)
        bm.append(seq, n * BLOCK["block_size"])
        seq += 1
    for s in rng.permutation(seq)[: seq // 2]:
        bm.free(int(s))
    live = [s for s in range(seq) if bm.has_sequence(s)]
    tensors = [torch.from_dlpack(t) for t in pool.tensors()]
    for t in tensors:
        t.normal_()
    last = tensors[-1]
    before = {s: last[torch.from_numpy(bm.block_ids(s)).long().cuda()].clone() for s in live}
    del tensors, last

    calls = []
    real_copy_blocks = ts._compactor.copy_blocks

    def counted(*a, **k):
        calls.append(1)
        return real_copy_blocks(*a, **k)

    used = bm.stats()["num_used"]
    free0 = free_bytes()
    mapped0 = pool.mapped_bytes
    # compact_and_shrink's steps, run here one by one so that each is timed.
    t0 = time.perf_counter()
    plan = comp.plan_compact()
    t1 = time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts._compactor.copy_blocks = counted
    try:
        start.record()
        ts.execute_plan(plan, ts._compactor._pool_tensors(pool))
        end.record()
    finally:
        ts._compactor.copy_blocks = real_copy_blocks
    end.synchronize()
    t2 = time.perf_counter()
    comp.commit(plan)
    t3 = time.perf_counter()
    bm.resize(used)
    pool.shrink(used)
    t4 = time.perf_counter()
    mapped1 = pool.mapped_bytes
    free1 = free_bytes()
    bm.check()
    if len(calls) != 1:
        fail(f"execute_plan made {len(calls)} copy_blocks calls for one compaction, expected 1")
    last = torch.from_dlpack(pool.tensors()[-1])
    for s in live:
        if not torch.equal(last[torch.from_numpy(bm.block_ids(s)).long().cuda()], before[s]):
            fail(f"compact_and_shrink: sequence {s}'s blocks did not keep their content")
    # Grow back through the helper (the reverse step), checking it hands the memory out again.
    t5 = time.perf_counter()
    ts.grow_pool(bm, pool, blocks)
    torch.cuda.synchronize()
    t6 = time.perf_counter()
    bm.check()
    ms = start.elapsed_time(end)
    return {
        "blocks": blocks,
        "used": used,
        "moves": len(plan),
        "bytes_moved": len(plan) * pool.bytes_per_block,
        "copy_blocks_calls": len(calls),
        "move_ms": ms,
        "bandwidth": 2 * len(plan) * pool.bytes_per_block / (ms * 1e-3),
        "plan_ms": (t1 - t0) * 1e3,
        "execute_wall_ms": (t2 - t1) * 1e3,
        "commit_ms": (t3 - t2) * 1e3,
        "resize_shrink_ms": (t4 - t3) * 1e3,
        "grow_ms": (t6 - t5) * 1e3,
        "mapped_before": mapped0,
        "mapped_after": mapped1,
        "unmapped_bytes": mapped0 - mapped1,
        "driver_freed_bytes": free1 - free0,
        "granule_bytes": pool.granule_bytes,
        "live_bytes": used * pool.bytes_per_block,
    }


def host_plans() -> dict:
    rows = bench_compactor_host.measure(100_000, 16, 1000, 3, 0, log=lambda line: None)
    return {
        k: {"pairs": p, "plan_ms": a * 1e3, "commit_ms": b * 1e3} for k, (p, a, b) in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=8192, help="blocks of the compaction pool")
    parser.add_argument("--moves", type=int, default=2048, help="blocks moved by one compaction")
    parser.add_argument("--swap-blocks", type=int, default=2048, help="blocks per swap call")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()
    if not ts.cuda_available():
        fail("needs a CUDA device and tinyserve built with CUDA")
    torch.manual_seed(0)
    torch.cuda.init()
    name = torch.cuda.get_device_name()

    ceiling = copy_ceiling(args.iters)
    torch.cuda.empty_cache()
    comp = compaction(args.layers, args.blocks, args.moves, args.iters)
    torch.cuda.empty_cache()
    swap = offload_recall(args.swap_blocks, args.iters)
    torch.cuda.empty_cache()
    resize = [shrink_grow(GiB, 5, 0), shrink_grow(GiB, 5, 64 * MiB)]
    torch.cuda.empty_cache()
    e2e = compact_and_shrink_end_to_end(args.layers, args.blocks)
    torch.cuda.empty_cache()
    host = host_plans()

    tb = 1e12
    gb = 1e9
    print(f"# bench_compactor on {name}, {time.strftime('%Y-%m-%d')}, commit {commit()}")
    print()
    print("| what | measured | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| compaction: copy_blocks, {comp['moves']} blocks x {comp['tensors']} tensors "
        f"({comp['bytes_moved'] / GiB:.2f} GiB) | {comp['bandwidth'] / tb:.2f} TB/s "
        f"({comp['ms']:.3f} ms) | D2D copy {ceiling / tb:.2f} TB/s | "
        f"{comp['bandwidth'] / ceiling:.0%} | >= 3 TB/s |"
    )
    for way, ceil in [("offload", "d2h_ceiling"), ("recall", "h2d_ceiling")]:
        print(
            f"| {way}: swap_blocks, {swap['blocks']} x {swap['block_bytes'] // 1024} KiB "
            f"scattered | {swap[way + '_bandwidth'] / gb:.1f} GB/s ({swap[way + '_ms']:.2f} ms) "
            f"| pinned cudaMemcpyAsync {swap[ceil + '_bandwidth'] / gb:.1f} GB/s | "
            f"{swap[way + '_bandwidth'] / swap[ceil + '_bandwidth']:.0%} | >= 90% |"
        )
        dev_bw, dev_ceil = swap[way + "_device_bandwidth"], swap[ceil + "_device_bandwidth"]
        print(
            f"| {way}, device time (CUDA graph replay) | {dev_bw / gb:.1f} GB/s "
            f"({swap[way + '_device_ms']:.2f} ms) | pinned cudaMemcpyAsync, replayed "
            f"{dev_ceil / gb:.1f} GB/s | {dev_bw / dev_ceil:.0%} | |"
        )
        per = swap[way + "_per_block_ms"]
        print(
            f"| {way}: vs one {swap['per_block_call']} per block | {swap[way + '_ms']:.2f} ms "
            f"| {per:.2f} ms | {per / swap[way + '_ms']:.1f}x faster | >= 2x |"
        )
    for r in resize:
        print(
            f"| grow 0 -> {r['bytes'] / GiB:.2f} GiB ({r['granules']} granules of "
            f"{r['granule_bytes'] // MiB} MiB) | {r['grow_ms']:.1f} ms | cudaMemGetInfo: "
            f"{r['taken_bytes'] / MiB:.0f} MiB taken | | |"
        )
        print(
            f"| shrink {r['bytes'] / GiB:.2f} GiB -> 0 ({r['granule_bytes'] // MiB} MiB granules) "
            f"| {r['shrink_ms']:.1f} ms | cudaMemGetInfo: {r['freed_bytes'] / MiB:.0f} MiB freed "
            f"| | freed = mapped, to the granule |"
        )
    print(
        f"| compact_and_shrink: {e2e['moves']} of {e2e['used']} live blocks moved "
        f"({e2e['bytes_moved'] / GiB:.2f} GiB, {e2e['copy_blocks_calls']} copy_blocks call) | "
        f"{e2e['bandwidth'] / tb:.2f} TB/s ({e2e['move_ms']:.2f} ms) | D2D copy "
        f"{ceiling / tb:.2f} TB/s | {e2e['bandwidth'] / ceiling:.0%} | >= 3 TB/s |"
    )
    print(
        f"| compact_and_shrink host: plan {e2e['plan_ms']:.2f} ms, commit "
        f"{e2e['commit_ms']:.2f} ms, resize + shrink {e2e['resize_shrink_ms']:.1f} ms; "
        f"grow_pool back {e2e['grow_ms']:.1f} ms | cudaMemGetInfo: "
        f"{e2e['driver_freed_bytes'] / MiB:.0f} MiB freed | unmapped "
        f"{e2e['unmapped_bytes'] / MiB:.0f} MiB | | freed = unmapped, to the granule |"
    )
    print(
        f"| memory held after compact_and_shrink | {e2e['mapped_after'] / MiB:.1f} MiB | live "
        f"blocks {e2e['live_bytes'] / MiB:.1f} MiB | "
        f"{e2e['mapped_after'] / max(1, e2e['live_bytes']):.3f}x | 1.0x (to the granule) |"
    )
    for kind, r in host.items():
        print(
            f"| host, 100k-block pool: plan_{kind} ({r['pairs']:.0f} pairs) | plan "
            f"{r['plan_ms']:.2f} ms | commit {r['commit_ms']:.2f} ms | | |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "commit": commit(),
                    "copy_ceiling": ceiling,
                    "compaction": comp,
                    "swap": swap,
                    "resize": resize,
                    "compact_and_shrink": e2e,
                    "host_plans": host,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
