"""select_pages on CUDA against the float64 NumPy reference (reference.py), over every
path of the CUDA kernels: the page-wide scoring kernel (the group folded into two weight vectors
for summed scores, or each query head scored alone), the row-by-row fallback (rows that are not
whole 16-byte chunks, or misaligned), the shared-memory top-k and the global-memory one (tables
of more than 32767 pages), the copy of short sequences, sinks, hits, and graph replay; scores of
16-bit summaries as accurate as float32 weights make them, over wide magnitudes; rows of
thousands of candidates around multiples of 2048, ties across them, ragged batches.

Integer data makes every score exact in float32 whatever the order of the sums (the folded
kernel reassociates them), so the page sets, their order and the tie-break (the lower page) are
compared exactly; ties are frequent. Continuous data is compared exactly except where the
reference's own scores are within float32 rounding of the cut, where either page may win."""

from __future__ import annotations

import numpy as np
import pytest
from test_selection import random_pages, to_np

import reference as R
import tinyserve as ts
from arrays import TOLERANCE, asarray, cuda_ok, torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_ok(), reason="needs torch with CUDA and tinyserve built with it"),
]

SUMMARIES = ["minmax_damped", "minmax", "meanstd"]
REDUCES = ["sum", "max"]
DTYPES = ["float32", "float16", "bfloat16"]


def integer_summaries(rng, num_blocks, num_kv_heads, head_dim, summary):
    """Small-integer summaries (valid ones: min <= max, std >= 0)."""
    a = rng.integers(-3, 4, size=(num_blocks, num_kv_heads, head_dim))
    b = rng.integers(-3, 4, size=(num_blocks, num_kv_heads, head_dim))
    if summary in ("minmax", "minmax_damped"):
        return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=2).astype(np.float32)
    return np.stack([a, np.abs(b)], axis=2).astype(np.float32)


def cuda_ints(a):
    return asarray(np.asarray(a), "torch", None, "cuda")


def run_select(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype,
               *, hits=None, meta_view=None, query_view=None):  # fmt: skip
    """select_pages on CUDA with poisoned outputs; returns (table, lens) as NumPy."""
    n, heads = len(seq_lens), meta.shape[1]
    got_t = torch.full((n, heads, budget), -7, dtype=torch.int32, device="cuda")
    got_l = torch.full((n, heads), -7, dtype=torch.int32, device="cuda")
    m = meta_view if meta_view is not None else asarray(meta, "torch", dtype, "cuda")
    q = query_view if query_view is not None else asarray(query, "torch", dtype, "cuda")
    ts_out = ts.select_pages(
        q,
        m,
        cuda_ints(table),
        cuda_ints(seq_lens),
        budget,
        block_size=block_size,
        num_sink_pages=sinks,
        summary=summary,
        group_reduce=reduce,
        hits=hits,
        out=(got_t, got_l),
    )
    torch.cuda.synchronize()
    assert ts_out[0] is got_t and ts_out[1] is got_l
    return to_np(got_t), to_np(got_l)


def check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype,
                **kw):  # fmt: skip
    got_t, got_l = run_select(
        query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype, **kw
    )
    want_t, want_l = R.select_pages(
        query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce
    )
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_array_equal(got_l, want_l)
    return got_t


# ---------------------------------------------------------------------------------------------
# Every scoring path: summary x reduce x dtype x head_dim x group


# 64/128/256: whole 16-byte chunks, a power of two of them per row; 80/96: whole chunks, not a
# power of two (idle lanes in a row's group); 40 and 20: whole chunks in float32, 8-byte loads of
# the row-by-row fallback in 16-bit types; 17: the fallback's one-element loads.
HEAD_DIMS = [64, 128, 256, 80, 96, 40, 20, 17]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("summary", SUMMARIES)
def test_scoring_paths(rng, summary, reduce, group, head_dim, dtype):
    """Lengths around the budget (budget - 1, budget, budget + 1, budget + 2 pages), a long one,
    an empty one; sinks 0 and 2."""
    block_size, budget, kv_heads = 16, 8, 3
    pages = [budget - 1, budget, budget + 1, budget + 2, 75, 0]
    seq_lens = np.array([max(0, p * block_size - 5) for p in pages], dtype=np.int32)
    seq_lens[1] = budget * block_size  # exactly budget full pages
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(len(pages), kv_heads * group, head_dim)).astype(np.float32)
    meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, summary)
    for sinks in (0, 2):
        check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype)


@pytest.mark.parametrize("summary", SUMMARIES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_many_kv_heads_and_wide_rows(rng, summary, reduce):
    """16 KV heads (several rounds of loads per page), head_dim 512 in 16-bit (64 chunks: two
    per lane) and float32 head_dim 256 (64 chunks), and one KV head (a page is one row)."""
    block_size, budget = 16, 6
    for kv_heads, group, head_dim, dtype in [
        (16, 2, 64, "float16"),
        (2, 4, 512, "bfloat16"),
        (2, 2, 256, "float32"),
        (1, 8, 128, "float16"),
    ]:
        seq_lens = np.array([900, 40, 333], dtype=np.int32)
        table, num_blocks = random_pages(rng, seq_lens, block_size)
        query = rng.integers(-2, 3, size=(3, kv_heads * group, head_dim)).astype(np.float32)
        meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, summary)
        check_exact(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("row_bytes", [128, 256, 512])
def test_folded_scoring_shapes(rng, dtype, kv_heads, row_bytes):
    """The shapes of the page-major folded kernel (summed group, or one query head per KV head):
    a KV head's two rows 16, 32 or 64 16-byte chunks, a page of 1 to 16 KV heads (passes of 1, 2,
    4 or 8 chunks a lane, several passes a page, and pages that are not whole warps of chunks,
    which take the page-wide kernel), sinks, an empty sequence; every summary with a contiguous
    and a strided summary buffer."""
    block_size, budget, sinks = 16, 20, 1
    head_dim = row_bytes // (4 if dtype == "float32" else 2)
    seq_lens = np.array([700 * block_size - 3, 21 * block_size, 64 * block_size + 1, 0], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    padded = torch.full((num_blocks, kv_heads + 1, 2, head_dim + 16), float("nan"))
    padded = padded.to(device="cuda", dtype=getattr(torch, dtype))
    view = padded[:, 1:, :, 8 : 8 + head_dim]
    for group, reduce in ((4, "sum"), (1, "max")):
        query = rng.integers(-2, 3, size=(4, kv_heads * group, head_dim)).astype(np.float32)
        for summary in SUMMARIES:
            meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, summary)
            check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce,
                        dtype)  # fmt: skip
            view.copy_(asarray(meta, "torch", dtype, "cuda"))
            check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce,
                        dtype, meta_view=view)  # fmt: skip


def test_folded_scoring_long_runs_and_many_passes(rng):
    """The page-major kernel where each warp walks more than two windows of 32 pages (block ids
    loaded window by window, and again for every pass of a page): enough sequences that each
    gets one thread block of the scoring grid, the long ones 600, 333 and 101 pages, with 3 KV
    heads at head_dim 128 in float16 (3 passes of one chunk a lane); and 72 KV heads at head_dim
    256 (18 passes of 8 chunks a lane, weights too large for three stages of copies: the
    two-stage ring)."""
    block_size, budget, sinks = 16, 12, 1
    long = [600 * block_size - 5, 333 * block_size, 101 * block_size + 3]
    short = rng.integers(1, budget * block_size + 1, size=2100 - len(long))
    seq_lens = np.concatenate([long, short]).astype(np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(len(seq_lens), 3 * 2, 128)).astype(np.float32)
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, 3, 128, summary)
        check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, "sum",
                    "float16")  # fmt: skip
    seq_lens = np.array([50 * block_size, 30 * block_size - 1], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(2, 72, 256)).astype(np.float32)
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, 72, 256, summary)
        for reduce in REDUCES:
            check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce,
                        "float16")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 16-bit summaries (head_dim 64, 128, 256): the scores keep the float32 weights' precision

HALF_DTYPES = ["float16", "bfloat16"]
HALF_HEAD_DIMS = [64, 128, 256]


def in_dtype(x, dtype):
    """x rounded to `dtype`, as float32 NumPy: the values a kernel reads from such a tensor."""
    return to_np(asarray(np.asarray(x, np.float32), "torch", dtype).float())


def folded_weights(q, summary):
    """(w0, w1) [..., Hkv, D] in float64 with the group's summed score = w0 . row0 + w1 . row1
    for q [..., Hkv, G, D] (minmax boxes with min <= max)."""
    q = np.asarray(q, np.float64)
    neg, pos = np.minimum(q, 0), np.maximum(q, 0)
    if summary == "minmax":
        w0, w1 = neg, pos
    elif summary == "minmax_damped":
        w0, w1 = 0.75 * neg + 0.25 * pos, 0.75 * pos + 0.25 * neg
    else:
        w0, w1 = q, np.abs(q)
    return w0.sum(-2), w1.sum(-2)


def top_pages(scores, pages, budget, sinks):
    """The logical pages the selection keeps from one row of scores (highest first, the lower page
    on ties; sinks and the last page always)."""
    candidates = sorted(range(sinks, pages - 1), key=lambda p: (-scores[p], p))
    return sorted(list(range(sinks)) + candidates[: budget - sinks - 1]) + [pages - 1]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", HALF_HEAD_DIMS)
@pytest.mark.parametrize("group", [2, 4, 8])
@pytest.mark.parametrize("summary", SUMMARIES)
def test_16_bit_summaries_keep_float32_weights(rng, summary, group, head_dim, dtype):
    """Summed-group weights that 16 bits cannot hold: per KV head, query head 0 is (1, -1) and
    query head 1 is (eps, 0) on dims 0 and 1 (eps = 2^-12 in float16, 2^-9 in bfloat16: at most
    half an ulp of 1), so the weights there sum to 1 + eps and -1 (minmax: on the max and min
    rows). Each page's summary on those dims is the point b_p (meanstd: mean b_p, std 0), b_p
    distinct integers, and 0 elsewhere, where the query holds random integers: the score is
    eps * b_p, exact in float32. With the weights rounded to 16 bits every page would score 0 and
    the lowest pages would win (checked): the exact reference's pages are required."""
    block_size, budget, kv_heads, sinks = 16, 12, 2, 1
    eps = 2.0**-12 if dtype == "float16" else 2.0**-9
    seq_lens = np.array([120 * block_size - 3, 80 * block_size, 9 * block_size], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads, group, head_dim)).astype(np.float32)
    query[:, :, :, :2] = 0
    query[:, :, 0, :2] = [1, -1]
    query[:, :, 1, 0] = eps
    query = query.reshape(3, kv_heads * group, head_dim)
    meta = np.zeros((num_blocks, kv_heads, 2, head_dim), np.float32)
    for h in range(kv_heads):
        b_p = rng.permutation(num_blocks) + 1  # at most 256: exact in bfloat16
        meta[:, h, 0, :2] = b_p[:, None]
        if summary != "meanstd":
            meta[:, h, 1, :2] = b_p[:, None]
    assert num_blocks <= 256
    chosen = check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, "sum",
                         dtype)  # fmt: skip
    # The same selection from weights rounded to 16 bits picks other pages for every row.
    w0, w1 = folded_weights(query.reshape(3, kv_heads, group, head_dim), summary)
    w0, w1 = in_dtype(w0, dtype), in_dtype(w1, dtype)
    for b in range(2):  # the third sequence fits the budget: copied, not scored
        pages = -(-int(seq_lens[b]) // block_size)
        row = table[b, :pages]
        for h in range(kv_heads):
            rounded = meta[row, h, 0] @ w0[b, h] + meta[row, h, 1] @ w1[b, h]
            assert not np.array_equal(
                row[top_pages(rounded, pages, budget, sinks)], chosen[b, h]
            ), (b, h)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("head_dim", HALF_HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8, 16])
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("summary", SUMMARIES)
def test_scoring_over_wide_magnitudes(rng, summary, reduce, group, head_dim, dtype):
    """Query elements spanning eight decades (1e-4 to 1e4: the group's summed weights pass float16's
    range, the small ones its subnormals), summaries of both signs, one planted needle per
    (sequence, KV head) (the widest box, or the largest std: the highest score of every query head)
    and pages with equal summaries (exact ties), groups up to 16. The needle is kept, and the pages
    are the float64 reference's except where its scores are within 2^-16 of the scores' term
    magnitudes (sum over the group and dims of |q| * (|row0| + |row1|), the needles left out) of the
    cut."""
    block_size, budget, kv_heads, sinks = 16, 24, 2, 1
    pages = np.array([300, 77, 25, 24])  # the last two: a short candidate list, a copied table
    seq_lens = (pages * block_size - rng.integers(0, block_size, size=4)).astype(np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    shape = (4, kv_heads * group, head_dim)
    magnitude = 10.0 ** rng.uniform(-4, 4, size=shape)
    query = in_dtype(np.clip(rng.standard_normal(shape) * magnitude, -6e4, 6e4), dtype)
    a = in_dtype(rng.standard_normal((num_blocks, kv_heads, head_dim)), dtype)
    c = in_dtype(rng.standard_normal((num_blocks, kv_heads, head_dim)), dtype)
    if summary == "meanstd":
        meta = np.stack([a, np.abs(c)], axis=2)
    else:
        meta = np.stack([np.minimum(a, c), np.maximum(a, c)], axis=2)
    needles = {}
    for b in range(4):
        n = int(pages[b])
        for h in range(kv_heads):
            p = int(rng.integers(sinks, n - 1))
            needles[b, h] = p
            meta[table[b, p], h, 0] = 0 if summary == "meanstd" else -64
            meta[table[b, p], h, 1] = 64
        # Exact ties: some candidates take another candidate's summaries (needles left alone).
        others = [p for p in range(sinks, n - 1) if p not in (needles[b, 0], needles[b, 1])]
        for src, dst in rng.choice(others, size=(n // 8, 2)):
            meta[table[b, dst]] = meta[table[b, src]]

    def tolerance(b, scores):
        n = scores.shape[1]
        q = np.abs(query[b].astype(np.float64)).reshape(kv_heads, group, head_dim).sum(1)
        rows = np.abs(meta[table[b, :n]].astype(np.float64)).sum(2)  # [n, Hkv, D]
        terms = np.einsum("hd,phd->hp", q, rows)
        for h in range(kv_heads):
            terms[h, needles[b, h]] = 0
        return 2.0**-16 * terms.max(axis=1)

    got_t, got_l = run_select(
        query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce, dtype
    )
    want_t, want_l = R.select_pages(
        query, meta, table, seq_lens, budget, block_size, sinks, summary, reduce
    )
    np.testing.assert_array_equal(got_l, want_l)
    for b in range(3):
        for h in range(kv_heads):
            assert table[b, needles[b, h]] in got_t[b, h], (b, h)
    check_up_to_rounding(got_t, want_t, query, meta, table, seq_lens, block_size, sinks, summary,
                         reduce, tolerance)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Top-k: long sequences, budget boundaries, the global-memory kernel


@pytest.mark.parametrize("summary", SUMMARIES)
def test_long_sequences(rng, summary):
    """The bench's shapes, 8 sequences of 2048 pages and one of 8192 (runs of 8 candidates per
    top-k thread, every block id read before the scores), and one of 8300 (runs of 16: ids past
    the eighth read after the select): float16, 32 query / 8 KV heads, head_dim 128, budget 128
    pages with one sink."""
    block_size, budget = 16, 128
    for seq_lens in (
        np.full(8, 2048 * block_size, np.int32),
        np.array([8192 * block_size], np.int32),
        np.array([8300 * block_size - 3], np.int32),
    ):
        table, num_blocks = random_pages(rng, seq_lens, block_size)
        query = rng.integers(-2, 3, size=(len(seq_lens), 32, 128)).astype(np.float32)
        meta = integer_summaries(rng, num_blocks, 8, 128, summary)
        for reduce in REDUCES:
            check_exact(
                query, meta, table, seq_lens, budget, block_size, 1, summary, reduce, "float16"
            )


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("summary", ["minmax_damped", "meanstd"])
def test_scoring_runs_longer_than_a_window(rng, summary, reduce):
    """Enough pages that each scoring warp walks more than one window of 32 pages (24 sequences
    of 3000-3400 pages: at 264 resident thread blocks of the page-wide kernel, 11 per sequence,
    runs of about 39 pages per warp; fewer multiprocessors give longer runs), with four rounds
    per window (2 KV heads at head_dim 64 in float16: 8 pages a round), so the copies issued
    ahead cross into the next window while the warp scores the last rounds of the current one,
    and runs end mid-window and mid-round. Integer data: exact page sets."""
    block_size, budget, kv_heads, group, head_dim = 16, 20, 2, 4, 64
    pages = rng.integers(3000, 3401, size=24)
    seq_lens = (pages * block_size - rng.integers(0, block_size, size=24)).astype(np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(24, kv_heads * group, head_dim)).astype(np.float32)
    meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, summary)
    check_exact(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce, "float16")


PLANTED_KINDS = ["ulps", "equal", "outliers", "ties", "signed_zeros", "wide", "minus_inf"]


def planted_scores(rng, kind, n):
    """n float32 scores shaped to reach every way the top-k's radix select ends."""
    if kind == "ulps":  # consecutive floats: a key range no wider than the bins, or twice
        x = (np.float32(1.5).view(np.int32) + np.arange(n, dtype=np.int32)).view(np.float32)
    elif kind == "equal":  # one key value from the start
        x = np.full(n, 0.25, np.float32)
    elif kind == "outliers":  # a tight cluster in one bin of the full range: a second pass
        x = (7 + 1e-3 * rng.standard_normal(n)).astype(np.float32)
        at = rng.permutation(n)
        x[at[:3]], x[at[3:6]] = 1e30, -1e30
        x[at[6:8]], x[at[8:12]] = np.inf, -np.inf
    elif kind == "ties":  # four values: the cut falls inside a run of equal scores
        x = (rng.integers(0, 4, n) * 2.0 - 3).astype(np.float32)
    elif kind == "signed_zeros":  # -0.0 ranks equal to +0.0 (the lower page first), denormals
        x = rng.choice(np.array([-0.0, 0.0, 1e-40, -1e-40, 1.0, -1.0], np.float32), n)
    elif kind == "minus_inf":  # mostly -inf: the cut falls among -inf ties where few are finite
        x = np.full(n, -np.inf, np.float32)
        finite = rng.choice(n, size=max(1, n // 50), replace=False)
        x[finite] = rng.standard_normal(len(finite)).astype(np.float32)
    else:  # magnitudes from 1e-30 to 1e30, both signs
        x = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    return rng.permutation(x)


@pytest.mark.parametrize("group", [1, 2])
def test_top_k_on_planted_scores(rng, group):
    """Scores planted exactly (float32 summaries whose score is one element: a one-hot query,
    zero std): consecutive floats, all equal, far outliers and infinities, runs of ties at the
    cut, signed zeros and denormals, 60 decades, mostly -inf. Sequences of 2047, 2999, 200 and
    9000 candidate pages (more than 8192: runs of 16 per top-k thread), two budgets, sinks."""
    block_size, kv_heads, dim = 2, 2, 16
    pages = [2049, 3000, 202, 9001]
    seq_lens = np.array([p * block_size - 1 for p in pages], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = np.zeros((len(pages), kv_heads * group, dim), np.float32)
    query[:, :, 0] = 1.0 / group  # exact: the folded weights are 1.0 too
    for combo, (budget, sinks) in enumerate([(130, 0), (130, 3), (37, 0), (37, 3)]):
        meta = np.zeros((num_blocks, kv_heads, 2, dim), np.float32)
        for b, n in enumerate(pages):
            for h in range(kv_heads):
                # Over the four calls, each sequence meets every kind.
                kind = PLANTED_KINDS[(2 * combo + h + 3 * b) % len(PLANTED_KINDS)]
                meta[table[b, :n], h, 0, 0] = planted_scores(rng, kind, n)
        for reduce in REDUCES:
            check_exact(query, meta, table, seq_lens, budget, block_size, sinks, "meanstd",
                        reduce, "float32")  # fmt: skip


def test_global_memory_top_k(rng):
    """A table wider than 32767 pages takes the global-memory top-k (block_size 1: 33000
    pages of one token), with the budget's boundaries in the same batch."""
    block_size, budget = 1, 40
    seq_lens = np.array([33000, budget, budget + 1, 7], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    assert table.shape[1] > 32767
    query = rng.integers(-2, 3, size=(4, 4, 16)).astype(np.float32)
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, 2, 16, summary)
        for sinks in (0, 3):
            check_exact(query, meta, table, seq_lens, budget, block_size, sinks, summary, "sum",
                        "float32")  # fmt: skip


# Rows of candidates around multiples of 2048 (SLICE), in tables exactly as wide as their
# longest row.
SLICE = 2048


def exact_width_table(rng, seq_lens, block_size):
    """random_pages' table cut to the longest sequence's pages (no spare columns)."""
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    width = max(1, max(-(-int(n) // block_size) for n in seq_lens))
    return np.ascontiguousarray(table[:, :width]), num_blocks


def planted_meta(rng, table, pages, num_blocks, kv_heads, dim, kinds):
    """float32 summaries whose meanstd score under a one-hot query is exactly the planted
    score: kinds[b][h] for sequence b and KV head h."""
    meta = np.zeros((num_blocks, kv_heads, 2, dim), np.float32)
    for b, n in enumerate(pages):
        for h in range(kv_heads):
            if n > 0:
                meta[table[b, :n], h, 0, 0] = planted_scores(rng, kinds[b][h], n)
    return meta


def check_with_hits(rng, query, meta, table, seq_lens, budget, block_size, sinks, reduce):
    """check_exact of planted float32 summaries with a hits array (random start counts): each
    kept block adds one."""
    num_blocks = meta.shape[0]
    start = rng.integers(0, 3, num_blocks).astype(np.int32)
    hits = cuda_ints(start.copy())
    got_t = check_exact(query, meta, table, seq_lens, budget, block_size, sinks, "meanstd",
                        reduce, "float32", hits=hits)  # fmt: skip
    kept = got_t.ravel()
    want = start + np.bincount(kept[kept >= 0], minlength=num_blocks)
    np.testing.assert_array_equal(to_np(hits), want)


@pytest.mark.parametrize("slices", [1, 2, 3, 4, 8, 9, 16])
def test_top_k_around_slice_boundaries(rng, slices):
    """A table exactly wide enough for `slices` slices of 2048 candidates, and a batch of sequences
    around every slice boundary within it: the full width, one page less, one candidate past the
    previous boundary, 2049 and 2048 candidates, 2047, a short row, one within the budget (copied),
    an empty one. Planted scores of every kind (all equal, ties at the cut, -inf, ...), budgets
    whose kept pages stay in one slice (130) or span two (2600), sinks 0 and 3, hits; exact pages,
    order and lengths."""
    block_size, kv_heads, dim, group = 1, 2, 16, 2
    for sinks in (0, 3):
        widest = slices * SLICE + 1 + sinks  # pages: slices * 2048 candidates
        candidates = [slices * SLICE, slices * SLICE - 1, (slices - 1) * SLICE + 1]
        candidates += [SLICE + 1, SLICE, SLICE - 1, 700]
        pages = [min(c, widest - 1 - sinks) + 1 + sinks for c in candidates if c > 0]
        pages[0] = widest
        for budget in (130, 2600):
            batch = pages + [min(budget - 2, widest), 0]
            seq_lens = np.array([p * block_size for p in batch], np.int32)
            table, num_blocks = exact_width_table(rng, seq_lens, block_size)
            kinds = [
                [PLANTED_KINDS[(b + 3 * h + budget) % len(PLANTED_KINDS)] for h in range(kv_heads)]
                for b in range(len(batch))
            ]
            meta = planted_meta(rng, table, batch, num_blocks, kv_heads, dim, kinds)
            query = np.zeros((len(batch), kv_heads * group, dim), np.float32)
            query[:, :, 0] = 1.0 / group  # exact: the folded weights are 1.0 too
            for reduce in REDUCES:
                check_with_hits(rng, query, meta, table, seq_lens, budget, block_size, sinks,
                                reduce)  # fmt: skip


@pytest.mark.parametrize("width", [2048, 2049, 4096, 4097, 8192])
def test_top_k_table_widths(rng, width):
    """Tables on either side of the widths where the shared-memory top-k's threads place runs of
    2, 4 and 8 candidates (up to 2048, 4096 and 8192 candidates; its score loads are batched by
    8192): rows of the full width, one page less, about half and a short one, planted scores of
    every kind, budgets of 130 and 1500 pages, sinks 0 and 3, hits; exact pages, order and
    lengths."""
    block_size, kv_heads, dim, group = 1, 2, 16, 2
    for sinks in (0, 3):
        batch = [width, width - 1, width // 2 + 1, 300 + sinks]
        seq_lens = np.array([p * block_size for p in batch], np.int32)
        table, num_blocks = exact_width_table(rng, seq_lens, block_size)
        assert table.shape[1] == width
        for budget in (130, 1500):
            kinds = [
                [PLANTED_KINDS[(b + 3 * h + budget + sinks) % len(PLANTED_KINDS)]
                 for h in range(kv_heads)]
                for b in range(len(batch))
            ]  # fmt: skip
            meta = planted_meta(rng, table, batch, num_blocks, kv_heads, dim, kinds)
            query = np.zeros((len(batch), kv_heads * group, dim), np.float32)
            query[:, :, 0] = 1.0 / group  # exact: the folded weights are 1.0 too
            check_with_hits(rng, query, meta, table, seq_lens, budget, block_size, sinks, "sum")


@pytest.mark.parametrize("kind", ["equal", "ties", "minus_inf"])
def test_top_k_ties_across_slices(rng, kind):
    """All-equal scores, four values, or mostly -inf over rows of one to five slices, with a
    budget larger than a slice: the equal pages kept are the lowest ones, across slice
    boundaries."""
    block_size, kv_heads, dim = 2, 3, 8
    batch = [5 * SLICE + 1, 3 * SLICE + 7, 2 * SLICE, SLICE + 2, 900]
    seq_lens = np.array([p * block_size - 1 for p in batch], np.int32)
    table, num_blocks = exact_width_table(rng, seq_lens, block_size)
    meta = planted_meta(rng, table, batch, num_blocks, kv_heads, dim, [[kind] * kv_heads] * 5)
    query = np.zeros((len(batch), kv_heads, dim), np.float32)
    query[:, :, 0] = 1.0
    for budget, sinks in ((3000, 1), (2049, 0), (64, 2)):
        check_with_hits(rng, query, meta, table, seq_lens, budget, block_size, sinks, "sum")


def test_top_k_ragged_batch(rng):
    """Ragged lengths from one page to 9000 in one batch (float16, 32 query / 8 KV heads,
    head_dim 32, page 16, budget 128, one sink), scored from integer summaries (ties are
    frequent): short rows, long ones of up to five slices of 2048 candidates, copies."""
    block_size, budget = 16, 128
    pages = np.concatenate([[9000, 8192, 2050, 2051, 129, 128, 1], rng.integers(1, 9001, 5)])
    seq_lens = (pages * block_size - rng.integers(0, block_size, len(pages))).astype(np.int32)
    table, num_blocks = exact_width_table(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(len(pages), 32, 32)).astype(np.float32)
    meta = integer_summaries(rng, num_blocks, 8, 32, "minmax_damped")
    for reduce in REDUCES:
        hits = torch.zeros(num_blocks, dtype=torch.int32, device="cuda")
        got_t = check_exact(query, meta, table, seq_lens, budget, block_size, 1, "minmax_damped",
                            reduce, "float16", hits=hits)  # fmt: skip
        kept = got_t.ravel()
        np.testing.assert_array_equal(
            to_np(hits), np.bincount(kept[kept >= 0], minlength=num_blocks)
        )


@pytest.mark.parametrize("sinks", [0, 1, 5])
def test_budget_boundaries(rng, sinks):
    """Every page count from 1 to budget + 40 in one batch, keep == 0 (budget = sinks + 1)
    included, with continuous data (no exact ties; near-ties are checked against the
    reference's scores)."""
    block_size, kv_heads, group, dim = 4, 2, 4, 64
    for budget in (sinks + 1, sinks + 2, 33):
        pages = np.arange(1, budget + 41)
        seq_lens = (pages * block_size - rng.integers(0, block_size, size=len(pages))).astype(
            np.int32
        )
        table, num_blocks = random_pages(rng, seq_lens, block_size)
        query = rng.standard_normal((len(pages), kv_heads * group, dim)).astype(np.float32)
        meta = rng.standard_normal((num_blocks, kv_heads, 2, dim)).astype(np.float32)
        meta[:, :, 1] = np.abs(meta[:, :, 1])
        got_t, got_l = run_select(
            query, meta, table, seq_lens, budget, block_size, sinks, "meanstd", "sum", "float32"
        )
        want_t, want_l = R.select_pages(
            query, meta, table, seq_lens, budget, block_size, sinks, "meanstd", "sum"
        )
        np.testing.assert_array_equal(got_l, want_l)
        check_up_to_rounding(got_t, want_t, query, meta, table, seq_lens, block_size, sinks)


def check_up_to_rounding(got_t, want_t, query, meta, table, seq_lens, block_size, sinks,
                         summary="meanstd", reduce="sum", tolerance=None):  # fmt: skip
    """Equal tables, except that pages whose reference scores are within float32 rounding of the
    cut may be swapped with each other (the kernels sum in float32, in another order).
    tolerance(b, scores) -> [Hkv] (scores: the reference's [Hkv, pages] of sequence b); by default
    1e-5 of the largest score's magnitude, plus one."""
    for b in range(len(seq_lens)):
        pages = -(-int(seq_lens[b]) // block_size)
        row = table[b, :pages]
        scores = R.page_scores(query[b], meta[row], summary, reduce) if pages else None
        if scores is not None:
            tol = (
                1e-5 * (np.abs(scores).max(axis=1) + 1.0)
                if tolerance is None
                else tolerance(b, scores)
            )
        for h in range(got_t.shape[1]):
            if np.array_equal(got_t[b, h], want_t[b, h]):
                continue
            assert scores is not None and pages > got_t.shape[2], (b, h)  # a real selection
            assert got_t[b, h, -1] == want_t[b, h, -1]
            position = {int(block): p for p, block in enumerate(row)}
            got = {position[int(x)] for x in got_t[b, h] if x >= 0}
            want = {position[int(x)] for x in want_t[b, h] if x >= 0}
            assert len(got) == len(want)
            kept = sorted(want - {pages - 1} - set(range(sinks)))
            assert kept, (b, h)  # with no candidate kept the tables cannot differ
            cut = min(scores[h, p] for p in kept)
            for p in got ^ want:
                assert abs(scores[h, p] - cut) <= tol[h], (b, h, p)
            # Still logical order with the last page last.
            order = [position[int(x)] for x in got_t[b, h] if x >= 0]
            assert order == sorted(order)


def test_sparse_decode_of_one_sequence_fills_the_gpu(rng):
    """A selected table of one sequence (8 KV heads of 128 pages, 2048 tokens) is planned in
    enough splits to give every multiprocessor a CTA (chunks down to 64 tokens), or on sm_90 in
    8 splits that merge in thread-block clusters (no merge launch: faster there), and sparse
    decode at that split count matches the float64 reference over the selected pages."""
    props = torch.cuda.get_device_properties(0)
    sm = props.multi_processor_count
    block_size, kv_heads, group, head_dim, budget = 16, 8, 4, 128, 128
    pages = 300
    seq_lens = np.array([pages * block_size - 5], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = rng.standard_normal(shape).astype(np.float32)
    value_cache = rng.standard_normal(shape).astype(np.float32)
    query = rng.standard_normal((1, kv_heads * group, head_dim)).astype(np.float32)
    kc = asarray(key_cache, "torch", "float16", "cuda")
    vc = asarray(value_cache, "torch", "float16", "cuda")
    q = asarray(query, "torch", "float16", "cuda")
    t, lens = cuda_ints(table), cuda_ints(seq_lens)
    meta = torch.empty((num_blocks, kv_heads, 2, head_dim), dtype=torch.float16, device="cuda")
    ts.build_page_meta(kc, t, lens, meta, summary="minmax_damped")
    sel_t, sel_l = ts.select_pages(
        q, meta, t, lens, budget, block_size=block_size, num_sink_pages=1, summary="minmax_damped"
    )
    max_len = budget * block_size
    splits, nbytes = ts.plan_paged_attention(q, kc, sel_t, max_seq_len=max_len)
    assert splits * kv_heads >= sm or (props.major >= 9 and splits == 8)
    assert max_len // splits >= 64
    workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device="cuda")
    out = torch.full_like(q, float("nan"))
    ts.paged_attention(q, kc, vc, sel_t, sel_l, out, max_seq_len=max_len, workspace=workspace)
    torch.cuda.synchronize()
    want = R.paged_attention_per_kv_head(
        to_np(q).astype(np.float64),
        to_np(kc).astype(np.float64),
        to_np(vc).astype(np.float64),
        to_np(sel_t),
        to_np(sel_l),
    )
    assert R.rel_error(to_np(out), want) < TOLERANCE["float16"]


# ---------------------------------------------------------------------------------------------
# Layouts, NaN, hits


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_summaries(rng, dtype):
    """Summaries in a padded buffer (rows 16-byte aligned but not contiguous: the page-wide
    kernel with strides) and one element off alignment (the row-by-row kernel), and a strided
    query: the same pages as contiguous ones."""
    block_size, budget, kv_heads, group, dim = 16, 5, 2, 4, 64
    seq_lens = np.array([700, 90, 300], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads * group, dim)).astype(np.float32)
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, kv_heads, dim, summary)
        padded = torch.full((num_blocks, kv_heads + 1, 2, dim + 16), float("nan"), device="cuda")
        padded = padded.to(getattr(torch, dtype))
        view = padded[:, :kv_heads, :, :dim]
        view.copy_(asarray(meta, "torch", dtype, "cuda"))
        flat = torch.empty(meta.size + 1, dtype=getattr(torch, dtype), device="cuda")
        shifted = flat[1:].view(meta.shape)
        shifted.copy_(asarray(meta, "torch", dtype, "cuda"))
        for reduce in REDUCES:
            for m in (view, shifted):
                check_exact(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce,
                            dtype, meta_view=m)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_rows_off_16_byte_alignment(rng, dtype):
    """Query rows that are not whole 16-byte chunks apart (a padded head stride) or start one
    element off (the page-wide kernel builds its weights element by element then): the same
    pages as a contiguous query, folded (summed group) and per query head (maximum)."""
    block_size, budget, kv_heads, group, dim = 16, 6, 2, 4, 64
    seq_lens = np.array([900, 70, 400], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads * group, dim)).astype(np.float32)
    q = asarray(query, "torch", dtype, "cuda")
    padded = torch.full((3, kv_heads * group, dim + 1), float("nan"), device="cuda")
    padded = padded.to(q.dtype)
    padded[:, :, :dim] = q
    flat = torch.full((q.numel() + 1,), float("nan"), dtype=q.dtype, device="cuda")
    shifted = flat[1:].view(q.shape)
    shifted.copy_(q)
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, kv_heads, dim, summary)
        for reduce in REDUCES:
            for view in (padded[:, :, :dim], shifted):
                check_exact(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce,
                            dtype, query_view=view)  # fmt: skip


@pytest.mark.parametrize("head_dim", [128, 96, 17])
def test_block_ids_outside_the_cache_rank_lowest(rng, head_dim):
    """A device table naming blocks outside the cache (negative, and past page_meta's first
    dimension; nothing checks a table on the device): every scoring kernel (head_dim 128 the
    page-major one with the group summed, the page-wide one with its maximum; 96 the page-wide
    one, 17 the row-by-row one) reads nothing there and ranks those pages lowest, below pages of
    any score. The reference scores each such page as a block of NaN summaries of its own. The
    last sequence has fewer scorable candidates than the budget, and its scorable pages score
    below zero (a page read as zeros would outrank them): its lowest unreadable pages are kept
    after them. Run under memcheck on the GPU."""
    block_size, budget, kv_heads, group = 16, 16, 8, 4
    pages = [300, 90, 30]
    seq_lens = np.array([300 * block_size - 7, 90 * block_size, 30 * block_size - 2], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(3, kv_heads * group, head_dim)).astype(np.float32)
    query[2] = 1  # with summaries of -3 (std 0), every readable page of it scores -3 per element
    bad = [-1, -(2**31), num_blocks, num_blocks + 1000, 2**31 - 1]
    device_table, ref_table = table.copy(), table.copy()
    device_id = {}  # the reference's NaN block -> the id the device table holds there
    for b, n in enumerate(pages):
        chosen = rng.choice(np.arange(1, n - 1), size=20, replace=False)  # candidates only
        for page in chosen:
            device_table[b, page] = rng.choice(bad)
            ref_table[b, page] = num_blocks + len(device_id)
            device_id[int(ref_table[b, page])] = int(device_table[b, page])
    for summary in SUMMARIES:
        meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, summary)
        readable = table[2, : pages[2]][device_table[2, : pages[2]] == table[2, : pages[2]]]
        meta[readable, :, 0] = -3
        meta[readable, :, 1] = 0 if summary == "meanstd" else -3
        nan_blocks = np.full((len(device_id),) + meta.shape[1:], np.nan, np.float32)
        ref_meta = np.concatenate([meta, nan_blocks])
        for reduce in REDUCES:
            got_t, got_l = run_select(query, meta, device_table, seq_lens, budget, block_size, 1,
                                      summary, reduce, "float16")  # fmt: skip
            want_t, want_l = R.select_pages(
                query, ref_meta, ref_table, seq_lens, budget, block_size, 1, summary, reduce
            )
            kept_bad = np.isin(want_t, list(device_id))
            assert kept_bad[2].any() and not kept_bad[:2].any()
            want_t = np.vectorize(lambda i: device_id.get(int(i), int(i)))(want_t)
            np.testing.assert_array_equal(got_t, want_t)
            np.testing.assert_array_equal(got_l, want_l)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("summary", SUMMARIES)
def test_nan_summaries_rank_lowest(rng, summary, reduce):
    """Pages whose summary is NaN (never written) are kept only where nothing else is left."""
    block_size, budget = 16, 10
    seq_lens = np.array([40 * 16, 12 * 16], dtype=np.int32)
    table, num_blocks = random_pages(rng, seq_lens, block_size)
    query = rng.integers(-2, 3, size=(2, 8, 128)).astype(np.float32)
    meta = integer_summaries(rng, num_blocks, 2, 128, summary)
    poisoned = rng.choice(num_blocks, size=num_blocks // 2, replace=False)
    meta[poisoned] = np.nan
    for dtype in DTYPES:
        check_exact(query, meta, table, seq_lens, budget, block_size, 1, summary, reduce, dtype)


def test_hits_with_sinks_and_short_sequences(rng):
    """hits counts every kept block once per (sequence, KV head): sinks, the last page, chosen
    pages and the whole table of a short sequence, on both top-k kernels."""
    for block_size, lens in ((16, [3000, 50, 16 * 9]), (1, [33000, 5])):
        budget = 9
        seq_lens = np.array(lens, dtype=np.int32)
        table, num_blocks = random_pages(rng, seq_lens, block_size)
        query = rng.integers(-2, 3, size=(len(lens), 8, 64)).astype(np.float32)
        meta = integer_summaries(rng, num_blocks, 2, 64, "meanstd")
        start = rng.integers(0, 5, size=num_blocks).astype(np.int32)
        hits = cuda_ints(start.copy())
        got_t = check_exact(query, meta, table, seq_lens, budget, block_size, 2, "meanstd", "sum",
                            "float16", hits=hits)  # fmt: skip
        kept = got_t.ravel()
        want = start + np.bincount(kept[kept >= 0], minlength=num_blocks)
        np.testing.assert_array_equal(to_np(hits), want)


# ---------------------------------------------------------------------------------------------
# CUDA graphs


def check_graph_replays(
    rng, table, num_blocks, kv_heads, group, head_dim, budget, block_size, sinks, reduce, steps
):
    """One capture of select_pages (float16 meanstd summaries, hits), replayed once per entry of
    `steps` (the sequences' lengths) with a new query written in place and the outputs poisoned:
    every replay gives the reference's pages, lengths and hit counts."""
    batch = table.shape[0]
    meta = integer_summaries(rng, num_blocks, kv_heads, head_dim, "meanstd")
    query = rng.integers(-2, 3, size=(batch, kv_heads * group, head_dim)).astype(np.float32)
    q = asarray(query, "torch", "float16", "cuda")
    m = asarray(meta, "torch", "float16", "cuda")
    t = cuda_ints(table)
    lens = cuda_ints(np.asarray(steps[0], np.int32))
    hits = torch.zeros(num_blocks, dtype=torch.int32, device="cuda")
    out = (
        torch.full((batch, kv_heads, budget), -7, dtype=torch.int32, device="cuda"),
        torch.full((batch, kv_heads), -7, dtype=torch.int32, device="cuda"),
    )
    ws = torch.empty(ts.select_pages_workspace_bytes(q, m, t), dtype=torch.uint8, device="cuda")

    def select():
        ts.select_pages(q, m, t, lens, budget, block_size=block_size, num_sink_pages=sinks,
                        summary="meanstd", group_reduce=reduce, hits=hits, out=out,
                        workspace=ws)  # fmt: skip

    select()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select()
    for step_lens in steps:
        step_lens = np.asarray(step_lens, np.int32)
        query = rng.integers(-2, 3, size=query.shape).astype(np.float32)
        q.copy_(asarray(query, "torch", "float16", "cuda"))
        lens.copy_(cuda_ints(step_lens))
        hits.zero_()
        out[0].fill_(-7)
        out[1].fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        want_t, want_l = R.select_pages(
            query, meta, table, step_lens, budget, block_size, sinks, "meanstd", reduce
        )
        np.testing.assert_array_equal(to_np(out[0]), want_t)
        np.testing.assert_array_equal(to_np(out[1]), want_l)
        kept = want_t.ravel()
        np.testing.assert_array_equal(
            to_np(hits), np.bincount(kept[kept >= 0], minlength=num_blocks)
        )


@pytest.mark.parametrize("reduce", REDUCES)
def test_graph_replay_across_the_budget(rng, reduce):
    """The page-wide kernels (head_dim 128, group 4, sinks) replayed while lengths grow from below
    the budget to far above it."""
    block_size, capacity = 16, np.array([4000, 2500, 600], dtype=np.int32)
    table, num_blocks = random_pages(rng, capacity, block_size)
    steps = [[100, 30, 5], [193, 192, 191], [4000, 1000, 600], [2500, 2500, 17]]
    check_graph_replays(rng, table, num_blocks, 2, 4, 128, 12, block_size, 1, reduce,
                        [np.minimum(s, capacity) for s in steps])  # fmt: skip


@pytest.mark.parametrize("reduce", REDUCES)
def test_graph_replay_across_slices(rng, reduce):
    """A table three slices of 2048 candidates wide (head_dim 64, group 2, two sinks) replayed
    while lengths move between a copy, one slice, two and three."""
    block_size = 16
    capacity = np.array([3 * SLICE + 3, 2 * SLICE + 40, SLICE + 3, 500], dtype=np.int32)
    table, num_blocks = exact_width_table(rng, capacity * block_size, block_size)
    step_pages = [
        [50, 90, 3, 96],
        [SLICE + 3, SLICE + 4, SLICE + 3, 97],
        [3 * SLICE + 3, 2 * SLICE + 40, SLICE + 2, 500],
        [2 * SLICE + 3, 1, SLICE + 3, 0],
    ]
    steps = [(np.array(p) * block_size - 7).clip(0) for p in step_pages]
    check_graph_replays(rng, table, num_blocks, 4, 2, 64, 96, block_size, 2, reduce, steps)


@pytest.mark.parametrize("width_below_budget", [0, 3])
def test_table_no_wider_than_the_budget(rng, width_below_budget):
    """A block_table of at most `budget` columns launches only the copy: each KV head gets the
    sequence's pages and -1 padding, lengths as given, hits counted, in a graph replay too."""
    block_size, budget, kv_heads = 16, 10, 4
    width = budget - width_below_budget
    seq_lens = np.array([width * block_size, 1, 0, 37, width * block_size - 9], dtype=np.int32)
    num_blocks = 64
    table = np.stack([rng.permutation(num_blocks)[:width] for _ in seq_lens]).astype(np.int32)
    query = rng.integers(-2, 3, size=(len(seq_lens), kv_heads * 2, 64)).astype(np.float32)
    meta = integer_summaries(rng, num_blocks, kv_heads, 64, "meanstd")
    hits = torch.zeros(num_blocks, dtype=torch.int32, device="cuda")
    got_t = check_exact(query, meta, table, seq_lens, budget, block_size, 1, "meanstd", "sum",
                        "float16", hits=hits)  # fmt: skip
    kept = got_t.ravel()
    np.testing.assert_array_equal(to_np(hits), np.bincount(kept[kept >= 0], minlength=num_blocks))

    q = asarray(query, "torch", "float16", "cuda")
    m = asarray(meta, "torch", "float16", "cuda")
    t, lens = cuda_ints(table), cuda_ints(seq_lens)
    out = (
        torch.full((len(seq_lens), kv_heads, budget), -7, dtype=torch.int32, device="cuda"),
        torch.full((len(seq_lens), kv_heads), -7, dtype=torch.int32, device="cuda"),
    )
    ws = torch.empty(max(16, ts.select_pages_workspace_bytes(q, m, t)), dtype=torch.uint8,
                     device="cuda")  # fmt: skip

    def select():
        ts.select_pages(q, m, t, lens, budget, block_size=block_size, out=out, workspace=ws)

    select()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select()
    new_lens = rng.integers(0, width * block_size + 1, size=len(seq_lens)).astype(np.int32)
    lens.copy_(cuda_ints(new_lens))
    out[0].fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    want_t, want_l = R.select_pages(
        query, meta, table, new_lens, budget, block_size, 0, "meanstd", "sum"
    )
    np.testing.assert_array_equal(to_np(out[0]), want_t)
    np.testing.assert_array_equal(to_np(out[1]), want_l)


def test_select_pages_workspace_errors_write_nothing():
    """The CUDA scratch: missing, too small, misaligned, strided, sharing the output table's
    memory or on the host, it is a ValueError and the outputs keep their poison."""
    rng = np.random.default_rng(11)
    seq_lens = np.array([40, 7], np.int32)
    table, num_blocks = random_pages(rng, seq_lens, 4)
    meta = integer_summaries(rng, num_blocks, 2, 8, "minmax")
    query = rng.integers(-2, 3, size=(2, 4, 8)).astype(np.float32)
    q, m = asarray(query, "torch", "float32", "cuda"), asarray(meta, "torch", "float32", "cuda")
    t, lens = cuda_ints(table), cuda_ints(seq_lens)
    nbytes = ts.select_pages_workspace_bytes(q, m, t)
    big = torch.empty((2 * nbytes + 64,), dtype=torch.uint8, device="cuda")
    shared = torch.full(((nbytes + 63) // 4,), -7, dtype=torch.int32, device="cuda")
    out_l = torch.full((2, 2), -7, dtype=torch.int32, device="cuda")
    cases = [
        (None, None, rf"the CUDA backend needs a workspace of {nbytes} bytes"),
        (big[:16], None, rf"workspace must hold at least {nbytes} bytes, got 16"),
        (big[1 : nbytes + 1], None, r"workspace must be 16-byte aligned"),
        (big[: 2 * nbytes : 2], None, r"workspace must be contiguous"),
        (shared.view(torch.uint8)[:nbytes], shared[:12].view(2, 2, 3), r"table and workspace"),
        (torch.empty((nbytes,), dtype=torch.uint8), None, r"all tensors must be on one device"),
    ]
    for workspace, out_t, match in cases:
        if out_t is None:
            out_t = torch.full((2, 2, 3), -7, dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="^tinyserve.select_pages: " + match):
            # the core directly: the Python wrapper would supply its own workspace for None
            ts._tinyserve.select_pages(q, m, t, lens, 3, 4, out_t, out_l, workspace=workspace)
        torch.cuda.synchronize()
        assert (out_t == -7).all() and (out_l == -7).all()
    assert (shared == -7).all()
