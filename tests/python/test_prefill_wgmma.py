"""paged_attention with query_start_loc on batches that take the Hopper prefill kernel (warpgroup
MMA) where the build and the device have it: float16/bfloat16 at head_dim 64/128/256 with
aligned rows, at least 64 query rows per sequence on average (fewer make a mixed step, whose
one-row sequences the decode kernel takes: test_prefill_mixed.py; elsewhere these batches run the
mma.sync kernel, so the tests hold on any GPU). Against the float64 reference: ragged prompts and
appends in random page order with decode rows and empty sequences mixed in, causal and tile
boundaries (key tiles of 128, 96 and 32 keys at head_dim 64, 128, 256; 128 rows per CTA),
windows, soft-cap, a negative scale, GQA packings, splits, HND storage, pages of 1 and 7 tokens
and chunked prefill (CUDA-graph replay of such batches: test_prefill_cuda.py). Skipped without a
device."""

from __future__ import annotations

import numpy as np
import pytest
from test_prefill_cuda import make_case, run

import reference as R
from arrays import TOLERANCE, torch
from arrays import check_prefill as check

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch is None, reason="torch is not installed"),
]


def long_rows_batch(rng, num_seqs: int, max_prefix: int, max_rows: int):
    """(seq_lens, rows) averaging over 64 rows a sequence: prompts and appends of up to max_rows
    rows over prefixes up to max_prefix, one decode row, one empty sequence."""
    fewest = 64 * num_seqs // (num_seqs - 2) + 1  # the others make up the average
    rows = [int(r) for r in rng.integers(fewest, max_rows, size=num_seqs)]
    prefixes = [int(p) for p in rng.integers(0, max_prefix, size=num_seqs)]
    prefixes[0] = 0
    rows[1], prefixes[1] = 1, int(rng.integers(1, max_prefix))  # a decode row
    rows[2], prefixes[2] = 0, 0  # an empty sequence
    lens = [r + p for r, p in zip(rows, prefixes)]
    assert sum(rows) >= 64 * num_seqs
    return lens, rows


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "head_dim,group,block_size",
    [(128, 4, 16), (128, 1, 16), (128, 8, 7), (64, 4, 16), (64, 3, 1), (256, 2, 16), (256, 5, 32)],
)
def test_ragged_long_rows(rng, dtype, head_dim, group, block_size):
    lens, rows = long_rows_batch(rng, 7, 700, 400)
    case = make_case(rng, lens, rows, 2, group, head_dim, block_size)
    check(*run(case, dtype), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tile_boundaries(rng, dtype, head_dim):
    """Row counts and prefixes at and around the key tiles (32-128 keys) and the 128-row query tile
    (32 positions at group 4), so the diagonal falls on every offset of a tile; windows at and
    off the tile width, soft-cap and a negative scale."""
    rows = [127, 128, 129, 255, 256, 257, 64, 65, 200, 96, 95, 97, 33]
    prefixes = [0, 1, 63, 64, 127, 128, 129, 255, 256, 31, 97, 191, 95]
    lens = [r + p for r, p in zip(rows, prefixes)]
    case = make_case(rng, lens, rows, 2, 4, head_dim, 16)
    check(*run(case, dtype), dtype)
    for window in (63, 128, 200):
        check(*run(case, dtype, window_left=window), dtype)
    check(*run(case, dtype, logits_soft_cap=5.0), dtype)
    check(*run(case, dtype, scale=-0.1), dtype)


@pytest.mark.parametrize("layout", ["HND", "NHD_combined"])
@pytest.mark.parametrize("num_splits", [None, 3, 8])
def test_layouts_and_splits(rng, layout, num_splits):
    lens, rows = long_rows_batch(rng, 5, 3000, 300)
    case = make_case(rng, lens, rows, 2, 4, 128, 16)
    check(*run(case, "float16", layout=layout, num_splits=num_splits), "float16")


def test_large_group_takes_head_tiles(rng):
    """A group of 130 heads: one position of 128 heads per CTA row tile, two head tiles."""
    lens, rows = [300, 200, 150], [100, 80, 90]
    case = make_case(rng, lens, rows, 1, 130, 64, 16)
    check(*run(case, "float16"), "float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_chunked_prefill_equals_one_pass(rng, dtype):
    """A 1000-token prompt in chunks of 130, 300, 570 tokens gives the rows of one pass."""
    prompt, heads_kv, group, head_dim = 1000, 2, 4, 128
    one = make_case(rng, [prompt], [prompt], heads_kv, group, head_dim, 16)
    full_out, full_lse, ref_out, ref_lse = run(one, dtype)
    check(full_out, full_lse, ref_out, ref_lse, dtype)
    done = 0
    for chunk in [130, 300, 570]:
        case = make_case(rng, [done + chunk], [chunk], heads_kv, group, head_dim, 16)
        case.key_cache, case.value_cache, case.block_table = (
            one.key_cache,
            one.value_cache,
            one.block_table,
        )
        case.query = one.query[done : done + chunk]
        out, lse, _, _ = run(case, dtype)
        assert R.rel_error(out, full_out[done : done + chunk]) < TOLERANCE[dtype]
        np.testing.assert_allclose(lse, full_lse[done : done + chunk], rtol=1e-4, atol=1e-3)
        done += chunk
    assert done == prompt
