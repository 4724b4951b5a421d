"""GPU benchmark: dense decode attention over a list of (batch, context) shapes, graph-timed, for
comparing two builds of tinyserve in one session (run it once per build, e.g. with PYTHONPATH
pointing at a `pip install --target` of the other build, alternating, on one machine).

The case is bench_decode.decode_inputs': float16, 32 query / 8 KV heads, head_dim 128, page 16,
each sequence's pages in random physical order, NHD; the split workspace is planned once outside
the timing. Each figure is the lowest of
--samples medians, each the median of 20 replays of a CUDA graph of 10 back-to-back calls (CUDA
events; bench_decode.median_ms), so short launches are timed without the host. --dry-run: small
shapes on the CPU, each output checked against float64 attention over the pages the table names
(the check of the script itself; no timing).

    python benchmarks/bench_decode_shapes.py [--shapes 1x512,8x1024,...] [--samples 3]
                                             [--json PATH] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json

import numpy as np
import torch
from bench_decode import commit, decode_inputs, median_ms

import tinyserve as ts

SHAPES = "1x512,1x2048,1x4096,8x1024,8x4096,64x4096,8x32768"
DRY_SHAPES = "1x48,3x96"
PAGE = 16  # decode_inputs' page size: contexts are whole pages


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """BATCHxCONTEXT,... into (batch, context) pairs; ValueError naming the spec otherwise."""
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in spec.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or s[0] < 1 or s[1] < PAGE or s[1] % PAGE for s in shapes):
        raise ValueError(
            f"--shapes takes BATCHxCONTEXT,... (batch >= 1, context a positive multiple of "
            f"{PAGE}), got {spec}"
        )
    return shapes


def reference(q, kc, vc, table, context: int) -> torch.Tensor:
    """float64 attention of each sequence over the first `context` tokens of its pages."""
    group = q.shape[1] // kc.shape[2]
    outs = []
    for b in range(q.shape[0]):
        k = kc[table[b].long()].reshape(-1, kc.shape[2], kc.shape[3])[:context].double()
        v = vc[table[b].long()].reshape(-1, kc.shape[2], kc.shape[3])[:context].double()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,thd->ht", q[b].double(), k) / q.shape[2] ** 0.5
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v))
    return torch.stack(outs)


def time_shape(
    batch: int, context: int, samples: int, rng: np.random.Generator, device: str
) -> dict:  # fmt: skip
    q, kc, vc, table, lens = decode_inputs(batch, context, rng, device=device)
    out = torch.full_like(q, float("nan"))
    splits, ws_bytes = ts.plan_paged_attention(q, kc, table, max_seq_len=context)
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device=device)

    def call():
        ts.paged_attention(q, kc, vc, table, lens, out, max_seq_len=context, workspace=ws)

    row = {"batch": batch, "context": context, "splits": splits}
    if device == "cpu":  # the dry run: check the case, time nothing
        call()
        err = ((out.double() - reference(q, kc, vc, table, context)).abs().max()).item()
        if not err < 2e-3:
            raise SystemExit(f"{batch} x {context}: output differs from float64 by {err}")
        return {**row, "max_abs_error": err}
    times = [1e3 * median_ms(call, 20, warmup=3, graph=True) for _ in range(samples)]
    return {**row, "us": min(times), "us_samples": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated BATCHxCONTEXT")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU, checked")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    try:
        shapes = parse_shapes(DRY_SHAPES if args.dry_run and args.shapes == SHAPES else args.shapes)
    except ValueError as exc:
        parser.error(str(exc))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = [time_shape(b, c, args.samples, rng, device) for b, c in shapes]
    result = {
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "tinyserve": ts.__file__,
        "decode": rows,
    }
    print(f"# {result['device']}, {result['date']}, commit {result['commit']}, {ts.__file__}")
    print("| batch | context | splits | us (lowest of samples) |")
    print("|---|---|---|---|")
    for r in rows:
        us = (
            f"dry run: max abs error {r['max_abs_error']:.1e}" if args.dry_run else f"{r['us']:.2f}"
        )
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {us} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
