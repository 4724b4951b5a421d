"""Decode time at fixed split counts against the planned count: the data a split-planner fit needs.

For every case of the grid (batch x context x head_dim x KV dtype x length spread) it plans the
call as a user would (`plan_paged_attention` with the lengths on the host), times the decode at
the planned count and at every candidate count (CUDA-graph replays, the median of 20, the faster
of `--rounds` rounds), checks every count's output against a float64 reference, and reports how
much slower the planned count is than the fastest one measured (its regret). A tool for tuning
the planner, not a benchmark of record: 32 query / 8 KV heads, page 16, float16 queries, pages in
random order.

    python benchmarks/calibrate_splits.py --batches 40,48,56,64 --contexts 4096 \
        --kv-dtypes float16,fp8 --spreads equal,0.5-1.5 --json splits.json

A spread `lo-hi` draws each length uniformly from [lo x context, hi x context) (at least 1);
`equal` gives every sequence the context. --dry-run runs shrunk cases on the CPU (checks the
script and the outputs, times nothing meaningful).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from bench_decode import commit, timed_pair, to_fp8

import tinyserve as ts

Q_HEADS, KV_HEADS, PAGE = 32, 8, 16


def parse_spread(spread: str) -> tuple[float, float] | None:
    if spread == "equal":
        return None
    try:
        lo, hi = (float(x) for x in spread.split("-"))
    except ValueError:
        lo, hi = 0.0, 0.0
    if not 0 <= lo < hi:
        raise SystemExit(f"calibrate_splits: a spread is lo-hi with 0 <= lo < hi, got {spread}")
    return lo, hi


def case_inputs(batch, context, dim, kv_dtype, spread, rng, device):
    """Query, caches (float8 ones with their scales), block table and lengths of one case."""
    bounds = parse_spread(spread)
    if bounds is None:
        lens = np.full(batch, context, dtype=np.int32)
    else:
        lo = max(1, int(bounds[0] * context))
        hi = max(lo + 1, int(bounds[1] * context))
        lens = rng.integers(lo, hi, size=batch).astype(np.int32)
    pages = (lens + PAGE - 1) // PAGE
    ids = rng.permutation(int(pages.sum())).astype(np.int32)
    table = np.zeros((batch, int(pages.max())), dtype=np.int32)
    start = 0
    for i in range(batch):
        table[i, : pages[i]] = ids[start : start + pages[i]]
        start += pages[i]
    shape = (int(pages.sum()), PAGE, KV_HEADS, dim)
    dtype = torch.bfloat16 if kv_dtype == "bfloat16" else torch.float16
    kc = torch.randn(shape, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    scales = {}
    if kv_dtype == "fp8":
        (kc, k_scale), (vc, v_scale) = to_fp8(kc), to_fp8(vc)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
    q = torch.randn((batch, Q_HEADS, dim), dtype=dtype, device=device)
    table_t = torch.from_numpy(table).to(device)
    return q, kc, vc, scales, table_t, torch.from_numpy(lens).to(device), lens


def reference(q, kc, vc, scales, table, lens) -> torch.Tensor:
    """Decode attention in float64 over the cached values as the kernels decode them (float8
    ones times their scales), sequence by sequence; the default scale 1 / sqrt(head_dim)."""
    k_scale, v_scale = scales.get("k_scale", 1.0), scales.get("v_scale", 1.0)
    batch, q_heads, dim = q.shape
    group = q_heads // KV_HEADS
    out = torch.empty((batch, q_heads, dim), dtype=torch.float64, device=q.device)
    for b, n in enumerate(int(x) for x in lens):
        blocks = table[b, : (n + PAGE - 1) // PAGE].long()
        k = kc[blocks].reshape(-1, KV_HEADS, dim)[:n].to(torch.float64) * k_scale
        v = vc[blocks].reshape(-1, KV_HEADS, dim)[:n].to(torch.float64) * v_scale
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].to(torch.float64), k) / dim**0.5
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out


def time_call(fn, rounds: int, device: str) -> float:
    """Per-call milliseconds, the fastest of `rounds` rounds of bench_decode's timing (graph
    replays on CUDA, a host clock on the CPU)."""
    return min(timed_pair({"call": fn}, 20, device)[0]["call"] for _ in range(rounds))


def run_case(batch, context, dim, kv_dtype, spread, counts, rounds, rng, device) -> dict:
    q, kc, vc, scales, table, lens, lens_np = case_inputs(
        batch, context, dim, kv_dtype, spread, rng, device
    )
    max_len = int(lens_np.max())
    planned, _ = ts.plan_paged_attention(q, kc, table, max_seq_len=max_len, host_seq_lens=lens_np)
    expected = reference(q, kc, vc, scales, table, lens_np)
    times = {}
    for n in sorted({planned, *counts}):
        _, nbytes = ts.plan_paged_attention(q, kc, table, max_seq_len=max_len, num_splits=n)
        workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device=device)
        out = torch.full_like(q, float("nan"))

        def call(n=n, out=out, workspace=workspace):
            ts.paged_attention(
                q,
                kc,
                vc,
                table,
                lens,
                out,
                max_seq_len=max_len,
                num_splits=n,
                workspace=workspace,
                **scales,
            )

        call()
        # Every count computes the same attention (a NaN left in `out` fails too).
        err = float((out.to(torch.float64) - expected).norm() / expected.norm())
        if not err <= 1e-2:
            raise SystemExit(
                f"calibrate_splits: {batch} x {context} hd{dim} {kv_dtype} {spread}: "
                f"{n} splits off the float64 reference by {err:.2e} (relative L2)"
            )
        times[n] = time_call(call, rounds, device)
    best = min(times, key=times.get)
    return {
        "batch": batch,
        "context": context,
        "head_dim": dim,
        "kv_dtype": kv_dtype,
        "spread": spread,
        "lens": lens_np.tolist(),
        "planned": planned,
        "ms": {str(n): t for n, t in times.items()},
        "best": best,
        "regret": times[planned] / times[best] - 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="40,48,56,64,72,80,96,112,128")
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--head-dims", default="128")
    parser.add_argument("--kv-dtypes", default="float16,fp8", help="float16, bfloat16, fp8")
    parser.add_argument("--spreads", default="equal,0.5-1.5,0-2")
    parser.add_argument("--splits", default="1,2,3,4,6,8", help="counts timed beside the plan")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every case to this file")
    parser.add_argument("--dry-run", action="store_true", help="shrunk cases on the CPU")
    args = parser.parse_args()
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    batches, contexts, dims = ints(args.batches), ints(args.contexts), ints(args.head_dims)
    if device == "cpu":  # the script's path on small shapes
        batches, contexts = [2, 3], [min(c, 96) for c in contexts[:1]]
    counts = ints(args.splits)
    spreads = args.spreads.split(",")
    for spread in spreads:  # a malformed spread stops the run before any case
        parse_spread(spread)
    rng = np.random.default_rng(args.seed)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(f"{name}, commit {commit()}")
    cases = []
    for kv_dtype in args.kv_dtypes.split(","):
        for dim in dims:
            for spread in spreads:
                for context in contexts:
                    for batch in batches:
                        r = run_case(
                            batch, context, dim, kv_dtype, spread, counts, args.rounds, rng, device
                        )
                        cases.append(r)
                        ms = "  ".join(
                            f"{n}{'*' if int(n) == r['planned'] else ''}: {t * 1e3:.1f}"
                            for n, t in r["ms"].items()
                        )
                        print(
                            f"{kv_dtype:8s} hd{dim:<3d} {spread:8s} {batch:4d} x {context:6d} "
                            f"plan {r['planned']:2d} best {r['best']:2d} "
                            f"regret {r['regret'] * 100:5.1f}%  | us {ms}",
                            flush=True,
                        )
                        if device == "cuda":
                            torch.cuda.empty_cache()
    regrets = [c["regret"] for c in cases]
    print(
        f"{len(cases)} cases: planned count over the fastest, mean {statistics.mean(regrets):.1%},"
        f" worst {max(regrets):.1%}; {sum(r > 0.05 for r in regrets)} over 5%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "commit": commit(), "cases": cases}, f)


if __name__ == "__main__":
    main()
