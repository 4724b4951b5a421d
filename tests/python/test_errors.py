"""Every bad argument raises a clear error naming the op and the offending value, and a rejected
call writes nothing."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        (
            lambda c: {"block_table": c.block_table[0]},
            r"block_table must have 2 dimensions \[batch, max_blocks\] or \[batch, num_kv_heads, "
            r"max_blocks\], got 1",
        ),
        (
            lambda c: {"block_table": c.block_table[:, None, None]},
            r"block_table must have 2 dimensions .*, got 4",
        ),
        (lambda c: {"seq_lens": c.seq_lens.astype(np.int64)}, r"seq_lens must be int32, got int64"),
        (
            lambda c: {"seq_lens": np.array([20, 10_000], np.int32)},
            r"seq_lens\[1\] must be in \[0, \d+\] \(max_blocks \* block_size\), got 10000",
        ),
        (lambda c: {"seq_lens": np.array([-1, 3], np.int32)}, r"seq_lens\[0\] .* got -1"),
        (lambda c: {"out": c.out[:, :4]}, r"out must have the shape of query"),
        (lambda c: {"out": c.out.astype(np.float16)}, r"out must have the dtype of query"),
        (lambda c: {"lse": c.lse.astype(np.float64)}, r"lse must be float32, got float64"),
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
    expect_error(
        attention(case, out=frozen),
        ValueError,
        r"tinyserve.paged_attention: out is written to and must be writable, got a read-only "
        r"ndarray",
        frozen,
        case.lse,
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


@pytest.mark.parametrize("num_blocks", [64, 6_000_000])  # the id checks' bitmap, then sort path
@pytest.mark.parametrize("op", ["copy_blocks", "swap_blocks"])
def test_repeated_block_ids_rejected_at_any_pool_size(rng, op, num_blocks):
    cache = np.zeros((num_blocks, 1), np.uint8)
    cache[:64, 0] = rng.integers(0, 255, 64, dtype=np.uint8)
    cases = [
        ([0, 1, 2], [40, 50, 40], r"dst must not name a block twice, got 40 twice"),
        (
            [0, 1, 50],
            [40, 50, 60],
            r"a block must not be both a source and a destination, got block 50",
        ),
    ]
    for src, dst, match in cases:
        ids = np.array(src, np.int32), np.array(dst, np.int32)
        args = ([cache], *ids) if op == "copy_blocks" else (cache, cache, *ids)
        expect_error(
            lambda a=args: getattr(ts, op)(*a), ValueError, f"tinyserve.{op}: " + match, cache
        )
    # distinct ids, none both read and written: the copy happens
    before = cache[:64, 0].copy()
    src, dst = np.array([0, 1, 2], np.int32), np.array([40, 50, 63], np.int32)
    if op == "copy_blocks":
        ts.copy_blocks([cache], src, dst)
    else:
        ts.swap_blocks(cache, cache, src, dst)
    np.testing.assert_array_equal(cache[dst, 0], before[src])


def test_copy_blocks_bad_tensors(rng):
    good = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    ids = np.array([0], np.int32), np.array([1], np.int32)
    expect_error(
        lambda: ts.copy_blocks([good, np.zeros((), np.float32)], *ids),
        ValueError,
        r"caches\[1\] must have at least 1 dimension \[num_blocks, \.\.\.\], got 0",
        good,
    )
    expect_error(
        lambda: ts.copy_blocks([good], ids[0].astype(np.int16), ids[1]),
        ValueError,
        r"src must be int32 or int64, got int16",
        good,
    )
    expect_error(
        lambda: ts.copy_blocks([good], ids[0].astype(np.int64), ids[1]),
        ValueError,
        r"dst must have the dtype of src \(int64\), got int32",
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
        r"tinyserve.paged_attention: query must be float32, float16 or bfloat16, got float64$",
        case.out,
    )


def test_stream_argument_type(case):
    with pytest.raises(TypeError, match=r"^tinyserve.paged_attention: stream must be None, an int"):
        ts.paged_attention(
            case.query,
            case.key_cache,
            case.value_cache,
            case.block_table,
            case.seq_lens,
            case.out,
            stream="default",
        )


# --- KV cache strides (every cache argument of every op) ------------------------------------


def strided_in_last_dim(c):
    """Every other element of a buffer twice as wide: plausible-looking values, stride 2."""
    return np.repeat(c, 2, -1)[..., ::2]


def reversed_last_dim(c):
    return c[..., ::-1]


def torch_ndhp_transposed(c):
    """torch storage [N, P, D, H] passed as .transpose(2, 3): last stride num_kv_heads."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(c.transpose(0, 1, 3, 2))).transpose(2, 3)


def overlapping_heads(c):
    """Head rows half a row apart: every row overlaps the next."""
    n, p, h, d = c.shape
    base = np.full(n * p * h * d, np.nan, c.dtype)
    e = c.itemsize
    return np.lib.stride_tricks.as_strided(base, c.shape, (p * h * d * e, h * d * e, d // 2 * e, e))


BAD_CACHES = [
    pytest.param(
        strided_in_last_dim, r"must be contiguous in its last dimension, got stride 2", id="repeat"
    ),
    pytest.param(
        reversed_last_dim, r"must be contiguous in its last dimension, got stride -1", id="reversed"
    ),
    pytest.param(
        torch_ndhp_transposed,
        r"must be contiguous in its last dimension, got stride 2",
        id="torch-NPDH",
    ),
    pytest.param(
        overlapping_heads, r"must not reach one element's memory twice, got strides", id="overlap"
    ),
]


def base_of(a):
    """The array whose memory a view uses (NumPy or torch), as NumPy, for before/after checks."""
    if type(a).__module__.startswith("torch"):
        return a.numpy()
    while isinstance(a, np.ndarray) and a.base is not None and isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.mark.parametrize("make_bad,match", BAD_CACHES)
@pytest.mark.parametrize("which", ["key_cache", "value_cache"])
def test_attention_rejects_bad_cache_strides(case, make_bad, match, which):
    bad = make_bad(getattr(case, which))
    expect_error(
        attention(case, **{which: bad}),
        ValueError,
        rf"tinyserve.paged_attention: {which} {match}",
        case.out,
        case.lse,
    )


@pytest.mark.parametrize("make_bad,match", BAD_CACHES)
def test_plan_rejects_bad_cache_strides(case, make_bad, match):
    with pytest.raises(ValueError, match=rf"tinyserve.plan_paged_attention: key_cache {match}"):
        ts.plan_paged_attention(case.query, make_bad(case.key_cache), case.block_table)


@pytest.mark.parametrize("make_bad,match", BAD_CACHES)
@pytest.mark.parametrize("which", ["key_cache", "value_cache"])
def test_reshape_and_cache_rejects_bad_cache_strides(cache_args, make_bad, match, which):
    args = dict(cache_args)
    args[which] = make_bad(cache_args[which])
    watched = [base_of(args["key_cache"]), base_of(args["value_cache"])]
    expect_error(
        lambda: ts.reshape_and_cache(**args),
        ValueError,
        rf"tinyserve.reshape_and_cache: {which} {match}",
        *watched,
    )


def test_copy_blocks_rejects_overlapping_elements(rng):
    good = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    bad = overlapping_heads(np.zeros((6, 4, 2, 8), np.float32))
    watched = base_of(bad)
    watched[:] = rng.standard_normal(watched.shape)
    expect_error(
        lambda: ts.copy_blocks([good, bad], np.array([0], np.int32), np.array([1], np.int32)),
        ValueError,
        r"tinyserve.copy_blocks: caches\[1\] must not reach one element's memory twice",
        good,
        watched,
    )


# --- Sizes that kernels index with 32-bit integers -----------------------------------------


def huge_view(shape, dtype=np.float32):
    """A view of `shape`, last dimension contiguous and every other stride 0, over an anonymous
    mapping that reserves no memory (its pages read as zeros until written): sizes past 32 bits
    without gigabytes of RAM. Returns the view and its first 1024 elements, set to NaN: where a
    write would land first."""
    itemsize = np.dtype(dtype).itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    memory = mmap.mmap(-1, max(shape[-1], 1024) * itemsize, flags=flags)
    base = np.frombuffer(memory, dtype)
    base[:1024] = np.nan
    strides = [0] * (len(shape) - 1) + [itemsize]
    return base[:1024], np.lib.stride_tricks.as_strided(base, shape, strides)


@pytest.mark.parametrize(
    "heads,head_dim",
    [(1, 2**31 + 8), (2**31 + 1, 1), (2**16, 2**15)],
    ids=["head_dim", "heads", "product"],
)
def test_reshape_and_cache_sizes_beyond_32_bits(heads, head_dim):
    """These sizes used to be narrowed to int in the kernels (head_dim 2**31 + 8 crashed)."""
    kc_base, kc = huge_view((1, 1, heads, head_dim))
    vc_base, vc = huge_view((1, 1, heads, head_dim))
    _, key = huge_view((1, heads, head_dim))
    expect_error(
        lambda: ts.reshape_and_cache(key, key, kc, vc, np.array([0], np.int64)),
        ValueError,
        rf"tinyserve.reshape_and_cache: key_cache must hold at most 2147483647 bytes per token "
        rf"\(num_kv_heads \* head_dim \* element size\), got num_kv_heads {heads} and head_dim "
        rf"{head_dim}",
        kc_base,
        vc_base,
    )


def test_attention_head_dim_beyond_32_bits(case):
    kc_head, kc = huge_view((4, 16, 2, 2**31 + 8))
    vc_head, vc = huge_view((4, 16, 2, 2**31 + 8))
    q_head, q = huge_view((2, 8, 2**31 + 8))
    out_head, out = huge_view((2, 8, 2**31 + 8))
    expect_error(
        attention(case, query=q, key_cache=kc, value_cache=vc, out=out),
        ValueError,
        r"tinyserve.paged_attention: key_cache must hold at most 2147483647 bytes per token",
        out_head,
        case.lse,
    )


def huge_ids(shape):
    """An int32 view of `shape` (last dimension contiguous, others stride 0) over an anonymous
    mapping that reserves no memory: a block table too wide for 32-bit indexing."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    memory = mmap.mmap(-1, shape[-1] * 4, flags=flags)
    base = np.frombuffer(memory, np.int32)
    return np.lib.stride_tricks.as_strided(base, shape, [0] * (len(shape) - 1) + [4])


@pytest.mark.parametrize(
    "q_shape,table_shape,starts,match",
    [
        (
            (1, 65536, 1),
            (1, 1),
            None,
            r"sizes must fit 32-bit indexing, got query \[1, 65536, 1\] and block_table \[1, 1\]",
        ),
        (
            (1, 1, 1),
            (1, 2**30 + 1),
            None,
            r"sizes must fit 32-bit indexing, got query \[1, 1, 1\] and block_table "
            r"\[1, 1073741825\]",
        ),
        (
            (65535, 65535, 1),
            (65535, 1),
            None,
            r"batch \* num_q_heads must be at most 2147483647, got batch 65535 and num_q_heads "
            r"65535",
        ),
        (
            (40000, 65535, 1),
            (1, 1),
            [0, 40000],
            r"total_rows \* num_q_heads must be at most 2147483647, got total_rows 40000 and "
            r"num_q_heads 65535",
        ),
    ],
    ids=["num_q_heads", "max_blocks", "decode_rows", "prefill_rows"],
)
def test_attention_sizes_beyond_32_bits(q_shape, table_shape, starts, match):
    out_head, out = huge_view(q_shape)
    _, q = huge_view(q_shape)
    kc = np.zeros((1, 1, 1, 1), np.float32)
    table = huge_ids(table_shape) if table_shape[1] > 1 else np.zeros(table_shape, np.int32)
    lens = np.ones(table_shape[0], np.int32)
    options = {} if starts is None else {"query_start_loc": np.array(starts, np.int32)}
    expect_error(
        lambda: ts.paged_attention(q, kc, kc, table, lens, out, **options),
        ValueError,
        "tinyserve.paged_attention: " + match,
        out_head,
    )
    with pytest.raises(ValueError, match="tinyserve.plan_paged_attention: " + match):
        ts.plan_paged_attention(q, kc, table, **options)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((4, 0, 2, 64), "block_size must be positive, got 0"),
        ((4, 16, 0, 64), "num_kv_heads must be positive, got 0"),
        ((4, 16, 2, 0), "head_dim must be positive, got 0"),
    ],
)
def test_caches_with_an_empty_dimension_are_refused(case, rng, shape, match):
    kc = np.zeros(shape, np.float32)
    expect_error(
        attention(case, key_cache=kc, value_cache=kc.copy()),
        ValueError,
        "tinyserve.paged_attention: " + match,
        case.out,
        case.lse,
    )
    key = rng.standard_normal((1, 2, 64)).astype(np.float32)
    expect_error(
        lambda: ts.reshape_and_cache(key, key, kc, kc.copy(), np.array([0], np.int64)),
        ValueError,
        "tinyserve.reshape_and_cache: " + match,
    )
    meta = np.full((4, max(shape[2], 1), 2, max(shape[3], 1)), np.nan, np.float32)
    expect_error(
        lambda: ts.build_page_meta(kc, np.zeros((1, 1), np.int32), np.zeros(1, np.int32), meta),
        ValueError,
        "tinyserve.build_page_meta: " + match,
        meta,
    )


def test_reshape_and_cache_refuses_a_scale_with_page_meta_of_a_16_bit_cache(cache_args):
    a = cache_args
    n, _, h, d = a["key_cache"].shape
    meta = np.full((n, h, 2, d), np.nan, np.float32)
    for name, scale in (("k_scale", {"k_scale": 3.0}), ("v_scale", {"v_scale": 2.0})):
        expect_error(
            lambda s=scale: ts.reshape_and_cache(**a, page_meta=meta, **s),
            ValueError,
            rf"tinyserve.reshape_and_cache: {name} applies to float8_e4m3fn caches only, got a "
            rf"{a['key_cache'].dtype} cache",
            a["key_cache"],
            a["value_cache"],
            meta,
        )


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class OnDevice:
    """A C-contiguous integer or float array that says (through DLPack) it lives on DLPack device
    `device_type`: the memory is host memory, which the refused calls never read."""

    def __init__(self, array, device_type):
        self.array = np.ascontiguousarray(array)
        self.shape, self.dtype = array.shape, array.dtype
        self.dl_shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        self.managed = _DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = self.array.ctypes.data
        t.device = _DLDevice(device_type, 0)
        t.ndim = array.ndim
        code = {"i": 0, "u": 1, "f": 2}[array.dtype.kind]  # kDLInt, kDLUInt, kDLFloat
        t.dtype = _DLDataType(code, array.dtype.itemsize * 8, 1)
        t.shape = self.dl_shape
        self.device_type = device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, **kwargs):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self.managed), b"dltensor", None)


def test_arrays_of_more_than_six_dimensions_are_named(case):
    expect_error(
        attention(case, query=np.zeros((1,) * 7, np.float32)),
        ValueError,
        r"^tinyserve.paged_attention: query must have at most 6 dimensions, got 7$",
        case.out,
        case.lse,
    )


def test_arrays_on_other_devices_are_named():
    """Op arguments may be on cpu, cuda or cuda_host; id arguments of the block manager on the
    CPU only. DLPack device types 2 (CUDA) and 8 (Metal)."""
    cache = np.full((4, 2), np.nan, np.float32)
    metal = OnDevice(np.array([0, 1], np.int32), 8)
    expect_error(
        lambda: ts.copy_blocks([cache], metal, np.array([2, 3], np.int32)),
        ValueError,
        r"^tinyserve.copy_blocks: src must be on cpu, cuda or cuda_host, got DLPack device type 8$",
        cache,
    )
    bm = ts.BlockManager(8, 2)
    bm.add_sequence(0)
    for device_type in (2, 8):
        with pytest.raises(
            ValueError,
            match=rf"^tinyserve.BlockManager.append_batch: seq_ids must be on the CPU, got DLPack "
            rf"device type {device_type}$",
        ):
            bm.append_batch(OnDevice(np.array([0], np.int64), device_type), 1)
    assert bm.seq_len(0) == 0
    bm.check()


def test_a_query_on_the_gpu_beside_host_caches_is_named_by_paged_attention(case):
    """A CUDA query plans the call first; the plan's checks speak as paged_attention."""
    expect_error(
        attention(case, query=OnDevice(case.query, 2)),
        ValueError,
        r"^tinyserve.paged_attention: all tensors must be on one device: query is on cuda:0, got "
        r"key_cache on cpu$",
        case.out,
        case.lse,
    )


# --- Errors that name the argument and the value --------------------------------------------


@pytest.mark.parametrize(
    "options,exc,match",
    [
        (
            {"window_left": 2**40},
            ValueError,
            r"window_left must be an int in \[-2147483648, 2147483647\], got 1099511627776",
        ),
        (
            {"num_splits": 2**31},
            ValueError,
            r"num_splits must be an int in \[-2147483648, 2147483647\], got 2147483648",
        ),
        (
            {"max_seq_len": 2**70},
            ValueError,
            r"max_seq_len must be an int in .*, got 1180591620717411303424",
        ),
        (
            {"stream": -1},
            ValueError,
            r"stream must be an int in \[0, 18446744073709551615\], got -1",
        ),
        (
            {"stream": 2**64},
            ValueError,
            r"stream must be an int in \[0, 18446744073709551615\], got 18446744073709551616",
        ),
        ({"stream": "abc"}, TypeError, r"stream must be None, an int .*got str"),
        ({"window_left": "abc"}, TypeError, r"window_left must be an int, got str"),
        ({"window_left": 1.5}, TypeError, r"window_left must be an int, got float"),
        ({"scale": 1e60}, ValueError, r"scale must be representable in float32, got 1e\+60"),
        ({"scale": -1e-60}, ValueError, r"scale must be representable in float32, got -1e-60"),
        ({"scale": "abc"}, TypeError, r"scale must be a float, got str"),
        (
            {"logits_soft_cap": 1e300},
            ValueError,
            r"logits_soft_cap must be representable in float32, got 1e\+300",
        ),
        ({"scale": float("inf")}, ValueError, r"scale must be finite and nonzero, got inf"),
    ],
)
def test_attention_option_values_are_named(case, options, exc, match):
    expect_error(
        attention(case, **options), exc, "^tinyserve.paged_attention: " + match, case.out, case.lse
    )


def test_plan_option_values_are_named(case):
    with pytest.raises(
        ValueError, match=r"^tinyserve.plan_paged_attention: num_splits must be an int in"
    ):
        ts.plan_paged_attention(case.query, case.key_cache, case.block_table, num_splits=2**31)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda c: ts.reshape_and_cache(
                c["key"], c["value"], c["key_cache"], c["value_cache"], c["slot_mapping"], stream=-1
            ),
            ValueError,
            r"^tinyserve.reshape_and_cache: stream must be an int in \[0, \d+\], got -1",
        ),
        (
            lambda c: ts.reshape_and_cache(
                c["key"],
                c["value"],
                c["key_cache"],
                c["value_cache"],
                c["slot_mapping"],
                stream="abc",
            ),
            TypeError,
            r"^tinyserve.reshape_and_cache: stream must be None",
        ),
        (
            lambda c: ts.reshape_and_cache(
                c["key"].tolist(), c["value"], c["key_cache"], c["value_cache"], c["slot_mapping"]
            ),
            TypeError,
            r"^tinyserve.reshape_and_cache: key must be an array \(DLPack or buffer protocol\), "
            r"got list",
        ),
        (
            lambda c: ts.reshape_and_cache(
                c["key"], c["value"], c["key_cache"], c["value_cache"], [0, 5, -1, 23, 7]
            ),
            TypeError,
            r"^tinyserve.reshape_and_cache: slot_mapping must be an array .*, got list",
        ),
        (
            lambda c: ts.copy_blocks([c["key_cache"]], [0], [1], stream=-1),
            TypeError,
            r"^tinyserve.copy_blocks: src must be an array \(DLPack or buffer protocol\), got list",
        ),
        (
            lambda c: ts.copy_blocks([c["key_cache"]], np.array([0]), np.array([1]), stream=-1),
            ValueError,
            r"^tinyserve.copy_blocks: stream must be an int in",
        ),
        (
            lambda c: ts.copy_blocks([c["key_cache"]], np.array([0]), np.array([1]), stream="abc"),
            TypeError,
            r"^tinyserve.copy_blocks: stream must be None",
        ),
        (
            lambda c: ts.swap_blocks(
                c["key_cache"], c["value_cache"], np.array([0]), np.array([1]), stream=-1
            ),
            ValueError,
            r"^tinyserve.swap_blocks: stream must be an int in",
        ),
    ],
)
def test_cache_op_arguments_are_named(cache_args, call, exc, match):
    expect_error(
        lambda: call(cache_args), exc, match, cache_args["key_cache"], cache_args["value_cache"]
    )


def test_read_only_outputs_are_named(cache_args):
    kc, vc = cache_args["key_cache"], cache_args["value_cache"]
    frozen = kc.copy()
    frozen.flags.writeable = False
    args = dict(cache_args, key_cache=frozen)
    expect_error(
        lambda: ts.reshape_and_cache(**args),
        ValueError,
        r"^tinyserve.reshape_and_cache: key_cache is written to and must be writable, got a "
        r"read-only ndarray",
        frozen,
        vc,
    )
    ids = np.array([0]), np.array([1])
    expect_error(
        lambda: ts.copy_blocks([kc, frozen], *ids),
        ValueError,
        r"^tinyserve.copy_blocks: caches\[1\] is written to and must be writable, got a "
        r"read-only ndarray",
        kc,
        frozen,
    )
    expect_error(
        lambda: ts.swap_blocks(kc, frozen, *ids),
        ValueError,
        r"^tinyserve.swap_blocks: dst_cache is written to and must be writable",
        kc,
        frozen,
    )


def test_output_list_is_named(case):
    expect_error(
        attention(case, out=case.out.tolist()),
        TypeError,
        r"^tinyserve.paged_attention: out must be an array \(DLPack or buffer protocol\), got list",
        case.lse,
    )


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtype_is_named():
    torch = pytest.importorskip("torch")
    good = np.zeros((4, 2, 3), np.float32)
    half_complex = torch.zeros((4, 2, 3), dtype=torch.complex32)
    expect_error(
        lambda: ts.copy_blocks([good, half_complex], np.array([0]), np.array([1])),
        ValueError,
        r"^tinyserve.copy_blocks: caches\[1\] has an unsupported dtype, got complex32$",
        good,
    )


# --- copy_blocks takes a sequence of tensors, never one tensor -------------------------------


@pytest.mark.parametrize(
    "make_caches,name",
    [
        (lambda kc: kc, "ndarray"),
        (lambda kc: None, "NoneType"),
        (lambda kc: (c for c in [kc]), "generator"),
        (lambda kc: "caches", "str"),
    ],
    ids=["one-array", "none", "generator", "str"],
)
def test_copy_blocks_needs_a_sequence_of_tensors(rng, make_caches, name):
    kc = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    expect_error(
        lambda: ts.copy_blocks(make_caches(kc), np.array([0], np.int32), np.array([1], np.int32)),
        TypeError,
        r"^tinyserve.copy_blocks: caches must be a sequence of arrays \(list or tuple\), "
        rf"got {name}$",
        kc,
    )


def test_copy_blocks_one_torch_tensor_is_not_a_list(rng):
    torch = pytest.importorskip("torch")
    kc = torch.from_numpy(rng.standard_normal((6, 4, 2, 8)).astype(np.float32))
    expect_error(
        lambda: ts.copy_blocks(kc, torch.tensor([0]), torch.tensor([1])),
        TypeError,
        r"^tinyserve.copy_blocks: caches must be a sequence of arrays \(list or tuple\), "
        r"got Tensor$",
        kc.numpy(),
    )


def test_copy_blocks_binding_refuses_one_array(rng):
    """The compiled core refuses it too (a sequence of rows is not a list of caches)."""
    from tinyserve import _tinyserve

    kc = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    ids = np.array([0], np.int32), np.array([1], np.int32)
    expect_error(
        lambda: _tinyserve.copy_blocks(kc, *ids),
        TypeError,
        r"^tinyserve.copy_blocks: caches must be a list or tuple of arrays, got ndarray$",
        kc,
    )
    expect_error(
        lambda: _tinyserve.copy_blocks(None, *ids),
        TypeError,
        r"^tinyserve.copy_blocks: caches must be a list or tuple of arrays, got NoneType$",
        kc,
    )
    expect_error(
        lambda: ts.copy_blocks([kc, [1.0, 2.0]], *ids),
        TypeError,
        r"^tinyserve.copy_blocks: caches\[1\] must be an array \(DLPack or buffer protocol\), "
        r"got list$",
        kc,
    )


# --- Aliasing ------------------------------------------------------------------------------


def test_reshape_and_cache_one_array_for_both_caches(cache_args):
    kc = cache_args["key_cache"]
    args = dict(cache_args, value_cache=kc)
    expect_error(
        lambda: ts.reshape_and_cache(**args),
        ValueError,
        r"^tinyserve.reshape_and_cache: key_cache and value_cache must not share memory",
        kc,
    )


def test_reshape_and_cache_overlapping_cache_views(rng):
    """Two views of one buffer a block apart overlap; K and V as the two halves of one
    [N, 2, ...] tensor do not and are accepted."""
    buf = np.full((7, 4, 2, 16), np.nan, np.float32)
    key = rng.standard_normal((2, 2, 16)).astype(np.float32)
    slots = np.array([0, 9], np.int64)
    expect_error(
        lambda: ts.reshape_and_cache(key, key, buf[:-1], buf[1:], slots),
        ValueError,
        r"key_cache and value_cache must not share memory",
        buf,
    )
    kv = np.full((6, 2, 4, 2, 16), np.nan, np.float32)
    ts.reshape_and_cache(key, key, kv[:, 0], kv[:, 1], slots)
    np.testing.assert_array_equal(kv[0, 0, 0], key[0])
    np.testing.assert_array_equal(kv[2, 1, 1], key[1])


def test_reshape_and_cache_key_inside_the_cache(cache_args):
    kc = cache_args["key_cache"]
    kc[:] = 1.0
    args = dict(cache_args, key=kc[0, :4] if kc.shape[1] >= 4 else kc[0])
    args["key"] = kc.reshape(-1, kc.shape[2], kc.shape[3])[:5]
    args["value"] = args["key"]
    expect_error(
        lambda: ts.reshape_and_cache(**args),
        ValueError,
        r"^tinyserve.reshape_and_cache: key_cache and key must not share memory",
        kc,
        cache_args["value_cache"],
    )


def test_attention_output_sharing_memory(case):
    expect_error(
        attention(case, out=case.query),
        ValueError,
        r"^tinyserve.paged_attention: out and query must not share memory",
        case.query,
        case.lse,
    )
    flat = np.full(case.out.size + case.lse.size, np.nan, np.float32)
    out = flat[: case.out.size].reshape(case.out.shape)
    lse = flat[case.out.size - 4 : case.out.size - 4 + case.lse.size].reshape(case.lse.shape)
    expect_error(
        attention(case, out=out, lse=lse),
        ValueError,
        r"^tinyserve.paged_attention: lse and out must not share memory",
        flat,
    )


def test_copy_blocks_tensors_sharing_memory(rng):
    kv = rng.standard_normal((6, 2, 4, 2, 8)).astype(np.float32)
    ids = np.array([0, 1], np.int32), np.array([2, 3], np.int32)
    for caches, pair in [
        ([kv[:, 0], kv[:, 0]], (0, 1)),
        ([kv[:, 1], kv, kv[:, 0]], (1, 2)),
        ([kv[:, 0], kv[:, 1], kv[:-1, 0], kv[1:, 0]], (0, 2)),
        ([kv[:, 0], kv.reshape(-1)[8:].reshape(-1, 8)], (0, 1)),
    ]:
        expect_error(
            lambda caches=caches: ts.copy_blocks(caches, *ids),
            ValueError,
            rf"^tinyserve.copy_blocks: caches\[{pair[0]}\] and caches\[{pair[1]}\] must not "
            "share memory",
            kv,
        )
    expect_error(
        lambda: ts.copy_blocks([kv[:, 0]], kv.reshape(-1).view(np.int32)[:2], ids[1]),
        ValueError,
        r"^tinyserve.copy_blocks: caches\[0\] and src must not share memory",
        kv,
    )


def test_copy_blocks_disjoint_views_of_one_buffer(rng):
    """K and V of several layers as interleaved views of one [N, layers, 2, ...] buffer: their
    address ranges meet, their elements do not; accepted and copied."""
    buf = rng.standard_normal((9, 3, 2, 4, 2, 8)).astype(np.float32)
    caches = [buf[:, layer, kv] for layer in range(3) for kv in range(2)]
    expected = buf.copy()
    src, dst = np.array([0, 4, 7], np.int32), np.array([8, 1, 2], np.int32)
    ts.copy_blocks(caches, src, dst)
    expected[dst] = expected[src]
    np.testing.assert_array_equal(buf, expected)


def test_copy_blocks_column_slices_of_different_widths(rng):
    """Slices of one buffer's last dimension of different widths (a wide K beside a narrow V),
    also both with their pages reversed: disjoint, accepted and copied; slices that share a
    column refused with nothing written."""
    buf = rng.standard_normal((6, 4, 2, 40)).astype(np.float32)
    expected = buf.copy()
    src, dst = np.array([0, 3], np.int32), np.array([5, 1], np.int32)
    ts.copy_blocks([buf[..., :24], buf[..., 24:]], src, dst)
    expected[dst] = expected[src]
    np.testing.assert_array_equal(buf, expected)
    src, dst = np.array([5], np.int32), np.array([2], np.int32)
    ts.copy_blocks([buf[:, ::-1, :, 30:], buf[:, ::-1, :, :30]], src, dst)  # both reversed
    expected[dst] = expected[src]
    np.testing.assert_array_equal(buf, expected)
    for caches in (
        [buf[..., :24], buf[..., 23:]],
        [buf[:, ::-1, :, 30:], buf[:, ::-1, :, :31]],
        [buf[..., 8:], buf[..., :9][:, ::-1]],
    ):
        expect_error(
            lambda caches=caches: ts.copy_blocks(caches, src, dst),
            ValueError,
            r"^tinyserve.copy_blocks: caches\[0\] and caches\[1\] must not share memory",
            buf,
        )


def test_reshape_and_cache_page_meta_sharing_memory_with_value(rng):
    """page_meta is written while value is read: one buffer holding both is refused, nothing
    written; the same arrays side by side in one buffer are accepted."""
    n, p, h, d = 6, 4, 2, 16
    key = rng.standard_normal((5, h, d)).astype(np.float32)
    kc = np.full((n, p, h, d), np.nan, np.float32)
    vc = np.full((n, p, h, d), np.nan, np.float32)
    slots = np.array([0, 5, -1, 23, 7], np.int64)
    meta_size = n * h * 2 * d
    buf = np.full(meta_size + key.size, np.nan, np.float32)
    meta = buf[:meta_size].reshape(n, h, 2, d)
    value = buf[meta_size - key.size : meta_size].reshape(key.shape)
    value[:] = rng.standard_normal(key.shape)
    expect_error(
        lambda: ts.reshape_and_cache(key, value, kc, vc, slots, meta),
        ValueError,
        r"^tinyserve.reshape_and_cache: page_meta and value must not share memory",
        buf,
        kc,
        vc,
    )
    apart = buf[meta_size:].reshape(key.shape)
    apart[:] = value
    ts.reshape_and_cache(key, apart, kc, vc, slots, meta)
    for i, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(vc[slot // p, slot % p], apart[i])
    np.testing.assert_array_equal(meta[0, :, 0], key[[0]].min(0))


def test_outputs_sharing_memory_with_per_head_scales(rng):
    """Per-KV-head float8 scales are read while paged_attention writes out and lse and while
    reshape_and_cache writes the caches: an output that is also a scale is refused, nothing
    written."""
    n, p, h, d = 4, 4, 2, 16
    fp8 = dict(kv_dtype="float8_e4m3fn")
    kc = np.zeros((n, p, h, d), np.uint8)  # float8 zeros
    vc = np.zeros((n, p, h, d), np.uint8)
    query = rng.standard_normal((1, 4, d)).astype(np.float32)
    table, lens = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    out = np.full(query.shape, np.nan, np.float32)
    lse = np.full(query.shape[:2], np.nan, np.float32)
    scale_in_out = out.reshape(-1)[:h]
    scale_in_out[:] = 1.0
    expect_error(
        lambda: ts.paged_attention(query, kc, vc, table, lens, out, k_scale=scale_in_out, **fp8),
        ValueError,
        r"^tinyserve.paged_attention: out and k_scale must not share memory",
        out,
    )
    scale_in_lse = lse.reshape(-1)[2 : 2 + h]
    scale_in_lse[:] = 2.0
    expect_error(
        lambda: ts.paged_attention(
            query,
            kc,
            vc,
            table,
            lens,
            np.full_like(out, np.nan),
            lse=lse,
            v_scale=scale_in_lse,
            **fp8,
        ),
        ValueError,
        r"^tinyserve.paged_attention: lse and v_scale must not share memory",
        lse,
    )
    # Caches and scales in one byte buffer, the scale inside the key cache.
    buf = np.zeros(2 * kc.size, np.uint8)
    kc_view, vc_view = buf[: kc.size].reshape(kc.shape), buf[kc.size :].reshape(vc.shape)
    scale = buf[8:16].view(np.float32)
    scale[:] = 1.0
    key = rng.standard_normal((3, h, d)).astype(np.float32)
    expect_error(
        lambda: ts.reshape_and_cache(
            key, key, kc_view, vc_view, np.array([0, 1, 2], np.int64), k_scale=scale, **fp8
        ),
        ValueError,
        r"^tinyserve.reshape_and_cache: key_cache and k_scale must not share memory",
        buf,
    )


def test_swap_blocks_overlapping_caches(rng):
    buf = rng.standard_normal((7, 4, 2, 8)).astype(np.float32)
    expect_error(
        lambda: ts.swap_blocks(buf[:-1], buf[1:], np.array([0]), np.array([3])),
        ValueError,
        r"^tinyserve.swap_blocks: src_cache and dst_cache must not share memory",
        buf,
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_overlap_of_two_views_of_one_layout_is_exact(data):
    """Two views of one buffer with the same shape and strides, at different offsets: copy_blocks
    refuses them exactly when some element of one is an element of the other (brute force over
    every address), however the layout interleaves them."""
    ndim = data.draw(st.integers(2, 4))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    order = data.draw(st.permutations(range(ndim - 1)))  # the last dimension's stride is 1
    strides = [0] * ndim
    strides[-1], span = 1, shape[-1] - 1
    for dim in order:
        strides[dim] = span + 1 + data.draw(st.integers(0, 3))
        span += (shape[dim] - 1) * strides[dim]
    offset_a, offset_b = data.draw(st.integers(0, 40)), data.draw(st.integers(0, 40))
    if offset_a == offset_b:
        offset_b += 1
    buf = np.zeros(max(offset_a, offset_b) + span + 1, np.float32)
    item = buf.itemsize

    def view(offset):
        return np.lib.stride_tricks.as_strided(
            buf[offset:], shape, [s * item for s in strides], writeable=True
        )

    index = np.indices(shape).reshape(ndim, -1)
    offsets = set((np.array(strides) @ index).tolist())
    overlap = bool({o + offset_a for o in offsets} & {o + offset_b for o in offsets})
    none = np.zeros(0, np.int32)
    if overlap:
        with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] must not share memory"):
            ts.copy_blocks([view(offset_a), view(offset_b)], none, none)
    else:
        ts.copy_blocks([view(offset_a), view(offset_b)], none, none)


@pytest.mark.parametrize("summary", [1, None])
def test_a_summary_of_the_wrong_kind_is_an_argument_type_error(rng, summary):
    """Checked before anything is written: page_meta keeps its poison."""
    key_cache = rng.standard_normal((4, 2, 1, 8)).astype(np.float32)
    block_table = np.array([[0, 1]], np.int32)
    seq_lens = np.array([3], np.int32)
    page_meta = np.full(ts.page_meta_shape(key_cache), np.nan, np.float32)
    with pytest.raises(
        ts.ArgumentTypeError, match="^tinyserve.build_page_meta: summary must be a str, got"
    ):
        ts.build_page_meta(key_cache, block_table, seq_lens, page_meta, summary=summary)
    assert np.isnan(page_meta).all()


@pytest.mark.parametrize(
    "lens,match",
    [
        (np.ones(3, np.int32), r"host_seq_lens dimension 0 \(batch\) must be 4, got 3"),
        (np.ones(4, np.int64), "host_seq_lens must be int32, got int64"),
        (np.ones((4, 2), np.int32), r"host_seq_lens must be \[batch\], got shape \[4, 2\]"),
        (np.ones((4, 2, 1), np.int32), r"host_seq_lens must be \[batch\], got shape"),
    ],
    ids=["batch", "dtype", "per_head_with_shared_table", "3d"],
)
def test_plan_host_seq_lens_rejected(lens, match):
    """plan_paged_attention's host_seq_lens: wrong shape or dtype raises ValueError."""
    q = np.zeros((4, 8, 64), np.float32)
    kc = np.zeros((32, 16, 2, 64), np.float32)
    table = np.zeros((4, 8), np.int32)
    with pytest.raises(ValueError, match="^tinyserve.plan_paged_attention: " + match):
        ts.plan_paged_attention(q, kc, table, host_seq_lens=lens)


def test_plan_host_seq_lens_per_kv_head():
    """[batch, num_kv_heads] host lengths go with a per-KV-head table (of that many heads); the
    CPU backend's plan does not depend on them."""
    q = np.zeros((4, 8, 64), np.float32)
    kc = np.zeros((32, 16, 2, 64), np.float32)
    table = np.zeros((4, 2, 8), np.int32)
    plain = ts.plan_paged_attention(q, kc, table)
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=np.ones((4, 2), np.int32)) == plain
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=[5, 1, 128, 0]) == plain
    # A list clamps its integers into int32 (lengths are clamped anyway); floats are refused.
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=[2**40, 1, -(2**40), 0]) == plain
    with pytest.raises(ValueError, match="host_seq_lens must be int32, got float64"):
        ts.plan_paged_attention(q, kc, table, host_seq_lens=[1.5, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"host_seq_lens dimension 1 \(num_kv_heads\) must be 2"):
        ts.plan_paged_attention(q, kc, table, host_seq_lens=np.ones((4, 3), np.int32))


def test_arrays_that_cannot_be_exported_are_named():
    """An array that neither DLPack nor the buffer protocol carries is refused in the library's
    style, saying why: byte order, dtype, or a device DLPack cannot name (torch's "meta")."""
    kc = np.zeros((4, 4, 2, 8), np.float32)
    table, lens = np.zeros((2, 2), np.int32), np.ones(2, np.int32)
    out = np.full((2, 4, 8), np.nan, np.float32)
    cases = [
        (
            np.zeros((2, 4, 8), ">f4"),
            "query must be in native byte order, got ndarray of dtype >f4",
        ),
        (np.zeros((2, 4, 8), object), "query must be an array of a supported dtype, got ndarray"),
    ]
    for query, match in cases:
        with pytest.raises(ValueError, match="^tinyserve.paged_attention: " + match):
            ts.paged_attention(query, kc, kc, table, lens, out)
        assert np.isnan(out).all()
    torch = pytest.importorskip("torch")
    with pytest.raises(
        ValueError,
        match=r"^tinyserve.paged_attention: query must be on cpu, cuda "
        r"or cuda_host, got torch.Tensor on meta",
    ):
        ts.paged_attention(torch.empty((2, 4, 8), device="meta"), kc, kc, table, lens, out)
    assert np.isnan(out).all()


def test_select_pages_budget_beyond_int32_allocates_nothing():
    """select_pages without out= refuses a budget outside int32 as the core does (ValueError),
    before sizing its outputs from it."""
    q = np.zeros((2, 4, 8), np.float32)
    meta = np.zeros((8, 2, 2, 8), np.float32)
    table, lens = np.zeros((2, 2), np.int32), np.array([5, 8], np.int32)
    with pytest.raises(ValueError, match=r"^tinyserve.select_pages: budget must be an int in"):
        ts.select_pages(q, meta, table, lens, 2**40, block_size=4)


def test_bool_tensors_are_not_ints(case):
    """A 0-d torch.bool tensor indexes as 0 or 1 but is refused where an int is meant, as a
    Python bool is; a 0-d integer tensor is an int."""
    torch = pytest.importorskip("torch")
    for name in ("window_left", "num_splits", "max_seq_len"):
        expect_error(
            attention(case, **{name: torch.tensor(True)}),
            TypeError,
            rf"^tinyserve.paged_attention: {name} must be an int, got bool$",
            case.out,
            case.lse,
        )
    q = np.zeros((2, 4, 8), np.float32)
    meta = np.zeros((8, 2, 2, 8), np.float32)
    table, lens = np.zeros((2, 2), np.int32), np.array([5, 8], np.int32)
    with pytest.raises(
        TypeError, match=r"^tinyserve.select_pages: budget must be an int, got bool"
    ):
        ts.select_pages(q, meta, table, lens, torch.tensor(True), block_size=4)
    bm = ts.BlockManager(4, 2)
    bm.add_sequence(0)
    assert torch.tensor(0) in bm and torch.tensor(False) not in bm
    caches = [np.zeros((4, 2, 1, 8), np.float32)]
    assert ts.allocate_host_pool(caches, torch.tensor(3))[0].shape == (3, 2, 1, 8)
    with pytest.raises(TypeError, match="num_host_blocks must be an int, got bool"):
        ts.allocate_host_pool(caches, torch.tensor(True))


def test_python_wrappers_read_ints_as_the_core_does():
    """allocate_host_pool's count and every op's stream take NumPy integers like the core's int
    arguments; a float or a bool is an ArgumentTypeError."""
    caches = [np.zeros((4, 2, 1, 8), np.float32)]
    assert ts.allocate_host_pool(caches, np.int64(2))[0].shape == (2, 2, 1, 8)
    for bad, kind in ((4.0, "float"), (True, "bool"), (np.bool_(True), "bool"), ("4", "str")):
        with pytest.raises(
            ts.ArgumentTypeError,
            match=rf"^tinyserve.allocate_host_pool: num_host_blocks must be an int, got {kind}$",
        ):
            ts.allocate_host_pool(caches, bad)
    cache = np.arange(16, dtype=np.float32).reshape(4, 4)
    ts.copy_blocks([cache], np.array([0]), np.array([1]), stream=np.int64(0))
    np.testing.assert_array_equal(cache[1], cache[0])
    with pytest.raises(TypeError, match=r"^tinyserve.copy_blocks: stream must be None.*got bool"):
        ts.copy_blocks([cache], np.array([0]), np.array([1]), stream=True)
