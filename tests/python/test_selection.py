"""Query-aware page selection: page summaries written with the cache, build_page_meta,
select_pages, and paged_attention over per-KV-head tables, each against a float64 NumPy
reference. The torch-cuda variants run the same checks on the GPU."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

import reference as R
import tinyserve as ts
from arrays import TOLERANCE, asarray, backends, cache_pair, empty, f64, require, sync, torch

SUMMARIES = ["minmax_damped", "minmax", "meanstd"]
# Summaries are stored in the cache's dtype: allowed error of a mean/std against float64, relative
# to the keys' scale (the rounding of the stored value, and float32 sums on the GPU).
META_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def device_of(backend):
    fw, device = backend
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    return fw, device


def to_np(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def ints(a, fw, device):
    return asarray(np.asarray(a), fw, None, device)


def random_pages(rng, seq_lens, block_size, spare=4):
    """A block table handing out blocks in random physical order; padding names a spare block."""
    per_seq = [-(-int(n) // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + spare
    perm = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((len(seq_lens), max(per_seq) + 1), perm[-1], dtype=np.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = perm[used : used + n]
        used += n
    return table, num_blocks


def check_meta(meta, keys_by_block, summary, dtype, untouched):
    """Every written block's summary against the reference of its keys; untouched blocks NaN."""
    got = f64(meta)
    for block, keys in keys_by_block.items():
        want = R.page_summary(np.stack(keys), summary)
        if summary in R.MINMAX_SUMMARIES:
            np.testing.assert_array_equal(got[block], want, err_msg=f"block {block}")
        else:
            scale = max(1.0, np.abs(want).max())
            np.testing.assert_allclose(
                got[block], want, rtol=0, atol=META_TOLERANCE[dtype] * scale, err_msg=f"{block}"
            )
    for block in untouched:
        assert np.isnan(got[block]).all(), f"block {block} was written"


# ---------------------------------------------------------------------------------------------
# Summaries


def test_cpu_meanstd_summaries_of_float16_rounded_once(rng):
    """The CPU backend accumulates a page's mean and standard deviation in float64 and stores
    each rounded once to float16, exactly NumPy's rounding of the float64 statistic (rounded
    through float32 first, a value just above a float16 halfway point can land on it and round
    to the wrong neighbour). One page whose deviation is such a value, and 1024 pages of random
    keys, written with the cache and built from it."""
    block_size, num_kv_heads, head_dim = 16, 4, 64
    pages = 1024
    keys = (rng.standard_normal((pages * block_size, num_kv_heads, head_dim)) * 3).astype(
        np.float16
    )
    # Page 0, head 0, element 0: keys whose deviation, 4.978515837..., rounds through float32 to
    # the float16 halfway point 4.978515625 and from there to even, 4.9765625; once, to 4.98046875.
    keys[:3, 0, 0] = [-7.9921875, 1.408203125, 3.435546875]
    kc = np.zeros((pages, block_size, num_kv_heads, head_dim), np.float16)
    vc = np.zeros_like(kc)
    lens = np.full(pages, block_size, dtype=np.int32)
    lens[0] = 3
    slots = np.concatenate([np.arange(3), np.arange(block_size, pages * block_size)]).astype(
        np.int64
    )
    meta = np.full((pages, num_kv_heads, 2, head_dim), np.nan, np.float16)
    ts.reshape_and_cache(keys[slots], keys[slots], kc, vc, slots, meta, summary="meanstd")
    built = np.full_like(meta, np.nan)
    table = np.arange(pages, dtype=np.int32)[:, None]
    ts.build_page_meta(kc, table, lens, built, summary="meanstd")
    k64 = kc.astype(np.float64)
    want = np.empty(meta.shape, np.float64)
    for page in range(pages):
        page_keys = k64[page, : lens[page]]
        want[page] = np.stack([page_keys.mean(0), page_keys.std(0)], axis=1)
    want = want.astype(np.float16)
    assert want[0, 0, 1, 0] == np.float16(4.98046875)
    np.testing.assert_array_equal(meta, want)
    np.testing.assert_array_equal(built, want)


def check_summaries_follow_the_writes(rng, fw, device, dtype, summary, make_meta, check):
    """A prompt written in one call (tokens in random order, padding slots), decode steps of one
    token per sequence in random sequence order extending pages and starting new ones, then two
    written blocks reused (rewritten from offset 0, offset 0 not first). After every call,
    check(meta, keys_by_block, untouched) with each written page's keys so far (float64, as
    stored in the cache) and the blocks never written. make_meta(shape): the summaries, NaN."""
    block_size, num_kv_heads, head_dim = 8, 2, 16
    prompt = rng.integers(1, 40, size=4)
    steps = 11
    table, num_blocks = random_pages(rng, prompt + steps, block_size)
    kc = empty((num_blocks, block_size, num_kv_heads, head_dim), fw, dtype, device)
    vc = empty((num_blocks, block_size, num_kv_heads, head_dim), fw, dtype, device)
    meta = make_meta((num_blocks, num_kv_heads, 2, head_dim))
    keys_by_block: dict[int, list] = {}

    def write(slots):
        n = len(slots)
        key = rng.standard_normal((n + 2, num_kv_heads, head_dim)) * 3 + 1
        order = rng.permutation(n + 2)
        slot_mapping = np.array(list(slots) + [-1, -1], dtype=np.int64)[order]
        k_dev = asarray(key[order], fw, dtype, device)
        ts.reshape_and_cache(
            k_dev, k_dev, kc, vc, ints(slot_mapping, fw, device), meta, summary=summary
        )
        sync(fw, device)
        rounded = f64(k_dev)
        written = [divmod(int(s), block_size) + (i,) for i, s in enumerate(slot_mapping) if s >= 0]
        for block in {w[0] for w in written}:
            mine = [w for w in written if w[0] == block]
            if any(offset == 0 for _, offset, _ in mine):  # a restart: this call's keys only
                keys_by_block[block] = []
            keys_by_block.setdefault(block, []).extend(rounded[i] for _, _, i in mine)
        check(meta, keys_by_block, set(range(num_blocks)) - set(keys_by_block))

    def slot(s, p):
        return int(table[s, p // block_size]) * block_size + p % block_size

    write([slot(s, p) for s in range(len(prompt)) for p in range(prompt[s])])
    lengths = prompt.copy()
    for _ in range(steps):
        write([slot(s, int(lengths[s])) for s in rng.permutation(len(prompt))])
        lengths += 1
    reused = rng.choice(sorted(keys_by_block), size=2, replace=False)
    write([int(b) * block_size + p for b in reused for p in (2, 0, 1)])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("summary", SUMMARIES)
def test_summaries_follow_the_writes(rng, backend, dtype, summary):
    """check_summaries_follow_the_writes with summaries in the caches' dtype: after every call
    each written page's summary is that of all its keys so far, and no other page is touched."""
    fw, device = device_of(backend)
    require(fw, dtype)
    check_summaries_follow_the_writes(
        rng, fw, device, dtype, summary,
        lambda shape: empty(shape, fw, dtype, device),
        lambda meta, keys, untouched: check_meta(meta, keys, summary, dtype, untouched),
    )  # fmt: skip


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
def test_page_reuse_restarts_the_summary(rng, backend, summary):
    """A full page rewritten from offset 0 (a freed block handed to another sequence) forgets
    its old keys, and the same call's later offsets count, whatever their order."""
    fw, device = device_of(backend)
    block_size, heads, dim = 4, 3, 8
    kc = empty((3, block_size, heads, dim), fw, "float32", device)
    vc = empty((3, block_size, heads, dim), fw, "float32", device)
    meta = empty((3, heads, 2, dim), fw, "float32", device)
    old = (rng.standard_normal((4, heads, dim)) * 10).astype(np.float32)
    ts.reshape_and_cache(
        *(asarray(old, fw, "float32", device),) * 2,
        kc,
        vc,
        ints(np.arange(4, 8), fw, device),
        meta,
        summary=summary,
    )
    new = rng.standard_normal((2, heads, dim)).astype(np.float32)
    ts.reshape_and_cache(
        *(asarray(new, fw, "float32", device),) * 2,
        kc,
        vc,
        ints([5, 4], fw, device),  # offset 1 before offset 0
        meta,
        summary=summary,
    )
    sync(fw, device)
    check_meta(meta, {1: [new[1], new[0]]}, summary, "float32", [0, 2])


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_moves_summaries(rng, backend):
    """page_meta is indexed by block: copy_blocks moves a page's summary with its keys."""
    fw, device = device_of(backend)
    meta_np = rng.standard_normal((6, 2, 2, 8)).astype(np.float32)
    meta = asarray(meta_np, fw, "float32", device)
    ts.copy_blocks(
        [meta],
        ints(np.array([1, 4], np.int32), fw, device),
        ints(np.array([3, 0], np.int32), fw, device),
    )
    sync(fw, device)
    want = meta_np.copy()
    want[[3, 0]] = meta_np[[1, 4]]
    np.testing.assert_array_equal(to_np(meta), want)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_build_page_meta(rng, backend, summary, layout):
    """Summaries built from a filled cache equal the reference of each page's first tokens; a
    block shared by two sequences is built once; blocks of no sequence stay untouched."""
    fw, device = device_of(backend)
    block_size, heads, dim = 16, 2, 32
    case = R.PagedCase(rng, [37, 64, 5, 0], 4, heads, dim, block_size)
    table = case.block_table.copy()
    table = np.vstack([table, table[1:2]])  # a fifth sequence sharing the second's blocks
    lens = np.append(case.seq_lens, 64).astype(np.int32)
    kc, _ = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, layout)
    num_blocks = case.key_cache.shape[0]
    meta = empty((num_blocks, heads, 2, dim), fw, "float32", device)
    ts.build_page_meta(kc, ints(table, fw, device), ints(lens, fw, device), meta, summary=summary)
    sync(fw, device)
    keys = {}
    for b, n in enumerate(lens):
        for p in range(-(-int(n) // block_size)):
            t = min(block_size, int(n) - p * block_size)
            keys[int(table[b, p])] = list(case.key_cache[table[b, p], :t])
    check_meta(meta, keys, summary, "float32", set(range(num_blocks)) - set(keys))


# ---------------------------------------------------------------------------------------------
# select_pages


def integer_case(rng, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size):
    """Small-integer queries and summaries: every score is exact in float32 on any backend, and
    ties are frequent, so the tie-break is exercised."""
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(len(seq_lens), num_q_heads, head_dim)).astype(np.float32)
    a = rng.integers(-3, 4, size=(num_blocks, num_kv_heads, head_dim))
    b = rng.integers(-3, 4, size=(num_blocks, num_kv_heads, head_dim))
    minmax = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=2).astype(np.float32)
    meanstd = np.stack([a, np.abs(b)], axis=2).astype(np.float32)
    return table, query, {"minmax": minmax, "minmax_damped": minmax, "meanstd": meanstd}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
@pytest.mark.parametrize("group_reduce", ["sum", "max"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_select_pages_matches_reference(rng, backend, summary, group_reduce, dtype):
    """Exact page sets, order, padding and lengths against the reference, with sinks, a sequence
    shorter than the budget, an empty one and one of exactly budget pages."""
    fw, device = device_of(backend)
    require(fw, dtype)
    block_size, budget = 4, 6
    seq_lens = np.array([97, 3, 0, 24, 61, 200], dtype=np.int32)
    table, query, metas = integer_case(rng, seq_lens, 8, 2, 16, block_size)
    meta = metas[summary]
    for sinks in (0, 2):
        got_t = empty((len(seq_lens), 2, budget), fw, "int32", device, fill=-7)
        got_l = empty((len(seq_lens), 2), fw, "int32", device, fill=-7)
        out = ts.select_pages(
            asarray(query, fw, dtype, device),
            asarray(meta, fw, dtype, device),
            ints(table, fw, device),
            ints(seq_lens, fw, device),
            budget,
            block_size=block_size,
            num_sink_pages=sinks,
            summary=summary,
            group_reduce=group_reduce,
            out=(got_t, got_l),
        )
        sync(fw, device)
        assert out[0] is got_t and out[1] is got_l
        want_t, want_l = R.select_pages(
            query, meta, table, seq_lens, budget, block_size, sinks, summary, group_reduce
        )
        np.testing.assert_array_equal(to_np(got_t), want_t)
        np.testing.assert_array_equal(to_np(got_l), want_l)
        if summary == "minmax_damped":
            # The same rows scored as Quest's bound keep other pages: the score is live.
            bound_t, _ = R.select_pages(
                query, meta, table, seq_lens, budget, block_size, sinks, "minmax", group_reduce
            )
            assert not np.array_equal(bound_t, want_t)


@pytest.mark.parametrize("backend", backends())
def test_select_pages_random_scores(rng, backend):
    """Continuous random data (no ties): the kept set is the reference's, 200 pages, budget 17."""
    fw, device = device_of(backend)
    block_size = 16
    seq_lens = np.array([3200, 1000, 17], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.standard_normal((3, 12, 64)).astype(np.float32)
    for summary in SUMMARIES:
        meta = rng.standard_normal((num_blocks, 4, 2, 64)).astype(np.float32)
        if summary in R.MINMAX_SUMMARIES:
            meta.sort(axis=2)
        else:
            meta[:, :, 1] = np.abs(meta[:, :, 1])
        got_t, got_l = ts.select_pages(
            asarray(query, fw, "float32", device),
            asarray(meta, fw, "float32", device),
            ints(table, fw, device),
            ints(seq_lens, fw, device),
            17,
            block_size=block_size,
            summary=summary,
        )
        want_t, want_l = R.select_pages(
            query, meta, table, seq_lens, 17, block_size, 0, summary, "sum"
        )
        np.testing.assert_array_equal(to_np(got_t), want_t)
        np.testing.assert_array_equal(to_np(got_l), want_l)


@pytest.mark.parametrize("backend", backends())
def test_nan_scores_count_as_minus_infinity(backend):
    """A page scoring NaN (0 * inf in an infinite summary) ties with one scoring minus infinity
    (the lower page kept); under group_reduce="max" a head scoring NaN is left out, so the order
    of a group's query heads does not matter."""
    fw, device = device_of(backend)
    table = ints(np.array([[0, 1, 2, 3]], np.int32), fw, device)
    lens = ints(np.array([4], np.int32), fw, device)

    def select(query, meta, group_reduce):
        got, _ = ts.select_pages(
            asarray(np.array([query], np.float32), fw, "float32", device),
            asarray(meta, fw, "float32", device),
            table,
            lens,
            3,
            block_size=1,
            num_sink_pages=1,
            summary="minmax",
            group_reduce=group_reduce,
        )
        return to_np(got).tolist()

    meta = np.zeros((4, 1, 2, 2), np.float32)
    meta[1, 0, :, 1] = [-np.inf, np.inf]  # q_1 = 0: NaN
    meta[2, 0, :, 0] = [-np.inf, -np.inf]  # q_0 = 1: minus infinity
    for reduce in ("sum", "max"):
        assert select([[1.0, 0.0]], meta, reduce) == [[[0, 1, 3]]]
    meta[2, 0, :, 0] = [-5.0, -5.0]
    assert select([[1.0, 0.0]], meta, "sum") == [[[0, 2, 3]]]  # NaN under -5
    # Page 1: NaN for the first head, +inf for the second; the maximum is +inf either way.
    for heads in ([[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]):
        assert select(heads, meta, "max") == [[[0, 1, 3]]]


def quest_bound_selection(query, keys_by_page, block_table, seq_lens, budget, block_size):
    """DESIGN.md's default selection, written out on its own in float64: per KV head, Quest's
    bound sum_d max(q_d * min_d, q_d * max_d) over each page's keys, summed over the group's
    query heads; the last page kept, then the budget's other pages of highest bound (the lower
    logical page on ties), in logical order. keys_by_page[block]: [n, Hkv, D] keys."""
    q = np.asarray(query, np.float64)
    batch, num_q_heads, _ = q.shape
    num_kv_heads = next(iter(keys_by_page.values())).shape[1]
    group = num_q_heads // num_kv_heads
    table = np.full((batch, num_kv_heads, budget), -1, np.int64)
    lens = np.zeros((batch, num_kv_heads), np.int64)
    for b in range(batch):
        length = int(seq_lens[b])
        pages = -(-length // block_size)
        for h in range(num_kv_heads):
            if pages <= budget:
                table[b, h, :pages] = block_table[b, :pages]
                lens[b, h] = length
                continue
            bound = []
            for p in range(pages - 1):
                k = np.asarray(keys_by_page[int(block_table[b, p])][:, h], np.float64)
                lo, hi = k.min(0), k.max(0)
                qg = q[b, h * group : (h + 1) * group]
                bound.append(np.maximum(qg * lo, qg * hi).sum())
            order = sorted(range(pages - 1), key=lambda p: (-bound[p], p))
            kept = sorted(order[: budget - 1]) + [pages - 1]
            table[b, h] = block_table[b, kept]
            lens[b, h] = (budget - 1) * block_size + length - (pages - 1) * block_size
    return table, lens


def spread_and_centre_case(rng, seq_lens, block_size, kv_heads, group, dim, budget, dtype):
    """Keys whose pages differ in centre and in spread (so Quest's bound, the damped score and
    mean/std rank them differently), a third of the pages exact copies of four others (so
    scores tie). Returns (table, num_blocks, query, keys [num_blocks, block_size, Hkv, D],
    keys_by_page {block: the page's written keys}, the bound's selection)."""
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    centre = rng.standard_normal((num_blocks, 1, kv_heads, dim))
    centre *= rng.uniform(0, 5, size=(num_blocks, 1, kv_heads, 1))
    spread = rng.uniform(0.2, 2, size=(num_blocks, 1, kv_heads, 1))
    keys = centre + spread * rng.standard_normal((num_blocks, block_size, kv_heads, dim))
    pool = keys[rng.integers(0, num_blocks, size=4)]
    copies = rng.random(num_blocks) < 0.3
    keys[copies] = pool[rng.integers(0, len(pool), size=int(copies.sum()))]
    keys = keys.astype(dtype)
    query = rng.standard_normal((len(seq_lens), kv_heads * group, dim)).astype(dtype)
    keys_by_page = {}
    for b, length in enumerate(seq_lens):
        for p in range(-(-int(length) // block_size)):
            block = int(table[b, p])
            keys_by_page[block] = keys[block, : min(block_size, int(length) - p * block_size)]
    want = quest_bound_selection(query, keys_by_page, table, seq_lens, budget, block_size)
    return table, num_blocks, query, keys, keys_by_page, want


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_default_selection_is_quests_bound(rng, backend, dtype):
    """The defaults are DESIGN.md's: reshape_and_cache(page_meta=...) and select_pages called
    with no summary or group_reduce keep exactly the pages of Quest's bound over the keys'
    min/max with the GQA group's scores summed (an independent float64 model above), ties to
    the lower logical page. The data is drawn until the damped and mean/std scores keep other
    pages than the bound, so a default of either fails the check."""
    fw, device = device_of(backend)
    block_size, kv_heads, group, dim, budget = 8, 3, 3, 32, 7
    for _ in range(20):
        seq_lens = np.array(
            [rng.integers(300, 500), rng.integers(60, 120), budget * block_size - 3], np.int32
        )
        table, num_blocks, query, keys, keys_by_page, (want_t, want_l) = spread_and_centre_case(
            rng, seq_lens, block_size, kv_heads, group, dim, budget, dtype
        )
        others = []
        for other in ("minmax_damped", "meanstd"):
            other_meta = np.zeros((num_blocks, kv_heads, 2, dim))
            for block, page_keys in keys_by_page.items():
                other_meta[block] = R.page_summary(page_keys, other)
            other_t, _ = R.select_pages(
                query, other_meta, table, seq_lens, budget, block_size, 0, other, "sum"
            )
            others.append(other_t)
        if not any(np.array_equal(other_t, want_t) for other_t in others):
            break
    else:
        pytest.fail("no draw in 20 where the scorings keep different pages")
    kc = empty((num_blocks, block_size, kv_heads, dim), fw, dtype, device)
    vc = empty((num_blocks, block_size, kv_heads, dim), fw, dtype, device)
    meta = empty((num_blocks, kv_heads, 2, dim), fw, dtype, device)
    slots = np.array(
        [b * block_size + i for b, k in keys_by_page.items() for i in range(len(k))], np.int64
    )
    written = np.concatenate(list(keys_by_page.values()))
    order = rng.permutation(len(slots))  # any order within the call
    k = asarray(written[order], fw, dtype, device)
    ts.reshape_and_cache(k, k, kc, vc, ints(slots[order], fw, device), meta)
    got_t, got_l = ts.select_pages(
        asarray(query, fw, dtype, device),
        meta,
        ints(table, fw, device),
        ints(seq_lens, fw, device),
        budget,
        block_size=block_size,
    )
    np.testing.assert_array_equal(to_np(got_t), want_t)
    np.testing.assert_array_equal(to_np(got_l), want_l)


@pytest.mark.parametrize("backend", backends())
def test_hits_count_every_kept_block(rng, backend):
    fw, device = device_of(backend)
    seq_lens = np.array([50, 9, 33], dtype=np.int32)
    table, query, metas = integer_case(rng, seq_lens, 4, 2, 8, 4)
    start = rng.integers(0, 5, size=metas["minmax"].shape[0]).astype(np.int32)
    hits = ints(start.copy(), fw, device)
    got_t, _ = ts.select_pages(
        asarray(query, fw, "float32", device),
        asarray(metas["minmax"], fw, "float32", device),
        ints(table, fw, device),
        ints(seq_lens, fw, device),
        5,
        block_size=4,
        summary="minmax",
        hits=hits,
    )
    kept = to_np(got_t).ravel()
    want = start + np.bincount(kept[kept >= 0], minlength=len(start))
    np.testing.assert_array_equal(to_np(hits), want)


def check_planted_needle(rng, fw, device, summary, make_meta):
    """One key in a long sequence points along the query; with summaries written by
    reshape_and_cache into `make_meta(shape)`, a 4-page budget keeps that key's page for every
    KV head, and sparse decode over the kept pages equals the float64 reference over them."""
    block_size, heads, dim, length = 16, 2, 64, 4000
    table, num_blocks = random_pages(rng, [length], block_size)
    keys = rng.standard_normal((length, heads, dim)).astype(np.float32)
    query = rng.standard_normal((1, 2 * heads, dim)).astype(np.float32)
    needle = int(rng.integers(0, length - block_size))
    for h in range(heads):
        direction = query[0, 2 * h] + query[0, 2 * h + 1]
        keys[needle, h] = 4 * direction / np.linalg.norm(direction) * np.sqrt(dim)
    kc = empty((num_blocks, block_size, heads, dim), fw, "float32", device)
    vc = empty((num_blocks, block_size, heads, dim), fw, "float32", device)
    meta = make_meta((num_blocks, heads, 2, dim))
    pos = np.arange(length)
    slots = table[0, pos // block_size].astype(np.int64) * block_size + pos % block_size
    k = asarray(keys, fw, "float32", device)
    ts.reshape_and_cache(k, k, kc, vc, ints(slots, fw, device), meta, summary=summary)
    q = asarray(query, fw, "float32", device)
    got_t, got_l = ts.select_pages(
        q,
        meta,
        ints(table, fw, device),
        ints(np.array([length], np.int32), fw, device),
        4,
        block_size=block_size,
        summary=summary,
    )
    out = ts.paged_attention(q, kc, vc, got_t, got_l)
    sync(fw, device)
    for h in range(heads):
        assert table[0, needle // block_size] in to_np(got_t)[0, h]
    want = R.paged_attention_per_kv_head(query, f64(kc), f64(vc), to_np(got_t), to_np(got_l))
    assert R.rel_error(f64(out), want) < TOLERANCE["float32"]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
def test_planted_needle_is_found(rng, backend, summary):
    fw, device = device_of(backend)
    check_planted_needle(
        rng, fw, device, summary, lambda shape: empty(shape, fw, "float32", device)
    )


# ---------------------------------------------------------------------------------------------
# Sparse decode


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND_combined"])
def test_per_head_tables_match_reference(rng, backend, dtype, layout):
    """Each KV head reads its own random page list and length (empty and partial ones too)."""
    fw, device = device_of(backend)
    require(fw, dtype)
    block_size, heads, group, dim = 16, 4, 3, 64
    batch, num_blocks, width = 3, 40, 9
    case = R.PagedCase(rng, [num_blocks * block_size - 3 * block_size], 1, heads, dim, block_size)
    key_cache = rng.standard_normal((num_blocks, block_size, heads, dim)).astype(np.float32)
    value_cache = rng.standard_normal((num_blocks, block_size, heads, dim)).astype(np.float32)
    del case
    table = np.stack(
        [[rng.permutation(num_blocks)[:width] for _ in range(heads)] for _ in range(batch)]
    ).astype(np.int32)
    lens = rng.integers(0, width * block_size + 1, size=(batch, heads)).astype(np.int32)
    lens[0, 0] = 0
    query = rng.standard_normal((batch, heads * group, dim)).astype(np.float32)
    kc, vc = cache_pair(key_cache, value_cache, fw, dtype, device, layout)
    q = asarray(query, fw, dtype, device)
    for splits in (1, 3):
        out = empty(query.shape, fw, dtype, device)
        ts.paged_attention(
            q, kc, vc, ints(table, fw, device), ints(lens, fw, device), out, num_splits=splits
        )
        sync(fw, device)
        want = R.paged_attention_per_kv_head(f64(q), f64(kc), f64(vc), table, lens)
        assert R.rel_error(f64(out), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("summary", SUMMARIES)
def test_full_budget_equals_dense(rng, backend, summary):
    """A budget covering every page: select_pages returns the dense table per head, and sparse
    decode over it gives dense decode's output."""
    fw, device = device_of(backend)
    block_size, heads, dim = 16, 2, 64
    case = R.PagedCase(rng, [300, 17, 1, 256], 6, heads, dim, block_size)
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "NHD")
    num_blocks = case.key_cache.shape[0]
    meta = empty((num_blocks, heads, 2, dim), fw, "float32", device)
    table, lens = ints(case.block_table, fw, device), ints(case.seq_lens, fw, device)
    ts.build_page_meta(kc, table, lens, meta, summary=summary)
    q = asarray(case.query, fw, "float32", device)
    sparse_t, sparse_l = ts.select_pages(
        q, meta, table, lens, 19, block_size=block_size, summary=summary
    )
    dense = ts.paged_attention(q, kc, vc, table, lens, num_splits=1)
    sparse = ts.paged_attention(q, kc, vc, sparse_t, sparse_l, num_splits=1)
    np.testing.assert_array_equal(to_np(sparse_l), np.repeat(case.seq_lens[:, None], heads, 1))
    np.testing.assert_allclose(f64(sparse), f64(dense), rtol=1e-6, atol=1e-6)
    ref, _ = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    assert R.rel_error(f64(sparse), ref) < TOLERANCE["float32"]


@pytest.mark.parametrize("backend", backends())
def test_select_then_sparse_decode(rng, backend):
    """select_pages' output fed to paged_attention equals the reference over the kept pages."""
    fw, device = device_of(backend)
    block_size, heads, dim = 16, 2, 32
    case = R.PagedCase(rng, [900, 123, 40], 8, heads, dim, block_size)
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "HND")
    meta = empty((case.key_cache.shape[0], heads, 2, dim), fw, "float32", device)
    table, lens = ints(case.block_table, fw, device), ints(case.seq_lens, fw, device)
    ts.build_page_meta(kc, table, lens, meta)
    q = asarray(case.query, fw, "float32", device)
    sparse_t, sparse_l = ts.select_pages(q, meta, table, lens, 5, block_size=block_size)
    out = ts.paged_attention(q, kc, vc, sparse_t, sparse_l)
    want = R.paged_attention_per_kv_head(
        case.query, case.key_cache, case.value_cache, to_np(sparse_t), to_np(sparse_l)
    )
    assert R.rel_error(f64(out), want) < TOLERANCE["float32"]


# ---------------------------------------------------------------------------------------------
# Bad input: rejected before anything is written


def _select_args(fw="numpy", device="cpu"):
    rng = np.random.default_rng(0)
    seq_lens = np.array([40, 7], dtype=np.int32)
    table, query, metas = integer_case(rng, seq_lens, 4, 2, 8, 4)
    return (
        asarray(query, fw, "float32", device),
        asarray(metas["minmax"], fw, "float32", device),
        ints(table, fw, device),
        ints(seq_lens, fw, device),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(budget=0), "budget must be at least 1 page, got 0"),
        (dict(budget=-3), "budget must be at least 1 page, got -3"),
        (dict(num_sink_pages=3), "budget must exceed num_sink_pages"),
        (dict(num_sink_pages=-1), "num_sink_pages must be >= 0"),
        (dict(block_size=0), "block_size must be in [1, 1048576], got 0"),
        (dict(meta_shape=(10, 2, 3, 8)), "page_meta must have the shape"),
        (dict(meta_shape=(10, 2, 2, 9)), "page_meta must have the shape"),
        (dict(meta_shape=(10, 2, 2)), "page_meta must have 4 dimensions"),
        (dict(meta_dtype="float16"), "page_meta must have the dtype of query (float32)"),
        (dict(summary="mean"), "summary must be 'minmax', 'minmax_damped' or 'meanstd'"),
        (dict(group_reduce="avg"), "group_reduce must be 'sum' or 'max'"),
        (dict(seq_len=41), "seq_lens[0] must be in [0, "),
        (dict(table_value=99), "block_table[0, 1] must be a block id"),
        (dict(hits_len=3), "hits dimension 0 (num_blocks of page_meta)"),
        (dict(meta_shape=(10, 0, 2, 8)), "page_meta's num_kv_heads must be positive, got shape"),
    ],
)
def test_select_pages_rejects_bad_input(change, message):
    query, meta, table, seq_lens = _select_args()
    budget = change.get("budget", 3)
    if "meta_shape" in change:
        meta = np.zeros(change["meta_shape"], np.float32)
    if "meta_dtype" in change:
        meta = meta.astype(change["meta_dtype"])
    if "seq_len" in change:
        seq_lens[0] = table.shape[1] * 4 + 1
    if "table_value" in change:
        table[0, 1] = 99
    hits = np.zeros(change.get("hits_len", meta.shape[0]), np.int32)
    out_t = np.full((2, 2, max(budget, 1)), -7, np.int32)
    out_l = np.full((2, 2), -7, np.int32)
    with pytest.raises(ValueError) as info:
        ts.select_pages(
            query,
            meta,
            table,
            seq_lens,
            budget,
            block_size=change.get("block_size", 4),
            num_sink_pages=change.get("num_sink_pages", 0),
            summary=change.get("summary", "minmax"),
            group_reduce=change.get("group_reduce", "sum"),
            hits=hits,
            out=(out_t, out_l) if budget >= 1 else None,
        )
    assert str(info.value).startswith("tinyserve.select_pages: ")
    assert message in str(info.value)
    assert (out_t == -7).all() and (out_l == -7).all() and (hits == 0).all()


@pytest.mark.parametrize(
    "meta_shape, meta_dtype, message",
    [
        ((10, 2, 2, 8), "float16", "page_meta must have the dtype of query (float32)"),
        ((10, 2, 2, 8), "int32", "page_meta must have the dtype of query (float32)"),
        ((10, 2, 3, 8), "float32", "page_meta must have the shape"),
        ((10, 2, 2, 9), "float32", "page_meta must have the shape"),
        ((10, 3, 2, 8), "float32", "num_q_heads must be a positive multiple of num_kv_heads"),
    ],
)
def test_select_pages_workspace_bytes_rejects_bad_summaries(meta_shape, meta_dtype, message):
    """The workspace size query checks the summaries as select_pages does: a size is never
    returned for summaries select_pages would refuse."""
    query, _, table, _ = _select_args()
    meta = np.zeros(meta_shape, meta_dtype)
    with pytest.raises(ValueError) as info:
        ts.select_pages_workspace_bytes(query, meta, table)
    assert str(info.value).startswith("tinyserve.select_pages_workspace_bytes: ")
    assert message in str(info.value)
    good = np.zeros((10, 2, 2, 8), np.float32)
    assert ts.select_pages_workspace_bytes(query, good, table) == 0  # host arrays: no scratch


def test_select_pages_workspace_bytes_takes_numpy_float8_summaries():
    """NumPy float8 summaries (ml_dtypes), as select_pages takes them: a size, no refusal."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    query, _, table, _ = _select_args()
    fp8 = np.zeros((10, 2, 2, 8), ml_dtypes.float8_e4m3fn)
    assert ts.select_pages_workspace_bytes(query, fp8, table) == 0


@pytest.mark.parametrize(
    "meta_shape, meta_dtype, message",
    [
        ((5, 2, 2, 8), "float32", "page_meta must have the shape [6, 2, 2, 8]"),
        ((6, 3, 2, 8), "float32", "page_meta must have the shape [6, 2, 2, 8]"),
        ((6, 2, 2, 8), "float16", "page_meta must have the dtype of the key cache (float32)"),
    ],
)
@pytest.mark.parametrize("op", ["reshape_and_cache", "build_page_meta"])
def test_summary_writers_reject_bad_meta(rng, meta_shape, meta_dtype, message, op):
    kc = np.full((6, 4, 2, 8), np.nan, np.float32)
    vc = kc.copy()
    meta = np.full(meta_shape, np.nan, meta_dtype)
    key = rng.standard_normal((3, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"^tinyserve\.{op}: ") as info:
        if op == "reshape_and_cache":
            ts.reshape_and_cache(key, key, kc, vc, np.array([0, 1, 2], np.int64), meta)
        else:
            kc[:] = 0
            ts.build_page_meta(kc, np.array([[0, 1]], np.int32), np.array([7], np.int32), meta)
    assert message in str(info.value)
    assert np.isnan(meta).all()
    if op == "reshape_and_cache":
        assert np.isnan(kc).all() and np.isnan(vc).all()


def test_bad_summary_name_writes_nothing(rng):
    kc = np.full((6, 4, 2, 8), np.nan, np.float32)
    vc = kc.copy()
    meta = np.full((6, 2, 2, 8), np.nan, np.float32)
    key = rng.standard_normal((1, 2, 8)).astype(np.float32)
    with pytest.raises(
        ValueError, match="summary must be 'minmax', 'minmax_damped' or 'meanstd', got 'max'"
    ):
        ts.reshape_and_cache(key, key, kc, vc, np.array([0], np.int64), meta, summary="max")
    assert np.isnan(kc).all() and np.isnan(meta).all()


@pytest.mark.parametrize(
    "change, message",
    [
        ("lens_1d", "seq_lens must have 2 dimensions"),
        ("heads", "block_table dimension 1 (num_kv_heads of the caches) must be 2, got 3"),
        ("window", "window_left must be -1, got 4"),
        ("bad_id", "block_table[1, 0, 2] must be a block id"),
        ("bad_len", "seq_lens[0, 1] must be in [0, 48]"),
        (
            "prefill",
            "a per-KV-head block_table is for decode: query_start_loc must be None, got one",
        ),
    ],
)
def test_per_head_tables_reject_bad_input(rng, change, message):
    kc = rng.standard_normal((6, 16, 2, 8)).astype(np.float32)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    table = np.zeros((2, 2, 3), np.int32)
    lens = np.full((2, 2), 40, np.int32)
    window = -1
    if change == "lens_1d":
        lens = lens[:, 0].copy()
    elif change == "heads":
        table = np.zeros((2, 3, 3), np.int32)
    elif change == "window":
        window = 4
    elif change == "bad_id":
        table[1, 0, 2] = 6
    elif change == "bad_len":
        lens[0, 1] = 49
    starts = np.array([0, 1, 2], np.int32) if change == "prefill" else None
    out = np.full_like(q, np.nan)
    with pytest.raises(ValueError, match=r"^tinyserve\.paged_attention: ") as info:
        ts.paged_attention(q, kc, kc, table, lens, out, window_left=window, query_start_loc=starts)
    assert message in str(info.value)
    assert np.isnan(out).all()


def test_readme_sparse_example_runs():
    """The README's sparse-decode example, as written: 32 pages per KV head, the last page last,
    and an output that matches the float64 reference over those pages."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "select_pages" in b
    )
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    pages, tokens = scope["pages"], scope["tokens"]
    assert pages.shape == (1, 2, 32) and (pages[0, :, -1] == 187).all()
    np.testing.assert_array_equal(tokens, [[31 * 16 + 3000 - 187 * 16] * 2])
    want = R.paged_attention_per_kv_head(
        scope["query"], scope["k_cache"], scope["v_cache"], pages, tokens
    )
    assert R.rel_error(scope["out"], want) < TOLERANCE["float32"]


@pytest.mark.cuda
@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_select_pages_in_a_cuda_graph(rng):
    """select_pages with out= and workspace= captured once; replays after the query and the
    lengths change in place give the reference's pages (device-resident lengths, fixed grid)."""
    block_size, budget = 16, 8
    seq_lens = np.array([1000, 300, 90], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens + 200, block_size)
    meta = rng.standard_normal((num_blocks, 2, 2, 32)).astype(np.float32)
    meta[:, :, 1] = np.abs(meta[:, :, 1])
    query = rng.standard_normal((3, 4, 32)).astype(np.float32)
    q, m = asarray(query, "torch", "float32", "cuda"), asarray(meta, "torch", "float32", "cuda")
    t, lens = ints(table, "torch", "cuda"), ints(seq_lens, "torch", "cuda")
    out = (
        torch.empty((3, 2, budget), dtype=torch.int32, device="cuda"),
        torch.empty((3, 2), dtype=torch.int32, device="cuda"),
    )
    ws = torch.empty(ts.select_pages_workspace_bytes(q, m, t), dtype=torch.uint8, device="cuda")

    def select():
        ts.select_pages(
            q, m, t, lens, budget, block_size=block_size, summary="meanstd", out=out, workspace=ws
        )

    select()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select()
    for step in range(3):
        query = rng.standard_normal((3, 4, 32)).astype(np.float32)
        q.copy_(torch.from_numpy(query))
        lens.add_(67 * step)
        graph.replay()
        torch.cuda.synchronize()
        want_t, want_l = R.select_pages(
            query, meta, table, to_np(lens), budget, block_size, 0, "meanstd", "sum"
        )
        np.testing.assert_array_equal(to_np(out[0]), want_t)
        np.testing.assert_array_equal(to_np(out[1]), want_l)


def test_select_pages_size_limits():
    """The CUDA grids' and shared memory's limits, checked alike on every backend."""
    meta = np.zeros((4, 1, 2, 8), np.float32)
    batch = 65536
    query = np.zeros((batch, 1, 8), np.float32)
    table = np.zeros((batch, 1), np.int32)
    lens = np.zeros(batch, np.int32)
    with pytest.raises(ValueError, match="batch must be at most 65535, got 65536"):
        ts.select_pages(query, meta, table, lens, 1, block_size=4)
    wide = np.zeros((1, 2, 16385), np.float32)
    with pytest.raises(ValueError, match="num_q_heads \\* head_dim must be at most 32768"):
        ts.select_pages(
            wide, np.zeros((4, 1, 2, 16385), np.float32), table[:1], lens[:1], 1, block_size=4
        )


def _int32_view(shape):
    """An int32 view of `shape` (last dimension contiguous, others stride 0) over an anonymous
    mapping that reserves no memory."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    base = np.frombuffer(mmap.mmap(-1, shape[-1] * 4, flags=flags), np.int32)
    return np.lib.stride_tricks.as_strided(base, shape, [0] * (len(shape) - 1) + [4])


@pytest.mark.parametrize(
    "batch, max_blocks, message",
    [
        (1, 2**24 + 1, "max_blocks must be at most 16777216, got 16777217"),
        (2**24 + 1, 1, "sizes must fit 32-bit indexing, got query [16777217, 2, 8]"),
    ],
    ids=["max_blocks", "batch"],
)
def test_select_pages_sizes_beyond_the_kernel_limits(batch, max_blocks, message):
    query = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (batch, 2, 8), (0, 0, 4))
    meta = np.zeros((4, 1, 2, 8), np.float32)
    table = _int32_view((batch, max_blocks))
    lens = np.lib.stride_tricks.as_strided(np.zeros(1, np.int32), (batch,), (0,))
    out_t = np.full((1, 1, 2), -7, np.int32)
    out_l = np.full((1, 1), -7, np.int32)
    with pytest.raises(ValueError) as info:
        ts.select_pages(query, meta, table, lens, 2, block_size=4, out=(out_t, out_l))
    assert str(info.value).startswith("tinyserve.select_pages: ")
    assert message in str(info.value)
    assert (out_t == -7).all() and (out_l == -7).all()


def test_select_pages_outputs_share_memory_with_nothing():
    """Every output is refused when it overlaps an input or another output, before anything is
    written (on the CPU the workspace is not used, so it is not checked)."""
    query, meta, table, seq_lens = _select_args()
    cases = []
    # table inside block_table
    block_table = np.zeros(64, np.int32)
    block_table[:22] = table.reshape(-1)
    bt = block_table[:22].reshape(2, 11)
    cases.append((bt, block_table[:12].reshape(2, 2, 3), None, None, "table and block_table"))
    # lens inside table
    buf = np.full(16, -7, np.int32)
    cases.append(
        (table, buf[:12].reshape(2, 2, 3), buf[8:12].reshape(2, 2), None, "table and lens")
    )
    # hits over the query's memory
    hits = query.view(np.int32).reshape(-1)[:16]
    cases.append((table, None, None, hits, "hits and query"))
    for bt, out_t, out_l, hits, pair in cases:
        out_t = np.full((2, 2, 3), -7, np.int32) if out_t is None else out_t
        out_l = np.full((2, 2), -7, np.int32) if out_l is None else out_l
        watched = [a.copy() for a in (bt, out_t, out_l, query)]
        with pytest.raises(ValueError) as info:
            ts.select_pages(
                query, meta, bt, seq_lens, 3, block_size=4, hits=hits, out=(out_t, out_l)
            )
        assert str(info.value).startswith(f"tinyserve.select_pages: {pair} must not share memory")
        for a, before in zip((bt, out_t, out_l, query), watched):
            np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("shape", ["one array", "1-tuple", "3-tuple"])
def test_select_pages_out_must_be_a_pair(shape):
    """out= other than a (table, lens) pair is named in the contract's format (one array would
    otherwise be unpacked into its rows), and nothing is written."""
    query, meta, table, seq_lens = _select_args()
    hits = np.full(meta.shape[0], -7, np.int32)
    out_t = np.full((2, 2, 3), -7, np.int32)
    out_l = np.full((2, 2), -7, np.int32)
    out = {"one array": out_t[:2], "1-tuple": (out_t,), "3-tuple": (out_t, out_l, out_l)}[shape]
    with pytest.raises(TypeError) as info:
        ts.select_pages(query, meta, table, seq_lens, 3, block_size=4, hits=hits, out=out)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(
        "tinyserve.select_pages: out must be None or a (table, lens) pair of arrays, got "
    )
    assert (out_t == -7).all() and (out_l == -7).all() and (hits == -7).all()


def test_build_page_meta_output_shares_memory_with_no_input(rng):
    kc = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    table = np.zeros((1, 2), np.int32)
    lens = np.array([7], np.int32)
    inside_keys = kc.reshape(-1)[:192].reshape(6, 2, 2, 8)
    ids = np.zeros(192, np.int32)
    inside_table = ids.view(np.float32).reshape(6, 2, 2, 8)
    for meta, bt, name in (
        (inside_keys, table, "key_cache"),
        (inside_table, ids[:2][None], "block_table"),
    ):
        before = kc.copy(), ids.copy()
        with pytest.raises(ValueError) as info:
            ts.build_page_meta(kc, bt, lens, meta)
        assert str(info.value).startswith(
            f"tinyserve.build_page_meta: page_meta and {name} must not share memory"
        )
        np.testing.assert_array_equal(kc, before[0])
        np.testing.assert_array_equal(ids, before[1])
