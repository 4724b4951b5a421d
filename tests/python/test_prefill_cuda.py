"""paged_attention with query_start_loc on CUDA against the float64 reference: both prefill
kernels (tensor-core: float16/bfloat16 at head_dim 64/128/256 with aligned rows; CUDA-core:
float32, other head dims, unaligned rows), ragged batches mixing decode and prefill, tile and
causal boundaries, windows, soft-cap, GQA packing, splits, chunked prefill, CUDA-graph replay,
and device-side offsets that are never trusted. Skipped without a device."""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
import tinyserve as ts
from arrays import (
    TOLERANCE,
    asarray,
    cache_pair,
    check_offsets_stay_in_bounds,
    empty,
    f64,
    prefill_graph_buffers,
    prefill_reference,
    random_row_split,
    replay_prefill_step,
    torch,
)
from arrays import check_prefill as check

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch is None, reason="torch is not installed"),
]


def cuda(x, dtype=None):
    return asarray(np.asarray(x), "torch", dtype, "cuda")


def ragged_batch(rng, num_seqs: int, max_len: int):
    """(seq_lens, rows): every kind of sequence at least once (decode step, whole prompt, append
    over a prefix, no rows, empty), the rest random; lengths long enough for several query and
    key tiles."""
    lens = rng.integers(2, max_len, size=num_seqs)
    kinds = ["decode", "prompt", "append", "none", "empty"]
    kinds += list(rng.choice(["decode", "prompt", "append"], size=max(0, num_seqs - len(kinds))))
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "empty":
            lens[i] = 0
        n = int(lens[i])
        rows.append(
            {
                "decode": 1,
                "prompt": n,
                "append": int(rng.integers(1, n)) if n > 1 else n,
                "none": 0,
                "empty": 0,
            }[kind]
        )
    return lens, rows


def run(case, dtype, layout="NHD", misaligned=False, reference=True, **kwargs):
    """tinyserve on CUDA (out and lse NaN-poisoned) and the reference on the dtype-rounded inputs,
    all float64. `misaligned`: the query is a view starting 2 elements into rows of head_dim + 2
    elements, so no row start is 16-byte aligned. Without `reference` (a case the reference does
    not take, such as more rows than keys) the reference outputs are None."""
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", layout)
    q = cuda(case.query, dtype)
    if misaligned:
        padded = torch.zeros(q.shape[:2] + (q.shape[2] + 2,), dtype=q.dtype, device="cuda")
        padded[:, :, 2:] = q
        q = padded[:, :, 2:]
    out = empty(tuple(q.shape), "torch", dtype, "cuda")
    lse = empty(tuple(q.shape[:2]), "torch", "float32", "cuda")
    ts.paged_attention(
        q,
        kc,
        vc,
        cuda(case.block_table),
        cuda(case.seq_lens),
        out,
        lse=lse,
        query_start_loc=cuda(case.query_start_loc),
        **kwargs,
    )
    torch.cuda.synchronize()
    if not reference:
        return f64(out), f64(lse), None, None
    ref_out, ref_lse = prefill_reference(q, kc, vc, case, **kwargs)
    return f64(out), f64(lse), ref_out, ref_lse


def make_case(rng, lens, rows, num_kv_heads, group, head_dim, block_size):
    return R.PagedCase(
        rng, lens, num_kv_heads * group, num_kv_heads, head_dim, block_size, query_rows=rows
    )


# (head_dim, group, block_size): the tensor-core head dims with MHA, GQA 4 and 8 (16 and 8
# positions per CTA), a group that does not divide 64, and an odd head dim (CUDA-core kernel).
SHAPES = [(64, 1, 16), (128, 4, 16), (128, 8, 7), (256, 3, 16), (64, 5, 1), (80, 4, 16)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim,group,block_size", SHAPES)
def test_ragged_mixed_batch(rng, dtype, head_dim, group, block_size):
    lens, rows = ragged_batch(rng, 9, 300)
    case = make_case(rng, lens, rows, 2, group, head_dim, block_size)
    check(*run(case, dtype), dtype)


@pytest.mark.parametrize("layout", ["HND", "NHD_combined", "HND_combined"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cache_layouts(rng, layout, dtype):
    lens, rows = ragged_batch(rng, 6, 200)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, dtype, layout), dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 0},
        {"window_left": 1},
        {"window_left": 63},
        {"window_left": 64},
        {"window_left": 100},
        {"window_left": 5000},
        {"logits_soft_cap": 3.0},
        {"scale": -0.2, "window_left": 20, "logits_soft_cap": 10.0},
    ],
)
def test_window_soft_cap_scale(rng, dtype, options):
    lens, rows = ragged_batch(rng, 7, 400)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, dtype, **options), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_causal_and_tile_boundaries(rng, dtype):
    """Row counts and prefixes at and around the query tile (16 positions at group 4) and the key
    tile (64 keys): the diagonal falls on every offset within a tile."""
    rows = [1, 15, 16, 17, 63, 64, 65, 128, 129, 33]
    prefixes = [0, 1, 63, 64, 65, 0, 127, 5, 200, 31]
    lens = [r + p for r, p in zip(rows, prefixes)]
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, dtype), dtype)
    check(*run(case, dtype, window_left=47), dtype)


@pytest.mark.parametrize(
    "dtype,group,block_size",
    [("float16", 1, 16), ("bfloat16", 2, 7), ("float16", 4, 32), ("float16", 8, 16)],
)
def test_tile_boundaries_of_every_tile_shape(rng, dtype, group, block_size):
    """Head dim 128 with row counts and prefixes at and around every boundary a tile
    configuration of the tensor-core kernel may have (benchmarks/sweep_prefill): query tiles of
    16-256 positions (128 or 256 rows over groups of 1-8), key tiles and score chunks of 32, 64
    and 128 keys, so the diagonal falls on every offset of a tile, a tile wider than its chunk
    ends inside or past a chunk, and a page (7: the loader's non-power-of-two path) straddles
    tiles; windows at the chunk width."""
    rows = [31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1, 96]
    prefixes = [0, 1, 31, 32, 63, 64, 65, 127, 128, 191, 192, 255, 64, 160]
    lens = [r + p for r, p in zip(rows, prefixes)]
    case = make_case(rng, lens, rows, 2, group, 128, block_size)
    check(*run(case, dtype), dtype)
    for window in (31, 64):
        check(*run(case, dtype, window_left=window), dtype)
    check(*run(case, dtype, logits_soft_cap=5.0), dtype)
    check(*run(case, dtype, scale=-0.1), dtype)


@pytest.mark.parametrize(
    "dtype,group", [("float16", 16), ("float16", 64), ("float16", 130), ("float32", 70)]
)
def test_large_groups(rng, dtype, group):
    """Large GQA groups: the tensor-core kernel's 128 rows hold 8 positions of 16 heads, 2 of 64,
    and 130 heads take two head tiles per KV head; the CUDA-core kernel's 16 rows take 5 head
    tiles of a group of 70."""
    lens, rows = ragged_batch(rng, 5, 90)
    case = make_case(rng, lens, rows, 1, group, 64, 16)
    check(*run(case, dtype), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("num_splits", [2, 5, 16])
def test_split_long_prefixes(rng, dtype, num_splits):
    """Few query rows over long prefixes, the keys split and merged; a split may get no tile."""
    lens = [3000, 1700, 40, 2500]
    rows = [70, 1, 40, 3]
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, dtype, num_splits=num_splits), dtype)
    check(*run(case, dtype, num_splits=num_splits, window_left=900), dtype)


def test_planned_split_for_one_long_chunk(rng):
    """The planner splits a chunk over a long prefix when the rows alone would not fill the GPU;
    the result matches the reference either way."""
    lens, rows = [20000], [64]
    case = make_case(rng, lens, rows, 8, 4, 128, 16)
    q = cuda(case.query, "float16")
    kc = cuda(case.key_cache, "float16")
    splits, nbytes = ts.plan_paged_attention(
        q, kc, cuda(case.block_table), query_start_loc=cuda(case.query_start_loc)
    )
    assert splits > 1 and nbytes > 0
    check(*run(case, "float16"), "float16")


def test_no_planned_split_once_the_ctas_fill_every_slot():
    """Once a prefill step's CTAs fill every slot of the GPU the planner does not split, even
    where the last wave of CTAs is nearly empty (the cost model for equal-length decode rows
    would split those). Batches of one-row sequences over a 32k-key bound: 8 KV heads, so at
    least 8 * batch CTAs, and from 4 * SMs sequences on that is >= 32 CTAs per SM, the most an
    SM holds; the sweep covers every remainder of the last wave. A single sequence with the
    same bound still splits (the bound is seen)."""
    num_kv_heads, head_dim, block_size, max_seq_len = 8, 128, 16, 32768
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    first = 4 * sms
    last = 2 * first
    q = torch.zeros((last, num_kv_heads, head_dim), dtype=torch.float16, device="cuda")
    kc = torch.zeros((4, block_size, num_kv_heads, head_dim), dtype=torch.float16, device="cuda")
    table = torch.zeros((last, max_seq_len // block_size), dtype=torch.int32, device="cuda")
    starts = torch.arange(last + 1, dtype=torch.int32, device="cuda")

    def planned_splits(batch):
        splits, _ = ts.plan_paged_attention(
            q[:batch],
            kc,
            table[:batch],
            max_seq_len=max_seq_len,
            query_start_loc=starts[: batch + 1],
        )
        return splits

    assert planned_splits(1) > 1
    assert {planned_splits(batch) for batch in range(first, last + 1)} == {1}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_unaligned_rows_take_the_cuda_core_kernel(rng, dtype):
    """A query view that starts 2 elements into its rows is not 16-byte aligned: the CUDA-core
    kernel runs it (float16 at head_dim 128 would otherwise take tensor cores)."""
    lens, rows = ragged_batch(rng, 6, 150)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, dtype, misaligned=True), dtype)


def test_one_row_per_sequence_matches_decode(rng):
    lens = rng.integers(1, 3000, size=12)
    case = make_case(rng, lens, [1] * 12, 2, 4, 128, 16)
    out, lse, ref_out, ref_lse = run(case, "float16")
    check(out, lse, ref_out, ref_lse, "float16")
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    dec = ts.paged_attention(
        cuda(case.query, "float16"), kc, vc, cuda(case.block_table), cuda(case.seq_lens)
    )
    assert R.rel_error(f64(dec), out) < TOLERANCE["float16"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_chunked_prefill_equals_one_pass(rng, dtype):
    """A 700-token prompt in chunks of 1, 63, 200, 436 tokens (K/V appended before each chunk)
    gives the rows of one pass, beside another sequence doing decode steps."""
    prompt, block_size, heads_kv, group, head_dim = 700, 16, 2, 4, 128
    one = make_case(rng, [prompt, 900], [prompt, 1], heads_kv, group, head_dim, block_size)
    full_out, full_lse, ref_out, ref_lse = run(one, dtype)
    check(full_out, full_lse, ref_out, ref_lse, dtype)
    done = 0
    for chunk in [1, 63, 200, 436]:
        case = make_case(rng, [done + chunk, 900], [chunk, 1], heads_kv, group, head_dim, 16)
        # the same cache, table and query rows as the one-pass case, lengths of the chunk
        case.key_cache, case.value_cache, case.block_table = (
            one.key_cache,
            one.value_cache,
            one.block_table,
        )
        case.query = np.concatenate([one.query[done : done + chunk], one.query[prompt:]])
        out, lse, _, _ = run(case, dtype)
        assert R.rel_error(out[:chunk], full_out[done : done + chunk]) < TOLERANCE[dtype]
        np.testing.assert_allclose(lse[:chunk], full_lse[done : done + chunk], rtol=1e-4, atol=1e-3)
        done += chunk
    assert done == prompt


@pytest.mark.parametrize("workspace_kind", ["explicit", "planned"])
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize(
    "batch,total,max_blocks",
    [(5, 300, 40), (4, 640, 60)],
    ids=["short-rows", "long-rows"],
)
def test_cuda_graph_replay_with_new_offsets_lengths_and_tables(
    rng, workspace_kind, num_splits, batch, total, max_blocks
):
    """Capture in torch's global mode (any synchronising or allocating CUDA call from any thread
    breaks it), with the workspace passed in or planned and kept by the Python layer
    (workspace=None, what the benchmark does), split or not; every replay writes new
    query_start_loc, lengths, tables and queries into the same buffers (same total rows,
    different split among sequences) and matches the reference. 60 rows a sequence make a mixed
    step (the decode kernel for one-row sequences, then the prefill kernel), 160 run in the
    prefill kernel alone (the Hopper one where the build and the device have it)."""
    num_blocks, block_size = 10 * max_blocks, 16
    heads_kv, group, head_dim = 2, 4, 128
    shape = (num_blocks, block_size, heads_kv, head_dim)
    kc = cuda(rng.standard_normal(shape), "float16")
    vc = cuda(rng.standard_normal(shape), "float16")
    q, starts, table, lens, out, lse = prefill_graph_buffers(
        batch, total, max_blocks, heads_kv * group, head_dim
    )
    kwargs = dict(
        out=out,
        lse=lse,
        num_splits=num_splits,
        query_start_loc=starts,
        max_seq_len=max_blocks * block_size,
    )
    if workspace_kind == "explicit":
        _, nbytes = ts.plan_paged_attention(
            q,
            kc,
            table,
            num_splits=num_splits,
            query_start_loc=starts,
            max_seq_len=max_blocks * block_size,
        )
        kwargs["workspace"] = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ts.paged_attention(q, kc, vc, table, lens, **kwargs)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        for _ in range(2):  # back to back, as the benchmark captures its calls
            ts.paged_attention(q, kc, vc, table, lens, **kwargs)
    buffers = (q, starts, table, lens, out, lse)
    for _ in range(4):
        new_starts, rows = random_row_split(rng, batch, total)
        replay_prefill_step(
            graph.replay, rng, buffers, kc, vc, new_starts, rows, num_blocks, block_size
        )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_untrusted_device_offsets_stay_in_bounds(rng, dtype):
    """query_start_loc lives on the device, so CUDA cannot check it: offsets that decrease, pass
    the last row, or are negative must still touch no row outside out and lse (guard rows around
    them stay NaN) and read nothing outside the cache, and still write every row (wrong values,
    never NaN)."""
    lens, rows = [50, 80, 30], [20, 30, 10]
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", "NHD")
    q = cuda(case.query, dtype)
    total = q.shape[0]
    table, seq_lens = cuda(case.block_table), cuda(case.seq_lens)
    check_offsets_stay_in_bounds(
        lambda starts, out, lse: ts.paged_attention(
            q, kc, vc, table, seq_lens, out, lse=lse, query_start_loc=starts
        ),
        q,
        [
            [0, 40, 10, total],
            [0, 10, total + 500, total],
            [-30, 5, 20, total],
            [0, 0, 0, 0],
            [0, 60, 60, total],
        ],
    )
