"""GPU benchmark: dense decode attention over a list of (batch, context) shapes, graph-timed, for
comparing two builds of tinyserve in one session (run it once per build, e.g. with PYTHONPATH
pointing at a `pip install --target` of the other build, alternating, on one machine).

float16, 32 query / 8 KV heads, head_dim 128, page 16, each sequence's pages in random physical
order, NHD, split workspace planned once outside the timing. Each figure is the lowest of
--samples medians, each the median of 20 replays of a CUDA graph of 10 back-to-back calls (CUDA
events; bench_decode.median_ms), so short launches are timed without the host.

    python benchmarks/bench_decode_shapes.py [--shapes 1x512,8x1024,...] [--samples 3]
                                             [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from bench_decode import commit, median_ms

import tinyserve as ts

HEADS_Q, HEADS_KV, HEAD_DIM, PAGE = 32, 8, 128, 16
SHAPES = "1x512,1x2048,1x4096,8x1024,8x4096,64x4096,8x32768"


def time_shape(batch: int, context: int, samples: int, gen: torch.Generator) -> dict:
    pages = (context + PAGE - 1) // PAGE
    blocks = batch * pages + 1
    kc = torch.randn(blocks, PAGE, HEADS_KV, HEAD_DIM, device="cuda", dtype=torch.float16,
                     generator=gen)  # fmt: skip
    vc = torch.randn_like(kc)
    table = torch.randperm(blocks - 1, device="cuda", generator=gen)[: batch * pages]
    table = table.view(batch, pages).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
    out = torch.empty_like(q)
    splits, ws_bytes = ts.plan_paged_attention(q, kc, table, max_seq_len=context)[:2]
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device="cuda")

    def call():
        ts.paged_attention(q, kc, vc, table, lens, out, max_seq_len=context, workspace=ws)

    times = [1e3 * median_ms(call, 20, warmup=3, graph=True) for _ in range(samples)]
    return {"batch": batch, "context": context, "splits": splits, "us": min(times),
            "us_samples": times}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated BATCHxCONTEXT")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [time_shape(b, c, args.samples, gen) for b, c in shapes]
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "tinyserve": ts.__file__,
        "decode": rows,
    }
    print(f"# {result['device']}, {result['date']}, commit {result['commit']}, {ts.__file__}")
    print("| batch | context | splits | us (lowest of samples) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['us']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
