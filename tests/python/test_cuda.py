"""CUDA-only behaviour: graph capture and replay, streams, CuPy and JAX interop, device-side
bounds checks, long sequences, and agreement with the CPU backend. Skipped without a device."""

from __future__ import annotations

import os

import numpy as np
import pytest

import reference as R
import tinyserve as ts
from arrays import TOLERANCE, asarray, cache_pair, f64, torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch is None, reason="torch is not installed"),
]


def cuda(x, dtype=None):
    return asarray(np.asarray(x), "torch", dtype, "cuda")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [128, 96])
def test_cuda_matches_cpu_backend(rng, dtype, head_dim):
    """The CUDA kernels against the CPU backend on the same (rounded) data, and both against the
    float64 reference."""
    case = R.PagedCase(rng, rng.integers(1, 3000, size=6), 32, 8, head_dim, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", "NHD")
    q = cuda(case.query, dtype)
    table, lens = cuda(case.block_table), cuda(case.seq_lens)
    out_gpu, lse_gpu = ts.paged_attention(q, kc, vc, table, lens, return_lse=True)
    out_cpu, lse_cpu = ts.paged_attention(
        q.cpu(), kc.cpu(), vc.cpu(), table.cpu(), lens.cpu(), return_lse=True
    )
    torch.cuda.synchronize()
    ref, ref_lse = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    assert R.rel_error(f64(out_gpu), ref) < TOLERANCE[dtype]
    assert R.rel_error(f64(out_cpu), ref) < TOLERANCE[dtype]
    assert R.rel_error(f64(out_gpu), f64(out_cpu)) < 2 * TOLERANCE[dtype]
    np.testing.assert_allclose(f64(lse_gpu), ref_lse, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(f64(lse_gpu), f64(lse_cpu), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("head_dim", [pytest.param(128, id="d128"), pytest.param(64, id="d64")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lengths_up_to_100k(rng, dtype, head_dim):
    """Long and short sequences in one batch, default (planned) splits."""
    lens = [100_000, 1, 4097, 65_536]
    case = R.PagedCase(rng, lens, 8, 2, head_dim, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", "HND")
    q = cuda(case.query, dtype)
    out = torch.full_like(q, float("nan"))
    _, lse = ts.paged_attention(
        q, kc, vc, cuda(case.block_table), cuda(case.seq_lens), out, return_lse=True
    )
    torch.cuda.synchronize()
    ref, ref_lse = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE[dtype]
    np.testing.assert_allclose(f64(lse), ref_lse, rtol=1e-4, atol=1e-3)


# Lengths at and around the edges of the tensor-core kernel's tiles at head_dim 64 (128 tokens,
# 16 for each of 8 warps), and longer ones that splits cut into chunks ending inside a tile.
D64_LENS = [1, 2, 63, 64, 65, 127, 128, 129, 191, 255, 256, 257, 300, 1000]


def decode_d64(case, dtype, layout, **options):
    """Runs decode at head_dim 64 on the GPU into NaN-poisoned outputs; returns (out, lse,
    reference out, reference lse) in float64."""
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", dtype, "cuda", layout)
    q = cuda(case.query, dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device="cuda")
    ts.paged_attention(
        q, kc, vc, cuda(case.block_table), cuda(case.seq_lens), out, lse=lse, **options
    )
    torch.cuda.synchronize()
    ref, ref_lse = R.paged_attention(
        f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens, **options_for_reference(options)
    )
    return f64(out), f64(lse), ref, ref_lse


def options_for_reference(options):
    return {k: v for k, v in options.items() if k in ("window_left", "logits_soft_cap")}


def check_d64(out, lse, ref, ref_lse, dtype):
    assert R.rel_error(out, ref) < TOLERANCE[dtype]
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8, 20])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_d64_decode_tile_edges(rng, dtype, layout, block_size, group, num_splits):
    """head_dim 64 on the tensor-core kernel: every length around a 64- and 128-token tile edge
    (partial tiles, a tile whose last 4 warps' tokens are empty or partial), split into chunks of
    whole tiles whose last one ends inside a tile, GQA groups of 1 to 20 (two head tiles), page
    sizes 1/16/32, both cache layouts."""
    case = R.PagedCase(rng, D64_LENS, 2 * group, 2, 64, block_size)
    out, lse, ref, ref_lse = decode_d64(case, dtype, layout, num_splits=num_splits)
    check_d64(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("window_left", [0, 100, 200, 1000])
def test_d64_decode_window_softcap_splits(rng, dtype, num_splits, window_left):
    """A sliding window starts the key range (and so every tile and split) at a token that is no
    multiple of 64 or 128; with a soft cap and split counts that leave some splits empty."""
    case = R.PagedCase(rng, [1, 129, 300, 1000, 4097], 32, 8, 64, 16)
    options = dict(num_splits=num_splits, window_left=window_left, logits_soft_cap=30.0)
    out, lse, ref, ref_lse = decode_d64(case, dtype, "NHD", **options)
    check_d64(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 7, 8, 9, 16, 24])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_query_heads_across_the_mma_rows(rng, dtype, head_dim, group, num_splits):
    """The tensor-core decode kernel holds up to 16 query heads of a KV head as its MMA rows and
    skips the softmax of rows 8-15 when it holds at most 8. Groups on both sides of 8, a full 16
    and 24 (a CTA of 16 heads and one of 8 per KV head): every query head's output against the
    float64 reference, over lengths that end inside and on tiles."""
    case = R.PagedCase(rng, [1, 64, 130, 1000], 2 * group, 2, head_dim, 16)
    out, lse, ref, ref_lse = decode_d64(case, dtype, "NHD", num_splits=num_splits)
    for head in range(2 * group):
        assert R.rel_error(out[:, head], ref[:, head]) < TOLERANCE[dtype], head
    check_d64(out, lse, ref, ref_lse, dtype)


# Split counts on both sides of the cluster merge's limit (kMaxClusterSplits = 8: up to 8 splits
# of a row merge in a thread-block cluster on sm_90, more through the merge kernel).
CLUSTER_SPLITS = [2, 5, 8, 9, 16]


@pytest.mark.parametrize("num_splits", CLUSTER_SPLITS)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [4, 24])
def test_split_merge_in_a_cluster_and_in_the_merge_kernel(rng, num_splits, head_dim, group):
    """Every split count around the cluster limit: lengths that leave most splits of a row empty
    (1 and 17 tokens over 16 splits), chunks ending inside a tile, a group of 24 (two head tiles,
    so two clusters per KV head); output and log-sum-exp against float64 into poisoned buffers."""
    case = R.PagedCase(rng, [1, 17, 197, 1000, 4097], 2 * group, 2, head_dim, 16)
    for dtype in ["float16", "bfloat16"]:
        out, lse, ref, ref_lse = decode_d64(case, dtype, "NHD", num_splits=num_splits)
        check_d64(out, lse, ref, ref_lse, dtype)


def test_split_merge_in_clusters_writes_no_partials(rng):
    """On sm_90 a launch of 4 splits whose 20 clusters fit the device at once merges them in
    thread-block clusters: the caller's workspace keeps every byte it had. 9 splits (more than
    a cluster takes) write their partials there for the merge kernel, as every split launch does
    before sm_90. Both outputs against float64."""
    case = R.PagedCase(rng, [700, 1000, 1, 333, 2000], 16, 4, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    table, lens = cuda(case.block_table), cuda(case.seq_lens)
    ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    hopper = torch.cuda.get_device_properties(0).major >= 9
    for splits, in_clusters in [(4, hopper), (9, False)]:
        _, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=splits)
        workspace = torch.full((nbytes,), 0x7F, dtype=torch.uint8, device="cuda")
        out = torch.full_like(q, float("nan"))
        ts.paged_attention(q, kc, vc, table, lens, out, num_splits=splits, workspace=workspace)
        torch.cuda.synchronize()
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"], splits
        assert bool((workspace == 0x7F).all()) == in_clusters, splits


@pytest.mark.parametrize("num_splits", [2, 3])
def test_split_merge_over_many_waves(rng, num_splits):
    """A split launch of more CTAs than the device holds at once: 2 splits merge in clusters
    whatever the launch's length (clusters of two CTAs fill every slot), 3 through the merge
    kernel (where clusters of three would leave slots idle)."""
    lens = rng.integers(1, 700, size=300)
    case = R.PagedCase(rng, lens, 8, 4, 128, 16)
    out, lse, ref, ref_lse = decode_d64(case, "float16", "NHD", num_splits=num_splits)
    check_d64(out, lse, ref, ref_lse, "float16")


@pytest.mark.parametrize("num_splits", CLUSTER_SPLITS)
def test_split_merge_over_per_kv_head_tables(rng, num_splits):
    """Sparse decode's shape (one page list and length per KV head, as select_pages returns):
    KV heads of one sequence with different lengths, one of them empty, at every split count."""
    num_blocks, block_size, kv_heads, group, head_dim = 600, 16, 4, 8, 128
    key = rng.standard_normal((num_blocks, block_size, kv_heads, head_dim)).astype(np.float32)
    value = rng.standard_normal((num_blocks, block_size, kv_heads, head_dim)).astype(np.float32)
    kc, vc = cuda(key, "float16"), cuda(value, "float16")
    batch, width = 3, 40
    table = rng.permutation(num_blocks)[: batch * kv_heads * width]
    table = table.reshape(batch, kv_heads, width).astype(np.int32)
    lens = rng.integers(1, width * block_size + 1, size=(batch, kv_heads)).astype(np.int32)
    lens[1, 2] = 0
    q = cuda(rng.standard_normal((batch, kv_heads * group, head_dim)), "float16")
    out = torch.full_like(q, float("nan"))
    ts.paged_attention(q, kc, vc, cuda(table), cuda(lens), out, num_splits=num_splits)
    torch.cuda.synchronize()
    want = R.paged_attention_per_kv_head(f64(q), f64(kc), f64(vc), table, lens)
    assert R.rel_error(f64(out), want) < TOLERANCE["float16"]
    np.testing.assert_array_equal(f64(out)[1, 2 * group : 3 * group], 0.0)


def test_d64_planned_splits(rng):
    """The planner's split counts at head_dim 64 (occupancy of the 128-token-tile kernel): one
    long sequence is split across the GPU, and the planned call gives the reference result."""
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    case = R.PagedCase(rng, [40_000], 32, 8, 64, 16)
    q = cuda(case.query, "float16")
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    splits, _ = ts.plan_paged_attention(q, kc, cuda(case.block_table))
    assert splits * 8 >= sm
    out, lse, ref, ref_lse = decode_d64(case, "float16", "NHD")
    check_d64(out, lse, ref, ref_lse, "float16")


def test_plan_fills_the_gpu_for_one_long_sequence(rng):
    """One sequence of 128k tokens is split across the GPU (for the split kernel's occupancy);
    256 short ones are not split."""
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.empty((1, 32, 128), dtype=torch.float16, device="cuda")
    kc = torch.empty((8193, 16, 8, 128), dtype=torch.float16, device="cuda")
    table = torch.zeros((1, 8192), dtype=torch.int32, device="cuda")
    splits, nbytes = ts.plan_paged_attention(q, kc, table)
    assert splits * 8 >= sm  # at least one CTA per multiprocessor
    assert nbytes >= splits * 32 * 129 * 4
    if torch.cuda.get_device_capability(0) == (9, 0):
        # Split launches at head_dim 128 run the kernel that fits three CTAs per multiprocessor
        # (228 KB of shared memory), and the split count is planned for it: one wave of more
        # than two CTAs per multiprocessor.
        assert 2 * sm < splits * 8 <= 3 * sm
    q256 = torch.empty((256, 32, 128), dtype=torch.float16, device="cuda")
    table256 = torch.zeros((256, 64), dtype=torch.int32, device="cuda")
    assert ts.plan_paged_attention(q256, kc, table256) == (1, 0)


def test_plan_over_host_lengths(rng):
    """plan_paged_attention(host_seq_lens=...): equal lengths plan as max_seq_len does; where
    lengths differ on a batch that fills the GPU less than three times, the plan may split (on
    an H100/H200 it does for 16 and 48 sequences of 1-8k tokens, and keeps the 64 measured
    unsplit, in float16 and over float8 caches); many waves of short sequences stay unsplit; a
    plan made over stale lengths is still correct (the call reads seq_lens)."""
    kc = torch.empty((4, 16, 8, 128), dtype=torch.float16, device="cuda")
    q = torch.empty((64, 32, 128), dtype=torch.float16, device="cuda")
    table = torch.zeros((64, 512), dtype=torch.int32, device="cuda")
    equal = np.full(64, 4096, np.int32)
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=equal) == ts.plan_paged_attention(
        q, kc, table, max_seq_len=4096
    )
    ragged = rng.integers(1, 8192, size=64).astype(np.int32)
    splits, nbytes = ts.plan_paged_attention(q, kc, table, host_seq_lens=ragged)
    assert splits >= 1 and (nbytes > 0) == (splits > 1)
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) == (9, 0) and props.multi_processor_count >= 114:
        # 16 sequences leave most of the GPU idle unsplit. 64 fill it about twice, longest
        # first: the split kernel's third CTA a multiprocessor adds little bandwidth, and
        # unsplit measured faster on these lengths than the 3 splits planned before (an H200:
        # 0.280 ms against 0.291; over float8 caches 0.149 against 0.176). Between them, 48
        # sequences ran fastest in 2 splits (0.198 ms against 0.225 unsplit and 0.214-0.219 in
        # 3-4; over float8 caches 0.115 against 0.121 and 0.133). Fixed draws (the ones
        # measured).
        lens16 = np.random.default_rng(16).integers(1, 8192, size=16).astype(np.int32)
        lens48 = np.random.default_rng(48).integers(1, 8192, size=48).astype(np.int32)
        lens64 = np.random.default_rng(64).integers(1, 8192, size=64).astype(np.int32)
        kc8 = torch.empty((4, 16, 8, 128), dtype=torch.float8_e4m3fn, device="cuda")
        for cache in (kc, kc8):
            assert ts.plan_paged_attention(q, cache, table, host_seq_lens=lens64)[0] == 1
            assert ts.plan_paged_attention(q[:48], cache, table[:48], host_seq_lens=lens48)[0] == 2
            assert ts.plan_paged_attention(q[:16], cache, table[:16], host_seq_lens=lens16)[0] > 1
        # 128 ragged sequences are near four waves of CTAs: they balance unsplit (measured
        # faster than 3 splits on an H200), so the plan is not simulated.
        q128 = torch.empty((128, 32, 128), dtype=torch.float16, device="cuda")
        lens128 = rng.integers(1, 4096, size=128).astype(np.int32)
        assert ts.plan_paged_attention(
            q128, kc, table[:1].expand(128, -1).contiguous(), host_seq_lens=lens128
        ) == (1, 0)
    # A list works too, and num_splits given wins over the lengths.
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=list(ragged))[0] == splits
    assert ts.plan_paged_attention(q, kc, table, host_seq_lens=ragged, num_splits=3)[0] == 3
    q256 = torch.empty((256, 32, 128), dtype=torch.float16, device="cuda")
    table256 = torch.zeros((256, 128), dtype=torch.int32, device="cuda")
    short = rng.integers(1, 2048, size=256).astype(np.int32)
    assert ts.plan_paged_attention(q256, kc, table256, host_seq_lens=short) == (1, 0)
    # Per-KV-head lengths with a per-KV-head table.
    table_h = torch.zeros((64, 8, 512), dtype=torch.int32, device="cuda")
    lens_h = rng.integers(1, 8192, size=(64, 8)).astype(np.int32)
    assert ts.plan_paged_attention(q, kc, table_h, host_seq_lens=lens_h)[0] >= 1
    with pytest.raises(ValueError, match="host_seq_lens must be in host memory"):
        ts.plan_paged_attention(q, kc, table, host_seq_lens=torch.from_numpy(ragged).cuda())


@pytest.mark.parametrize("stale", [False, True], ids=["planned", "stale_plan"])
def test_decode_with_a_plan_over_host_lengths(rng, stale):
    """Decode over ragged lengths with the split planned from their host copy (or from other,
    stale lengths): the float64 reference's result, every output row written."""
    lens = rng.integers(1, 6000, size=24)
    case = R.PagedCase(rng, lens, 32, 8, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    host = rng.integers(1, 6000, size=24) if stale else case.seq_lens
    splits, nbytes = ts.plan_paged_attention(
        q, kc, cuda(case.block_table), host_seq_lens=np.asarray(host, np.int32)
    )
    workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device="cuda")
    out = torch.full_like(q, float("nan"))
    ts.paged_attention(
        q,
        kc,
        vc,
        cuda(case.block_table),
        cuda(case.seq_lens),
        out,
        num_splits=splits,
        workspace=workspace,
    )
    torch.cuda.synchronize()
    ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    assert not torch.isnan(out).any()
    assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]


@pytest.mark.parametrize("batch", [2, 37, 256, 257])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window_left", [-1, 40])
def test_sequences_run_longest_first(rng, batch, num_splits, window_left):
    """The tensor-core decode kernel runs the sequences of a batch of 2-256 longest first (each
    CTA ranks them by their lengths on the device): every row is its own sequence's attention
    whatever the order, with lengths tied, empty, longer and shorter than the window, split or
    not, and at 257 sequences (index order)."""
    lens = rng.choice([0, 1, 17, 40, 41, 300, 300, 777], size=batch)
    lens[rng.integers(batch)] = 1000  # one clearly longest, anywhere
    case = R.PagedCase(rng, lens, 8, 2, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    table, seq_lens = cuda(case.block_table), cuda(case.seq_lens)
    _, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=num_splits)
    workspace = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device="cuda")
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device="cuda")
    ts.paged_attention(
        q,
        kc,
        vc,
        table,
        seq_lens,
        out,
        lse=lse,
        num_splits=num_splits,
        workspace=workspace,
        window_left=window_left,
    )
    torch.cuda.synchronize()
    ref, ref_lse = R.paged_attention(
        f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens, window_left=window_left
    )
    got, got_lse = f64(out), f64(lse)
    for b in range(batch):  # row by row: a row computed for another sequence stands out
        assert R.rel_error(got[b], ref[b]) < TOLERANCE["float16"], b
        finite = np.isfinite(ref_lse[b])
        np.testing.assert_allclose(got_lse[b][finite], ref_lse[b][finite], rtol=1e-4, atol=1e-3)
        assert (np.isneginf(got_lse[b]) == ~finite).all(), b


@pytest.mark.parametrize("head_dim", [pytest.param(128, id="d128"), pytest.param(64, id="d64")])
def test_cuda_graph_capture_and_replay(rng, head_dim):
    """Capture decode once; replay with new lengths, tables and queries written into the same
    buffers: every replay matches the reference."""
    num_blocks, block_size, max_blocks, batch = 600, 16, 40, 5
    dtype = torch.float16
    key = rng.standard_normal((num_blocks, block_size, 4, head_dim)).astype(np.float32)
    value = rng.standard_normal((num_blocks, block_size, 4, head_dim)).astype(np.float32)
    kc, vc = cuda(key, "float16"), cuda(value, "float16")
    q = torch.zeros((batch, 16, head_dim), dtype=dtype, device="cuda")
    table = torch.zeros((batch, max_blocks), dtype=torch.int32, device="cuda")
    lens = torch.ones((batch,), dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty((batch, 16), dtype=torch.float32, device="cuda")
    splits, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=4)
    workspace = torch.empty((nbytes,), dtype=torch.uint8, device="cuda")
    kwargs = dict(out=out, lse=lse, num_splits=4, workspace=workspace)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ts.paged_attention(q, kc, vc, table, lens, **kwargs)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ts.paged_attention(q, kc, vc, table, lens, **kwargs)
    for _ in range(3):
        new_lens = rng.integers(0, max_blocks * block_size + 1, size=batch).astype(np.int32)
        new_table = rng.integers(0, num_blocks, size=(batch, max_blocks)).astype(np.int32)
        new_q = rng.standard_normal((batch, 16, head_dim)).astype(np.float32)
        q.copy_(cuda(new_q, "float16"))
        table.copy_(cuda(new_table))
        lens.copy_(cuda(new_lens))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = R.paged_attention(f64(q), f64(kc), f64(vc), new_table, new_lens)
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(f64(lse)[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("torch_paths", ["private", "public"])
def test_runs_on_the_current_torch_stream(rng, monkeypatch, torch_paths):
    """With stream=None the op runs on torch's current stream: it sees work queued before it on
    that stream (a long sleep, then the query write) with no synchronisation by the caller. Also
    through torch's public export and stream query, as where its private ones are missing."""
    from tinyserve import _interop

    _interop.export(torch.zeros(1))  # finds torch's fast paths
    if torch_paths == "public":
        monkeypatch.setattr(_interop, "_TORCH_TO_DLPACK", None)
        monkeypatch.setattr(_interop, "_TORCH_RAW_STREAM", None)
    case = R.PagedCase(rng, [500, 37], 16, 4, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    table, lens = cuda(case.block_table), cuda(case.seq_lens)
    q_host = torch.from_numpy(case.query).half().pin_memory()
    q = torch.zeros((2, 16, 128), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream
        q.copy_(q_host, non_blocking=True)
        out = ts.paged_attention(q, kc, vc, table, lens)
        explicit = torch.empty_like(out)
    ts.paged_attention(q, kc, vc, table, lens, explicit, stream=stream)
    stream.synchronize()
    ref, _ = R.paged_attention(
        case.query.astype(np.float16), f64(kc), f64(vc), case.block_table, case.seq_lens
    )
    assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]
    assert R.rel_error(f64(explicit), ref) < TOLERANCE["float16"]
    with pytest.raises(TypeError):
        ts.paged_attention(q, kc, vc, table, lens, stream=1.5)


def test_other_streams_are_left_alone(rng):
    """Ops on a side stream add no work or wait to any other stream: while the side stream is
    busy, the legacy default stream stays idle through every op, and the results are right."""
    case = R.PagedCase(rng, [300, 40], 8, 2, 64, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q, table, lens = cuda(case.query, "float16"), cuda(case.block_table), cuda(case.seq_lens)
    new_k = torch.randn((3, 2, 64), dtype=torch.float16, device="cuda")
    slots = torch.tensor([5, -1, 17], dtype=torch.int64, device="cuda")
    pairs = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    k2, v2 = kc.clone(), vc.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        out = ts.paged_attention(q, kc, vc, table, lens)
        ts.reshape_and_cache(new_k, new_k, k2, v2, slots)
        ts.copy_blocks([k2, v2], pairs[:1], pairs[1:])
    assert torch.cuda.default_stream().query(), "the default stream was made to wait"
    side.synchronize()
    ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]
    expected = kc.clone()
    expected.view(-1, 2, 64)[torch.tensor([5, 17], device="cuda")] = new_k[[0, 2]]
    expected[1] = expected[0]
    # exact, with the case's NaN-poisoned padding slots compared as equal
    torch.testing.assert_close(k2, expected, rtol=0, atol=0, equal_nan=True)


def test_cache_writes_never_leave_the_cache(rng):
    """Out-of-range slots and block ids arriving on the device write and read nothing outside
    the cache (the guard blocks around the cache view stay untouched)."""
    n, p, h, d = 8, 16, 2, 64
    buf = torch.full((n + 2, p, h, d), 7.0, dtype=torch.float16, device="cuda")
    value_buf = torch.full_like(buf, 7.0)
    cache, value_cache = buf[1 : n + 1], value_buf[1 : n + 1]
    slots = torch.tensor([-5, n * p, n * p + 100, -1, 3, 2**40], dtype=torch.int64, device="cuda")
    key = torch.randn((6, h, d), dtype=torch.float16, device="cuda")
    value = torch.randn((6, h, d), dtype=torch.float16, device="cuda")
    ts.reshape_and_cache(key, value, cache, value_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(cache.reshape(-1, h, d)[3], key[4])
    assert torch.equal(value_cache.reshape(-1, h, d)[3], value[4])
    expected = torch.full_like(buf, 7.0)
    expected[1:].reshape(-1, h, d)[3] = key[4]
    assert torch.equal(buf, expected)
    expected_value = torch.full_like(buf, 7.0)
    expected_value[1:].reshape(-1, h, d)[3] = value[4]
    assert torch.equal(value_buf, expected_value)

    ts.copy_blocks(
        [cache],
        torch.tensor([0, -3, 9], dtype=torch.int32, device="cuda"),
        torch.tensor([n, 1, 2], dtype=torch.int32, device="cuda"),
    )
    torch.cuda.synchronize()
    assert torch.equal(buf, expected)

    table = torch.tensor([[0, -1, n, 2**30]], dtype=torch.int32, device="cuda")
    out = ts.paged_attention(
        torch.randn((1, 4, d), dtype=torch.float16, device="cuda"),
        cache,
        cache,
        table,
        torch.tensor([64], dtype=torch.int32, device="cuda"),
    )
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def test_device_mismatch_and_pageable_host(rng):
    q = torch.randn((1, 4, 64), device="cuda")
    kc = torch.randn((4, 16, 1, 64), device="cuda")
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ts.paged_attention(q, kc, kc, torch.zeros((1, 1), dtype=torch.int32), lens)
    host = torch.zeros((4, 16, 1, 64))  # pageable
    with pytest.raises(ValueError, match="must be pinned"):
        ts.swap_blocks(kc, host, np.array([0], np.int32), np.array([1], np.int32))
    with pytest.raises(ValueError, match="src and dst must be in host memory"):
        ts.swap_blocks(
            kc,
            host.pin_memory(),
            torch.tensor([0], dtype=torch.int32, device="cuda"),
            np.array([1], np.int32),
        )


def test_swap_pinned_combined_layout(rng):
    """Offload through a pinned host pool laid out like the device cache ([N, 2, H, P, D])."""
    dev = torch.randn((20, 2, 4, 16, 64), dtype=torch.bfloat16, device="cuda")
    host = torch.zeros((6, 2, 4, 16, 64), dtype=torch.bfloat16).pin_memory()
    src = np.array([3, 4, 5, 11], np.int32)  # a run of three and a single block
    dst = np.array([0, 1, 2, 5], np.int32)
    stream = torch.cuda.Stream()
    ts.swap_blocks(dev, host, src, dst, stream=stream)
    stream.synchronize()
    assert torch.equal(host[torch.from_numpy(dst).long()], dev[torch.from_numpy(src).long()].cpu())
    back = np.array([15, 16, 17, 0], np.int32)
    ts.swap_blocks(host, dev, dst, back)
    torch.cuda.synchronize()
    assert torch.equal(dev[torch.from_numpy(back).long()], dev[torch.from_numpy(src).long()])


def test_swap_blocks_in_a_cuda_graph(rng):
    """Offload and recall captured in a CUDA graph: each replay copies the blocks' current
    contents, and nothing else changes."""
    dev = torch.randn((24, 16, 2, 64), dtype=torch.float16, device="cuda")
    host = torch.zeros((8, 16, 2, 64), dtype=torch.float16).pin_memory()
    out_src = np.array([3, 4, 9, 20, 21, 22], np.int32)  # runs of 2, 1 and 3 blocks
    out_dst = np.array([0, 1, 5, 2, 3, 4], np.int32)
    back = np.array([10, 11, 12, 0, 1, 2], np.int32)  # recall into other device blocks
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ts.swap_blocks(dev, host, out_src, out_dst)  # warm-up outside capture
        ts.swap_blocks(host, dev, out_dst, back)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ts.swap_blocks(dev, host, out_src, out_dst)
        ts.swap_blocks(host, dev, out_dst, back)
    for _ in range(3):
        dev.copy_(torch.randn_like(dev))
        host.fill_(float("nan"))
        before = dev.clone()
        graph.replay()
        torch.cuda.synchronize()
        src_idx = torch.from_numpy(out_src).long()
        assert torch.equal(host[torch.from_numpy(out_dst).long()], before[src_idx].cpu())
        assert torch.isnan(host[[6, 7]]).all()  # host blocks not named stay as they were
        expected = before.clone()
        expected[torch.from_numpy(back).long()] = before[src_idx]
        assert torch.equal(dev, expected)


# Pinned torch memory is mapped under unified addressing, so these swaps run the zero-copy kernel
# (a CTA per block slice, the host side read and written over the bus).


@pytest.mark.parametrize("layout", ["NHD", "HND_combined"])
@pytest.mark.parametrize("id_dtype", ["int32", "int64"])
def test_swap_kernel_scattered_kv_views(rng, layout, id_dtype):
    """Offload and recall of hundreds of scattered 32 KiB blocks of K and V views, each against
    a NumPy gather; blocks not named keep their (NaN) contents."""
    n_dev, n_host, pairs = 600, 500, 450
    shape = (n_dev, 16, 8, 128)  # float16: 32 KiB a block
    kc, vc = cache_pair(
        rng.standard_normal(shape), rng.standard_normal(shape), "torch", "float16", "cuda", layout
    )
    poison = np.full((n_host,) + shape[1:], np.nan)
    hk, hv = cache_pair(poison, poison, "torch", "float16", "cpu", layout, pinned=True)
    out_src = rng.choice(n_dev, pairs, replace=False).astype(id_dtype)
    out_dst = rng.permutation(n_host)[:pairs].astype(id_dtype)
    dev_before = [f64(kc), f64(vc)]
    ts.swap_blocks(kc, hk, out_src, out_dst)
    ts.swap_blocks(vc, hv, out_src, out_dst)
    torch.cuda.synchronize()
    for host, before in zip((hk, hv), dev_before):
        expect = poison.copy()
        expect[out_dst] = before[out_src]
        np.testing.assert_array_equal(f64(host), expect)

    back = rng.permutation(n_dev)[:pairs].astype(id_dtype)  # recall into other device blocks
    back_idx = torch.from_numpy(back.astype(np.int64)).cuda()
    for dev in (kc, vc):
        dev[back_idx] = float("nan")
    ts.swap_blocks(hk, kc, out_dst, back)
    ts.swap_blocks(hv, vc, out_dst, back)
    torch.cuda.synchronize()
    for dev, before in zip((kc, vc), dev_before):
        expect = before.copy()
        expect[back] = before[out_src]
        np.testing.assert_array_equal(f64(dev), expect)


def pinned_bytes(rng, num_blocks, block_shape, offset):
    """Random bytes [num_blocks, *block_shape] in pinned memory, starting `offset` bytes into
    the allocation (so its address may be aligned to as little as 1 byte)."""
    size = num_blocks * int(np.prod(block_shape))
    buf = torch.empty(size + offset, dtype=torch.uint8).pin_memory()
    view = buf[offset:].view((num_blocks,) + block_shape)
    view.copy_(torch.from_numpy(rng.integers(0, 256, view.shape, dtype=np.uint8)))
    return view


@pytest.mark.parametrize(
    ("block_shape", "offset"),
    [
        ((3, 5, 7), 1),  # 105-byte blocks at an odd address: 1-byte words
        ((2, 3, 2), 2),  # 12 bytes: 4-byte words
        ((9, 8), 8),  # 72 bytes: 8-byte words
        ((1025, 1023), 3),  # about 1 MiB of 1-byte words: 513 CTAs per block
        ((4112, 16, 16), 16),  # 16-byte words, blocks of 32 CTA steps plus a tail
    ],
)
def test_swap_kernel_odd_block_sizes(rng, block_shape, offset):
    """Blocks whose size or address is not a multiple of 16 bytes, and blocks larger than one
    CTA step, copied exactly both ways."""
    n_dev, n_host = 9, 7
    if int(np.prod(block_shape)) > 2**20:
        n_dev, n_host = 5, 4
    dev = torch.from_numpy(rng.integers(0, 256, (n_dev,) + block_shape, dtype=np.uint8)).cuda()
    host = pinned_bytes(rng, n_host, block_shape, offset)
    dev_before, host_before = dev.cpu().numpy(), host.numpy().copy()
    src = rng.choice(n_dev, 3, replace=False).astype(np.int32)
    dst = rng.choice(n_host, 3, replace=False).astype(np.int32)
    ts.swap_blocks(dev, host, src, dst)
    torch.cuda.synchronize()
    expect = host_before.copy()
    expect[dst] = dev_before[src]
    np.testing.assert_array_equal(host.numpy(), expect)
    back = rng.choice(n_dev, 3, replace=False).astype(np.int64)
    ts.swap_blocks(host, dev, dst.astype(np.int64), back)  # one id width per call
    torch.cuda.synchronize()
    dev_expect = dev_before.copy()
    dev_expect[back] = expect[dst]
    np.testing.assert_array_equal(dev.cpu().numpy(), dev_expect)


def test_swap_kernel_registered_numpy_memory(rng):
    """Host memory pinned with cudaHostRegister (a NumPy array, not a torch allocation) is used
    in place: the device cache's blocks land in the array and come back."""
    cudart = torch.cuda.cudart()
    host = np.full((6, 16, 2, 64), np.nan, np.float32)
    torch.cuda.check_error(cudart.cudaHostRegister(host.ctypes.data, host.nbytes, 0))
    try:
        dev = torch.from_numpy(rng.standard_normal((10, 16, 2, 64)).astype(np.float32)).cuda()
        before = dev.cpu().numpy()
        src, dst = np.array([9, 2, 5], np.int32), np.array([4, 0, 3], np.int32)
        ts.swap_blocks(dev, host, src, dst)
        torch.cuda.synchronize()
        expect = np.full_like(host, np.nan)
        expect[dst] = before[src]
        np.testing.assert_array_equal(host, expect)
        back = np.array([0, 1, 7], np.int32)
        ts.swap_blocks(host, dev, dst, back)
        torch.cuda.synchronize()
        dev_expect = before.copy()
        dev_expect[back] = before[src]
        np.testing.assert_array_equal(dev.cpu().numpy(), dev_expect)
    finally:
        torch.cuda.check_error(cudart.cudaHostUnregister(host.ctypes.data))


def test_swap_kernel_many_pairs_in_a_cuda_graph(rng):
    """More pairs than one launch's parameters hold (several kernel nodes), scattered, captured
    in a graph: each replay moves the blocks' current contents both ways."""
    n_dev, n_host, pairs = 12000, 9000, 8500
    dev = torch.empty((n_dev, 4, 8), dtype=torch.float16, device="cuda")  # 64-byte blocks
    host = torch.empty((n_host, 4, 8), dtype=torch.float16).pin_memory()
    out_src = rng.choice(n_dev, pairs, replace=False).astype(np.int32)
    out_dst = rng.choice(n_host, pairs, replace=False).astype(np.int32)
    back = rng.choice(n_dev, pairs, replace=False).astype(np.int32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ts.swap_blocks(dev, host, out_src, out_dst)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ts.swap_blocks(dev, host, out_src, out_dst)
        ts.swap_blocks(host, dev, out_dst, back)
    for _ in range(2):
        dev.copy_(torch.randn_like(dev))
        host.fill_(float("nan"))
        before = f64(dev)
        graph.replay()
        torch.cuda.synchronize()
        host_expect = np.full((n_host, 4, 8), np.nan)
        host_expect[out_dst] = before[out_src]
        np.testing.assert_array_equal(f64(host), host_expect)
        dev_expect = before.copy()
        dev_expect[back] = before[out_src]
        np.testing.assert_array_equal(f64(dev), dev_expect)


def test_cupy_arrays(rng):
    cupy = pytest.importorskip("cupy")
    case = R.PagedCase(rng, [33, 200], 8, 2, 64, 16)
    kc = cupy.asarray(case.key_cache.astype(np.float16))
    vc = cupy.asarray(case.value_cache.astype(np.float16))
    q = cupy.asarray(case.query.astype(np.float16))
    out = ts.paged_attention(q, kc, vc, cupy.asarray(case.block_table), cupy.asarray(case.seq_lens))
    assert isinstance(out, cupy.ndarray)
    cupy.cuda.get_current_stream().synchronize()
    ref, _ = R.paged_attention(
        case.query.astype(np.float16),
        case.key_cache.astype(np.float16),
        case.value_cache.astype(np.float16),
        case.block_table,
        case.seq_lens,
    )
    assert R.rel_error(cupy.asnumpy(out), ref) < TOLERANCE["float16"]
    slots = cupy.asarray(np.array([5, -1], np.int64))
    new = cupy.asarray(rng.standard_normal((2, 2, 64)).astype(np.float16))
    ts.reshape_and_cache(new, new, kc, vc, slots, stream=cupy.cuda.get_current_stream())
    cupy.cuda.get_current_stream().synchronize()
    assert bool((kc[0, 5] == new[0]).all())


def test_jax_arrays_as_inputs(rng):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    case = R.PagedCase(rng, [70, 3, 129], 8, 4, 128, 16)
    args = [
        jnp.asarray(x)
        for x in (
            case.query.astype(np.float16),
            case.key_cache.astype(np.float16),
            case.value_cache.astype(np.float16),
            case.block_table,
            case.seq_lens,
        )
    ]
    out = ts.paged_attention(*args)
    assert "jax" in type(out).__module__ or "jaxlib" in type(out).__module__
    ref, _ = R.paged_attention(
        case.query.astype(np.float16),
        case.key_cache.astype(np.float16),
        case.value_cache.astype(np.float16),
        case.block_table,
        case.seq_lens,
    )
    assert R.rel_error(np.asarray(out), ref) < TOLERANCE["float16"]


def test_workspace_errors_write_nothing(rng):
    """A split needs the caller's workspace: missing, too small, misaligned, strided or on the
    wrong device, it is a ValueError and the output keeps its poison."""
    case = R.PagedCase(rng, [600, 90], 8, 2, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    table, lens = cuda(case.block_table), cuda(case.seq_lens)
    out = torch.full_like(q, float("nan"))
    _, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=4)
    big = torch.empty((2 * nbytes + 64,), dtype=torch.uint8, device="cuda")
    cases = [
        (None, r"splitting into 4 pieces needs a workspace of \d+ bytes"),
        (big[:16], rf"workspace must hold at least {nbytes} bytes for 4 splits, got 16"),
        (big[1 : nbytes + 1], r"workspace must be 16-byte aligned"),
        (big[: 2 * nbytes : 2], r"workspace must be contiguous"),
        (torch.empty((nbytes,), dtype=torch.uint8), r"all tensors must be on one device"),
    ]
    for workspace, match in cases:
        with pytest.raises(ValueError, match="tinyserve.paged_attention: " + match):
            # the core directly: the Python wrapper would supply its own workspace for None
            ts._tinyserve.paged_attention(
                q, kc, vc, table, lens, out, num_splits=4, workspace=workspace
            )
    torch.cuda.synchronize()
    assert torch.isnan(out).all()
    ts.paged_attention(q, kc, vc, table, lens, out, num_splits=4, workspace=big[:nbytes])
    torch.cuda.synchronize()
    ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]


def test_head_dim_limit_on_cuda():
    q = torch.zeros((1, 2, 520), dtype=torch.float32, device="cuda")
    kc = torch.zeros((2, 16, 1, 520), dtype=torch.float32, device="cuda")
    out = torch.full_like(q, float("nan"))
    table = torch.zeros((1, 2), dtype=torch.int32, device="cuda")
    lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="head_dim must be at most 512, got 520"):
        ts.paged_attention(q, kc, kc, table, lens, out)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()


def test_repeated_calls_plan_once(rng, monkeypatch):
    """An eager call with a split plans once per shapes and options: later calls cross into the
    core once (no second planning call), and give the reference result with the kept
    workspace; a new shape or option, or query_start_loc, plans again."""
    from tinyserve import _ops

    planned = []
    real_plan = _ops._C.plan_paged_attention

    def counting_plan(*args, **kwargs):
        planned.append(args)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(_ops._C, "plan_paged_attention", counting_plan)
    monkeypatch.setattr(_ops, "_plans", {})
    case = R.PagedCase(rng, [3000, 17], 16, 4, 128, 16)
    kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
    q = cuda(case.query, "float16")
    table, lens = cuda(case.block_table), cuda(case.seq_lens)
    ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
    for _ in range(3):
        out = torch.full_like(q, float("nan"))
        ts.paged_attention(q, kc, vc, table, lens, out)
        torch.cuda.synchronize()
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]
    assert len(planned) == 1
    ts.paged_attention(q, kc, vc, table, lens, window_left=100)
    ts.paged_attention(q[:1], kc, vc, table[:1], lens[:1])
    assert len(planned) == 3
    # The same shapes as prefill (one row per sequence, the decode rows) plan apart from decode,
    # and give the decode result.
    starts = torch.arange(3, dtype=torch.int32, device="cuda")
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        ts.paged_attention(q, kc, vc, table, lens, out, query_start_loc=starts)
        torch.cuda.synchronize()
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]
    assert len(planned) == 4


def test_two_streams_at_once_with_kept_workspaces(rng):
    """Split decode (and split prefill) on two streams at once with no workspace passed: each
    stream has a kept buffer of its own for its partials, so every result matches the
    reference however the streams interleave."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    runs = []
    for rows in (None, [40, 3]):
        case = R.PagedCase(rng, [6000, 3000], 16, 4, 128, 16, query_rows=rows)
        kc, vc = cache_pair(case.key_cache, case.value_cache, "torch", "float16", "cuda", "NHD")
        q = cuda(case.query, "float16")
        table, lens = cuda(case.block_table), cuda(case.seq_lens)
        if rows is None:
            ref, _ = R.paged_attention(f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens)
            starts = None
        else:
            starts = cuda(case.query_start_loc)
            ref, _ = R.paged_prefill(
                f64(q), f64(kc), f64(vc), case.block_table, case.seq_lens, case.query_start_loc
            )
        runs.append((q, kc, vc, table, lens, starts, ref))
    torch.cuda.synchronize()
    outs = []
    for _ in range(10):
        for stream, (q, kc, vc, table, lens, starts, ref) in zip(streams, runs):
            with torch.cuda.stream(stream):
                out = torch.full_like(q, float("nan"))
                ts.paged_attention(
                    q, kc, vc, table, lens, out, num_splits=8, query_start_loc=starts
                )
                outs.append((out, ref))
    torch.cuda.synchronize()
    for out, ref in outs:
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64] if torch is not None else [])
def test_copy_blocks_byte_types_on_the_gpu(rng, id_dtype):
    """FP8 and int8 caches with their float16 page metadata, int32 or int64 ids on the device,
    one call: every byte of every moved block arrives, nothing else changes."""
    shape = (20, 16, 2, 64)
    k8 = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).cuda()
    v8 = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)).cuda()
    caches = [k8.view(torch.float8_e4m3fn), v8.view(torch.int8)]
    meta = cuda(rng.standard_normal((20, 2, 2, 64)), "float16")
    before = [k8.cpu().numpy(), v8.cpu().numpy(), f64(meta)]
    src = torch.tensor([3, 0, 11], dtype=id_dtype, device="cuda")
    dst = torch.tensor([19, 7, 4], dtype=id_dtype, device="cuda")
    ts.copy_blocks(caches + [meta], src, dst)
    torch.cuda.synchronize()
    for after, old in zip([k8.cpu().numpy(), v8.cpu().numpy(), f64(meta)], before):
        expected = old.copy()
        expected[[19, 7, 4]] = old[[3, 0, 11]]
        np.testing.assert_array_equal(after, expected)


def test_aliasing_rejected_for_cuda_tensors(rng):
    """The host-side aliasing checks hold for device tensors: nothing is launched."""
    kc = torch.full((6, 4, 2, 16), float("nan"), device="cuda")
    key = cuda(rng.standard_normal((2, 2, 16)), "float32")
    slots = torch.tensor([0, 5], dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="key_cache and value_cache must not share memory"):
        ts.reshape_and_cache(key, key, kc, kc, slots)
    ids = torch.tensor([0], device="cuda"), torch.tensor([1], device="cuda")
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] must not share memory"):
        ts.copy_blocks([kc, kc], *ids)
    torch.cuda.synchronize()
    assert torch.isnan(kc).all()


def test_scale_and_value_aliasing_rejected_for_cuda_tensors(rng):
    """Per-head float8 scales and page_meta are checked against the outputs and inputs of device
    calls too: page_meta over value, out over k_scale, the key cache over k_scale. Nothing is
    launched."""
    n, p, h, d = 6, 4, 2, 16
    key = cuda(rng.standard_normal((3, h, d)), "float32")
    kc = torch.full((n, p, h, d), float("nan"), device="cuda")
    vc = torch.full((n, p, h, d), float("nan"), device="cuda")
    slots = torch.tensor([0, 5, 9], dtype=torch.int64, device="cuda")
    buf = torch.full((n * h * 2 * d,), float("nan"), device="cuda")
    meta = buf.view(n, h, 2, d)
    value = buf[: key.numel()].view(key.shape)
    with pytest.raises(ValueError, match="page_meta and value must not share memory"):
        ts.reshape_and_cache(key, value, kc, vc, slots, meta)
    k8 = torch.zeros((n, p, h, d), dtype=torch.uint8, device="cuda")
    v8 = torch.zeros((n, p, h, d), dtype=torch.uint8, device="cuda")
    scale = k8.view(-1)[:8].view(torch.float32)
    scale.fill_(1.0)
    k8_before = k8.clone()
    with pytest.raises(ValueError, match="key_cache and k_scale must not share memory"):
        ts.reshape_and_cache(key, key, k8, v8, slots, k_scale=scale, kv_dtype="float8_e4m3fn")
    query = cuda(rng.standard_normal((1, 4, d)), "float32")
    out = torch.full((1, 4, d), float("nan"), device="cuda")
    out.view(-1)[:h] = 1.0
    table = torch.tensor([[0, 1]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="out and k_scale must not share memory"):
        ts.paged_attention(
            query, k8, v8, table, lens, out, k_scale=out.view(-1)[:h], kv_dtype="float8_e4m3fn"
        )
    torch.cuda.synchronize()
    assert torch.isnan(kc).all() and torch.isnan(vc).all() and torch.isnan(out.view(-1)[h:]).all()
    assert torch.equal(k8, k8_before) and (v8 == 0).all()
