"""CPU benchmark: paged decode attention against torch, and one BlockManager decode step.

(a) paged_attention on the CPU backend: batch 8, context 4096, 32 query heads, 8 KV heads,
    head_dim 128, float32 (--dtype picks float16 or bfloat16), page size 16, pages in random
    physical order (NHD cache), against torch's CPU scaled_dot_product_attention on the same keys
    and values held contiguously
    ([B, H, L, D], enable_gqa=True so each KV head is read once). Both run with the same thread
    count. Median of many calls after warm-up, the two timed alternately so drift of the machine
    hits both alike; the outputs are compared (max abs diff). Target: tinyserve at most 2x torch.
(b) the BlockManager cost of one decode step for 256 sequences of 1000..4000 tokens through the
    Python API (append_batch of one token each, then block_table for all), measured by
    bench_block_manager.py. Target: median under 50 us.

torch's OpenMP threads are told to wait passively (OMP_WAIT_POLICY=PASSIVE, unless set) so that
their spinning between calls does not slow the tinyserve calls timed in between.

    python benchmarks/bench_cpu.py [--json results.json] [--iters 40] [--steps 2000]
                                   [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import os

# torch's OpenMP/MKL worker threads keep spinning after each call by default (up to 200 ms for
# Intel's runtime): with calls alternating on few cores they took CPU time from tinyserve's
# workers, which block instead (measured 21.5 ms instead of 15 ms for (a) on 2 cores, with torch
# unchanged). Set before torch loads its runtime; an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_block_manager import cpu_name, measure, percentile

import tinyserve as ts

ATTENTION_RATIO_TARGET = 2.0  # tinyserve time / torch time
STEP_TARGET_US = 50.0


def git_commit() -> str:
    """Short commit of the checkout, with "+dirty" when files that go into the build differ
    from it (edits elsewhere, docs for instance, do not change what is measured)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "src", "include", "python", "CMakeLists.txt")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if changed else "")


def attention_inputs(batch: int, context: int, q_heads: int, kv_heads: int, dim: int, page: int):
    """The same data twice: paged (pages in random physical order) for tinyserve, contiguous
    [B, H, L, D] for torch."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_heads, dim, generator=gen)
    k = torch.randn(batch, kv_heads, context, dim, generator=gen)
    v = torch.randn(batch, kv_heads, context, dim, generator=gen)
    pages = context // page
    perm = np.random.default_rng(0).permutation(batch * pages)
    table = torch.from_numpy(perm.astype(np.int32)).view(batch, pages)

    def paged(x: torch.Tensor) -> torch.Tensor:
        # [B, H, L, D] -> [B * pages, page, H, D] in token order, then scattered to the pages.
        logical = x.permute(0, 2, 1, 3).reshape(batch * pages, page, kv_heads, dim)
        # Not empty_like: for batch 1 the reshape is a view with the heads outermost, and
        # empty_like would keep those strides instead of the NHD layout.
        cache = torch.empty(logical.shape, dtype=logical.dtype)
        cache[torch.from_numpy(perm)] = logical
        return cache

    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, k, v, paged(k), paged(v), table, lens


def bench_attention(iters: int, warmup: int, dtype: str = "float32") -> dict:
    batch, context, q_heads, kv_heads, dim, page = 8, 4096, 32, 8, 128, 16
    q, k, v, kc, vc, table, lens = attention_inputs(batch, context, q_heads, kv_heads, dim, page)
    torch_dtype = getattr(torch, dtype)
    q, k, v, kc, vc = (x.to(torch_dtype) for x in (q, k, v, kc, vc))
    out = torch.empty_like(q)
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]

    def run_tinyserve():
        ts.paged_attention(q, kc, vc, table, lens, out)

    def run_torch():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    times: dict[str, list[float]] = {"tinyserve": [], "torch": []}
    for i in range(warmup + iters):
        for name, fn in (("tinyserve", run_tinyserve), ("torch", run_torch)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    ref = run_torch().squeeze(2)
    run_tinyserve()
    kv_bytes = 2 * k.numel() * k.element_size()
    result = {
        "shape": {
            "batch": batch,
            "context": context,
            "num_q_heads": q_heads,
            "num_kv_heads": kv_heads,
            "head_dim": dim,
            "page_size": page,
            "dtype": dtype,
            "layout": "NHD, pages in random physical order",
        },
        "iters": iters,
        "warmup": warmup,
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
    }
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = {
            "median_ms": median,
            "p10_ms": percentile(values, 10),
            "p90_ms": percentile(values, 90),
            "kv_GBps": kv_bytes / (median * 1e-3) / 1e9,
        }
    result["ratio"] = result["tinyserve"]["median_ms"] / result["torch"]["median_ms"]
    result["target_ratio"] = ATTENTION_RATIO_TARGET
    result["meets_target"] = result["ratio"] <= ATTENTION_RATIO_TARGET
    return result


def bench_step(steps: int, warmup: int) -> dict:
    samples = measure(
        batch=256, block_size=16, min_len=1000, max_len=4000, reps=steps, warmup=warmup
    )
    result: dict = {
        "batch": 256,
        "block_size": 16,
        "lengths": [1000, 4000],
        "steps": steps,
        "warmup": warmup,
        "seq_ids": "numpy int64 array",
    }
    for part, values in samples.items():
        result[part] = {
            "median_us": statistics.median(values),
            "p10_us": percentile(values, 10),
            "p90_us": percentile(values, 90),
        }
    result["target_us"] = STEP_TARGET_US
    result["meets_target"] = result["step"]["median_us"] < STEP_TARGET_US
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--iters", type=int, default=40, help="timed attention calls of each")
    parser.add_argument("--warmup", type=int, default=5, help="untimed attention calls first")
    parser.add_argument("--steps", type=int, default=2000, help="timed BlockManager steps")
    parser.add_argument("--step-warmup", type=int, default=200)
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage dtype of query, caches and output (attention benchmark)",
    )
    args = parser.parse_args()

    torch.set_num_threads(ts.num_threads())
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "processor": platform.processor(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "tinyserve_threads": ts.num_threads(),
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
        "tinyserve": ts.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
    attention = bench_attention(args.iters, args.warmup, args.dtype)
    step = bench_step(args.steps, args.step_warmup)

    print(
        f"tinyserve {info['tinyserve']} (commit {info['commit']}), torch {info['torch']}, "
        f"Python {info['python']}, {info['date']}"
    )
    print(
        f"machine: {info['cpu_model']} (processor {info['processor']!r}), "
        f"{info['cpu_count']} CPUs, {info['system']}"
    )
    print(
        f"threads: tinyserve {info['tinyserve_threads']}, torch {info['torch_threads']} "
        f"(OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']})\n"
    )

    s = attention["shape"]
    print(
        f"(a) decode attention, batch {s['batch']}, context {s['context']}, "
        f"{s['num_q_heads']}/{s['num_kv_heads']} heads, head_dim {s['head_dim']}, {s['dtype']}, "
        f"page {s['page_size']}; median of {attention['iters']}"
    )
    print(f"    {'':<36} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'K+V GB/s':>9}")
    rows = (
        ("tinyserve.paged_attention (paged)", "tinyserve"),
        ("torch sdpa (contiguous, enable_gqa)", "torch"),
    )
    for label, key in rows:
        r = attention[key]
        print(
            f"    {label:<36} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['kv_GBps']:>9.2f}"
        )
    verdict = "meets" if attention["meets_target"] else "MISSES"
    print(
        f"    ratio tinyserve/torch {attention['ratio']:.2f}x ({verdict} target <= "
        f"{ATTENTION_RATIO_TARGET:.0f}x); max abs diff {attention['max_abs_diff']:.2e}\n"
    )

    print(
        f"(b) BlockManager decode step, {step['batch']} sequences of {step['lengths'][0]}.."
        f"{step['lengths'][1]} tokens, block_size {step['block_size']}; {step['steps']} steps"
    )
    print(f"    {'':<36} {'median us':>10} {'p10 us':>8} {'p90 us':>8}")
    for part in ("append_batch", "block_table", "step"):
        r = step[part]
        print(f"    {part:<36} {r['median_us']:>10.1f} {r['p10_us']:>8.1f} {r['p90_us']:>8.1f}")
    verdict = "meets" if step["meets_target"] else "MISSES"
    print(
        f"    step median {step['step']['median_us']:.1f} us ({verdict} target < "
        f"{STEP_TARGET_US:.0f} us)"
    )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"info": info, "attention": attention, "block_manager_step": step}, f, indent=2
            )
            f.write("\n")


if __name__ == "__main__":
    main()
