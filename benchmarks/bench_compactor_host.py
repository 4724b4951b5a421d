"""Host cost of the compactor: planning and committing each kind of plan on a large pool.

The pool (default 100k blocks of 16 tokens) is filled with sequences that share prompt prefixes
(prefix caching on), some are forked and some freed, so it holds used, shared, cached and free
blocks spread over the whole id range. Then, for each plan kind, the median over --repeats of:
the plan call alone (planned, then aborted), and plan + commit. No tensors are touched: this is
the host side only (the copies are timed by bench_compactor.py on a GPU).

    python benchmarks/bench_compactor_host.py [--num-blocks 100000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np

import tinyserve


def build(num_blocks: int, block_size: int, host_blocks: int, seed: int):
    rng = np.random.default_rng(seed)
    bm = tinyserve.BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    comp = tinyserve.Compactor(bm, host_blocks)
    prefixes = [rng.integers(0, 32000, 64 * block_size).tolist() for _ in range(32)]
    seq = 0
    live = []
    # Fill to ~90% with sequences of 8-64 blocks, then free a third of them at random.
    while bm.num_free_blocks > num_blocks // 10:
        prompt = prefixes[seq % len(prefixes)][: int(rng.integers(1, 32)) * block_size]
        prompt = prompt + rng.integers(0, 32000, int(rng.integers(8, 32)) * block_size).tolist()
        if len(prompt) // block_size + 2 > bm.num_free_blocks:
            break
        cached = bm.add_sequence(seq, prompt)
        bm.append(seq, len(prompt) - cached, prompt[cached:])
        live.append(seq)
        seq += 1
        if seq % 10 == 0:
            bm.fork(live[-1], seq)
            live.append(seq)
            seq += 1
    bm.take_copies()
    for s in rng.permutation(live)[: len(live) // 3]:
        bm.free(int(s))
        live.remove(int(s))
    for _ in range(8):
        comp.touch(rng.choice(live, size=len(live) // 4, replace=False).tolist())
    comp.record_hits(rng.integers(0, 4, num_blocks, dtype=np.int32))
    bm.check()
    return bm, comp, live


def plan_and_commit(comp, make) -> tuple[int, float, float]:
    """(pairs, seconds to plan, seconds to commit) of one plan."""
    start = time.perf_counter()
    plan = make()
    planned = time.perf_counter()
    comp.commit(plan)
    return len(plan), planned - start, time.perf_counter() - planned


def medians(samples: list[tuple[int, float, float]]) -> tuple[float, float, float]:
    """Each field's median over the samples."""
    return tuple(statistics.median(field) for field in zip(*samples))


def measure(
    num_blocks: int = 100_000,
    block_size: int = 16,
    move: int = 1000,
    repeats: int = 10,
    seed: int = 0,
    log=print,
) -> dict[str, tuple[float, float, float]]:
    """{plan kind: (median pairs, median seconds to plan, median seconds to commit)}."""
    samples: dict[str, list] = {"evict": [], "offload": [], "recall": [], "compact": []}
    # Compaction empties the fragmentation it measures: one fresh pool per repeat (3 at most).
    for repeat in range(min(repeats, 3)):
        bm, comp, live = build(num_blocks, block_size, move, seed + repeat)
        if repeat == 0:
            s = bm.stats()
            log(
                f"pool: {s['num_blocks']} blocks of {block_size} tokens, "
                f"{s['num_used']} used, "
                f"{s['num_shared']} shared, {s['num_evictable']} cached free, "
                f"{s['num_sequences']} sequences"
            )
            evict = min(move, s["num_evictable"] // repeats)
            for _ in range(repeats):
                samples["evict"].append(plan_and_commit(comp, partial(comp.plan_evict, evict)))
                samples["offload"].append(plan_and_commit(comp, partial(comp.plan_offload, move)))
                victims = [s for s in live if comp.num_offloaded(s)]
                samples["recall"].append(plan_and_commit(comp, partial(comp.plan_recall, victims)))
            bm.check()
        samples["compact"].append(plan_and_commit(comp, comp.plan_compact))
        bm.check()
    return {name: medians(rows) for name, rows in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-blocks", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--move", type=int, default=1000, help="blocks per offload/evict plan")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = measure(args.num_blocks, args.block_size, args.move, args.repeats, args.seed)
    print(f"{'plan':>8} {'pairs':>7} {'plan (ms)':>10} {'commit (ms)':>12}")
    for name, (pairs, plan_s, commit_s) in rows.items():
        print(f"{name:>8} {pairs:>7.0f} {plan_s * 1e3:>10.3f} {commit_s * 1e3:>12.3f}")


if __name__ == "__main__":
    main()
