"""GPU benchmark of decode over an FP8 (float8 e4m3fn) KV cache beside the same data in a 16-bit
cache, in the same run.

Per configuration: the 16-bit cache is random normal data; the FP8 cache holds the same values
quantised by tinyserve's reshape_and_cache with one scale per KV head (amax / 448, in device
memory; --scale tensor uses one scale for each cache). Reported: median time per call of both
(CUDA graph of 10 back-to-back calls, median of the replays, as bench_decode.py), each as a share
of the read ceiling in the bytes it reads (K+V of the real tokens: 1 byte an element for FP8),
the speedup, and the FP8 output's relative L2 error against the 16-bit cache's output.

    python benchmarks/bench_fp8.py [--iters 20] [--scale head|tensor] [--dtype float16|bfloat16]
                                   [--cases LABEL ...] [--json fp8.json]

--dtype runs every case with that query (and 16-bit cache) type instead of its own; --cases
runs only the cases of those labels.
"""

from __future__ import annotations

import argparse
import datetime
import json

import numpy as np
import torch
from bench_decode import commit, median_ms, read_ceiling

import tinyserve as ts

FP8_MAX = 448.0

# (label, q_heads, kv_heads, head_dim, page, batch, context, layout, dtype)
CASES = [
    ("base", 32, 8, 128, 16, 64, 4096, "NHD", torch.float16),
    ("long", 32, 8, 128, 16, 8, 32768, "NHD", torch.float16),
    ("one 128k", 32, 8, 128, 16, 1, 131072, "NHD", torch.float16),
    ("256 x 1k", 32, 8, 128, 16, 256, 1024, "NHD", torch.float16),
    ("head_dim 64", 32, 8, 64, 16, 64, 4096, "NHD", torch.float16),
    ("head_dim 256", 32, 8, 256, 16, 32, 4096, "NHD", torch.float16),
    ("group 8", 64, 8, 128, 16, 64, 4096, "NHD", torch.float16),
    ("group 1", 8, 8, 128, 16, 64, 4096, "NHD", torch.float16),
    ("page 32", 32, 8, 128, 32, 64, 4096, "NHD", torch.float16),
    ("page 1", 32, 8, 128, 1, 64, 4096, "NHD", torch.float16),
    ("HND", 32, 8, 128, 16, 64, 4096, "HND", torch.float16),
    ("bfloat16", 32, 8, 128, 16, 64, 4096, "NHD", torch.bfloat16),
]


def cache(shape, layout: str, dtype, fill=None):
    """A cache of logical shape [blocks, page, heads, dim] stored NHD, or HND as the permuted
    view; random normal when fill is None."""
    n, p, h, d = shape
    storage = (n, h, p, d) if layout == "HND" else (n, p, h, d)
    if fill is None:
        t = torch.randn(storage, dtype=dtype, device="cuda")
    else:
        t = torch.empty(storage, dtype=dtype, device="cuda")
    return t.transpose(1, 2) if layout == "HND" else t


def run_case(case, iters: int, rng: np.random.Generator, scale_mode: str) -> dict:
    label, q_heads, kv_heads, dim, page, batch, context, layout, dtype = case
    pages = context // page
    num_blocks = batch * pages
    shape = (num_blocks, page, kv_heads, dim)
    table = torch.from_numpy(rng.permutation(num_blocks).astype(np.int32)).view(batch, pages)
    table = table.cuda()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, q_heads, dim), dtype=dtype, device="cuda")
    k16, v16 = cache(shape, layout, dtype), cache(shape, layout, dtype)
    k8 = cache(shape, layout, torch.float8_e4m3fn, fill=0)
    v8 = cache(shape, layout, torch.float8_e4m3fn, fill=0)

    def scales(x):
        amax = x.abs().amax(dim=(0, 1, 3)).float() / FP8_MAX
        return amax if scale_mode == "head" else float(amax.max())

    k_scale, v_scale = scales(k16), scales(v16)
    slots = torch.arange(num_blocks * page, dtype=torch.int64, device="cuda")
    ts.reshape_and_cache(
        k16.reshape(-1, kv_heads, dim),
        v16.reshape(-1, kv_heads, dim),
        k8,
        v8,
        slots,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    out16, out8 = torch.empty_like(q), torch.empty_like(q)
    splits16, n16 = ts.plan_paged_attention(q, k16, table, max_seq_len=context)
    splits8, n8 = ts.plan_paged_attention(q, k8, table, max_seq_len=context)
    ws16 = torch.empty((max(n16, 16),), dtype=torch.uint8, device="cuda")
    ws8 = torch.empty((max(n8, 16),), dtype=torch.uint8, device="cuda")

    def run16():
        ts.paged_attention(
            q,
            k16,
            v16,
            table,
            lens,
            out16,
            max_seq_len=context,
            num_splits=splits16,
            workspace=ws16,
        )

    def run8():
        ts.paged_attention(
            q,
            k8,
            v8,
            table,
            lens,
            out8,
            max_seq_len=context,
            num_splits=splits8,
            workspace=ws8,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    ms16 = median_ms(run16, iters, graph=True)
    ms8 = median_ms(run8, iters, graph=True)
    run16()
    run8()
    torch.cuda.synchronize()
    err = float((out8.float() - out16.float()).norm() / out16.float().norm())
    elements = 2 * batch * context * kv_heads * dim
    return {
        "label": label,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_dim": dim,
        "page": page,
        "batch": batch,
        "context": context,
        "layout": layout,
        "dtype": str(dtype).removeprefix("torch."),
        "splits_16": splits16,
        "splits_fp8": splits8,
        "ms_16": ms16,
        "ms_fp8": ms8,
        "bandwidth_16": elements * 2 / (ms16 * 1e-3),
        "bandwidth_fp8": elements / (ms8 * 1e-3),
        "speedup": ms16 / ms8,
        "rel_err_fp8_vs_16": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--scale", choices=["head", "tensor"], default="head")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], help="every case in this type")
    parser.add_argument("--cases", nargs="+", metavar="LABEL", help="only these cases")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()
    labels = [c[0] for c in CASES]
    unknown = sorted(set(args.cases or []) - set(labels))
    if unknown:
        parser.error(f"unknown cases {unknown}; the cases are {labels}")
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases]
    if args.dtype:
        cases = [c[:-1] + (getattr(torch, args.dtype),) for c in cases]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    props = torch.cuda.get_device_properties(0)
    date = datetime.date.today().isoformat()
    print(f"{props.name}, {date}, commit {commit()}, scales per {args.scale}", flush=True)
    read_bw, method = read_ceiling(args.iters)
    print(f"read ceiling {read_bw / 1e12:.2f} TB/s ({method})", flush=True)
    header = (
        "| case | q/kv heads, dim, page | batch x context | layout, dtype | 16-bit ms | % ceiling "
        "| fp8 ms | % ceiling (fp8 bytes) | speedup | fp8 rel err vs 16-bit |"
    )
    print(header + "\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for case in cases:
        r = run_case(case, args.iters, rng, args.scale)
        torch.cuda.empty_cache()
        results.append(r)
        print(
            f"| {r['label']} | {r['q_heads']}/{r['kv_heads']}, {r['head_dim']}, {r['page']} "
            f"| {r['batch']} x {r['context']} | {r['layout']}, {r['dtype']} | {r['ms_16']:.3f} "
            f"| {100 * r['bandwidth_16'] / read_bw:.1f} | {r['ms_fp8']:.3f} "
            f"| {100 * r['bandwidth_fp8'] / read_bw:.1f} | {r['speedup']:.2f}x "
            f"| {r['rel_err_fp8_vs_16']:.1e} |",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "device": props.name,
                        "date": date,
                        "commit": commit(),
                        "read_ceiling": read_bw,
                        "scale": args.scale,
                        "cases": results,
                    },
                    f,
                    indent=2,
                )


if __name__ == "__main__":
    main()
