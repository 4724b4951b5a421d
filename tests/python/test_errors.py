"""Every bad argument raises a clear error naming the op and the offending value, and a rejected
call writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
import tinyserve as ts


def expect_error(call, exc, match, *watched):
    before = [w.copy() for w in watched]
    with pytest.raises(exc, match=match):
        call()
    for w, b in zip(watched, before):
        np.testing.assert_array_equal(w, b)  # NaN-aware: untouched, poison included


@pytest.fixture
def case(rng):
    c = R.PagedCase(rng, [20, 33], 8, 2, 64, 16)
    c.out = np.full(c.query.shape, np.nan, np.float32)
    c.lse = np.full(c.query.shape[:2], np.nan, np.float32)
    return c


def attention(c, **over):
    args = dict(
        query=c.query,
        key_cache=c.key_cache,
        value_cache=c.value_cache,
        block_table=c.block_table,
        seq_lens=c.seq_lens,
        out=c.out,
        lse=c.lse,
    )
    args.update(over)
    return lambda: ts.paged_attention(**args)


@pytest.mark.parametrize(
    "override,match",
    [
        (lambda c: {"query": c.query[0]}, r"query must have 3 dimensions"),
        (
            lambda c: {"query": c.query.astype(np.float16)},
            r"query must have the dtype of key_cache \(float32\), got float16",
        ),
        (
            lambda c: {"query": c.query.astype(np.int32)},
            r"query must be float32, float16 or bfloat16, got int32",
        ),
        (
            lambda c: {"query": np.zeros((2, 7, 64), np.float32)},
            r"num_q_heads must be a positive multiple of num_kv_heads \(2\), got 7",
        ),
        (
            lambda c: {"query": np.zeros((2, 8, 32), np.float32)},
            r"query dimension 2 \(head_dim of the caches\) must be 64, got 32",
        ),
        (
            lambda c: {"block_table": c.block_table.astype(np.int64)},
            r"block_table must be int32, got int64",
        ),
        (lambda c: {"block_table": c.block_table[:1]}, r"block_table dimension 0 \(batch\)"),
        (lambda c: {"seq_lens": c.seq_lens.astype(np.int64)}, r"seq_lens must be int32, got int64"),
        (
            lambda c: {"seq_lens": np.array([20, 10_000], np.int32)},
            r"seq_lens\[1\] must be in \[0, \d+\] \(max_blocks \* block_size\), got 10000",
        ),
        (lambda c: {"seq_lens": np.array([-1, 3], np.int32)}, r"seq_lens\[0\] .* got -1"),
        (lambda c: {"out": c.out[:, :4]}, r"out must have the shape of query"),
        (lambda c: {"out": c.out.astype(np.float16)}, r"out must have the dtype of query"),
        (lambda c: {"lse": c.lse.astype(np.float64)}, r"lse has an unsupported dtype"),
        (lambda c: {"lse": c.lse[:, :3]}, r"lse dimension 1 \(num_q_heads\) must be 8, got 3"),
        (lambda c: {"key_cache": c.key_cache[..., ::2].copy()}, r"value_cache must have the shape"),
        (
            lambda c: {"value_cache": c.value_cache.astype(np.float16)},
            r"value_cache must have the dtype of key_cache",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_attention_bad_arguments(case, override, match):
    expect_error(
        attention(case, **override(case)),
        ValueError,
        "tinyserve.paged_attention: " + match,
        case.out,
        case.lse,
    )


@pytest.mark.parametrize("bad_id", [-1, 10_000])
def test_attention_block_id_out_of_range(case, bad_id):
    case.block_table[1, 1] = bad_id
    expect_error(
        attention(case),
        ValueError,
        rf"tinyserve.paged_attention: block_table\[1, 1\] must be a block id in "
        rf"\[0, \d+\), got {bad_id}",
        case.out,
        case.lse,
    )


def test_attention_ignores_ids_past_the_length(case):
    """Padding entries beyond a sequence's blocks are never read, so they may hold anything."""
    case.block_table[0, 2:] = -7
    ts.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, case.out
    )
    assert not np.isnan(case.out).any()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"window_left": -2}, r"window_left must be -1 \(off\) or >= 0, got -2"),
        ({"logits_soft_cap": -1.0}, r"logits_soft_cap must be finite and >= 0"),
        ({"logits_soft_cap": float("inf")}, r"logits_soft_cap must be finite"),
        ({"scale": 0.0}, r"scale must be finite and nonzero, got 0"),
        ({"scale": float("nan")}, r"scale must be finite and nonzero, got nan"),
        ({"num_splits": -1}, r"num_splits must be in \[0, 4096\], got -1"),
        ({"max_seq_len": -5}, r"max_seq_len must be -1 \(unknown\) or >= 0, got -5"),
    ],
)
def test_attention_bad_options(case, options, match):
    expect_error(
        attention(case, **options),
        ValueError,
        "tinyserve.paged_attention: " + match,
        case.out,
        case.lse,
    )


def _limit_case(batch, max_blocks, block_size, head_dim):
    """Arrays of the given sizes, as small as the sizes allow (one KV head, one query head)."""
    q = np.zeros((batch, 1, head_dim), np.float32)
    kc = np.zeros((1, block_size, 1, head_dim), np.float32)
    table = np.zeros((batch, max_blocks), np.int32)
    lens = np.ones(batch, np.int32)
    out = np.full(q.shape, np.nan, np.float32)
    return q, kc, table, lens, out


@pytest.mark.parametrize(
    "sizes,match",
    [
        ((1, 1, 16, 520), r"head_dim must be at most 512, got 520"),
        ((65536, 1, 16, 8), r"batch must be at most 65535, got 65536"),
        (
            (1, 4096, 1 << 20, 1),
            r"max_blocks \* block_size must be at most 2147483647, got max_blocks 4096 and "
            r"block_size 1048576",
        ),
    ],
    ids=["head_dim", "batch", "capacity"],
)
def test_attention_kernel_limits_on_every_backend(sizes, match):
    """The CUDA kernels' limits are checked by the core, so a CPU call is refused alike."""
    q, kc, table, lens, out = _limit_case(*sizes)
    expect_error(
        lambda: ts.paged_attention(q, kc, kc, table, lens, out),
        ValueError,
        "tinyserve.paged_attention: " + match,
        out,
    )
    with pytest.raises(ValueError, match="tinyserve.plan_paged_attention: " + match):
        ts.plan_paged_attention(q, kc, table)


@pytest.mark.parametrize("sizes", [(1, 1, 16, 512), (65535, 1, 1, 8)], ids=["head_dim", "batch"])
def test_attention_at_the_kernel_limits(sizes):
    """The largest head_dim and batch are accepted and computed (a check off by one would
    refuse them)."""
    rng = np.random.default_rng(7)
    q, kc, table, lens, out = _limit_case(*sizes)
    q[:] = rng.standard_normal(q.shape)
    kc[:] = rng.standard_normal(kc.shape)
    ts.paged_attention(q, kc, kc, table, lens, out)
    # One token: the output is that token's value row for every query.
    np.testing.assert_allclose(out, np.broadcast_to(kc[0, 0], out.shape), rtol=1e-6)


def test_attention_non_contiguous_last_dim(case):
    wide = np.full((2, 8, 128), np.nan, np.float32)
    expect_error(
        attention(case, out=wide[..., ::2]),
        ValueError,
        r"out must be contiguous in its last dimension, got stride 2",
        wide,
        case.lse,
    )


def test_attention_read_only_output_rejected(case):
    frozen = case.out.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError):
        ts.paged_attention(
            case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, frozen
        )


def test_attention_accepts_read_only_inputs(case):
    for a in (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens):
        a.flags.writeable = False
    ts.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, case.out
    )
    ref, _ = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    assert R.rel_error(case.out, ref) < 1e-5


@pytest.fixture
def cache_args(rng):
    n, p, h, d = 6, 4, 2, 16
    return dict(
        key=rng.standard_normal((5, h, d)).astype(np.float32),
        value=rng.standard_normal((5, h, d)).astype(np.float32),
        key_cache=np.full((n, p, h, d), np.nan, np.float32),
        value_cache=np.full((n, p, h, d), np.nan, np.float32),
        slot_mapping=np.array([0, 5, -1, 23, 7], np.int64),
    )


@pytest.mark.parametrize(
    "override,match",
    [
        (
            {"slot_mapping": np.array([0, 5, -1, 24, 7])},
            r"slot_mapping\[3\] must be -1 or a slot in \[0, 24\), got 24",
        ),
        ({"slot_mapping": np.array([0, -2, 1, 2, 3])}, r"slot_mapping\[1\] .* got -2"),
        (
            {"slot_mapping": np.array([0, 1, 2, 3, 4], np.int32)},
            r"slot_mapping must be int64, got int32",
        ),
        ({"slot_mapping": np.array([0, 1, 2], np.int64)}, r"slot_mapping dimension 0"),
        ({"key": np.zeros((5, 3, 16), np.float32)}, r"key dimension 1 \(num_kv_heads"),
        ({"value": np.zeros((5, 2, 8), np.float32)}, r"value must have the shape of key"),
        ({"key": np.zeros((5, 2, 16), np.float16)}, r"key must have the dtype of key_cache"),
        (
            {"value_cache": np.zeros((6, 4, 2, 8), np.float32)},
            r"value_cache must have the shape of key_cache",
        ),
        ({"key_cache": np.zeros((6, 4, 2), np.float32)}, r"key_cache must have 4 dimensions"),
    ],
)
def test_reshape_and_cache_bad_arguments(cache_args, override, match):
    args = dict(cache_args)
    args.update(override)
    expect_error(
        lambda: ts.reshape_and_cache(**args),
        ValueError,
        "tinyserve.reshape_and_cache: " + match,
        cache_args["key_cache"],
        cache_args["value_cache"],
    )


@pytest.mark.parametrize(
    "src,dst,match",
    [
        ([0, 1], [2, 3, 4], r"dst dimension 0 \(num_pairs of src\) must be 2, got 3"),
        ([0, 9], [2, 3], r"src\[1\] must be a block id in \[0, 6\), got 9"),
        ([0, 1], [2, -1], r"dst\[1\] must be a block id in \[0, 6\), got -1"),
        ([0, 1], [2, 2], r"dst must not name a block twice, got 2 twice"),
        ([0, 1], [1, 2], r"a block must not be both a source and a destination, got block 1"),
    ],
)
def test_copy_blocks_bad_ids(rng, src, dst, match):
    caches = [rng.standard_normal((6, 4, 2, 8)).astype(np.float32) for _ in range(2)]
    expect_error(
        lambda: ts.copy_blocks(caches, np.array(src, np.int32), np.array(dst, np.int32)),
        ValueError,
        "tinyserve.copy_blocks: " + match,
        *caches,
    )


def test_copy_blocks_bad_tensors(rng):
    good = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    ids = np.array([0], np.int32), np.array([1], np.int32)
    expect_error(
        lambda: ts.copy_blocks([good, np.zeros(6, np.float32)], *ids),
        ValueError,
        r"caches\[1\] must have at least 2 dimensions",
        good,
    )
    expect_error(
        lambda: ts.copy_blocks([good], ids[0].astype(np.int64), ids[1]),
        ValueError,
        r"src must be int32, got int64",
        good,
    )
    expect_error(
        lambda: ts.copy_blocks([good[:, :, :, ::2]], *ids),
        ValueError,
        r"caches\[0\] must be contiguous in its last dimension",
        good,
    )


def test_swap_blocks_bad_arguments(rng):
    a = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    b = np.full((3, 4, 2, 8), np.nan, np.float32)
    ids = np.array([0], np.int32), np.array([1], np.int32)
    expect_error(
        lambda: ts.swap_blocks(a, b.astype(np.float16), *ids),
        ValueError,
        r"tinyserve.swap_blocks: dst_cache must have the dtype of src_cache",
        b,
    )
    expect_error(
        lambda: ts.swap_blocks(a, np.zeros((3, 4, 2, 4), np.float32), *ids),
        ValueError,
        r"dst_cache must match src_cache in every dimension but the first",
        b,
    )
    hnd = np.zeros((3, 2, 4, 8), np.float32).transpose(0, 2, 1, 3)
    expect_error(
        lambda: ts.swap_blocks(a, hnd, *ids),
        ValueError,
        r"src_cache and dst_cache must lay out a block alike",
        b,
    )
    expect_error(
        lambda: ts.swap_blocks(a, b, ids[0], np.array([3], np.int32)),
        ValueError,
        r"dst\[0\] must be a block id in \[0, 3\), got 3",
        b,
    )
    wide_src = np.zeros((6, 4, 2, 16), np.float32)[..., :8]
    wide_dst = np.full((3, 4, 2, 16), np.nan, np.float32)
    expect_error(
        lambda: ts.swap_blocks(wide_src, wide_dst[..., :8], *ids),
        ValueError,
        r"a block of the caches must be one contiguous run of memory",
        wide_dst,
    )


def test_unsupported_dtype_names_the_argument(case):
    expect_error(
        attention(case, query=case.query.astype(np.float64)),
        ValueError,
        r"tinyserve.paged_attention: query has an unsupported dtype",
        case.out,
    )


def test_stream_argument_type(case):
    with pytest.raises(TypeError, match="stream must be None, an int"):
        ts.paged_attention(
            case.query,
            case.key_cache,
            case.value_cache,
            case.block_table,
            case.seq_lens,
            case.out,
            stream="default",
        )
