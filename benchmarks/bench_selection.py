"""GPU benchmark of query-aware sparse decode: select_pages + paged_attention over the selected
per-KV-head pages, against dense paged_attention over every page, in the same run.

float16, 32 query / 8 KV heads, head_dim 128, page 16, pages in random physical order, budget
2048 tokens (128 pages). Shapes: 8 x 32k, 1 x 128k, and 8 x 1k (a batch shorter than the budget,
where select_pages copies the table and the step must cost no more than dense). Each time is the
median per-call GPU time of a CUDA graph of 10 back-to-back steps (CUDA events, median of 20
replays). Reported: dense, select_pages alone, sparse attention alone, select + sparse, the
speed-up, selection's share of the sparse step, the top-k and scoring kernels alone (from
torch.profiler's kernel times) and the scoring kernel's read rate over the summaries; with
--sparse-splits, the sparse attention at fixed split counts too. --layout HND stores the caches
[blocks, KV heads, page, head_dim] (passed as the permuted view): a KV head's keys of one page
are then contiguous, which is what sparse attention over per-KV-head tables reads.
--meta-dtypes float16,float8_e4m3fn times every shape with summaries of each dtype in turn
(float8 summaries: half the bytes the scoring kernel reads).

    python benchmarks/bench_selection.py [--json results.json] [--summary NAME]
                                         [--sparse-splits 8,16,32] [--layout NHD|HND]
                                         [--meta-dtypes float16[,float8_e4m3fn]]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from bench_decode import commit, median_ms

import tinyserve as ts

HEADS_Q, HEADS_KV, HEAD_DIM, PAGE, BUDGET_TOKENS = 32, 8, 128, 16, 2048
SHAPES = [(8, 32768), (1, 131072), (8, 1024)]


def kernel_us(fn, name: str, calls: int = 20) -> float:
    """Mean device time of the kernels whose name contains `name`, over `calls` eager calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if name in e.key]
        return sum(getattr(e, "device_time_total", 0.0) for e in events) / calls
    except Exception as error:  # the profiler is optional: the timings above stand without it
        print(f"profiler unavailable ({error}); kernel times omitted")
        return float("nan")


def case(
    batch: int, context: int, summary: str, gen: torch.Generator, layout: str = "NHD",
    meta_dtype: str = "float16",
):  # fmt: skip
    pages = context // PAGE
    num_blocks = batch * pages + 1
    dev = "cuda"

    def cache():
        if layout == "HND":  # storage [blocks, heads, page, dim], passed as the NHD view
            store = torch.randn(num_blocks, HEADS_KV, PAGE, HEAD_DIM, generator=gen, device=dev)
            return store.half().transpose(1, 2)
        return torch.randn(num_blocks, PAGE, HEADS_KV, HEAD_DIM, generator=gen, device=dev).half()

    kc, vc = cache(), cache()
    perm = torch.randperm(num_blocks - 1, generator=gen, device=dev).int()
    table = perm.view(batch, pages).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HEADS_Q, HEAD_DIM, generator=gen, device=dev).half()
    meta = torch.empty(ts.page_meta_shape(kc), dtype=getattr(torch, meta_dtype), device=dev)
    ts.build_page_meta(kc, table, lens, meta, summary=summary)
    return q, kc, vc, table, lens, meta


def run_shape(
    batch: int, context: int, summary: str, gen, sparse_splits=(), layout: str = "NHD",
    meta_dtype: str = "float16",
) -> dict:  # fmt: skip
    q, kc, vc, table, lens, meta = case(batch, context, summary, gen, layout, meta_dtype)
    budget = BUDGET_TOKENS // PAGE
    out = torch.empty_like(q)
    sel_t = torch.empty(batch, HEADS_KV, budget, dtype=torch.int32, device="cuda")
    sel_l = torch.empty(batch, HEADS_KV, dtype=torch.int32, device="cuda")
    # Workspaces sized once, outside the timed graphs.
    ws_bytes = ts.plan_paged_attention(q, kc, table, max_seq_len=context)[1]
    ws = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device="cuda")
    sel_ws = torch.empty(
        max(ts.select_pages_workspace_bytes(q, meta, table), 16),
        dtype=torch.uint8,
        device="cuda",
    )

    def dense():
        ts.paged_attention(q, kc, vc, table, lens, out, max_seq_len=context, workspace=ws)

    def select():
        ts.select_pages(
            q, meta, table, lens, budget, block_size=PAGE, summary=summary,
            out=(sel_t, sel_l), workspace=sel_ws,
        )  # fmt: skip

    select()
    # The longest key range a selected table holds: the budget, or the context where it is
    # shorter (a host-known bound, as dense decode's max_seq_len=context).
    sparse_max = min(BUDGET_TOKENS, context)
    sparse_ws_bytes = ts.plan_paged_attention(q, kc, sel_t, max_seq_len=sparse_max)[1]
    sparse_ws = torch.empty(max(sparse_ws_bytes, 16), dtype=torch.uint8, device="cuda")

    def sparse():
        ts.paged_attention(
            q, kc, vc, sel_t, sel_l, out, max_seq_len=sparse_max, workspace=sparse_ws
        )

    def step():
        select()
        sparse()

    r = {
        "batch": batch, "context": context, "summary": summary, "layout": layout,
        "meta_dtype": meta_dtype,
    }  # fmt: skip
    r["dense_us"] = 1e3 * median_ms(dense, 20, warmup=3, graph=True)
    r["select_us"] = 1e3 * median_ms(select, 20, warmup=3, graph=True)
    r["sparse_attention_us"] = 1e3 * median_ms(sparse, 20, warmup=3, graph=True)
    r["step_us"] = 1e3 * median_ms(step, 20, warmup=3, graph=True)
    r["speedup"] = r["dense_us"] / r["step_us"]
    r["selection_share"] = r["select_us"] / r["step_us"]
    # Either kernel of each step (the page-wide scoring kernel or its row-by-row fallback; the
    # shared-memory top-k or its global-memory fallback).
    r["topk_kernel_us"] = kernel_us(select, "select_pages_")
    r["score_kernel_us"] = kernel_us(select, "score_pages_")
    # The scoring kernel's read rate: every page's summary (both rows, every KV head), once.
    # (None where every sequence fits the budget: nothing is scored.)
    summary_bytes = batch * (context // PAGE) * meta[0].numel() * meta.element_size()
    r["score_read_tb_s"] = (
        summary_bytes / (r["score_kernel_us"] * 1e-6) / 1e12 if context // PAGE > budget else None
    )
    # Sparse attention at fixed split counts beside the planned one (tuning the planner for
    # per-KV-head tables).
    r["sparse_by_splits_us"] = {}
    for splits in sparse_splits:
        ws_n = ts.plan_paged_attention(q, kc, sel_t, max_seq_len=sparse_max, num_splits=splits)[1]
        ws_split = torch.empty(max(ws_n, 16), dtype=torch.uint8, device="cuda")

        def sparse_fixed(splits=splits, ws_split=ws_split):
            ts.paged_attention(
                q, kc, vc, sel_t, sel_l, out, max_seq_len=sparse_max, num_splits=splits,
                workspace=ws_split,
            )  # fmt: skip

        r["sparse_by_splits_us"][splits] = 1e3 * median_ms(sparse_fixed, 20, warmup=3, graph=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument(
        "--summary",
        default=ts.DEFAULT_SUMMARY,
        choices=["minmax", "minmax_damped", "meanstd"],
        help="page summary scored (default: the library's, %(default)s; the engine uses "
        "minmax_damped)",
    )
    parser.add_argument(
        "--sparse-splits",
        default="",
        help="comma-separated split counts: also time the sparse attention at each",
    )
    parser.add_argument("--layout", default="NHD", choices=["NHD", "HND"])
    parser.add_argument(
        "--meta-dtypes",
        default="float16",
        help="comma-separated page summary dtypes, each timed over every shape: float16 (the "
        "caches' dtype) and/or float8_e4m3fn",
    )
    args = parser.parse_args()
    splits = [int(x) for x in args.sparse_splits.split(",") if x]
    meta_dtypes = [x for x in args.meta_dtypes.split(",") if x]
    for name in meta_dtypes:
        if name not in ("float16", "float8_e4m3fn"):
            parser.error(f"--meta-dtypes: float16 or float8_e4m3fn, got {name!r}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [
        run_shape(b, c, args.summary, gen, splits, args.layout, m)
        for m in meta_dtypes
        for b, c in SHAPES
    ]
    torch.cuda.empty_cache()
    commit_id = commit()
    device = torch.cuda.get_device_name()
    print(
        f"# {device}, {datetime.date.today()}, commit {commit_id}, summary {args.summary}, "
        f"{args.layout} caches"
    )
    print(
        "| batch x context | summaries | dense us | select us | sparse attn us | select+sparse us "
        "| speed-up | selection share | top-k kernel us | score kernel us | score kernel TB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} x {r['context'] // 1024}k | {r['meta_dtype']} | {r['dense_us']:.1f} "
            f"| {r['select_us']:.1f} "
            f"| {r['sparse_attention_us']:.1f} | {r['step_us']:.1f} | {r['speedup']:.2f}x "
            f"| {100 * r['selection_share']:.0f}% | {r['topk_kernel_us']:.1f} "
            f"| {r['score_kernel_us']:.1f} "
            f"| {'-' if r['score_read_tb_s'] is None else format(r['score_read_tb_s'], '.2f')} |"
        )
    if splits:
        print("\nSparse attention (us) at fixed split counts:")
        print(
            "| batch x context | summaries | planned | "
            + " | ".join(f"{n} splits" for n in splits)
            + " |"
        )
        print("|---|---|---|" + "---|" * len(splits))
        for r in rows:
            fixed = " | ".join(f"{r['sparse_by_splits_us'][n]:.1f}" for n in splits)
            print(
                f"| {r['batch']} x {r['context'] // 1024}k | {r['meta_dtype']} "
                f"| {r['sparse_attention_us']:.1f} | {fixed} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "commit": commit_id, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
