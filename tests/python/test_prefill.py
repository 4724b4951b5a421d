"""paged_attention with query_start_loc (prefill, append, chunked prefill, mixed with decode)
against the float64 reference: ragged batches, every dtype and cache layout, causal and window
boundaries, chunked prompts, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
import tinyserve as ts
from arrays import (
    CACHE_LAYOUTS,
    DTYPES,
    TOLERANCE,
    asarray,
    backends,
    cache_pair,
    empty,
    f64,
    prefill_reference,
    require,
    sync,
    torch,
)
from arrays import (
    check_prefill as check,
)

# (head_dim, group size, block size): MHA, GQA, an odd group and page, MQA-like groups of 8 with
# pages of one token, a head dim that is no multiple of 8 (the vector loops' scalar tails).
SHAPES = [(64, 1, 16), (128, 4, 16), (80, 5, 7), (64, 8, 1), (36, 3, 5)]


def mixed_batch(rng, num_seqs: int = 6, max_len: int = 120):
    """(seq_lens, rows): random lengths with every kind of sequence at least once: a decode
    step (1 row), a whole prompt (rows = length), an append over a cached prefix (1 < rows <
    length), a sequence with no rows, and an empty sequence (length 0)."""
    lens = rng.integers(2, max_len, size=num_seqs)
    kinds = ["decode", "prompt", "append", "none", "empty"]
    kinds += list(rng.choice(kinds[:4], size=num_seqs - len(kinds)))
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "empty":
            lens[i] = 0
        rows.append(
            {
                "decode": 1,
                "prompt": int(lens[i]),
                "append": int(rng.integers(2, lens[i])) if lens[i] > 2 else 1,
                "none": 0,
                "empty": 0,
            }[kind]
        )
    return lens, rows


def make_case(rng, lens, rows, num_kv_heads, group, head_dim, block_size):
    return R.PagedCase(
        rng, lens, num_kv_heads * group, num_kv_heads, head_dim, block_size, query_rows=rows
    )


def run_case(case, fw, device, dtype, layout, **kwargs):
    """Runs tinyserve on the prefill case (NaN-poisoned out and lse); returns (out, lse,
    reference out, reference lse) in float64, the reference on the inputs rounded to dtype."""
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, dtype, device, layout)
    q = asarray(case.query, fw, dtype, device)
    table = asarray(case.block_table, fw, device=device)
    lens = asarray(case.seq_lens, fw, device=device)
    starts = asarray(case.query_start_loc, fw, device=device)
    out = empty(q.shape, fw, dtype, device)
    lse = empty(tuple(q.shape[:2]), fw, "float32", device)
    ts.paged_attention(q, kc, vc, table, lens, out, lse=lse, query_start_loc=starts, **kwargs)
    sync(fw, device)
    ref_out, ref_lse = prefill_reference(q, kc, vc, case, **kwargs)
    return f64(out), f64(lse), ref_out, ref_lse


# NumPy and torch on the CPU (the tests that build host arrays only).
HOST_BACKENDS = backends()[:2]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("head_dim,group,block_size", SHAPES)
def test_mixed_batch_matches_reference(rng, backend, dtype, layout, head_dim, group, block_size):
    fw, device = backend
    require(fw, dtype)
    lens, rows = mixed_batch(rng)
    case = make_case(rng, lens, rows, int(rng.integers(1, 4)), group, head_dim, block_size)
    check(*run_case(case, fw, device, dtype, layout), dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 0},
        {"window_left": 1},
        {"window_left": 37},
        {"window_left": 5000},
        {"logits_soft_cap": 3.0},
        {"scale": 0.7},
        {"scale": -0.2, "window_left": 20, "logits_soft_cap": 10.0},
    ],
    ids=["window0", "window1", "window37", "window_gt_len", "softcap", "scale", "all"],
)
def test_options(rng, backend, dtype, options):
    fw, device = backend
    require(fw, dtype)
    lens, rows = mixed_batch(rng, num_seqs=5, max_len=200)
    case = make_case(rng, lens, rows, 2, 4, 64, 16)
    check(*run_case(case, fw, device, dtype, "NHD", **options), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 4096])
@pytest.mark.parametrize("window_left", [-1, 300])
def test_splits_and_long_prefixes(rng, num_splits, window_left):
    """Rows over prefixes of thousands of tokens, split any number of ways (more pieces than
    keys too), beside a decode row and a short prompt."""
    lens = [int(rng.integers(1500, 3000)), 2000, 40, 1]
    rows = [int(rng.integers(10, 40)), 1, 40, 1]
    case = make_case(rng, lens, rows, 2, 4, 64, 16)
    out, lse, ref_out, ref_lse = run_case(
        case, "numpy", "cpu", "float32", "NHD", num_splits=num_splits, window_left=window_left
    )
    check(out, lse, ref_out, ref_lse, "float32")


def test_causal_and_window_boundaries(rng):
    """The row at position p reads keys p - window_left .. p and nothing else: changing the key
    and value just past either end leaves its output bit-identical, changing the ends moves it."""
    length, window = 90, 20
    case = make_case(rng, [length], [length], 2, 2, 64, 16)
    starts = case.query_start_loc

    def run(kc, vc, window_left):
        out = np.full_like(case.query, np.nan)
        ts.paged_attention(
            case.query,
            kc,
            vc,
            case.block_table,
            case.seq_lens,
            out,
            query_start_loc=starts,
            window_left=window_left,
        )
        return out

    def changed_at(position):
        kc, vc = case.key_cache.copy(), case.value_cache.copy()
        block, offset = case.block_table[0, position // 16], position % 16
        kc[block, offset] = rng.standard_normal(kc.shape[2:])
        vc[block, offset] = rng.standard_normal(vc.shape[2:])
        return kc, vc

    for window_left in (-1, window):
        base = run(case.key_cache, case.value_cache, window_left)
        ref, _ = R.paged_prefill(
            case.query,
            case.key_cache,
            case.value_cache,
            case.block_table,
            case.seq_lens,
            starts,
            window_left=window_left,
        )
        assert R.rel_error(base, ref) < TOLERANCE["float32"]
        for p in (0, 15, 16, 47, 89):
            moved = run(*changed_at(p), window_left)
            # Rows before p never see key p; with a window, rows after p + window no longer do.
            unseen = np.arange(length) < p
            if window_left >= 0:
                unseen |= np.arange(length) > p + window_left
            np.testing.assert_array_equal(moved[unseen], base[unseen])
            assert np.all(np.any(moved[~unseen] != base[~unseen], axis=(1, 2)))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("window_left", [-1, 50])
def test_chunked_prefill_equals_one_pass(rng, backend, window_left):
    """A prompt written and attended chunk by chunk through the BlockManager (slots,
    reshape_and_cache, block_table) gives the outputs of one pass over the whole prompt."""
    fw, device = backend
    num_kv_heads, group, head_dim, block_size = 2, 4, 64, 16
    length = int(rng.integers(150, 400))
    cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
    chunks = np.diff(np.concatenate([[0], cuts, [length]]))
    k = rng.standard_normal((length, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((length, num_kv_heads, head_dim)).astype(np.float32)
    q = rng.standard_normal((length, num_kv_heads * group, head_dim)).astype(np.float32)
    num_blocks = length // block_size + 8
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kc, vc = cache_pair(
        np.full(shape, np.nan, np.float32),
        np.full(shape, np.nan, np.float32),
        fw,
        "float32",
        device,
        "NHD",
    )
    manager = ts.BlockManager(num_blocks, block_size)
    manager.add_sequence(7)

    def attend(rows):
        """paged_attention of q[rows], the last rows of sequence 7 as the manager holds it."""
        table, lens = manager.block_table([7])
        out, lse = ts.paged_attention(
            asarray(q[rows], fw, device=device),
            kc,
            vc,
            asarray(table, fw, device=device),
            asarray(lens, fw, device=device),
            query_start_loc=asarray(
                np.array([0, rows.stop - rows.start], np.int32), fw, device=device
            ),
            window_left=window_left,
            return_lse=True,
        )
        sync(fw, device)
        return f64(out), f64(lse)

    outs, lses = [], []
    done = 0
    for n in chunks:
        part = slice(done, done + int(n))
        slots = manager.append(7, int(n))
        manager.check()
        ts.reshape_and_cache(
            asarray(k[part], fw, device=device),
            asarray(v[part], fw, device=device),
            kc,
            vc,
            asarray(slots, fw, device=device),
        )
        out, lse = attend(part)
        outs.append(out)
        lses.append(lse)
        done += int(n)
    one_out, one_lse = attend(slice(0, length))
    table, lens = manager.block_table([7])
    chunked_out, chunked_lse = np.concatenate(outs), np.concatenate(lses)
    assert R.rel_error(chunked_out, one_out) < 1e-6
    np.testing.assert_allclose(chunked_lse, one_lse, rtol=1e-6, atol=1e-6)
    ref_out, ref_lse = R.paged_prefill(
        q, f64(kc), f64(vc), table, lens, np.array([0, length]), window_left=window_left
    )
    check(chunked_out, chunked_lse, ref_out, ref_lse, "float32")


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_row_per_sequence_is_the_decode_path(rng, num_splits, dtype):
    """query_start_loc = [0, 1, ..., B] gives exactly what query_start_loc=None gives."""
    lens = rng.integers(1, 600, size=5)
    case = R.PagedCase(rng, lens, 8, 2, 64, 16)
    q, kc, vc = (x.astype(dtype) for x in (case.query, case.key_cache, case.value_cache))
    args = (q, kc, vc, case.block_table, case.seq_lens)
    decode_out, decode_lse = ts.paged_attention(*args, num_splits=num_splits, return_lse=True)
    starts = np.arange(len(lens) + 1, dtype=np.int32)
    out, lse = ts.paged_attention(
        *args, num_splits=num_splits, return_lse=True, query_start_loc=starts
    )
    np.testing.assert_array_equal(out, decode_out)
    np.testing.assert_array_equal(lse, decode_lse)
    ref_out, _ = R.paged_attention(*(f64(a) for a in (q, kc, vc)), case.block_table, lens)
    assert R.rel_error(f64(out), ref_out) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_outputs_allocated_with_row_shapes(rng, backend):
    fw, device = backend
    require(fw, "float32")
    case = make_case(rng, [30, 5, 12], [30, 0, 4], 2, 2, 64, 8)
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "HND")
    q = asarray(case.query, fw, "float32", device)
    out, lse = ts.paged_attention(
        q,
        kc,
        vc,
        asarray(case.block_table, fw),
        asarray(case.seq_lens, fw),
        query_start_loc=asarray(case.query_start_loc, fw),
        return_lse=True,
    )
    assert type(out) is type(q) and tuple(out.shape) == (34, 4, 64)
    assert type(lse) is type(q) and tuple(lse.shape) == (34, 4)
    ref_out, ref_lse = R.paged_prefill(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        case.query_start_loc,
    )
    check(f64(out), f64(lse), ref_out, ref_lse, "float32")


def test_no_rows_at_all(rng):
    case = make_case(rng, [10, 0, 3], [0, 0, 0], 1, 2, 64, 16)
    out = ts.paged_attention(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        query_start_loc=case.query_start_loc,
    )
    assert out.shape == (0, 2, 64)


def test_plan_with_query_start_loc(rng):
    case = make_case(rng, [100, 40], [100, 1], 2, 4, 64, 16)
    splits, nbytes = ts.plan_paged_attention(
        case.query, case.key_cache, case.block_table, query_start_loc=case.query_start_loc
    )
    assert splits >= 1 and nbytes == 0
    splits, _ = ts.plan_paged_attention(
        case.query,
        case.key_cache,
        case.block_table,
        query_start_loc=case.query_start_loc,
        num_splits=5,
    )
    assert splits == 5
    with pytest.raises(ValueError, match=r"query_start_loc dimension 0 \(batch \+ 1"):
        ts.plan_paged_attention(
            case.query, case.key_cache, case.block_table, query_start_loc=case.query_start_loc[1:]
        )


def _bad_inputs():
    """(name, change, message): change(args) mutates a fresh copy of the arguments."""

    def set_starts(values):
        def change(a):
            a["query_start_loc"] = np.array(values, dtype=np.int32)

        return change

    def set_key(key, make):
        def change(a):
            a[key] = make(a)

        return change

    def bad_first_block(a):
        table = a["block_table"].copy()
        table[0, 0] = 999
        return table

    # The case: lens [20, 9, 30], rows [5, 1, 30] -> starts [0, 5, 6, 36], 36 rows.
    return [
        ("first_not_zero", set_starts([1, 5, 6, 36]), r"query_start_loc\[0\] must be 0, got 1"),
        ("decreasing", set_starts([0, 7, 6, 36]), r"must be non-decreasing, got 7 then 6"),
        ("last_too_small", set_starts([0, 5, 6, 35]), r"last entry\) must be the number of"),
        ("last_too_large", set_starts([0, 5, 6, 37]), r"last entry\) must be the number of"),
        ("more_rows_than_tokens", set_starts([0, 5, 16, 36]), r"sequence 1 must have at most"),
        ("prompt_too_long", set_starts([0, 0, 1, 36]), r"sequence 2 must have at most"),
        (
            "int64",
            set_key("query_start_loc", lambda a: a["query_start_loc"].astype(np.int64)),
            r"query_start_loc must be int32, got int64",
        ),
        (
            "wrong_length",
            set_key("query_start_loc", lambda a: a["query_start_loc"][:3]),
            r"query_start_loc dimension 0 \(batch \+ 1 of block_table\) must be 4, got 3",
        ),
        (
            "two_dims",
            set_key("query_start_loc", lambda a: a["query_start_loc"][None]),
            r"query_start_loc must have 1 dimensions",
        ),
        (
            "lse_per_sequence",
            set_key("lse", lambda a: np.full((3, 4), np.nan, np.float32)),
            r"lse dimension 0 \(total_rows\) must be 36, got 3",
        ),
        (
            "out_per_sequence",
            set_key("out", lambda a: np.full((3, 4, 64), np.nan, np.float32)),
            r"out must have the shape of query",
        ),
        # Offsets kept in the memory of an output: refused before any row is written (the
        # NaN bits read as int32 would otherwise fail the offset checks with another message).
        (
            "starts_inside_out",
            set_key("query_start_loc", lambda a: a["out"].reshape(-1)[5:9].view(np.int32)),
            r"out and query_start_loc must not share memory",
        ),
        (
            "starts_inside_lse",
            set_key("query_start_loc", lambda a: a["lse"].reshape(-1)[-4:].view(np.int32)),
            r"lse and query_start_loc must not share memory",
        ),
        (
            "bad_block_in_prefix",
            set_key("block_table", bad_first_block),
            r"block_table\[0, 0\] must be a block id",
        ),
    ]


@pytest.mark.parametrize("name,change,message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_is_rejected_and_nothing_written(rng, name, change, message):
    case = make_case(rng, [20, 9, 30], [5, 1, 30], 2, 2, 64, 16)
    args = {
        "query": case.query,
        "key_cache": case.key_cache,
        "value_cache": case.value_cache,
        "block_table": case.block_table.copy(),
        "seq_lens": case.seq_lens,
        "out": np.full(case.query.shape, np.nan, np.float32),
        "lse": np.full(case.query.shape[:2], np.nan, np.float32),
        "query_start_loc": case.query_start_loc.copy(),
    }
    change(args)
    with pytest.raises(ValueError, match=r"^tinyserve\.paged_attention: .*" + message):
        ts.paged_attention(**args)
    assert np.isnan(args["out"]).all() and np.isnan(args["lse"]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 96, 512])
def test_cuda_matches_cpu_backend(rng, dtype, head_dim):
    """The CUDA prefill kernel against the CPU backend and the reference, head dims of the
    tensor-core decode kernels and others, and keys split four ways."""
    lens, rows = mixed_batch(rng, num_seqs=7, max_len=300)
    case = make_case(rng, lens, rows, 2, 4, head_dim, 16)
    out, lse, ref_out, ref_lse = run_case(case, "torch", "cuda", dtype, "HND", num_splits=4)
    check(out, lse, ref_out, ref_lse, dtype)
    cpu_out, cpu_lse, _, _ = run_case(case, "torch", "cpu", dtype, "HND")
    assert R.rel_error(out, cpu_out) < TOLERANCE[dtype]
    np.testing.assert_allclose(lse, cpu_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_prefill_in_a_graph(rng):
    """A captured prefill call replays with new offsets, lengths and queries: the device values
    are read on the device, never baked into the graph."""
    case = make_case(rng, [100] * 5, [10, 30, 0, 1, 20], 2, 4, 64, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = asarray(case.query, "torch", "float16", "cuda")
    table = asarray(case.block_table, "torch", device="cuda")
    seq_lens = asarray(case.seq_lens, "torch", device="cuda")
    starts = asarray(case.query_start_loc, "torch", device="cuda")
    out = empty(tuple(q.shape), "torch", "float16", "cuda")
    lse = empty(tuple(q.shape[:2]), "torch", "float32", "cuda")

    def call():
        ts.paged_attention(q, kc, vc, table, seq_lens, out, lse=lse, query_start_loc=starts)

    call()  # warm-up outside the capture (kernel attributes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    # The same 61 rows split another way over shorter sequences (all within written tokens).
    new_lens = np.array([80, 60, 100, 90, 70], np.int32)
    new_starts = np.concatenate([[0], np.cumsum([20, 1, 30, 10, 0])]).astype(np.int32)
    starts.copy_(torch.from_numpy(new_starts))
    seq_lens.copy_(torch.from_numpy(new_lens))
    q.copy_(torch.from_numpy(rng.standard_normal(case.query.shape).astype(np.float32)))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = R.paged_prefill(
        f64(q), f64(kc), f64(vc), case.block_table, new_lens, new_starts
    )
    check(f64(out), f64(lse), ref_out, ref_lse, "float16")


@pytest.mark.cuda
def test_cuda_bad_offsets_stay_in_bounds(rng):
    """Offsets on the device cannot be checked without a synchronisation: unsorted offsets and
    rows beyond a sequence's length give wrong rows (zeros where a row finds no key) but never
    read outside the cache or write outside out."""
    case = make_case(rng, [20, 9, 30], [5, 1, 30], 2, 2, 64, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float32", "cuda", "NHD")
    big_out = empty((38, 4, 64), "torch", "float32", "cuda")
    out = big_out[1:37]
    for bad in ([0, 7, 6, 36], [0, 5, 30, 36], [3, 5, 6, 36], [0, 0, 0, 36]):
        ts.paged_attention(
            asarray(case.query, "torch", "float32", "cuda"),
            kc,
            vc,
            asarray(case.block_table, "torch", device="cuda"),
            asarray(case.seq_lens, "torch", device="cuda"),
            out,
            query_start_loc=asarray(np.array(bad, np.int32), "torch", device="cuda"),
        )
        torch.cuda.synchronize()
        assert not torch.isnan(out).any()
        assert torch.isnan(big_out[[0, 37]]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_strided_query_and_output(rng, backend):
    """query rows as a view into a fused QKV buffer, out as a view with a gap around it."""
    fw, device = backend
    case = make_case(rng, [40, 77, 5], [40, 9, 1], 2, 4, 64, 16)
    rows = case.query.shape[0]
    qkv = asarray(rng.standard_normal((rows, 12, 64)).astype(np.float32), fw, "float32", device)
    q = qkv[:, 2:10]
    q[...] = asarray(case.query, fw, "float32", device)
    big_out = empty((rows, 10, 64), fw, "float32", device)
    out = big_out[:, 1:9]
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "NHD")
    ts.paged_attention(
        q,
        kc,
        vc,
        asarray(case.block_table, fw),
        asarray(case.seq_lens, fw),
        out,
        query_start_loc=asarray(case.query_start_loc, fw),
    )
    ref_out, _ = R.paged_prefill(
        case.query,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        case.query_start_loc,
    )
    assert R.rel_error(f64(out), ref_out) < TOLERANCE["float32"]
    assert np.isnan(f64(big_out)[:, [0, 9]]).all()
