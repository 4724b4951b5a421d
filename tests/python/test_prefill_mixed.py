"""paged_attention with query_start_loc on mixed steps: decode rows beside multi-row chunks, fewer
than 64 query rows per sequence on average, over the tensor-core types (float16/bfloat16, head_dim
64/128/256, aligned rows). CUDA runs these as two kernels: the decode kernel attends the sequences
of exactly one row, then the prefill kernel (the Hopper one where the build and the device have it
and at least 256 rows lie past one per sequence, else mma.sync: the "wgmma" cases below) the rest;
every row must be written by exactly one of them. Against the float64 reference with NaN-poisoned
outputs (a row written by neither stays NaN), and bit for bit against a plain decode call on the
decode rows (a decode row overwritten by the prefill kernel would differ: shown by the batch that
runs every row in the prefill kernel). Skipped without a device."""

from __future__ import annotations

import numpy as np
import pytest
from test_prefill_cuda import cuda, make_case, run

import reference as R
import tinyserve as ts
from arrays import (
    TOLERANCE,
    cache_pair,
    check_offsets_stay_in_bounds,
    empty,
    f64,
    prefill_graph_buffers,
    replay_prefill_step,
    torch,
)
from arrays import check_prefill as check

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch is None, reason="torch is not installed"),
]

# Chunk rows of a mixed step by the prefill kernel they lead to: fewer than 256 rows past one per
# sequence keep the mma.sync kernel, more take the Hopper kernel (where it exists).
CHUNKS = {"mma": [37, 90, 17], "wgmma": [300, 129, 64]}


def mixed_batch(rng, kernel: str, num_decode: int = 8, max_prefix: int = 700):
    """(seq_lens, rows) of a mixed step for the prefill kernel `kernel`, shuffled: num_decode
    decode rows over random prefixes, the kernel's chunks over random prefixes, an empty
    sequence, a sequence with a prefix and no rows, and a sequence of one token with its one
    row."""
    chunks = CHUNKS[kernel]
    rows = [1] * num_decode + list(chunks) + [0, 0, 1]
    lens = [1 + int(rng.integers(1, max_prefix)) for _ in range(num_decode)]
    lens += [c + int(rng.integers(0, max_prefix)) for c in chunks]
    lens += [0, int(rng.integers(1, max_prefix)), 1]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    lens = [lens[i] for i in order]
    assert sum(rows) < 64 * len(rows)  # a mixed step
    assert (sum(rows) - len(rows) >= 256) == (kernel == "wgmma")
    return lens, rows


def decode_call(case, dtype, **options):
    """(rows, out, lse), out and lse as float64, of a plain decode call (no query_start_loc)
    over the case's sequences of exactly one row (`rows`: their query rows): their table rows,
    lengths and queries, with the call's options and the split count that the mixed call uses."""
    rows = np.diff(case.query_start_loc)
    single = np.flatnonzero(rows == 1)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", "NHD")
    splits, _ = ts.plan_paged_attention(
        cuda(case.query, dtype),
        kc,
        cuda(case.block_table),
        window_left=options.get("window_left", -1),
        num_splits=options.get("num_splits"),
        query_start_loc=cuda(case.query_start_loc),
    )
    options = {**options, "num_splits": splits}
    q = cuda(case.query[case.query_start_loc[single]], dtype)
    out = empty(tuple(q.shape), "torch", dtype, "cuda")
    lse = empty(tuple(q.shape[:2]), "torch", "float32", "cuda")
    ts.paged_attention(
        q,
        kc,
        vc,
        cuda(case.block_table[single]),
        cuda(case.seq_lens[single]),
        out,
        lse=lse,
        **options,
    )
    torch.cuda.synchronize()
    return case.query_start_loc[single], f64(out), f64(lse)


def assert_decode_rows_bitwise(case, dtype, out, lse, **options):
    """The mixed call's rows of one-row sequences equal a decode call's bit for bit (with the
    mixed call's split count): the decode kernel wrote them, and nothing wrote them after."""
    rows, dec_out, dec_lse = decode_call(case, dtype, **options)
    assert len(rows) > 0
    np.testing.assert_array_equal(out[rows], dec_out)
    np.testing.assert_array_equal(lse[rows], dec_lse)


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "head_dim,group,block_size", [(64, 1, 16), (128, 4, 16), (128, 8, 7), (256, 3, 16), (64, 20, 1)]
)
def test_mixed_step(rng, kernel, dtype, head_dim, group, block_size):
    """Decode rows, chunks, empty sequences, a sequence without rows and a one-token sequence;
    MHA, GQA and a group of 20 (two head tiles of the decode kernel), pages of 1, 7 and 16."""
    lens, rows = mixed_batch(rng, kernel)
    case = make_case(rng, lens, rows, 2, group, head_dim, block_size)
    out, lse, ref_out, ref_lse = run(case, dtype)
    check(out, lse, ref_out, ref_lse, dtype)
    assert_decode_rows_bitwise(case, dtype, out, lse)


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 0},
        {"window_left": 63},
        {"window_left": 200},
        {"logits_soft_cap": 3.0},
        {"scale": -0.2, "window_left": 20, "logits_soft_cap": 10.0},
    ],
)
def test_mixed_step_window_soft_cap_scale(rng, kernel, num_splits, options):
    lens, rows = mixed_batch(rng, kernel)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    out, lse, ref_out, ref_lse = run(case, "float16", num_splits=num_splits, **options)
    check(out, lse, ref_out, ref_lse, "float16")
    assert_decode_rows_bitwise(case, "float16", out, lse, num_splits=num_splits, **options)


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("num_splits", [2, 5, 16])
def test_mixed_step_forced_splits(rng, kernel, dtype, num_splits):
    """Both kernels write split partials of the query rows into one workspace and one merge
    combines them; long prefixes, so that splits cut every row's keys (a split may get none)."""
    lens, rows = mixed_batch(rng, kernel, num_decode=6, max_prefix=2500)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    for options in ({}, {"window_left": 900}):
        out, lse, ref_out, ref_lse = run(case, dtype, num_splits=num_splits, **options)
        check(out, lse, ref_out, ref_lse, dtype)
        assert_decode_rows_bitwise(case, dtype, out, lse, num_splits=num_splits, **options)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_all_decode_through_query_start_loc(rng, dtype, head_dim, num_splits):
    """One row per sequence (one of them a one-token sequence): every row from the decode
    kernel, the prefill launch's tiles all exiting."""
    lens = [int(n) for n in rng.integers(1, 3000, size=11)] + [1]
    case = make_case(rng, lens, [1] * len(lens), 2, 4, head_dim, 16)
    out, lse, ref_out, ref_lse = run(case, dtype, num_splits=num_splits)
    check(out, lse, ref_out, ref_lse, dtype)
    assert_decode_rows_bitwise(case, dtype, out, lse, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_prefill_kernel_decode_rows_differ_from_the_decode_kernel(rng, num_splits):
    """What lets the bit-for-bit checks above fail: a batch of at least 64 rows per sequence runs
    every row, its decode rows too, in the prefill kernel, whose values for those rows are right
    but not the decode kernel's bits. (So a decode row that the prefill kernel of a mixed step
    also wrote, after the decode kernel, would not match the decode call.)"""
    lens = [int(n) for n in rng.integers(100, 3000, size=8)] + [600 + 200]
    rows = [1] * 8 + [600]
    assert sum(rows) >= 64 * len(rows)  # not a mixed step
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    out, lse, ref_out, ref_lse = run(case, "float16", num_splits=num_splits)
    check(out, lse, ref_out, ref_lse, "float16")
    single, dec_out, dec_lse = decode_call(case, "float16", num_splits=num_splits)
    assert R.rel_error(out[single], dec_out) < TOLERANCE["float16"]
    assert not (np.array_equal(out[single], dec_out) and np.array_equal(lse[single], dec_lse))


@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_one_row_without_keys(rng, kernel, num_splits):
    """A one-row sequence whose length on the device is 0 (more rows than keys, which CUDA cannot
    check): its row sees no key, output 0 and log-sum-exp -inf as the prefill kernel gives such
    rows; the other rows are untouched by it."""
    lens, rows = mixed_batch(rng, kernel)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    ref_out, ref_lse = R.paged_prefill(
        f64(cuda(case.query, "float16")),
        f64(cuda(case.key_cache, "float16")),
        f64(cuda(case.value_cache, "float16")),
        case.block_table,
        case.seq_lens,
        case.query_start_loc,
    )
    seq = int(np.flatnonzero((np.diff(case.query_start_loc) == 1) & (case.seq_lens > 1))[0])
    row = int(case.query_start_loc[seq])
    case.seq_lens[seq] = 0
    # The reference above was taken with the true lengths; it cannot take a row without keys.
    out, lse, _, _ = run(case, "float16", num_splits=num_splits, reference=False)
    assert (out[row] == 0).all() and (lse[row] == -np.inf).all()
    others = np.arange(len(out)) != row
    check(out[others], lse[others], ref_out[others], ref_lse[others], "float16")


@pytest.mark.parametrize("num_splits", [None, 3])
def test_untrusted_device_offsets_with_one_row_sequences(rng, num_splits):
    """Offsets that are wrong in ways that make one-row sequences out of other rows (overlapping,
    decreasing, out of range) still touch nothing outside out and lse, and write every row, with
    the decode and prefill kernels reading them alike."""
    lens, rows = [50, 80, 30, 40], [20, 30, 9, 1]
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    total = q.shape[0]
    assert total < 64 * len(lens)
    table, seq_lens = cuda(case.block_table), cuda(case.seq_lens)
    check_offsets_stay_in_bounds(
        lambda starts, out, lse: ts.paged_attention(
            q, kc, vc, table, seq_lens, out, lse=lse, num_splits=num_splits, query_start_loc=starts
        ),
        q,
        [
            [0, 1, 2, 3, total],
            [0, 1, 0, total + 5, total],
            [-3, 1, 2, total + 10, total],
            [0, total - 1, 1, 2, total],
            [5, 6, 7, 8, 9],
        ],
    )


def test_planned_split_of_a_mixed_step(rng):
    """A mixed step of few rows over long prefixes is split by the planner; the planned
    workspace, exactly that size, holds both kernels' partials."""
    lens, rows = [12000, 1, 12000, 9000], [1, 1, 40, 0]
    case = make_case(rng, lens, rows, 8, 4, 128, 16)
    q = cuda(case.query, "float16")
    kc = cuda(case.key_cache, "float16")
    splits, nbytes = ts.plan_paged_attention(
        q, kc, cuda(case.block_table), query_start_loc=cuda(case.query_start_loc)
    )
    assert splits > 1 and nbytes > 0
    workspace = torch.empty((nbytes,), dtype=torch.uint8, device="cuda")
    out, lse, ref_out, ref_lse = run(case, "float16", workspace=workspace)
    check(out, lse, ref_out, ref_lse, "float16")
    assert_decode_rows_bitwise(case, "float16", out, lse)


@pytest.mark.parametrize("kernel,total", [("mma", 90), ("wgmma", 420)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_cuda_graph_replay_switches_one_and_several_rows(rng, kernel, total, num_splits):
    """A mixed step captured once (12 sequences, `total` rows: the launches fixed by host
    values) and replayed with new offsets, lengths, tables and queries, where each replay turns
    the sequences of one row into sequences of several and back: the two kernels must agree on
    the new offsets at every replay."""
    batch, max_blocks, block_size = 12, 60, 16
    num_blocks, heads_kv, group, head_dim = 10 * max_blocks, 2, 4, 128
    assert total < 64 * batch and (total - batch >= 256) == (kernel == "wgmma")
    shape = (num_blocks, block_size, heads_kv, head_dim)
    kc = cuda(rng.standard_normal(shape), "float16")
    vc = cuda(rng.standard_normal(shape), "float16")
    buffers = prefill_graph_buffers(batch, total, max_blocks, heads_kv * group, head_dim)
    q, starts, table, lens, out, lse = buffers
    kwargs = dict(out=out, lse=lse, num_splits=num_splits, query_start_loc=starts)
    _, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=num_splits, query_start_loc=starts)
    kwargs["workspace"] = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ts.paged_attention(q, kc, vc, table, lens, **kwargs)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        ts.paged_attention(q, kc, vc, table, lens, **kwargs)
    for replay in range(4):
        # Sequences (b + replay) % 2 == 0 get one row, the others at least 2 and the rest of
        # the rows at random.
        single = (np.arange(batch) + replay) % 2 == 0
        rows = np.where(single, 1, 2)
        spare = total - int(rows.sum())
        others = np.flatnonzero(~single)
        cuts = np.sort(rng.integers(0, spare + 1, size=len(others) - 1))
        rows[others] += np.diff(np.concatenate([[0], cuts, [spare]]))
        new_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
        replay_prefill_step(
            graph.replay, rng, buffers, kc, vc, new_starts, rows, num_blocks, block_size
        )
