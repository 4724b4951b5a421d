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

--grid: the issue-14 grid instead (GRID below: head_dim 64/128/256, group 1/4/8, page 1/16/32,
NHD/HND, float16/bfloat16, equal and ragged lengths, batch 1-256, contexts 512 to 128k, each
against the base case 32q/8kv, head_dim 128, page 16, float16, 64 x 4096, NHD, random page
order). Per case, on the same data in the same run: tinyserve paged_attention and FlashInfer's
BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True) (planned once; its backend "auto"
unless --flashinfer-backend), both as CUDA-graph replays (both eager if either refuses the
capture; the row says which), median of --iters replays of 10 calls; % of the read ceiling
measured first; ratio FlashInfer time / tinyserve time; the two outputs' relative difference.
Without an importable flashinfer the grid runs tinyserve alone and says so. --kv-dtype fp8 adds
both on the same e4m3 cache (per-tensor scales; FlashInfer for the head_dim 128 cases), each as
a share of the read ceiling in the FP8 bytes, and tinyserve's FP8 output against its float16
one. --dry-run: the grid shrunk on the CPU, checking the
script and the page description given to FlashInfer against float64.

    python benchmarks/bench_decode.py --grid [--kv-dtype fp8] [--cases base HND] [--json g.json]
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


# Side-by-side grid against FlashInfer (issue 14): the same data, the same run, the same timing.

GRID_BASE = dict(
    q_heads=32,
    kv_heads=8,
    dim=128,
    page=16,
    dtype="float16",
    layout="NHD",
    batch=64,
    context=4096,
    ragged=False,
    order="random",
)

# (name, changes to GRID_BASE): each axis of issue 14 against the base case, then batch x context
# from 1 x 512 to 1 x 128k and 256 x 4096, then a few crossings. FlashInfer compiles one kernel
# module per (query dtype, KV dtype, head_dim): this grid needs four (float16 at 64/128/256,
# bfloat16 at 128); --kv-dtype fp8 adds two (float16 and bfloat16 queries over e4m3 KV).
GRID = (
    ("base", {}),
    ("head_dim 64", {"dim": 64}),
    ("head_dim 256", {"dim": 256}),
    ("group 1 (8/8)", {"q_heads": 8}),
    ("group 8 (64/8)", {"q_heads": 64}),
    ("page 1", {"page": 1}),
    ("page 32", {"page": 32}),
    ("HND", {"layout": "HND"}),
    ("bfloat16", {"dtype": "bfloat16"}),
    ("ragged", {"ragged": True}),
    ("sequential pages", {"order": "sequential"}),
    ("1 x 512", {"batch": 1, "context": 512}),
    ("1 x 4096", {"batch": 1, "context": 4096}),
    ("1 x 32768", {"batch": 1, "context": 32768}),
    ("1 x 131072", {"batch": 1, "context": 131072}),
    ("4 x 16384", {"batch": 4, "context": 16384}),
    ("8 x 32768", {"batch": 8, "context": 32768}),
    ("32 x 8192", {"batch": 32, "context": 8192}),
    ("128 x 2048", {"batch": 128, "context": 2048}),
    ("256 x 512", {"batch": 256, "context": 512}),
    ("256 x 1024", {"batch": 256, "context": 1024}),
    ("256 x 4096", {"batch": 256, "context": 4096}),
    ("37 x 4001 (partial last page)", {"batch": 37, "context": 4001}),
    ("ragged 256 x 1024", {"ragged": True, "batch": 256, "context": 1024}),
    ("head_dim 64, 8 x 32768", {"dim": 64, "batch": 8, "context": 32768}),
    ("group 8, 8 x 32768", {"q_heads": 64, "batch": 8, "context": 32768}),
    ("HND, page 32", {"layout": "HND", "page": 32}),
    ("bfloat16, ragged", {"dtype": "bfloat16", "ragged": True}),
    ("page 1, 1 x 32768", {"page": 1, "batch": 1, "context": 32768}),
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# FlashInfer kernel configurations whose JIT build failed once, with why: later cases with the
# same configuration skip it instead of paying for another failed build.
PEER_FAILURES: dict = {}
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def load_flashinfer():
    """(flashinfer module, None) when it imports, else (None, why). Its JIT cache goes under /tmp
    (FLASHINFER_WORKSPACE_BASE, unless the caller set it), never into the checkout or $HOME."""
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/tinyserve-flashinfer")
    try:
        import flashinfer

        return flashinfer, None
    except Exception as exc:  # noqa: BLE001 - any import failure means: measure without it
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def is_build_failure(exc: BaseException) -> bool:
    """Whether exc is FlashInfer's failed JIT build; if so its compiler output's end is printed
    (the table keeps only the first line)."""
    if "build failed" not in str(exc).lower():
        return False
    print(f"FlashInfer JIT build failed; the end of its output:\n{str(exc)[-3000:]}", flush=True)
    return True


def first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def timed_pair(fns: dict, iters: int, device: str) -> tuple[dict, str]:
    """Median per-call ms of each callable in `fns`, and how they were timed. On CUDA every one
    is captured in a CUDA graph of back-to-back calls and the graph replays are timed; if any
    cannot be captured, all of them are timed eagerly instead, so the numbers stay comparable.
    On the CPU (dry run) a host clock, a few calls."""
    if device != "cuda":
        import time

        times = {}
        for name, fn in fns.items():
            fn()
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
            times[name] = statistics.median(samples)
        return times, "host clock (dry run)"
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = median_ms(fn, iters, graph=True)
        except Exception as exc:  # noqa: BLE001 - a refused capture: time everything eagerly
            torch.cuda.synchronize()
            # Ending an invalidated capture raises "operation failed due to a previous error
            # during capture" over the call that broke it: report that call's error.
            cause = exc.__context__ if exc.__context__ is not None else exc
            how = f"eager (graph capture of {name} failed: {first_line(cause)})"
            return {name: median_ms(fn, iters) for name, fn in fns.items()}, how
    return times, "graph"


def grid_inputs(case: dict, rng: np.random.Generator, device: str) -> dict:
    """Paged K/V, query and both libraries' page descriptions for one grid case: random
    normal data, every sequence `context` tokens (ragged: uniform in [1, 2 * context - 1]),
    pages in random (or sequential) physical order, NHD storage or HND storage."""
    batch, page, kv_heads, dim = case["batch"], case["page"], case["kv_heads"], case["dim"]
    dtype = DTYPES[case["dtype"]]
    if case["ragged"]:
        lens_np = rng.integers(1, 2 * case["context"], size=batch).astype(np.int32)
    else:
        lens_np = np.full(batch, case["context"], dtype=np.int32)
    pages_np = (lens_np + page - 1) // page
    num_blocks = int(pages_np.sum())
    ids = np.arange(num_blocks, dtype=np.int32)
    if case["order"] == "random":
        ids = rng.permutation(ids)
    indptr_np = np.concatenate(([0], np.cumsum(pages_np))).astype(np.int32)
    table_np = np.zeros((batch, int(pages_np.max())), dtype=np.int32)
    for i in range(batch):
        table_np[i, : pages_np[i]] = ids[indptr_np[i] : indptr_np[i + 1]]
    if case["layout"] == "HND":
        k_store = torch.randn((num_blocks, kv_heads, page, dim), dtype=dtype, device=device)
        k_view = k_store.transpose(1, 2)
    else:
        k_store = torch.randn((num_blocks, page, kv_heads, dim), dtype=dtype, device=device)
        k_view = k_store
    v_store = torch.randn_like(k_store)
    v_view = v_store.transpose(1, 2) if case["layout"] == "HND" else v_store
    return {
        "query": torch.randn((batch, case["q_heads"], dim), dtype=dtype, device=device),
        "k_store": k_store,
        "v_store": v_store,
        "k_view": k_view,
        "v_view": v_view,
        "table": torch.from_numpy(table_np).to(device),
        "lens": torch.from_numpy(lens_np).to(device),
        "lens_host": lens_np,
        "max_len": int(lens_np.max()),
        "tokens": int(lens_np.sum()),
        "indptr": torch.from_numpy(indptr_np).to(device),
        "indices": torch.from_numpy(ids).to(device),
        "last_page_len": torch.from_numpy(lens_np - (pages_np - 1) * page).to(device),
    }


def flashinfer_decode(
    flashinfer, case: dict, data: dict, workspace, backend: str, k_cache, v_cache, **scales
):
    """A planned FlashInfer tensor-core decode over (k_cache, v_cache), as a no-argument call
    writing into a preallocated output (plan once, outside any timing), and the backend its
    plan resolved to."""
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, case["layout"], use_tensor_cores=True, backend=backend
    )
    wrapper.plan(
        data["indptr"],
        data["indices"],
        data["last_page_len"],
        case["q_heads"],
        case["kv_heads"],
        case["dim"],
        case["page"],
        q_data_type=data["query"].dtype,
        kv_data_type=k_cache.dtype,
    )
    out = torch.empty_like(data["query"])

    def run():
        wrapper.run(data["query"], (k_cache, v_cache), out=out, **scales)

    return run, out, getattr(wrapper, "resolved_backend", backend)


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x in float8 e4m3 with one per-tensor scale (x ~= fp8 * scale)."""
    scale = float(x.abs().max().float()) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def prebuild_concurrently(builds: dict) -> None:
    """Run FlashInfer's JIT builds (name -> no-argument call that plans a tiny problem, which
    compiles that configuration's module) side by side, so their nvcc jobs share the machine's
    cores instead of one module at a time; MAX_JOBS (ninja's parallelism, per module) splits the
    cores between them unless the caller set it. A build that fails here fails again, with its
    report, in the first case that needs it."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    if not builds:
        return
    cores = os.cpu_count() or 8
    os.environ.setdefault("MAX_JOBS", str(max(2, cores // len(builds))))
    start = time.perf_counter()

    def build(item):
        name, fn = item
        t0 = time.perf_counter()
        try:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return f"{name} {time.perf_counter() - t0:.0f} s"
        except Exception as exc:  # noqa: BLE001 - reported by the case that needs it
            return f"{name} failed ({first_line(exc)[:60]})"

    with ThreadPoolExecutor(len(builds)) as pool:
        done = list(pool.map(build, builds.items()))
    print(
        f"FlashInfer JIT, {len(builds)} configurations side by side (MAX_JOBS="
        f"{os.environ['MAX_JOBS']}): {time.perf_counter() - start:.0f} s; " + ", ".join(done),
        flush=True,
    )


def reference_from_peer_layout(case: dict, data: dict) -> torch.Tensor:
    """float64 decode attention computed from the page description handed to FlashInfer
    (indptr, indices, last_page_len over the storage tensors in the case's layout): the dry run
    checks that description against tinyserve's output, so a wrong peer input shows before the
    GPU run."""
    group = case["q_heads"] // case["kv_heads"]
    outs = []
    for i in range(case["batch"]):
        ids = data["indices"][data["indptr"][i] : data["indptr"][i + 1]].long()
        k, v = data["k_store"][ids].double(), data["v_store"][ids].double()
        if case["layout"] == "HND":  # [pages, heads, page, dim] -> [pages, page, heads, dim]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        n = (len(ids) - 1) * case["page"] + int(data["last_page_len"][i])
        k = k.reshape(-1, case["kv_heads"], case["dim"])[:n].repeat_interleave(group, 1)
        v = v.reshape(-1, case["kv_heads"], case["dim"])[:n].repeat_interleave(group, 1)
        q = data["query"][i].double()  # [heads, dim]
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / case["dim"] ** 0.5, dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(outs)


def grid_case(
    name: str,
    case: dict,
    iters: int,
    rng: np.random.Generator,
    device: str,
    flashinfer,
    workspace,
    kv_dtype: str,
    fi_backend: str = "auto",
) -> dict:
    data = grid_inputs(case, rng, device)
    q = data["query"]
    out = torch.empty_like(q)
    # Both libraries plan from the lengths on the host (FlashInfer's plan takes the page counts).
    splits, nbytes = ts.plan_paged_attention(
        q,
        data["k_view"],
        data["table"],
        max_seq_len=data["max_len"],
        host_seq_lens=data["lens_host"],
    )
    ts_workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device=device)

    def tinyserve_run():
        ts.paged_attention(
            q,
            data["k_view"],
            data["v_view"],
            data["table"],
            data["lens"],
            out,
            max_seq_len=data["max_len"],
            num_splits=splits,
            workspace=ts_workspace,
        )

    fns = {"tinyserve": tinyserve_run}
    fp8_store = None
    if kv_dtype == "fp8":  # one e4m3 copy of the data, read by both libraries
        (k8, k_scale), (v8, v_scale) = to_fp8(data["k_store"]), to_fp8(data["v_store"])
        fp8_store = (k8, v8, k_scale, v_scale)
        hnd = case["layout"] == "HND"
        k8_view, v8_view = (k8.transpose(1, 2), v8.transpose(1, 2)) if hnd else (k8, v8)
        out8 = torch.empty_like(q)
        splits8, nbytes8 = ts.plan_paged_attention(
            q,
            k8_view,
            data["table"],
            max_seq_len=data["max_len"],
            host_seq_lens=data["lens_host"],
        )
        ts_workspace8 = torch.empty((max(nbytes8, 16),), dtype=torch.uint8, device=device)

        def tinyserve_fp8_run():
            ts.paged_attention(
                q,
                k8_view,
                v8_view,
                data["table"],
                data["lens"],
                out8,
                max_seq_len=data["max_len"],
                num_splits=splits8,
                workspace=ts_workspace8,
                k_scale=k_scale,
                v_scale=v_scale,
            )

        fns["tinyserve fp8"] = tinyserve_fp8_run
    notes = []
    fi_out, resolved = None, None
    kernel = (case["dtype"], case["dim"])  # what FlashInfer compiles a module for
    if flashinfer is not None and kernel in PEER_FAILURES:
        notes.append(f"FlashInfer: {PEER_FAILURES[kernel]} (an earlier case)")
    elif flashinfer is not None:
        try:
            fns["flashinfer"], fi_out, resolved = flashinfer_decode(
                flashinfer, case, data, workspace, fi_backend, data["k_store"], data["v_store"]
            )
        except Exception as exc:  # noqa: BLE001 - a refused configuration is a result too
            if is_build_failure(exc):  # a failed JIT build would only fail again
                PEER_FAILURES[kernel] = first_line(exc)
            notes.append(f"FlashInfer: {first_line(exc)}")
    fp8 = None
    fp8_kernel = kernel + ("fp8",)
    if kv_dtype == "fp8" and fp8_kernel in PEER_FAILURES:
        notes.append(f"FlashInfer fp8: {PEER_FAILURES[fp8_kernel]} (an earlier case)")
    elif kv_dtype == "fp8" and flashinfer is not None and case["dim"] == 128:
        try:
            k8, v8, k_scale, v_scale = fp8_store
            fns["flashinfer fp8"], fp8, _ = flashinfer_decode(
                flashinfer,
                case,
                data,
                workspace,
                fi_backend,
                k8,
                v8,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        except Exception as exc:  # noqa: BLE001
            if is_build_failure(exc):
                PEER_FAILURES[fp8_kernel] = first_line(exc)
            notes.append(f"FlashInfer fp8: {first_line(exc)}")
    times, how = timed_pair(fns, iters, device)
    for fn in fns.values():  # one more call each, outside any graph, for the comparisons
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    elem = q.element_size()
    kv_bytes = 2 * data["tokens"] * case["kv_heads"] * case["dim"] * elem
    result = {
        "name": name,
        **case,
        "max_len": data["max_len"],
        "tokens": data["tokens"],
        "splits": splits,
        "kv_bytes": kv_bytes,
        "timing": how,
        "tinyserve_ms": times["tinyserve"],
        "flashinfer_ms": times.get("flashinfer"),
        "flashinfer_backend": resolved,
        "rel_diff_tinyserve_vs_flashinfer": None if fi_out is None else rel_diff(out, fi_out),
        "rel_diff_tinyserve_vs_float64_over_peer_layout": (
            rel_diff(out, reference_from_peer_layout(case, data)) if device != "cuda" else None
        ),
        "tinyserve_fp8_ms": times.get("tinyserve fp8"),
        "rel_diff_tinyserve_fp8_vs_fp16": None if fp8_store is None else rel_diff(out8, out),
        "flashinfer_fp8_ms": times.get("flashinfer fp8"),
        "fp8_kv_bytes": kv_bytes // elem,
        "rel_diff_flashinfer_fp8_vs_fp16": (
            None if fp8 is None or fi_out is None else rel_diff(fp8, fi_out)
        ),
        "notes": notes,
    }
    return result


def run_grid(args, device: str) -> None:
    flashinfer, why = (None, "dry run on the CPU") if device != "cuda" else load_flashinfer()
    peer = (
        f"FlashInfer {flashinfer.__version__} (BatchDecodeWithPagedKVCacheWrapper, "
        "use_tensor_cores=True)"
        if flashinfer is not None
        else f"FlashInfer not measured ({why}): tinyserve alone"
    )
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "host": platform.node(),
        "peer": peer,
        "kv_dtype": args.kv_dtype,
        "flashinfer_backend_requested": args.flashinfer_backend,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        header.update(device=props.name, sms=props.multi_processor_count)
        read_bw, read_method = read_ceiling(args.iters)
        torch.cuda.empty_cache()
    else:
        header.update(device="cpu (dry run: contexts / 256, batch <= 4, host clock)")
        read_bw, read_method = None, "none (dry run)"
    header.update(read_ceiling=read_bw, read_ceiling_method=read_method)
    print(
        f"{header['device']}, {header['date']}, commit {header['commit']}, torch "
        f"{torch.__version__}; {peer}; read ceiling "
        + ("n/a" if read_bw is None else f"{read_bw / 1e12:.2f} TB/s ({read_method})"),
        flush=True,
    )
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    workspace = (
        torch.empty(256 << 20, dtype=torch.uint8, device=device) if flashinfer is not None else None
    )
    selected = [(n, c) for n, c in GRID if not args.cases or any(s in n for s in args.cases)]
    if flashinfer is not None:  # one tiny plan per kernel configuration, built side by side
        builds = {}
        for _, changes in selected:
            tiny = {**GRID_BASE, **changes, "batch": 1, "context": 64, "ragged": False}
            kernel = f"{tiny['dtype']} head_dim {tiny['dim']}"

            def warm(tiny=tiny, fp8=False):
                data = grid_inputs(tiny, np.random.default_rng(0), device)
                k, v, scales = data["k_store"], data["v_store"], {}
                if fp8:
                    (k, ks), (v, vs) = to_fp8(k), to_fp8(v)
                    scales = {"k_scale": ks, "v_scale": vs}
                run, _, _ = flashinfer_decode(
                    flashinfer, tiny, data, workspace, args.flashinfer_backend, k, v, **scales
                )
                run()

            builds.setdefault(kernel, warm)
            if args.kv_dtype == "fp8" and tiny["dim"] == 128:
                builds.setdefault(kernel + " fp8 KV", lambda tiny=tiny: warm(tiny, fp8=True))
        prebuild_concurrently(builds)
    rows = []
    for name, changes in selected:
        case = dict(GRID_BASE, **changes)
        if device != "cuda":  # dry run: the same shapes, small enough for a shared CPU
            case["context"] = max(case["page"] + 3, case["context"] // 256)
            case["batch"] = min(case["batch"], 4)
        try:
            r = grid_case(
                name,
                case,
                args.iters,
                rng,
                device,
                flashinfer,
                workspace,
                args.kv_dtype,
                args.flashinfer_backend,
            )
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
            r = {"name": name, **case, "error": first_line(exc)}
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(r)
        print(grid_row(r, read_bw), flush=True)
        if args.json:  # after every case, so a run stopped at its time limit keeps its rows
            with open(args.json, "w") as f:
                json.dump(dict(header, grid=rows), f, indent=2)
    print(
        "\n% = share of the read ceiling (K+V bytes of the real tokens / time); "
        "ratio = FlashInfer time / tinyserve time (> 1: tinyserve faster)"
    )
    print(
        "| case | B x ctx | tinyserve ms | % | FlashInfer ms | % | ratio | rel diff "
        "| ts fp8 ms | fp8 % | fp8 vs fp16 | FI fp8 ms | fp8 % | timing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(grid_row(r, read_bw))
    if device != "cuda":  # the dry run is a check: a case that failed or disagrees fails it
        bad = [
            r["name"]
            for r in rows
            if "error" in r
            or not r["rel_diff_tinyserve_vs_float64_over_peer_layout"] < 2e-2
            or (args.kv_dtype == "fp8" and not r["rel_diff_tinyserve_fp8_vs_fp16"] < 0.1)
        ]
        if bad:
            raise SystemExit(f"dry run: wrong or failed cases: {bad}")


def grid_row(r: dict, read_bw) -> str:
    size = f"{r['batch']} x {r['context']}" + (" ragged" if r.get("ragged") else "")
    if "error" in r:
        return f"| {r['name']} | {size} | error: {r['error']} |"

    def ms(v):
        return "n/a" if v is None else f"{v:.4f}"

    def pct(nbytes, v):
        if v is None or read_bw is None:
            return "n/a"
        return f"{100 * nbytes / (v * 1e-3) / read_bw:.1f}"

    ts_ms, fi_ms, f8_ms = r["tinyserve_ms"], r["flashinfer_ms"], r["flashinfer_fp8_ms"]
    ts8_ms, diff8 = r["tinyserve_fp8_ms"], r["rel_diff_tinyserve_fp8_vs_fp16"]
    ratio = "n/a" if fi_ms is None else f"{fi_ms / ts_ms:.3f}"
    diff = r["rel_diff_tinyserve_vs_flashinfer"]
    if diff is None:  # dry run: tinyserve against float64 over the peer's page description
        diff = r.get("rel_diff_tinyserve_vs_float64_over_peer_layout")
    backend = f"FI {r['flashinfer_backend']}; " if r.get("flashinfer_backend") else ""
    timing = backend + r["timing"] + ("; " + "; ".join(r["notes"]) if r["notes"] else "")
    return (
        f"| {r['name']} | {size} | {ms(ts_ms)} | {pct(r['kv_bytes'], ts_ms)} | {ms(fi_ms)} | "
        f"{pct(r['kv_bytes'], fi_ms)} | {ratio} | {'n/a' if diff is None else f'{diff:.1e}'} | "
        f"{ms(ts8_ms)} | {pct(r['fp8_kv_bytes'], ts8_ms)} | "
        f"{'n/a' if diff8 is None else f'{diff8:.1e}'} | "
        f"{ms(f8_ms)} | {pct(r['fp8_kv_bytes'], f8_ms)} | {timing} |"
    )


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
    parser.add_argument(
        "--grid",
        action="store_true",
        help="the issue-14 grid: tinyserve and FlashInfer side by side, one row per case",
    )
    parser.add_argument(
        "--kv-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="grid: fp8 adds tinyserve and FlashInfer (head_dim 128 cases) on an e4m3 KV cache",
    )
    parser.add_argument(
        "--flashinfer-backend",
        default="auto",
        help="grid: FlashInfer decode backend (auto picks per plan; fa2 or fa3 fix it)",
    )
    parser.add_argument(
        "--cases", nargs="*", help="grid: only the cases whose name contains one of these"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="grid on the CPU backend at small sizes (checks the script, measures nothing)",
    )
    args = parser.parse_args()
    if args.grid or args.dry_run:
        run_grid(args, "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
        return
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
