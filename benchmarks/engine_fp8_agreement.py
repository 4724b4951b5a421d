"""How far greedy generation on a float8 KV cache follows the model's own cache: SmolLM2 (the
default model) through the engine twice, with the cache in the model's dtype and in float8
e4m3fn (kv_cache_dtype="fp8"), on the same prompts; prints, per prompt, the first generated
token where the two differ, and how many continuations stay identical.

    python benchmarks/engine_fp8_agreement.py [--max-new-tokens 48] [--kv-scale 1.0]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tinyserve.engine import Engine, SamplingParams
from tinyserve.engine.cli import encode_prompts
from tinyserve.integrations.transformers import TransformersRunner, load_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Why is the sky blue? Answer in one sentence.",
    "Explain photosynthesis to a child.",
    "List four planets of the solar system.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in two sentences.",
    "What does a compiler do?",
    "Suggest a name for a small bakery.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--kv-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(device=args.device, dtype=getattr(torch, args.dtype))
    runner = TransformersRunner(model)
    prompts = encode_prompts(tokenizer, PROMPTS, raw=False)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    tokens = {}
    for kv in ("auto", "fp8"):
        engine = Engine(
            runner,
            num_blocks=len(prompts) * (-(-(200 + args.max_new_tokens) // 16)),
            kv_cache_dtype=kv,
            kv_cache_scale=args.kv_scale,
        )
        tokens[kv] = [o.token_ids[0] for o in engine.generate(prompts, params)]
    first = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
        for x, y in zip(tokens["auto"], tokens["fp8"])
    ]
    for text, d in zip(PROMPTS, first):
        print(f"{'identical' if d is None else f'differs from token {d}':>22}  {text}")
    differing = [d for d in first if d is not None]
    print(
        f"{args.dtype} on {args.device}, kv_scale {args.kv_scale}, {args.max_new_tokens} new "
        f"tokens: {len(first) - len(differing)} of {len(first)} identical"
        + (
            f"; first differences at tokens {min(differing)}-{max(differing)} "
            f"(median {statistics.median(differing):g})"
            if differing
            else ""
        )
    )


if __name__ == "__main__":
    main()
