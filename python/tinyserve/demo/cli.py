"""The command line of python -m tinyserve demo: arguments, device choice and the summary."""

from __future__ import annotations

import argparse
import math
import sys
import time

import tinyserve

from .arrays import Arrays
from .check import TOLERANCE, DemoFailure
from .engine import Engine
from .model import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS
from .workload import (
    NUM_SYSTEM_PROMPTS,
    PARALLEL_SAMPLING_SHARE,
    SUFFIX_TOKENS,
    SYSTEM_PROMPT_TOKENS,
    make_requests,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyserve demo",
        description=(
            "Continuous-batching decode simulation over tinyserve's BlockManager and ops, with "
            "prefix caching, parallel sampling (fork + copy-on-write), preemption, and every "
            "attention output checked against a dense float64 NumPy reference. Exits 1 if a "
            "check fails. See docs/demo.md."
        ),
    )
    size = p.add_argument_group("workload and pool size")
    size.add_argument(
        "--requests", type=int, default=32, help="requests to serve (default: %(default)s)"
    )
    size.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="most tokens a sample generates; each stops at a random length between a quarter "
        "of this and this (default: %(default)s)",
    )
    size.add_argument(
        "--arrival-interval",
        type=float,
        default=1.5,
        help="mean decode steps between arrivals; the first 4 arrive at once "
        "(default: %(default)s)",
    )
    size.add_argument(
        "--steps",
        type=int,
        default=0,
        help="stop after this many decode steps and free what is left (default: 0, run until "
        "every request finished)",
    )
    size.add_argument(
        "--blocks", type=int, default=80, help="KV-cache blocks in the pool (default: %(default)s)"
    )
    size.add_argument(
        "--host-blocks",
        type=int,
        default=None,
        help="host pool blocks for preemption by offload: a preempted sequence's blocks go to "
        "host memory and come back when it resumes; 0 preempts by freeing and recomputing "
        "(default: as many as --blocks)",
    )
    size.add_argument(
        "--block-size", type=int, default=16, help="tokens per block (default: %(default)s)"
    )
    size.add_argument("--layers", type=int, default=2, help="model layers (default: %(default)s)")
    size.add_argument(
        "--seed", type=int, default=0, help="seeds the model and the workload (default: 0)"
    )
    run = p.add_argument_group("device and checks")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (the default): cuda when torch with CUDA and a CUDA build of tinyserve are "
        "present, else cpu",
    )
    run.add_argument(
        "--dtype",
        choices=tuple(TOLERANCE),
        default="float32",
        help="KV cache, query and output dtype; bfloat16 needs torch (default: %(default)s)",
    )
    run.add_argument(
        "--check-every",
        type=int,
        default=1,
        help="check attention against the float64 reference every N decode steps; 0 never "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest relative error accepted, positive and finite (default: by dtype, "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
        + ")",
    )
    run.add_argument(
        "--progress-every",
        type=int,
        default=16,
        help="print a progress line every N decode steps (default: %(default)s)",
    )
    run.add_argument(
        "--inject-fault",
        type=int,
        default=-1,
        metavar="STEP",
        help="self-test of the check: corrupt one cached token before decode step STEP; the "
        "demo must then fail",
    )
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def _resolve_device(requested: str) -> tuple[str | None, str]:
    """(device, reason): device None when the request cannot be met."""

    def cuda_ready() -> tuple[bool, str]:
        if not tinyserve.cuda_compiled():
            return False, "tinyserve was built without CUDA"
        if tinyserve.cuda_device_count() == 0:
            return False, "tinyserve was built with CUDA but sees no CUDA device"
        try:
            import torch
        except ImportError:
            return False, "the CUDA path uses torch, which is not installed"
        if not torch.cuda.is_available():
            return False, "torch has no CUDA"
        return True, ""

    if requested == "cpu":
        return "cpu", ""
    ok, why = cuda_ready()
    if requested == "cuda":
        return ("cuda", "") if ok else (None, why)
    return ("cuda", "") if ok else ("cpu", why)


def _validate(args: argparse.Namespace) -> str | None:
    for name in ("requests", "blocks", "block_size", "layers"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.max_new_tokens < 2:
        return f"--max-new-tokens must be at least 2, got {args.max_new_tokens}"
    if args.arrival_interval < 0 or args.steps < 0 or args.check_every < 0:
        return "--arrival-interval, --steps and --check-every must not be negative"
    if not math.isfinite(args.arrival_interval):
        return f"--arrival-interval must be finite, got {args.arrival_interval:g}"
    if args.seed < 0:  # NumPy's seeds are not negative
        return f"--seed must not be negative, got {args.seed}"
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        return f"--tolerance must be a positive finite number, got {args.tolerance:g}"
    if args.host_blocks is None:
        args.host_blocks = args.blocks
    if args.host_blocks < 0:
        return f"--host-blocks must not be negative, got {args.host_blocks}"
    if args.progress_every < 1:
        return f"--progress-every must be at least 1, got {args.progress_every}"
    # The longest sequence (system prompt + suffix + output) must fit in the pool on its own,
    # or preemption could not make progress.
    longest = SYSTEM_PROMPT_TOKENS[1] + SUFFIX_TOKENS[1] + args.max_new_tokens
    needed = -(-longest // args.block_size) + 1
    if args.blocks < needed:
        return (
            f"--blocks {args.blocks} is too small: the longest possible sequence ({longest} "
            f"tokens) needs {needed - 1} blocks of {args.block_size}, plus one kept free"
        )
    return None


def _summary(engine: Engine, device_line: str, wall: float) -> list[str]:
    c, args, stats = engine.counters, engine.args, engine.bm.stats()
    left = args.requests - c.requests_finished
    prompt_tokens = c.prefix_hit_tokens + c.prefill_tokens
    hit_share = c.prefix_hit_tokens / max(1, prompt_tokens)
    waste = 100.0 * c.waste_slots / max(1, c.used_slots)
    check = (
        f"{c.max_error:.2e} max relative error over {c.checks} checked steps (tolerance "
        f"{engine.tolerance:.2g}): OK"
        if c.checks
        else "not checked (--check-every 0)"
    )
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in c.seconds.items())
    hit_blocks = c.prefix_hit_tokens // args.block_size
    cut_off = f", {left} cut off by --steps" if left else ""
    return [
        "summary",
        f"  device         {device_line}",
        f"  steps          {c.decode_steps} decode steps, peak batch {c.peak_running}",
        (
            f"  tokens         {c.tokens_generated} generated; {prompt_tokens} prompt tokens "
            f"prefilled: {c.prefill_tokens} written ({c.recomputed_tokens} recomputed after "
            f"preemption), {c.prefix_hit_tokens} found in the prefix cache"
        ),
        f"  requests       {c.requests_finished} finished of {args.requests}{cut_off}",
        (
            f"  sequences      {c.sequences_forked} forked, {c.sequences_freed} freed "
            f"({c.preempted_frees} by preemption)"
        ),
        (
            f"  blocks         {args.blocks} x {args.block_size} slots: peak {c.peak_used} used, "
            f"peak {c.peak_shared} shared; at the end {stats['num_used']} used, "
            f"{stats['num_cached']} holding prefix-cache keys"
        ),
        f"  waste          {waste:.1f}% of used slots held no token (mean over steps)",
        (
            f"  prefix hits    {c.prefix_hit_tokens} tokens = {hit_blocks} blocks "
            f"({100 * hit_share:.0f}% of prompt tokens); {stats['evictions']} cached blocks "
            f"evicted for reuse"
        ),
        f"  copy-on-write  {c.cow_copies} block copies in {c.copy_calls} copy_blocks calls",
        (
            f"  preemptions    {c.preemptions}: {c.offloads} by offload ({c.offloaded_blocks} "
            f"blocks to a host pool of {args.host_blocks}), {c.recalls} recalled "
            f"({c.recalled_blocks} blocks back, nothing recomputed), "
            f"{c.preempted_frees} freed for recomputation"
        ),
        f"  attention      {check}",
        f"  wall time      {wall:.2f}s ({parts})",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 ok, 1 a check failed, 2 bad arguments)."""
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help, or an argparse error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    error = _validate(args)
    device, why = _resolve_device(args.device)
    if error is None and device is None:
        error = f"--device cuda is not available: {why}"
    if error is None and args.dtype == "bfloat16" and device == "cpu":
        try:
            import torch  # noqa: F401
        except ImportError:
            error = "--dtype bfloat16 needs torch (NumPy has no bfloat16)"
    if error is not None:
        print(f"tinyserve demo: {error}", file=sys.stderr)
        return 2
    if args.tolerance is None:
        args.tolerance = TOLERANCE[args.dtype]

    def log(line: str) -> None:
        if line and not args.quiet:
            print(line, flush=True)

    start = time.perf_counter()
    arrays = Arrays(device, args.dtype)
    engine = Engine(args, arrays, log)
    threads = f", {tinyserve.num_threads()} threads" if device == "cpu" else ""
    device_line = f"{device} ({arrays.framework} {args.dtype}{threads})"
    if args.device == "auto" and why:
        device_line += f"; CUDA not used: {why}"
    log(
        f"setup    {device_line}\n"
        f"         model: {args.layers} layers, {NUM_Q_HEADS} query heads on {NUM_KV_HEADS} KV "
        f"heads x {HEAD_DIM}, synthetic K/V/Q (no weights)\n"
        f"         pool: {args.blocks} blocks x {args.block_size} slots, "
        f"{arrays.nbytes(engine.kv) / 2**20:.1f} MiB of KV cache, prefix caching on, "
        f"{args.host_blocks} host blocks for preemption by offload\n"
        f"         workload: {args.requests} requests, {NUM_SYSTEM_PROMPTS} shared system "
        f"prompts, ~{PARALLEL_SAMPLING_SHARE:.0%} with n=2 samples, up to "
        f"{args.max_new_tokens} new tokens each"
    )
    try:
        engine.serve(make_requests(args))
    except (DemoFailure, RuntimeError) as failure:
        kind = "check" if isinstance(failure, DemoFailure) else type(failure).__name__
        print(f"FAIL ({kind}) {failure}", flush=True)
        return 1
    wall = time.perf_counter() - start
    print("\n".join(_summary(engine, device_line, wall)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
