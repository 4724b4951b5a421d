"""DESIGN.md §2, §3 and §6 read as an outside tester would: every behaviour the text states,
checked on inputs that are legal but odd (empty batches, empty sequences, page size 1, HND and
fused K/V through strides, negative strides, non-contiguous arguments), against a float64 model
written straight from the text (independent of reference.py). Outputs are poisoned with NaN."""

from __future__ import annotations

import numpy as np
import pytest
from test_errors import OnDevice

import tinyserve as ts

# --- The model: DESIGN.md §3 in float64 ------------------------------------------------------


def tokens_of(cache, row, length):
    """A sequence's first `length` rows of `cache` [N, block_size, H, D], through its table row."""
    block_size = cache.shape[1]
    t = np.arange(length)
    return np.asarray(cache, np.float64)[np.asarray(row)[t // block_size], t % block_size]


def attend(q, k, v, position, scale, window, cap):
    """One query row [Hq, D] at `position` over keys/values [L, Hkv, D] (GQA groups)."""
    num_q_heads = q.shape[0]
    group = num_q_heads // k.shape[1]
    first = 0 if window < 0 else max(0, position - window)
    out = np.zeros(q.shape)
    lse = np.full(num_q_heads, -np.inf)
    if position < first:
        return out, lse
    for h in range(num_q_heads):
        s = k[first : position + 1, h // group] @ q[h] * scale
        if cap > 0:
            s = cap * np.tanh(s / cap)
        m = s.max()
        e = np.exp(s - m)
        out[h] = e @ v[first : position + 1, h // group] / e.sum()
        lse[h] = m + np.log(e.sum())
    return out, lse


def model_attention(q, kc, vc, table, lens, qsl=None, scale=None, window=-1, cap=0.0):
    q = np.asarray(q, np.float64)
    scale = 1 / np.sqrt(q.shape[2]) if scale is None else scale
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    table, lens = np.asarray(table), np.asarray(lens)
    for b in range(len(lens)):
        if table.ndim == 3:  # one page list per KV head, decode
            group = q.shape[1] // table.shape[1]
            for kvh in range(table.shape[1]):
                n = int(lens[b, kvh])
                heads = slice(kvh * group, (kvh + 1) * group)
                k = tokens_of(kc, table[b, kvh], n)[:, kvh : kvh + 1]
                v = tokens_of(vc, table[b, kvh], n)[:, kvh : kvh + 1]
                out[b, heads], lse[b, heads] = attend(q[b, heads], k, v, n - 1, scale, window, cap)
            continue
        n = int(lens[b])
        rows = [b] if qsl is None else range(int(qsl[b]), int(qsl[b + 1]))
        k, v = tokens_of(kc, table[b], n), tokens_of(vc, table[b], n)
        for i, r in enumerate(rows):
            out[r], lse[r] = attend(q[r], k, v, n - len(rows) + i, scale, window, cap)
    return out, lse


def model_select(q, meta, table, lens, budget, block_size, sinks):
    """Pages per (sequence, KV head): all when they fit, else the sinks, the best by Quest's
    bound summed over the GQA group (ties: lower page), and the last page, in logical order."""
    q, meta = np.asarray(q, np.float64), np.asarray(meta, np.float64)
    batch, num_q_heads, _ = q.shape
    num_kv_heads = meta.shape[1]
    group = num_q_heads // num_kv_heads
    chosen = [[None] * num_kv_heads for _ in range(batch)]
    out_lens = np.zeros((batch, num_kv_heads), np.int64)
    for b in range(batch):
        n = int(lens[b])
        pages = -(-n // block_size)
        for h in range(num_kv_heads):
            if pages <= budget:
                chosen[b][h] = list(table[b, :pages])
                out_lens[b, h] = n
                continue
            qg = q[b, h * group : (h + 1) * group]  # [group, D]
            candidates = range(sinks, pages - 1)
            scores = [
                np.maximum(qg * meta[table[b, p], h, 0], qg * meta[table[b, p], h, 1]).sum()
                for p in candidates
            ]
            ranked = [p for _, p in sorted(zip((-x for x in scores), candidates))]
            keep = sorted(ranked[: budget - sinks - 1])
            chosen[b][h] = list(table[b, list(range(sinks)) + keep + [pages - 1]])
            out_lens[b, h] = (budget - 1) * block_size + n - (pages - 1) * block_size
    return chosen, out_lens


# --- Arrays laid out as a user may pass them --------------------------------------------------


def kv_caches(rng, layout, num_blocks, block_size, heads, dim, dtype=np.float32):
    """(key_cache, value_cache) of logical shape [N, block_size, H, D] in `layout`."""
    if layout == "HND":
        shape = (num_blocks, heads, block_size, dim)
        k, v = (rng.standard_normal(shape).astype(dtype).transpose(0, 2, 1, 3) for _ in range(2))
        return k, v
    if layout == "fused":  # K and V as two views of one [N, 2, ...] tensor
        both = rng.standard_normal((num_blocks, 2, block_size, heads, dim)).astype(dtype)
        return both[:, 0], both[:, 1]
    if layout == "reversed":  # negative block strides
        shape = (num_blocks, block_size, heads, dim)
        k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        return k[::-1], v[:, ::-1]
    shape = (num_blocks, block_size, heads, dim)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def block_table(rng, batch, num_blocks, max_blocks):
    rows = [rng.permutation(num_blocks)[:max_blocks] for _ in range(batch)]
    return np.array(rows, np.int32).reshape(batch, max_blocks)


def poisoned(shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype)


# --- paged_attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND", "fused", "reversed"])
@pytest.mark.parametrize(
    "block_size,lens,options",
    [
        (4, [9, 0, 12, 1], {}),
        (1, [7, 3, 0], {"window_left": 2}),
        (4, [12, 5, 1], {"window_left": 0, "scale": 0.7}),
        (4, [10, 11], {"logits_soft_cap": 1.5, "scale": 2.0}),
        (4, [], {}),
        (4, [0, 0], {}),
    ],
    ids=["mixed", "page1-window", "window0", "softcap", "B0", "all-empty"],
)
def test_decode_matches_the_model_on_odd_legal_inputs(rng, layout, block_size, lens, options):
    num_kv_heads, num_q_heads, dim, max_blocks = 2, 6, 16, 12 // block_size
    kc, vc = kv_caches(rng, layout, 16, block_size, num_kv_heads, dim)
    # The query strided over heads (every other row of a wider array): not contiguous.
    q = rng.standard_normal((len(lens), 2 * num_q_heads, dim)).astype(np.float32)[:, ::2]
    table = block_table(rng, len(lens), 16, max_blocks)
    seq_lens = np.array(lens, np.int32)
    out, lse = poisoned(q.shape), poisoned(q.shape[:2])
    result = ts.paged_attention(q, kc, vc, table, seq_lens, out, lse=lse, **options)
    assert result is out
    want_out, want_lse = model_attention(
        q,
        kc,
        vc,
        table,
        seq_lens,
        scale=options.get("scale"),
        window=options.get("window_left", -1),
        cap=options.get("logits_soft_cap", 0.0),
    )
    np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "rows,lens,window",
    [
        ([3, 1, 0, 5], [10, 7, 4, 5], -1),
        ([3, 1, 0, 5], [10, 7, 4, 5], 2),
        ([0, 2], [0, 2], -1),
        ([0, 0], [3, 0], -1),
        ([], [], -1),
    ],
    ids=["mixed", "window", "empty-sequence", "no-rows", "B0"],
)
def test_prefill_matches_the_model_on_odd_legal_inputs(rng, rows, lens, window):
    kc, vc = kv_caches(rng, "HND", 16, 4, 2, 16)
    qsl = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]), 4, 16)).astype(np.float32)
    table = block_table(rng, len(lens), 16, 4)
    seq_lens = np.array(lens, np.int32)
    out, lse = ts.paged_attention(
        q, kc, vc, table, seq_lens, query_start_loc=qsl, window_left=window, return_lse=True
    )
    assert isinstance(out, np.ndarray) and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == q.shape[:2]
    want_out, want_lse = model_attention(q, kc, vc, table, seq_lens, qsl, window=window)
    np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


def test_per_kv_head_tables_match_the_model_with_empty_heads(rng):
    kc, vc = kv_caches(rng, "fused", 16, 4, 2, 16)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    table = np.stack([block_table(rng, 2, 16, 3) for _ in range(3)])  # [B, Hkv, max_blocks]
    seq_lens = rng.integers(0, 13, (3, 2)).astype(np.int32)
    seq_lens[0, 1] = 0
    out, lse = poisoned(q.shape), poisoned(q.shape[:2])
    ts.paged_attention(q, kc, vc, table, seq_lens, out, lse=lse)
    want_out, want_lse = model_attention(q, kc, vc, table, seq_lens)
    np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


# --- select_pages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block_size,budget,sinks", [(4, 3, 0), (4, 4, 1), (1, 5, 2), (4, 1, 0)], ids=str
)
def test_select_pages_matches_the_model(rng, block_size, budget, sinks):
    batch, num_q_heads, num_kv_heads, dim, num_blocks, max_blocks = 4, 4, 2, 8, 40, 9
    q = rng.standard_normal((batch, num_q_heads, dim)).astype(np.float32)
    # Summaries strided (every other row of a wider array) and reversed over blocks.
    wide = np.sort(rng.standard_normal((num_blocks, num_kv_heads, 4, dim)), axis=2)
    meta = wide.astype(np.float32)[::-1, :, ::2]
    table = block_table(rng, batch, num_blocks, max_blocks)
    seq_lens = rng.integers(0, max_blocks * block_size + 1, batch).astype(np.int32)
    seq_lens[0], seq_lens[1], seq_lens[2] = max_blocks * block_size, 0, budget * block_size
    hits = np.zeros(num_blocks, np.int32)
    picked, lens = ts.select_pages(
        q, meta, table, seq_lens, budget, block_size=block_size, num_sink_pages=sinks, hits=hits
    )
    want, want_lens = model_select(q, meta, table, seq_lens, budget, block_size, sinks)
    assert picked.dtype == np.int32 and picked.shape == (batch, num_kv_heads, budget)
    assert lens.dtype == np.int32 and lens.shape == (batch, num_kv_heads)
    np.testing.assert_array_equal(lens, want_lens)
    want_hits = np.zeros(num_blocks, np.int64)
    for b in range(batch):
        for h in range(num_kv_heads):
            n = len(want[b][h])
            np.testing.assert_array_equal(picked[b, h, :n], want[b][h])
            np.add.at(want_hits, np.asarray(want[b][h], np.int64), 1)
    np.testing.assert_array_equal(hits, want_hits)
    # What it returns is ready for paged_attention; with all pages kept it is dense attention.
    kc, vc = kv_caches(rng, "NHD", num_blocks, block_size, num_kv_heads, dim)
    sparse = ts.paged_attention(q, kc, vc, picked, lens)
    dense = ts.paged_attention(q, kc, vc, table, seq_lens)
    np.testing.assert_allclose(sparse[2], dense[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sparse, model_attention(q, kc, vc, picked, lens)[0], atol=2e-5)


# --- page metadata, copies ---------------------------------------------------------------------


def test_page_meta_restarts_at_offset_0_and_extends_after_it_in_hnd_caches(rng):
    num_blocks, block_size, heads, dim = 5, 4, 2, 8
    kc, vc = kv_caches(rng, "HND", num_blocks, block_size, heads, dim)
    meta = poisoned((num_blocks, heads, 4, dim))[:, :, 1:3]  # a strided view
    keys = rng.standard_normal((8, heads, dim)).astype(np.float32)

    def box(rows):
        return np.stack([np.min(rows, 0), np.max(rows, 0)], 1)

    # Block 2 at offsets 2, 0, 1 (out of order, with 0: a fresh summary); block 3 at offset 0.
    slots = np.array([2 * 4 + 2, 2 * 4, 2 * 4 + 1, 3 * 4], np.int64)
    ts.reshape_and_cache(keys[:4], keys[:4], kc, vc, slots, meta)
    np.testing.assert_array_equal(meta[2], box(keys[:3]))
    np.testing.assert_array_equal(meta[3], box(keys[3:4]))
    # Later offsets extend the summaries.
    ts.reshape_and_cache(keys[4:7], keys[4:7], kc, vc, np.array([11, 13, 14], np.int64), meta)
    np.testing.assert_array_equal(meta[2], box(np.concatenate([keys[:3], keys[4:5]])))
    np.testing.assert_array_equal(meta[3], box(keys[[3, 5, 6]]))
    # A write at offset 0 again starts afresh.
    ts.reshape_and_cache(keys[7:], keys[7:], kc, vc, np.array([8], np.int64), meta)
    np.testing.assert_array_equal(meta[2], box(keys[7:]))
    assert np.isnan(meta[[0, 1, 4]]).all()


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_copy_and_swap_blocks_move_every_tensor_in_any_layout(rng, id_dtype):
    k, v = kv_caches(rng, "fused", 8, 4, 2, 8)
    hk, hv = kv_caches(rng, "HND", 8, 4, 2, 8, np.float16)
    meta = rng.standard_normal((8, 2, 2, 8)).astype(np.float16)[::-1]
    caches = [k, v, hk, hv, meta]
    before = [c.copy() for c in caches]
    src, dst = np.array([1, 5, 0], id_dtype), np.array([2, 7, 4], id_dtype)
    ts.copy_blocks(caches, src, dst)
    for c, b in zip(caches, before):
        expected = b.copy()
        expected[dst] = b[src]
        np.testing.assert_array_equal(c, expected)
    host = poisoned((3, 2, 4, 8), np.float16).transpose(0, 2, 1, 3)
    ts.swap_blocks(hk, host, np.array([6, 1], id_dtype), np.array([0, 2], id_dtype))
    np.testing.assert_array_equal(host[[0, 2]], hk[[6, 1]])
    assert np.isnan(host[1]).all()


# --- Errors (§6) -------------------------------------------------------------------------------


def _call_cases():
    q = np.zeros((2, 4, 8), np.float32)
    kc = np.zeros((4, 2, 2, 8), np.float32)
    table, lens = np.zeros((2, 2), np.int32), np.ones(2, np.int32)
    meta = np.zeros((4, 2, 2, 8), np.float32)
    ids = np.array([0], np.int32), np.array([1], np.int32)
    return [
        ("paged_attention", "block_table must be an array .*got list",
         lambda out: ts.paged_attention(q, kc, kc.copy(), table.tolist(), lens, out)),
        ("paged_attention", "window_left must be an int, got float",
         lambda out: ts.paged_attention(q, kc, kc.copy(), table, lens, out, window_left=1.5)),
        ("select_pages", "budget must be an int, got float",
         lambda out: ts.select_pages(q, meta, table, lens, 2.0, block_size=2, hits=out[0, 0, :4])),
        ("copy_blocks", "caches must be a sequence of arrays .*got ndarray",
         lambda out: ts.copy_blocks(out, *ids)),
        ("copy_blocks", "stream must be None, an int .*got str",
         lambda out: ts.copy_blocks([out], *ids, stream="0")),
        ("reshape_and_cache", "slot_mapping must be an array .*got list",
         lambda out: ts.reshape_and_cache(q[:, :2], q[:, :2], out, out.copy(), [0, 1])),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "op,message,call", _call_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_a_wrong_kind_of_argument_is_both_a_value_error_and_a_type_error(op, message, call):
    """§6: bad arguments raise ValueError; Python's habit for a wrong type is TypeError. The
    error is both, names the op, and nothing is written."""
    out = poisoned((2, 4, 8)) if op == "paged_attention" else poisoned((4, 2, 2, 8))
    if op == "select_pages":
        out = np.zeros((4, 2, 2, 8), np.int32)
    before = out.copy()
    for kind in (ValueError, TypeError, ts.ArgumentTypeError):
        with pytest.raises(kind, match=rf"^tinyserve\.{op}: {message}"):
            call(out)
    np.testing.assert_array_equal(out, before)


@pytest.mark.skipif(ts.cuda_compiled(), reason="the message of a build without CUDA")
def test_device_tensors_without_cuda_raise_runtime_error_in_the_contract_format():
    src = OnDevice(np.array([0], np.int32), 2)
    dst = OnDevice(np.array([1], np.int32), 2)
    with pytest.raises(
        RuntimeError,
        match=r"^tinyserve\.copy_blocks: tinyserve was built without CUDA, got tensors on cuda:0$",
    ):
        ts.copy_blocks([], src, dst)


def test_an_output_that_cannot_be_allocated_is_named_in_the_contract_format():
    query = OnDevice(np.array([0], np.int32), 2)
    empty = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(
        ValueError,
        match=r"^tinyserve\.paged_attention: cannot allocate an output on a CUDA device through "
        r"an unknown framework \(pass out= explicitly\), got a OnDevice$",
    ):
        ts.paged_attention(query, empty, empty, np.zeros((1, 1), np.int32), np.ones(1, np.int32))
