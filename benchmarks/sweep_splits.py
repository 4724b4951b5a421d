"""Decode time against the flash-decoding split count, and where the time of one call goes.

For each shape of bench_decode.py: the per-call time (median of back-to-back calls, CUDA events)
at several fixed split counts beside the planned one, and, at the planned split, each kernel's
own duration from the CUDA profiler (decode, merge) and the per-call time they leave unexplained
(launch gaps). --order sequential stores each sequence's pages in order (bench_decode.py uses a
random order). A tool for tuning, not a benchmark of record.

    python benchmarks/sweep_splits.py [--shapes 1x131072,64x4096] [--splits 16,33,66]
"""

from __future__ import annotations

import argparse
import re
import statistics

import numpy as np
import torch
from bench_decode import decode_inputs, median_ms

import tinyserve as ts


def profile_kernels(fn, calls: int = 50) -> dict[str, float]:
    """Median GPU duration (us) of each kernel name launched by fn, over `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            found = re.search(r"(\w+_kernel)", e.name)
            name = found.group(1) if found else e.name[:40]
            times.setdefault(name, []).append(e.device_time)
    return {k: statistics.median(v) for k, v in times.items()}


def sweep_shape(
    batch: int, context: int, extra: list[int], iters: int, rng, order: str = "random"
) -> None:
    q, kc, vc, table, lens = decode_inputs(batch, context, rng, order=order)
    kv_heads, dim = kc.shape[2], kc.shape[3]
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * context * kv_heads * dim * 2
    planned, _ = ts.plan_paged_attention(q, kc, table, max_seq_len=context)
    line, detail = [], ""
    for splits in sorted({planned, *extra}):
        _, nbytes = ts.plan_paged_attention(q, kc, table, max_seq_len=context, num_splits=splits)
        ws = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device="cuda")

        def run(splits=splits, ws=ws):
            ts.paged_attention(
                q, kc, vc, table, lens, out, max_seq_len=context, num_splits=splits, workspace=ws
            )

        ms = median_ms(run, iters)
        mark = "*" if splits == planned else ""
        line.append(f"{splits}{mark}: {ms * 1e3:.1f}us {kv_bytes / ms / 1e9:.2f}TB/s")
        if splits == planned:
            kernels = profile_kernels(run)
            gap = ms * 1e3 - sum(kernels.values())
            detail = ", ".join(f"{k} {v:.1f}us" for k, v in kernels.items())
            detail += f"; per call {gap:+.1f}us beyond the kernels"
    print(f"B={batch} ctx={context} {order} pages: " + "  ".join(line))
    print(f"   at {planned} splits: {detail}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x4096,8x32768,1x131072,256x1024")
    parser.add_argument("--splits", default="")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--order", choices=["random", "sequential"], default="random")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name} ({props.multi_processor_count} SMs)")
    rng = np.random.default_rng(0)
    extra = [int(s) for s in args.splits.split(",") if s]
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        sweep_shape(batch, context, extra, args.iters, rng, args.order)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
