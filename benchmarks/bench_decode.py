"""GPU benchmark of the CUDA backend against the memory-bandwidth ceilings measured in the same
run.

Decode attention: float16, 32 query heads, 8 KV heads, head_dim 128, page size 16, pages in random
physical order, at (batch, context) = (64, 4096), (8, 32768), (1, 131072), (256, 1024). Reported:
median time per call (CUDA events around a CUDA graph of 10 back-to-back calls, median of 20
replays, so the GPU time is measured, not the host's or the launch gaps; the same calls launched
one by one from Python are reported beside it as "eager"), effective bandwidth (K+V bytes of the
real tokens / time), the same for torch's scaled_dot_product_attention with the cuDNN backend on
the same data held contiguously, and both as a share of the read ceiling (a large read-only
reduction).

Cache writes (reshape_and_cache, 64k tokens) and block copies (copy_blocks, thousands of blocks
over 32 layers) against the device-to-device copy ceiling (bytes read + written).

    python benchmarks/bench_decode.py [--json results.json] [--iters 50]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess

import numpy as np
import torch

import tinyserve as ts

GiB = 1 << 30


def median_ms(fn, iters: int, warmup: int = 5, calls: int = 10, graph: bool = False) -> float:
    """Median over `iters` samples of the per-call GPU time of `calls` back-to-back calls
    between two CUDA events. Back-to-back calls keep the GPU busy, so host-side overhead (the
    Python wrapper) is not counted unless it is longer than the kernels. With graph=True the
    calls are captured once into a CUDA graph and each sample replays it, which also removes
    the launch gaps between kernels (as an engine that replays its decode step does)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
        run = captured.replay
        run()
        torch.cuda.synchronize()
    else:

        def run():
            for _ in range(calls):
                fn()

    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


READ_KERNEL = r"""
extern "C" __global__ void read_all(const uint4* __restrict__ x, unsigned long long n,
                                    unsigned int* out) {
  // Read-only reduction: 16-byte loads, UNROLL in flight per thread, an XOR fold so no load can
  // be dropped, one atomic per thread at the end.
  unsigned int acc = 0;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = x[i + u * stride];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) { uint4 a = x[i]; acc ^= a.x ^ a.y ^ a.z ^ a.w; }
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);
}
"""

# (loads in flight per thread, CTAs per multiprocessor, threads per CTA) of the raw read kernel;
# the fastest is kept, so no one launch shape decides the ceiling.
READ_CONFIGS = ((4, 8, 512), (8, 4, 512), (8, 2, 1024), (4, 16, 256), (8, 8, 256), (16, 4, 256))


def raw_read_kernels(x: torch.Tensor) -> dict:
    """{name: launch} of the raw 16-byte read kernel over all of x (CUDA, bytes a multiple of
    16), one per launch shape of READ_CONFIGS, on torch's current stream. Needs CuPy."""
    import cupy

    xc = cupy.from_dlpack(x.view(torch.int32))
    out = cupy.zeros(1, dtype=cupy.uint32)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    n = cupy.uint64(x.numel() * x.element_size() // 16)
    launches = {}
    for unroll, per_sm, threads in READ_CONFIGS:
        kernel = cupy.RawKernel(READ_KERNEL, "read_all", options=(f"-DUNROLL={unroll}",))

        def raw(kernel=kernel, blocks=sms * per_sm, threads=threads):
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                kernel((blocks,), (threads,), (xc, n, out))

        launches[f"raw read x{unroll} {per_sm}x{threads}/SM"] = raw
    return launches


def read_ceiling(iters: int) -> tuple[float, str]:
    """Bytes/s of the fastest of several read-only reductions over 4 GiB: torch sums (float16
    into float32, and the same bytes viewed as float32) and, where CuPy is present, a raw
    16-byte-load kernel in several launch shapes. The fastest is the ceiling."""
    x = torch.randn(2 * GiB, dtype=torch.float16, device="cuda")
    candidates = {
        "torch.sum(float16 -> float32)": lambda: x.sum(dtype=torch.float32),
        "torch.sum(float32 view)": lambda: x.view(torch.float32).sum(),
    }
    try:
        candidates.update(raw_read_kernels(x))
    except Exception:  # noqa: BLE001 - CuPy is optional; the torch reductions still measure
        pass
    rates = {name: 4 * GiB / (median_ms(fn, iters) * 1e-3) for name, fn in candidates.items()}
    best = max(rates, key=rates.get)
    print(
        "  read-only reductions: "
        + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in rates.items()),
        flush=True,
    )
    return rates[best], best


def copy_ceiling(iters: int) -> float:
    """Bytes/s (read + written) of a large device-to-device copy (2 GiB)."""
    src = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters)
    return 4 * GiB / (ms * 1e-3)


def decode_inputs(
    batch: int,
    context: int,
    rng: np.random.Generator,
    layout: str = "NHD",
    order: str = "random",
    device: str = "cuda",
):
    """(query, key_cache, value_cache, block_table, seq_lens) of the benchmark's decode case:
    float16, 32 query heads, 8 KV heads, head_dim 128, page 16, every sequence `context` tokens,
    pages in random (or sequential) physical order, NHD storage or HND passed as the NHD view."""
    q_heads, kv_heads, dim, page = 32, 8, 128, 16
    pages_per_seq = context // page
    num_blocks = batch * pages_per_seq
    ids = np.arange(num_blocks, dtype=np.int32)
    table = torch.from_numpy(rng.permutation(ids) if order == "random" else ids)
    table = table.view(batch, pages_per_seq).to(device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    if layout == "HND":  # storage [blocks, heads, page, dim], passed as the permuted view
        kc = torch.randn(
            (num_blocks, kv_heads, page, dim), dtype=torch.float16, device=device
        ).transpose(1, 2)
    else:
        kc = torch.randn((num_blocks, page, kv_heads, dim), dtype=torch.float16, device=device)
    vc = torch.randn_like(kc)
    q = torch.randn((batch, q_heads, dim), dtype=torch.float16, device=device)
    return q, kc, vc, table, lens


def decode_case(
    batch: int, context: int, iters: int, rng: np.random.Generator, layout: str, order: str
) -> dict:
    q, kc, vc, table, lens = decode_inputs(batch, context, rng, layout, order)
    q_heads, kv_heads, dim = q.shape[1], kc.shape[2], q.shape[2]
    out = torch.empty_like(q)
    splits, nbytes = ts.plan_paged_attention(q, kc, table, max_seq_len=context)
    workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device="cuda")

    def run():
        ts.paged_attention(
            q, kc, vc, table, lens, out, max_seq_len=context, num_splits=splits, workspace=workspace
        )

    ms = median_ms(run, iters, graph=True)
    ms_eager = median_ms(run, iters)
    kv_bytes = 2 * batch * context * kv_heads * dim * 2

    # Same data, contiguous [batch, heads, context, dim], for torch SDPA (cuDNN backend).
    k_dense = kc[table.long()].reshape(batch, context, kv_heads, dim).transpose(1, 2).contiguous()
    v_dense = vc[table.long()].reshape(batch, context, kv_heads, dim).transpose(1, 2).contiguous()
    q4 = q.unsqueeze(2)
    sdpa_ms, sdpa_ms_eager, sdpa_note, agreement = None, None, "", None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for note, k_in, v_in, gqa in (
        ("enable_gqa", k_dense, v_dense, True),
        ("KV repeated per query head", None, None, False),
    ):
        try:
            if k_in is None:
                k_in = k_dense.repeat_interleave(q_heads // kv_heads, 1)
                v_in = v_dense.repeat_interleave(q_heads // kv_heads, 1)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):

                def sdpa(k_in=k_in, v_in=v_in, gqa=gqa):
                    torch.nn.functional.scaled_dot_product_attention(q4, k_in, v_in, enable_gqa=gqa)

                sdpa_ms = median_ms(sdpa, iters, graph=True)
                sdpa_ms_eager = median_ms(sdpa, iters)
                reference = torch.nn.functional.scaled_dot_product_attention(
                    q4, k_in, v_in, enable_gqa=gqa
                ).squeeze(2)
            run()
            torch.cuda.synchronize()
            agreement = float((out.float() - reference.float()).norm() / reference.float().norm())
            sdpa_note = note
            break
        except Exception as exc:  # noqa: BLE001 - report why cuDNN refused, then try the next
            sdpa_note = f"{note}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return {
        "batch": batch,
        "context": context,
        "splits": splits,
        "ms": ms,
        "bandwidth": kv_bytes / (ms * 1e-3),
        "ms_eager": ms_eager,
        "bandwidth_eager": kv_bytes / (ms_eager * 1e-3),
        "rel_diff_vs_sdpa": agreement,
        "sdpa_ms": sdpa_ms,
        "sdpa_bandwidth": None if sdpa_ms is None else kv_bytes / (sdpa_ms * 1e-3),
        "sdpa_ms_eager": sdpa_ms_eager,
        "sdpa_note": sdpa_note,
    }


def reshape_case(iters: int) -> dict:
    tokens, heads, dim, page = 65536, 8, 128, 16
    num_blocks = tokens // page + 64
    kc = torch.zeros((num_blocks, page, heads, dim), dtype=torch.float16, device="cuda")
    vc = torch.zeros_like(kc)
    key = torch.randn((tokens, heads, dim), dtype=torch.float16, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * page, device="cuda")[:tokens].to(torch.int64)
    ms = median_ms(lambda: ts.reshape_and_cache(key, value, kc, vc, slots), iters)
    moved = 2 * 2 * key.numel() * 2  # K and V, read + written
    return {"tokens": tokens, "ms": ms, "bandwidth": moved / (ms * 1e-3)}


def copy_case(iters: int) -> dict:
    layers, pairs, page, heads, dim = 32, 2048, 16, 8, 128
    num_blocks = 2 * pairs + 64
    caches = [
        torch.randn((num_blocks, page, heads, dim), dtype=torch.float16, device="cuda")
        for _ in range(2 * layers)
    ]
    ids = torch.randperm(num_blocks, device="cuda")[: 2 * pairs].to(torch.int32)
    src, dst = ids[:pairs].contiguous(), ids[pairs:].contiguous()
    ms = median_ms(lambda: ts.copy_blocks(caches, src, dst), iters)
    moved = 2 * len(caches) * pairs * page * heads * dim * 2
    return {"layers": layers, "pairs": pairs, "ms": ms, "bandwidth": moved / (ms * 1e-3)}


def commit() -> str:
    """The git commit measured: TINYSERVE_COMMIT when set (a GPU machine may get a copy of the
    tree whose .git, if any, is not the one measured), else the checkout's HEAD."""
    if os.environ.get("TINYSERVE_COMMIT"):
        return os.environ["TINYSERVE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--layout",
        choices=["NHD", "HND"],
        default="NHD",
        help="KV cache storage layout (both are passed as the logical NHD view)",
    )
    parser.add_argument(
        "--order",
        choices=["random", "sequential"],
        default="random",
        help="physical order of each sequence's pages (the benchmark case is random)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    props = torch.cuda.get_device_properties(0)
    header = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "layout": args.layout,
        "order": args.order,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    tb = 1e12
    print(
        f"{props.name} ({props.multi_processor_count} SMs), {header['date']}, "
        f"commit {header['commit']}, torch {torch.__version__}, {args.layout} cache, "
        f"{args.order} page order",
        flush=True,
    )
    (read_bw, read_method), copy_bw = read_ceiling(args.iters), copy_ceiling(args.iters)
    header["read_ceiling_method"] = read_method
    print(
        f"read ceiling {read_bw / tb:.2f} TB/s ({read_method}); "
        f"copy ceiling {copy_bw / tb:.2f} TB/s (D2D copy, read + write)",
        flush=True,
    )
    rows = []
    decode = []
    for b, c in ((64, 4096), (8, 32768), (1, 131072), (256, 1024)):
        r = decode_case(b, c, args.iters, rng, args.layout, args.order)
        torch.cuda.empty_cache()  # the case's caches are gone: give their memory back
        decode.append(r)
        s_ms = "n/a" if r["sdpa_ms"] is None else f"{r['sdpa_ms']:.3f}"
        s_bw = "n/a" if r["sdpa_bandwidth"] is None else f"{r['sdpa_bandwidth'] / tb:.2f}"
        s_pc = (
            "n/a" if r["sdpa_bandwidth"] is None else f"{100 * r['sdpa_bandwidth'] / read_bw:.1f}"
        )
        err = "n/a" if r["rel_diff_vs_sdpa"] is None else f"{r['rel_diff_vs_sdpa']:.1e}"
        rows.append(
            f"| {r['batch']} | {r['context']} | {r['splits']} | {r['ms']:.3f} | "
            f"{r['bandwidth'] / tb:.2f} | {100 * r['bandwidth'] / read_bw:.1f} | {s_ms} | "
            f"{s_bw} | {s_pc} | {err} | {100 * r['bandwidth_eager'] / read_bw:.1f} |"
        )
        print(rows[-1], f" cuDNN: {r['sdpa_note']}", flush=True)

    def cache_op_line(label: str, r: dict) -> str:
        return (
            f"{label}: {r['ms']:.3f} ms, {r['bandwidth'] / tb:.2f} TB/s = "
            f"{100 * r['bandwidth'] / copy_bw:.1f}% of copy ceiling"
        )

    reshape = reshape_case(args.iters)
    reshape_line = cache_op_line("reshape_and_cache 64k tokens", reshape)
    print(reshape_line, flush=True)
    copy = copy_case(args.iters)
    copy_line = cache_op_line(
        f"copy_blocks {copy['pairs']} pairs x {2 * copy['layers']} caches", copy
    )
    print(copy_line, flush=True)
    results = dict(
        header,
        read_ceiling=read_bw,
        copy_ceiling=copy_bw,
        decode=decode,
        reshape_and_cache=reshape,
        copy_blocks=copy,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(
        "\n| batch | context | splits | tinyserve ms | TB/s | % read ceiling | cuDNN SDPA ms "
        "| TB/s | % read ceiling | rel diff vs SDPA | eager % read ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(reshape_line)
    print(copy_line)


if __name__ == "__main__":
    main()
