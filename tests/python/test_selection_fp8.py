"""Page summaries stored in float8 e4m3fn under float32, float16 and bfloat16 keys and queries:
the writers round outward (min toward minus infinity, max toward plus infinity, saturating at
+-448) and refuse mean/std summaries, build_page_meta writes what the cache writes, select_pages
scores the float8 values exactly (every scoring), and bad summaries are refused. Every check is
against float64 NumPy and a float8 table decoded here from the format's bits; torch-cuda variants
run on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
from test_selection import (
    SUMMARIES,
    check_planted_needle,
    check_summaries_follow_the_writes,
    device_of,
    integer_case,
    ints,
    random_pages,
    to_np,
)

import reference as R
import tinyserve as ts
from arrays import asarray, backends, cuda_ok, empty, f64, require, sync, torch

try:
    import ml_dtypes
except ImportError:  # NumPy float8 arrays need it; torch ones do not
    ml_dtypes = None


def _e4m3_table():
    """(values, bits) of every finite e4m3fn number, ascending (+0 only): sign, 4 exponent bits
    of bias 7, 3 mantissa bits; exponent 0 holds the subnormals m / 8 * 2^-6; 0x7f/0xff NaN."""
    bits = np.arange(256)
    e, m = (bits >> 3) & 0xF, bits & 0x7
    magnitude = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    values = np.where(bits & 0x80, -magnitude, magnitude)
    keep = ((bits & 0x7F) != 0x7F) & (bits != 0x80)
    order = np.argsort(values[keep])
    return values[keep][order], bits[keep][order]


E4M3, E4M3_BITS = _e4m3_table()
assert len(E4M3) == 253 and E4M3[-1] == 448 and np.all(np.diff(E4M3) > 0)


def floor8(x):
    """The largest e4m3 value <= x (-448 below the range)."""
    i = np.searchsorted(E4M3, np.asarray(x, np.float64), "right") - 1
    return E4M3[np.maximum(i, 0)]


def ceil8(x):
    """The smallest e4m3 value >= x (448 above the range)."""
    i = np.searchsorted(E4M3, np.asarray(x, np.float64), "left")
    return E4M3[np.minimum(i, len(E4M3) - 1)]


def steps8(a, b):
    """How many e4m3 values apart a and b (both e4m3 values) are."""
    return np.abs(np.searchsorted(E4M3, a) - np.searchsorted(E4M3, b))


def fp8_empty(shape, fw, device):
    """NaN-poisoned float8 summaries: ml_dtypes' float8_e4m3fn in NumPy, torch.float8_e4m3fn."""
    if fw == "numpy":
        if ml_dtypes is None:
            pytest.skip("NumPy float8 arrays need ml_dtypes")
        return np.full(shape, np.nan, dtype=ml_dtypes.float8_e4m3fn)
    return torch.full(shape, float("nan"), dtype=torch.float8_e4m3fn, device=device)


def fp8_from_bits(bits, fw, device):
    bits = np.ascontiguousarray(bits, np.uint8)
    if fw == "numpy":
        if ml_dtypes is None:
            pytest.skip("NumPy float8 arrays need ml_dtypes")
        return bits.view(ml_dtypes.float8_e4m3fn)
    return torch.from_numpy(bits).view(torch.float8_e4m3fn).to(device)


def fp8_array(values, fw, device):
    """Exact e4m3 values as a float8 array (through their bits, independent of any cast)."""
    values = np.asarray(values, np.float64)
    i = np.searchsorted(E4M3, values)
    assert (E4M3[np.minimum(i, len(E4M3) - 1)] == values).all(), "not e4m3 values"
    return fp8_from_bits(E4M3_BITS[i], fw, device)


def bits_of(meta) -> np.ndarray:
    if torch is not None and isinstance(meta, torch.Tensor):
        return meta.cpu().view(torch.uint8).numpy()
    return np.asarray(meta).view(np.uint8)


def test_rounding_reference_agrees_with_torch_and_ml_dtypes(rng):
    """The table decoded above is torch's and ml_dtypes' e4m3fn, and floor8 and ceil8 bracket x
    by adjacent values (random values, every e4m3 value, the midpoints between them, values out
    of range)."""
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.uniform(-4, 3, 4000), E4M3])
    x = np.concatenate([x, (E4M3[1:] + E4M3[:-1]) / 2, [1e4, -1e4, 448, -448, 464, -464]])
    lo, hi = floor8(x), ceil8(x)
    inside = np.abs(x) <= 448
    assert (lo[inside] <= x[inside]).all() and (hi[inside] >= x[inside]).all()
    assert (steps8(lo, hi)[inside] <= 1).all() and (lo[~inside] == hi[~inside]).all()
    assert ((lo == hi) == np.isin(x, E4M3) | ~inside).all()
    if torch is not None:
        every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        np.testing.assert_array_equal(f64(every)[E4M3_BITS], E4M3)
    if ml_dtypes is not None:
        every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(every.astype(np.float64)[E4M3_BITS], E4M3)


# The summaries the writers take in float8: min/max boxes (mean/std ones are refused).
BOX_SUMMARIES = [s for s in SUMMARIES if s in R.MINMAX_SUMMARIES]


def check_fp8_meta(meta, keys_by_block, untouched):
    """Each written block's float8 summary against its keys (float64): the minimum rounded down
    and the maximum rounded up to e4m3, exactly. Untouched blocks NaN."""
    got = f64(meta)
    for block, keys in keys_by_block.items():
        k = np.stack(keys)
        want = np.stack([floor8(k.min(0)), ceil8(k.max(0))], axis=1)
        np.testing.assert_array_equal(got[block], want, err_msg=f"block {block}")
    for block in untouched:
        assert np.isnan(got[block]).all(), f"block {block} was written"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("summary", BOX_SUMMARIES)
def test_fp8_summaries_follow_the_writes(rng, backend, dtype, summary):
    """check_summaries_follow_the_writes with float8 summaries (a prompt in one call, decode
    steps extending pages and starting new ones, two written blocks reused): after every call
    each page's float8 summary is the outward rounding of all its keys so far, and no other page
    is touched."""
    fw, device = device_of(backend)
    require(fw, dtype)
    check_summaries_follow_the_writes(
        rng, fw, device, dtype, summary, lambda shape: fp8_empty(shape, fw, device), check_fp8_meta
    )


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", BOX_SUMMARIES)
def test_fp8_summaries_saturate(rng, backend, summary):
    """Keys beyond +-448 (float32 and float16): a minimum of -1000 is stored as -448, a maximum
    of 1000 as 448 (all keys above 448: both bounds 448); an extension at offset 3 by keys of
    +-2000 keeps the saturated box."""
    fw, device = device_of(backend)
    for dtype in ("float32", "float16"):
        kc = empty((3, 4, 1, 16), fw, dtype, device)
        vc = empty((3, 4, 1, 16), fw, dtype, device)
        meta = fp8_empty((3, 1, 2, 16), fw, device)
        keys = rng.uniform(-1500, 1500, size=(3, 1, 16))
        keys[:, 0, :2] = [[-1000, 1000], [5, 300], [-3, 1]]
        keys[:, 0, 2], keys[:, 0, 3] = rng.uniform(460, 2000, 3), -rng.uniform(460, 2000, 3)
        k = asarray(keys, fw, dtype, device)
        ts.reshape_and_cache(k, k, kc, vc, ints([5, 4, 6], fw, device), meta, summary=summary)
        sync(fw, device)
        written = {1: list(f64(k)[[1, 0, 2]])}
        got = f64(meta)
        assert got[1, 0, 0, 0] == -448 and got[1, 0, 1, 1] == 448
        assert got[1, 0, 0, 2] == got[1, 0, 1, 2] == 448
        assert got[1, 0, 0, 3] == got[1, 0, 1, 3] == -448
        check_fp8_meta(meta, written, [0, 2])
        more = rng.uniform(-1500, 1500, size=(1, 1, 16))
        more[0, 0, :2] = [-2000, 2000]
        k = asarray(more, fw, dtype, device)
        ts.reshape_and_cache(k, k, kc, vc, ints([7], fw, device), meta, summary=summary)
        sync(fw, device)
        written[1].append(f64(k)[0])
        check_fp8_meta(meta, written, [0, 2])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("summary", BOX_SUMMARIES)
def test_fp8_build_page_meta_equals_cache_writes(rng, backend, dtype, summary):
    """Float8 summaries built from a filled cache have the bytes that reshape_and_cache wrote
    for the same pages in one call, and match the outward-rounded reference; a block listed by
    two sequences is built once; blocks of no sequence stay NaN."""
    fw, device = device_of(backend)
    require(fw, dtype)
    block_size, heads, dim = 16, 2, 32
    seq_lens = np.array([37, 64, 5, 0], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    table = np.vstack([table, table[1:2]])  # a fifth sequence sharing the second's blocks
    lens = np.append(seq_lens, 64).astype(np.int32)
    slots = np.array(
        [table[b, p // block_size] * block_size + p % block_size for b in range(4)
         for p in range(seq_lens[b])], np.int64)  # fmt: skip
    order = rng.permutation(len(slots))
    keys = asarray(rng.standard_normal((len(slots), heads, dim)) * 2, fw, dtype, device)
    slots = slots[order]
    kc = empty((num_blocks, block_size, heads, dim), fw, dtype, device)
    vc = empty((num_blocks, block_size, heads, dim), fw, dtype, device)
    written = fp8_empty((num_blocks, heads, 2, dim), fw, device)
    ts.reshape_and_cache(keys, keys, kc, vc, ints(slots, fw, device),
                         written, summary=summary)  # fmt: skip
    built = fp8_empty((num_blocks, heads, 2, dim), fw, device)
    ts.build_page_meta(kc, ints(table, fw, device), ints(lens, fw, device), built, summary=summary)
    sync(fw, device)
    np.testing.assert_array_equal(bits_of(built), bits_of(written))
    k64 = f64(kc)
    by_block = {}
    for b, n in enumerate(lens):
        for p in range(-(-int(n) // block_size)):
            tokens = min(block_size, int(n) - p * block_size)
            by_block[int(table[b, p])] = list(k64[table[b, p], :tokens])
    untouched = set(range(num_blocks)) - set(by_block)
    check_fp8_meta(built, by_block, untouched)


def e4m3_summaries(rng, num_blocks, kv_heads, head_dim, group, summary):
    """Random valid (min <= max, std >= 0) e4m3 summaries of magnitude at most 8, multiples of
    the smallest power of two (2^-9 up: subnormals too) that keeps every partial score of queries
    in [-2, 2] exact in float32 (at most 32 * group * head_dim, in quarters of it)."""
    lsb = 2.0**-9
    while 128 * group * head_dim / lsb > 2**24:
        lsb *= 2
    small = E4M3[(np.abs(E4M3) <= 8) & (E4M3 % lsb == 0)]
    a = rng.choice(small, size=(num_blocks, kv_heads, head_dim))
    b = rng.choice(small, size=(num_blocks, kv_heads, head_dim))
    if summary in R.MINMAX_SUMMARIES:
        return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=2)
    return np.stack([a, np.abs(b)], axis=2)


def select(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, fw, device):
    """select_pages with -7-poisoned outputs; (table, lens) as NumPy."""
    n, heads = len(seq_lens), meta.shape[1]
    got_t = empty((n, heads, budget), fw, "int32", device, fill=-7)
    got_l = empty((n, heads), fw, "int32", device, fill=-7)
    out = ts.select_pages(query, meta, ints(table, fw, device), ints(seq_lens, fw, device), budget,
                          block_size=block_size, num_sink_pages=sinks, summary=summary,
                          group_reduce=reduce, out=(got_t, got_l))  # fmt: skip
    sync(fw, device)
    assert out[0] is got_t and out[1] is got_l
    return to_np(got_t), to_np(got_l)


def check_select(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype,
                 fw, device, meta_view=None):  # fmt: skip
    """Float8 summaries (`meta`: e4m3 values, float64) select the float64 reference's pages, and
    the same pages as those values in the query's dtype."""
    q = asarray(query, fw, dtype, device)
    m8 = fp8_array(meta, fw, device) if meta_view is None else meta_view
    args = (table, seq_lens, budget, block_size, sinks, summary, reduce, fw, device)
    got_t, got_l = select(q, m8, *args)
    want_t, want_l = R.select_pages(query, meta, table, seq_lens, budget, block_size, sinks,
                                    summary, reduce)  # fmt: skip
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_array_equal(got_l, want_l)
    same_t, same_l = select(q, asarray(meta, fw, dtype, device), *args)
    np.testing.assert_array_equal(got_t, same_t)
    np.testing.assert_array_equal(got_l, same_l)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
@pytest.mark.parametrize("group_reduce", ["sum", "max"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fp8_select_pages_matches_reference(rng, backend, summary, group_reduce, dtype):
    """Integer summaries (frequent ties) and random e4m3 ones: exact page sets, order, padding and
    lengths with sinks 0 and 2; sequences of budget - 1, budget, budget + 1 pages, shorter and
    longer ones and an empty one."""
    fw, device = device_of(backend)
    require(fw, dtype)
    block_size, budget = 4, 6
    seq_lens = np.array([97, 3, 0, 24, 21, 25, 61, 200], dtype=np.int32)
    table, query, metas = integer_case(rng, seq_lens, 8, 2, 16, block_size)
    num_blocks = metas["minmax"].shape[0]
    for meta in (metas[summary], e4m3_summaries(rng, num_blocks, 2, 16, 4, summary)):
        for sinks in (0, 2):
            check_select(query, meta, table, seq_lens, budget, block_size, sinks, summary,
                         group_reduce, dtype, fw, device)  # fmt: skip


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("offset", [0, 1, 4, 16])
def test_fp8_summary_views(rng, backend, offset):
    """Strided float8 summaries (a KV head and head_dim padding around them) whose rows start
    `offset` elements into a row of the buffer: 16-byte aligned (0, 16), 4-byte aligned (4: the
    CUDA fallback's 4-element loads), misaligned (1: one-element loads)."""
    fw, device = device_of(backend)
    block_size, budget, kv_heads, head_dim = 16, 8, 3, 64
    seq_lens = np.array([75 * block_size - 5, 9 * block_size, 0, 8 * block_size], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    padded = fp8_empty((num_blocks, kv_heads + 1, 2, head_dim + 32), fw, device)
    view = padded[:, 1:, :, offset : offset + head_dim]
    query = rng.integers(-2, 3, size=(4, kv_heads * 4, head_dim)).astype(np.float32)
    for summary in SUMMARIES:
        meta = e4m3_summaries(rng, num_blocks, kv_heads, head_dim, 4, summary)
        view[...] = fp8_array(meta, fw, device)
        for reduce in ("sum", "max"):
            check_select(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce,
                         "float16" if fw == "torch" else "float32", fw, device, view)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ok(), reason="needs torch with CUDA and tinyserve built with it")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 16, 32, 48, 20, 17])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("summary", SUMMARIES)
def test_fp8_cuda_scoring_paths(rng, summary, reduce, group, head_dim, dtype):
    """Every CUDA scoring path over float8 summaries (16 elements a 16-byte chunk): whole chunks
    (head_dim 16 to 256; 8 KV heads at 64/128/256 for the page-major kernel), the row-by-row
    fallback (20: 4-byte loads, 17: one-byte loads); lengths around the budget, a long sequence,
    an empty one, sinks 0 and 2; integer and random e4m3 summaries."""
    block_size, budget = 16, 8
    kv_heads = 8 if head_dim in (64, 128, 256) else 3
    pages = [budget - 1, budget, budget + 1, budget + 2, 75, 0]
    seq_lens = np.array([max(0, p * block_size - 5) for p in pages], dtype=np.int32)
    seq_lens[1] = budget * block_size
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(len(pages), kv_heads * group, head_dim)).astype(np.float32)
    ints_meta = rng.integers(-3, 4, size=(2, num_blocks, kv_heads, head_dim)).astype(np.float64)
    if summary in R.MINMAX_SUMMARIES:
        ints_meta = np.stack([ints_meta.min(0), ints_meta.max(0)], axis=2)
    else:
        ints_meta = np.stack([ints_meta[0], np.abs(ints_meta[1])], axis=2)
    for meta in (ints_meta, e4m3_summaries(rng, num_blocks, kv_heads, head_dim, group, summary)):
        for sinks in (0, 2):
            check_select(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce,
                         dtype, "torch", "cuda")  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ok(), reason="needs torch with CUDA and tinyserve built with it")
@pytest.mark.parametrize("head_dim", [512, 1024])
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("summary", ["minmax_damped", "meanstd"])
def test_fp8_cuda_wide_rows(rng, summary, reduce, head_dim):
    """Float8 rows of 32 and 64 chunks: the page-major kernel with a KV head over two chunks a
    lane (head_dim 512, summed group) and the page-wide kernel with two chunks a lane (1024, or
    the group's maximum)."""
    block_size, budget, kv_heads, group = 16, 8, 2, 2
    seq_lens = np.array([70 * block_size - 3, 9 * block_size, 0], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads * group, head_dim)).astype(np.float32)
    meta = e4m3_summaries(rng, num_blocks, kv_heads, head_dim, group, summary)
    check_select(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce, "float16",
                 "torch", "cuda")  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ok(), reason="needs torch with CUDA and tinyserve built with it")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_cuda_query_off_16_byte_alignment(rng, dtype, head_dim):
    """Query rows one element off 16-byte alignment over float8 summaries: both 16-byte-chunk
    kernels then build their weights (16 elements a float8 chunk) element by element; the same
    pages as the reference, summed group and maximum."""
    block_size, budget, kv_heads, group = 16, 6, 8, 4
    seq_lens = np.array([900, 70, 400], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads * group, head_dim)).astype(np.float32)
    q = asarray(query, "torch", dtype, "cuda")
    flat = torch.full((q.numel() + 1,), float("nan"), dtype=q.dtype, device="cuda")
    shifted = flat[1:].view(q.shape)
    shifted.copy_(q)
    for summary in BOX_SUMMARIES:
        meta = e4m3_summaries(rng, num_blocks, kv_heads, head_dim, group, summary)
        m8 = fp8_array(meta, "torch", "cuda")
        for reduce in ("sum", "max"):
            args = (table, seq_lens, budget, block_size, 1, summary, reduce, "torch", "cuda")
            got_t, got_l = select(shifted, m8, *args)
            want_t, want_l = R.select_pages(query, meta, table, seq_lens, budget, block_size, 1,
                                            summary, reduce)  # fmt: skip
            np.testing.assert_array_equal(got_t, want_t)
            np.testing.assert_array_equal(got_l, want_l)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", BOX_SUMMARIES)
def test_fp8_planted_needle_is_found(rng, backend, summary):
    """test_selection's planted needle with float8 summaries written by reshape_and_cache."""
    fw, device = device_of(backend)
    check_planted_needle(rng, fw, device, summary, lambda shape: fp8_empty(shape, fw, device))


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_moves_fp8_summaries(rng, backend):
    """copy_blocks moves float8 summary blocks byte for byte (NaN bits included)."""
    fw, device = device_of(backend)
    bits = rng.integers(0, 256, size=(6, 2, 2, 16)).astype(np.uint8)
    meta = fp8_from_bits(bits, fw, device)
    src, dst = np.array([1, 4, 5], np.int32), np.array([3, 0, 2], np.int32)
    ts.copy_blocks([meta], ints(src, fw, device), ints(dst, fw, device))
    sync(fw, device)
    want = bits.copy()
    want[dst] = bits[src]
    np.testing.assert_array_equal(bits_of(meta), want)


@pytest.mark.parametrize(
    "fw, key_dtype, meta_dtype",
    [("numpy", "float32", "float16"), ("numpy", "float32", "uint8"),
     ("numpy", "float16", "float32"), ("torch", "float16", "bfloat16"),
     ("torch", "bfloat16", "float32")],
)  # fmt: skip
@pytest.mark.parametrize("op", ["reshape_and_cache", "build_page_meta", "select_pages"])
def test_other_summary_dtypes_are_refused(rng, fw, key_dtype, meta_dtype, op):
    """page_meta of neither the keys' (or query's) dtype nor float8_e4m3fn: ValueError naming
    both, before anything is written."""
    _ = device_of((fw, "cpu"))
    kc = empty((6, 4, 2, 16), fw, key_dtype)
    vc = empty((6, 4, 2, 16), fw, key_dtype)
    fill = 0 if meta_dtype == "uint8" else np.nan
    meta = empty((6, 2, 2, 16), fw, meta_dtype, fill=fill)
    key = asarray(rng.standard_normal((3, 2, 16)), fw, key_dtype)
    of = "query" if op == "select_pages" else "the key cache"
    message = f"page_meta must have the dtype of {of} ({key_dtype}) or float8_e4m3fn, got "
    table = ints(np.array([[0, 1]], np.int32), fw, "cpu")
    lens = ints(np.array([7], np.int32), fw, "cpu")
    out = (empty((1, 2, 1), fw, "int32", fill=-7), empty((1, 2), fw, "int32", fill=-7))
    with pytest.raises(ValueError, match=rf"^tinyserve\.{op}: ") as info:
        if op == "reshape_and_cache":
            ts.reshape_and_cache(key, key, kc, vc, ints([0, 1, 2], fw, "cpu"), meta)
        elif op == "build_page_meta":
            kc[...] = 0
            ts.build_page_meta(kc, table, lens, meta)
        else:
            ts.select_pages(key[:1], meta, table, lens, 1, block_size=4, out=out)
    assert message + meta_dtype in str(info.value)
    assert (to_np(out[0]) == -7).all() and (to_np(out[1]) == -7).all()
    assert (f64(meta) == 0).all() if meta_dtype == "uint8" else np.isnan(f64(meta)).all()
    if op == "reshape_and_cache":
        assert np.isnan(f64(kc)).all() and np.isnan(f64(vc)).all()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("op", ["reshape_and_cache", "build_page_meta"])
def test_writers_refuse_float8_mean_std(rng, backend, op):
    """Mean/std summaries in float8 are refused by both writers (a 3-bit mean cannot be extended
    by later keys): ValueError before the caches or the summaries are written. select_pages
    still scores float8 rows as mean/std (test_fp8_select_pages_matches_reference)."""
    fw, device = device_of(backend)
    kc = empty((4, 4, 2, 16), fw, "float16", device)
    vc = empty((4, 4, 2, 16), fw, "float16", device)
    meta = fp8_empty((4, 2, 2, 16), fw, device)
    key = asarray(rng.standard_normal((3, 2, 16)), fw, "float16", device)
    message = "float8_e4m3fn page summaries take the min/max summaries (minmax, minmax_damped)"
    with pytest.raises(ValueError, match=rf"^tinyserve\.{op}: ") as info:
        if op == "reshape_and_cache":
            ts.reshape_and_cache(key, key, kc, vc, ints([0, 1, 2], fw, device), meta,
                                 summary="meanstd")  # fmt: skip
        else:
            kc[...] = 0
            table = ints(np.array([[0, 1]], np.int32), fw, device)
            ts.build_page_meta(kc, table, ints(np.array([7], np.int32), fw, device), meta,
                               summary="meanstd")  # fmt: skip
    sync(fw, device)
    assert message in str(info.value)
    assert np.isnan(f64(meta)).all()
    if op == "reshape_and_cache":
        assert np.isnan(f64(kc)).all() and np.isnan(f64(vc)).all()


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ok(), reason="needs torch with CUDA and tinyserve built with it")
def test_fp8_summaries_in_a_cuda_graph(rng):
    """A decode step captured once: reshape_and_cache writing one token per sequence with float8
    summaries, then select_pages over them (out= and workspace=). Each replay, with new keys,
    slots and queries written in place, leaves every page's float8 box outward-rounded over its
    keys and selects the reference's pages over those float8 values."""
    block_size, heads, group, dim, budget = 16, 2, 4, 64, 6
    lens = np.array([300, 170, 90], dtype=np.int32)
    steps = 4
    table, num_blocks = random_pages(rng, lens + steps, block_size)
    kc = torch.full((num_blocks, block_size, heads, dim), float("nan"), device="cuda")
    vc = kc.clone()
    meta = fp8_empty((num_blocks, heads, 2, dim), "torch", "cuda")
    prompt_keys = {}
    for b, n in enumerate(lens):  # the prompts, written eagerly
        keys = rng.standard_normal((n, heads, dim)) * 2
        pos = np.arange(n)
        slots = table[b, pos // block_size].astype(np.int64) * block_size + pos % block_size
        k = asarray(keys, "torch", "float32", "cuda")
        ts.reshape_and_cache(k, k, kc, vc, ints(slots, "torch", "cuda"), meta)
        prompt_keys[b] = list(f64(k))
    key = torch.zeros((len(lens), heads, dim), device="cuda")
    slot = torch.zeros(len(lens), dtype=torch.int64, device="cuda")
    q = torch.zeros((len(lens), heads * group, dim), device="cuda")
    t, dev_lens = ints(table, "torch", "cuda"), ints(lens + 1, "torch", "cuda")
    out = (
        torch.empty((len(lens), heads, budget), dtype=torch.int32, device="cuda"),
        torch.empty((len(lens), heads), dtype=torch.int32, device="cuda"),
    )
    ws = torch.empty(ts.select_pages_workspace_bytes(q, meta, t), dtype=torch.uint8, device="cuda")

    def step():
        ts.reshape_and_cache(key, key, kc, vc, slot, meta)
        ts.select_pages(q, meta, t, dev_lens, budget, block_size=block_size, num_sink_pages=1,
                        out=out, workspace=ws)  # fmt: skip

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    length = lens.copy()
    for _ in range(steps):
        new = rng.standard_normal((len(lens), heads, dim)) * 2
        query = rng.integers(-2, 3, size=(len(lens), heads * group, dim)).astype(np.float32)
        pos = length
        slots = table[np.arange(len(lens)), pos // block_size].astype(np.int64) * block_size
        key.copy_(torch.from_numpy(new).float())
        slot.copy_(torch.from_numpy(slots + pos % block_size))
        q.copy_(torch.from_numpy(query))
        dev_lens.copy_(torch.from_numpy(length + 1))
        graph.replay()
        torch.cuda.synchronize()
        length += 1
        by_block = {}
        for b in range(len(lens)):
            prompt_keys[b].append(new[b].astype(np.float32).astype(np.float64))
            for p in range(-(-int(length[b]) // block_size)):
                by_block[int(table[b, p])] = prompt_keys[b][p * block_size : (p + 1) * block_size]
        check_fp8_meta(meta, by_block, set(range(num_blocks)) - set(by_block))
        want_t, want_l = R.select_pages(query, f64(meta), table, length, budget, block_size, 1,
                                        "minmax", "sum")  # fmt: skip
        np.testing.assert_array_equal(to_np(out[0]), want_t)
        np.testing.assert_array_equal(to_np(out[1]), want_l)


def test_meta_dtype_of_the_bindings():
    """The bindings' meta_dtype (what the Python ops pass for NumPy float8 summaries): a name
    other than float8_e4m3fn, or summaries neither uint8 nor float8, are refused by name."""
    C = ts._tinyserve
    query = np.zeros((1, 2, 16), np.float32)
    table, lens = np.zeros((1, 2), np.int32), np.array([4], np.int32)
    out = (np.full((1, 1, 2), -7, np.int32), np.full((1, 1), -7, np.int32))
    bits = np.zeros((2, 1, 2, 16), np.uint8)
    with pytest.raises(ValueError, match="select_pages: meta_dtype must be None or "
                       "'float8_e4m3fn', got 'float16'"):  # fmt: skip
        C.select_pages(query, bits, table, lens, 2, 4, *out, meta_dtype="float16")
    with pytest.raises(ValueError, match="page_meta must be uint8 or float8_e4m3fn with "
                       "meta_dtype='float8_e4m3fn', got float32"):  # fmt: skip
        C.select_pages(query, bits.astype(np.float32), table, lens, 2, 4, *out,
                       meta_dtype="float8_e4m3fn")  # fmt: skip
    assert (out[0] == -7).all() and (out[1] == -7).all()
    C.select_pages(query, bits, table, lens, 2, 4, *out, meta_dtype="float8_e4m3fn")
    np.testing.assert_array_equal(out[1], [[4]])
