"""Host-side cost of one call of each Python op on CUDA torch tensors: the time the calling
thread spends per call (median of several rounds of many calls, time.perf_counter), on shapes so
small that the GPU is never the bottleneck. This is what an engine that launches without CUDA
graphs pays per layer and step on its CPU, and what one-by-one ("eager") timings of a short
kernel include. Beside the ops: the pieces they are made of, for comparison.

    python benchmarks/bench_host.py [--calls 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_decode import commit

import tinyserve as ts
from tinyserve import _interop
from tinyserve import _tinyserve as _C


def per_call_us(fn, calls: int, rounds: int) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dev = "cuda"
    q = torch.randn((1, 32, 128), dtype=torch.float16, device=dev)
    kc = torch.randn((64, 16, 8, 128), dtype=torch.float16, device=dev)
    vc = torch.randn_like(kc)
    table = torch.arange(64, dtype=torch.int32, device=dev).view(1, 64)
    lens = torch.tensor([1024], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    new = torch.randn((4, 8, 128), dtype=torch.float16, device=dev)
    slots = torch.tensor([3, 70, -1, 500], dtype=torch.int64, device=dev)
    src = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    dst = torch.tensor([2, 3], dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    x = _interop.export
    sdpa_q = torch.randn((1, 32, 1, 128), dtype=torch.float16, device=dev)
    sdpa_kv = torch.randn((1, 32, 1024, 128), dtype=torch.float16, device=dev)

    cases = {
        "ts.paged_attention (planned split, kept workspace)": lambda: ts.paged_attention(
            q, kc, vc, table, lens, out
        ),
        "ts.paged_attention(num_splits=1)": lambda: ts.paged_attention(
            q, kc, vc, table, lens, out, num_splits=1
        ),
        "ts.reshape_and_cache": lambda: ts.reshape_and_cache(new, new, kc, vc, slots),
        "ts.copy_blocks (2 caches)": lambda: ts.copy_blocks([kc, vc], src, dst),
        "binding paged_attention, torch tensors as they are": lambda: _C.paged_attention(
            q, kc, vc, table, lens, out, num_splits=1, stream=stream
        ),
        "binding paged_attention, capsules (what the ops pass)": lambda: _C.paged_attention(
            x(q), x(kc), x(vc), x(table), x(lens), x(out), num_splits=1, stream=stream
        ),
        "tensor.__dlpack__() (torch's Python-level export)": lambda: q.__dlpack__(),
        "torch._C._to_dlpack(tensor) (C++ export)": lambda: torch._C._to_dlpack(q),
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "torch SDPA, same decode shape (reference point)": lambda: (
            torch.nn.functional.scaled_dot_product_attention(sdpa_q, sdpa_kv, sdpa_kv)
        ),
    }
    print(
        f"{torch.cuda.get_device_name()}, commit {commit()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; host us per call, median of {args.rounds} rounds of "
        f"{args.calls} calls"
    )
    for name, fn in cases.items():
        print(f"  {per_call_us(fn, args.calls, args.rounds):7.1f}  {name}")


if __name__ == "__main__":
    main()
