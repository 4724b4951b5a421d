"""One decode step of the BlockManager through the Python API.

For a batch of running sequences, a serving engine's scheduler calls, once per step,
``append_batch(seq_ids, 1)`` (one new token each) and ``block_table(seq_ids)`` (the kernel's
input). This script times that pair, with sequences of realistic length, and prints the median,
p10 and p90 in microseconds.

    python benchmarks/bench_block_manager.py [--batch 256] [--block-size 16] [--reps 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import tinyserve


def setup(batch: int, block_size: int, min_len: int, max_len: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=batch)
    # Room for every sequence to grow by `steps` tokens.
    num_blocks = int(sum(-(-(int(n) + steps) // block_size) for n in lens))
    bm = tinyserve.BlockManager(num_blocks, block_size)
    seq_ids = np.arange(batch, dtype=np.int64) * 7 + 1000
    for seq_id, n in zip(seq_ids.tolist(), lens.tolist()):
        bm.add_sequence(seq_id)
        bm.append(seq_id, n)
    return bm, seq_ids


def time_steps(bm, seq_ids, reps: int, warmup: int, as_list: bool) -> dict[str, list[float]]:
    """Microseconds per step: the whole step, and its two calls."""
    ids = seq_ids.tolist() if as_list else seq_ids
    samples: dict[str, list[float]] = {"step": [], "append_batch": [], "block_table": []}
    clock = time.perf_counter_ns
    for i in range(warmup + reps):
        start = clock()
        bm.append_batch(ids, 1)
        mid = clock()
        bm.block_table(ids)
        end = clock()
        if i >= warmup:
            samples["step"].append((end - start) / 1e3)
            samples["append_batch"].append((mid - start) / 1e3)
            samples["block_table"].append((end - mid) / 1e3)
    return samples


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def measure(
    batch: int = 256,
    block_size: int = 16,
    min_len: int = 1000,
    max_len: int = 4000,
    reps: int = 2000,
    warmup: int = 200,
    seed: int = 0,
    as_list: bool = False,
) -> dict[str, list[float]]:
    """Microseconds per step over `reps` steps after `warmup`, on a fresh manager; the manager's
    invariants are checked afterwards so a fast but wrong step cannot pass unnoticed."""
    bm, seq_ids = setup(batch, block_size, min_len, max_len, warmup + reps, seed)
    samples = time_steps(bm, seq_ids, reps, warmup, as_list)
    bm.check()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=1000)
    parser.add_argument("--max-len", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"tinyserve {tinyserve.__version__}, Python {platform.python_version()}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    print(
        f"batch {args.batch}, block_size {args.block_size}, "
        f"lengths {args.min_len}..{args.max_len} (+1 per step), {args.reps} steps after "
        f"{args.warmup} warm-up\n"
    )
    print(f"{'seq_ids passed as':<18} {'part':<13} {'median us':>10} {'p10 us':>8} {'p90 us':>8}")
    for as_list in (False, True):
        samples = measure(
            args.batch,
            args.block_size,
            args.min_len,
            args.max_len,
            args.reps,
            args.warmup,
            args.seed,
            as_list,
        )
        label = "list of int" if as_list else "numpy int64 array"
        for part, values in samples.items():
            print(
                f"{label:<18} {part:<13} {statistics.median(values):>10.1f} "
                f"{percentile(values, 10):>8.1f} {percentile(values, 90):>8.1f}"
            )


if __name__ == "__main__":
    main()
