"""paged_attention against the float64 reference, on every backend, dtype and cache layout."""

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
    require,
    sync,
)

# (head_dim, group size, block size): the fast head dims, an odd one, GQA groups 1/4/8/5,
# page sizes 1/16/32 and an odd one.
SHAPES = [
    (64, 1, 16),
    (128, 4, 16),
    (128, 8, 32),
    (256, 5, 1),
    (96, 4, 32),
    (80, 5, 7),
    (64, 8, 1),
    (256, 1, 16),
]


def run_case(case, fw, device, dtype, layout, **kwargs):
    """Runs tinyserve on the case; returns (out, lse, reference out, reference lse)."""
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, dtype, device, layout)
    q = asarray(case.query, fw, dtype, device)
    table = asarray(case.block_table, fw, device=device)
    lens = asarray(case.seq_lens, fw, device=device)
    out = empty(q.shape, fw, dtype, device)
    lse = empty(tuple(q.shape[:2]), fw, "float32", device)
    ts.paged_attention(q, kc, vc, table, lens, out, lse=lse, **kwargs)
    sync(fw, device)
    ref_out, ref_lse = R.paged_attention(
        f64(q),
        f64(kc),
        f64(vc),
        case.block_table,
        case.seq_lens,
        scale=kwargs.get("scale"),
        window_left=kwargs.get("window_left", -1),
        logits_soft_cap=kwargs.get("logits_soft_cap", 0.0),
    )
    return f64(out), f64(lse), ref_out, ref_lse


def check_lse(lse, ref_lse):
    finite = np.isfinite(ref_lse)
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert np.all(lse[~finite] == -np.inf)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("head_dim,group,block_size", SHAPES)
def test_matches_reference(rng, backend, dtype, layout, head_dim, group, block_size):
    fw, device = backend
    require(fw, dtype)
    num_kv_heads = int(rng.integers(1, 4))
    lens = rng.integers(1, 300, size=int(rng.integers(1, 5)))
    case = R.PagedCase(rng, lens, num_kv_heads * group, num_kv_heads, head_dim, block_size)
    out, lse, ref_out, ref_lse = run_case(case, fw, device, dtype, layout)
    assert R.rel_error(out, ref_out) < TOLERANCE[dtype]
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 0},
        {"window_left": 37},
        {"window_left": 5000},
        {"logits_soft_cap": 3.0},
        {"scale": 0.7},
        {"scale": -0.2, "window_left": 100, "logits_soft_cap": 10.0},
    ],
    ids=["window0", "window37", "window_gt_len", "softcap", "scale", "all"],
)
def test_options(rng, backend, dtype, options):
    fw, device = backend
    require(fw, dtype)
    case = R.PagedCase(rng, [1, 250, 16, 1000], 8, 2, 128, 16)
    out, lse, ref_out, ref_lse = run_case(case, fw, device, dtype, "NHD", **options)
    assert R.rel_error(out, ref_out) < TOLERANCE[dtype]
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("num_splits", [1, 2, 3, 16, 200])
@pytest.mark.parametrize("head_dim", [64, 63, 129])
def test_splits(rng, backend, num_splits, head_dim):
    """Any split count gives the reference result, including more splits than tokens. The head
    dims take each path of the CUDA merge: float4 columns, scalar columns in two groups of splits,
    and more scalar columns than threads."""
    fw, device = backend
    require(fw, "float32")
    case = R.PagedCase(rng, [3000, 1, 130, 0, 57], 16, 4, head_dim, 16)
    out, lse, ref_out, ref_lse = run_case(case, fw, device, "float32", "NHD", num_splits=num_splits)
    assert R.rel_error(out, ref_out) < TOLERANCE["float32"]
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("backend", backends())
def test_empty_sequences(rng, backend):
    """Length-0 sequences give zero output and -inf log-sum-exp, next to normal ones."""
    fw, device = backend
    require(fw, "float32")
    case = R.PagedCase(rng, [0, 5, 0], 4, 2, 64, 16)
    out, lse, ref_out, ref_lse = run_case(case, fw, device, "float32", "NHD")
    assert np.all(out[[0, 2]] == 0.0)
    assert np.all(lse[[0, 2]] == -np.inf)
    assert R.rel_error(out, ref_out) < TOLERANCE["float32"]


@pytest.mark.parametrize("backend", backends())
def test_long_sequence(rng, backend):
    """A long single sequence (the case flash-decoding splits) and a short one beside it."""
    fw, device = backend
    require(fw, "float32")
    case = R.PagedCase(rng, [20000, 3], 8, 1, 64, 16)
    out, lse, ref_out, ref_lse = run_case(case, fw, device, "float32", "NHD")
    assert R.rel_error(out, ref_out) < TOLERANCE["float32"]
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("backend", backends())
def test_strided_query_and_output(rng, backend):
    """query and out as non-contiguous views (a fused QKV buffer, an output with a gap)."""
    fw, device = backend
    require(fw, "float32")
    case = R.PagedCase(rng, [40, 77], 8, 2, 64, 16)
    qkv = asarray(rng.standard_normal((2, 12, 64)).astype(np.float32), fw, "float32", device)
    q = qkv[:, :8]
    q[...] = asarray(case.query, fw, "float32", device)
    big_out = empty((2, 10, 64), fw, "float32", device)
    out = big_out[:, 1:9]
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "NHD")
    ts.paged_attention(
        q,
        kc,
        vc,
        asarray(case.block_table, fw, device=device),
        asarray(case.seq_lens, fw, device=device),
        out,
    )
    sync(fw, device)
    ref_out, _ = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    assert R.rel_error(f64(out), ref_out) < TOLERANCE["float32"]
    # the gap around the output view is untouched
    assert np.isnan(f64(big_out)[:, [0, 9]]).all()


@pytest.mark.parametrize("backend", backends())
def test_out_allocated_by_callers_framework(rng, backend):
    fw, device = backend
    require(fw, "float32")
    case = R.PagedCase(rng, [9, 20], 4, 4, 64, 8)
    kc, vc = cache_pair(case.key_cache, case.value_cache, fw, "float32", device, "NHD")
    q = asarray(case.query, fw, "float32", device)
    args = (
        q,
        kc,
        vc,
        asarray(case.block_table, fw, device=device),
        asarray(case.seq_lens, fw, device=device),
    )
    out = ts.paged_attention(*args)
    assert type(out) is type(q)
    out2, lse = ts.paged_attention(*args, return_lse=True)
    assert type(lse) is type(q) and tuple(lse.shape) == (2, 4)
    assert str(lse.dtype).endswith("float32")
    if fw == "torch":
        assert out.device == q.device and lse.device == q.device
    sync(fw, device)
    ref_out, ref_lse = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    assert R.rel_error(f64(out), ref_out) < TOLERANCE["float32"]
    np.testing.assert_array_equal(f64(out), f64(out2))
    check_lse(f64(lse), ref_lse)


def test_plan_is_host_only_and_consistent(rng):
    case = R.PagedCase(rng, [10], 8, 2, 64, 16)
    splits, nbytes = ts.plan_paged_attention(
        case.query, case.key_cache, case.block_table, num_splits=3
    )
    assert splits == 3
    assert nbytes == 0  # the CPU backend needs no workspace
    splits, _ = ts.plan_paged_attention(case.query, case.key_cache, case.block_table)
    assert splits >= 1


def test_a_passed_workspace_is_not_kept(rng):
    """A workspace given by the caller is used for that call only: neither the core nor the
    plan cache keeps a reference, so it is freed as soon as the caller lets it go."""
    import gc
    import weakref

    case = R.PagedCase(rng, [40, 9], 8, 2, 64, 16)
    ref, _ = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    workspace = np.empty(1 << 16, dtype=np.uint8)
    kept = weakref.ref(workspace)
    out = np.full(case.query.shape, np.nan, dtype=np.float32)
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, out)
    ts.paged_attention(*args, num_splits=2, workspace=workspace)
    assert R.rel_error(f64(out), ref) < TOLERANCE["float32"]
    del workspace
    gc.collect()
    assert kept() is None


def test_host_value_caches_are_bounded(monkeypatch):
    """The plan and select-workspace caches hold at most _MAX_PLANS entries: the one past the
    bound empties the cache and stays alone in it."""
    from tinyserve import _ops

    monkeypatch.setattr(_ops, "_MAX_PLANS", 3)
    cache = {}
    for i in range(3):
        _ops._remember(cache, (i,), i)
    assert cache == {(0,): 0, (1,): 1, (2,): 2}
    _ops._remember(cache, (3,), 3)
    assert cache == {(3,): 3}


def test_the_plan_cache_keeps_only_its_own_workspace(rng, monkeypatch):
    """The CUDA plan cache, driven on the CPU with the core's planning and launch stubbed: a
    call with the caller's workspace neither plans nor stores it (the caller's buffer dies with
    its last reference); a call without one gets the kept buffer of the query's device and
    stream, never the caller's earlier one."""
    import gc
    import weakref

    from tinyserve import _interop, _ops

    launched = []
    monkeypatch.setattr(_ops, "_plans", {})
    monkeypatch.setattr(_ops, "_workspaces", {})
    monkeypatch.setattr(_ops, "_retired_workspaces", [])
    monkeypatch.setattr(_interop, "is_cuda", lambda array: True)
    monkeypatch.setattr(_ops._C, "plan_paged_attention", lambda *args: (2, 4096))
    monkeypatch.setattr(
        _ops._C, "paged_attention", lambda *args, **kw: launched.append(kw["workspace"])
    )
    case = R.PagedCase(rng, [40, 9], 8, 2, 64, 16)
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens)
    mine = np.empty(8192, dtype=np.uint8)
    kept = weakref.ref(mine)
    ts.paged_attention(*args, np.empty_like(case.query), workspace=mine)
    assert launched[-1] is mine and not _ops._plans and not _ops._workspaces
    ts.paged_attention(*args, np.empty_like(case.query))
    own = launched[-1]
    assert own is not mine and own.nbytes >= 4096
    assert list(_ops._plans.values()) == [(2, own)]
    del mine, launched[0]
    gc.collect()
    assert kept() is None
    ts.paged_attention(*args, np.empty_like(case.query))
    assert launched[-1] is own


def test_kept_workspaces_are_per_stream(rng, monkeypatch):
    """Calls on two streams may run at once, so without a caller's workspace each stream gets a
    buffer of its own (paged_attention and select_pages alike, driven on the CPU with the core
    stubbed); calls on one stream share theirs, a call needing more grows only its own, and a
    repeated call reuses what the first one planned."""
    from tinyserve import _interop, _ops

    launched = []
    monkeypatch.setattr(_ops, "_plans", {})
    monkeypatch.setattr(_ops, "_workspaces", {})
    monkeypatch.setattr(_ops, "_retired_workspaces", [])
    monkeypatch.setattr(_interop, "is_cuda", lambda array: True)
    needed = {"bytes": 4096}
    monkeypatch.setattr(_ops._C, "plan_paged_attention", lambda *a: (2, needed["bytes"]))

    def launch(*args, **kwargs):
        launched.append((kwargs["stream"], kwargs["workspace"]))

    monkeypatch.setattr(_ops._C, "paged_attention", launch)
    case = R.PagedCase(rng, [40, 9], 8, 2, 64, 16)
    args = (case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens)
    for stream in (11, 22, 11, 22):
        ts.paged_attention(*args, np.empty_like(case.query), stream=stream)
    (s1, w1), (s2, w2), (s3, w3), (s4, w4) = launched
    assert (s1, s2, s3, s4) == (11, 22, 11, 22)
    assert w1 is not w2 and w3 is w1 and w4 is w2
    assert min(w1.nbytes, w2.nbytes) >= 4096
    # A call that needs more grows its stream's buffer; the old one stays referenced (a captured
    # graph may point at it) and the other stream's is untouched.
    monkeypatch.setattr(_ops, "_plans", {})
    needed["bytes"] = 2 * w1.nbytes + 1
    ts.paged_attention(*args, np.empty_like(case.query), stream=11)
    grown = launched[-1][1]
    assert grown is not w1 and grown.nbytes >= needed["bytes"]
    assert any(w is w1 for w in _ops._retired_workspaces)
    kept = {key[-1]: w for key, w in _ops._workspaces.items() if key[0] == "paged_attention"}
    assert kept[11] is grown and kept[22] is w2

    selected = []

    def select(*args, **kwargs):
        selected.append((kwargs["stream"], kwargs["workspace"]))

    sized = []

    def size(*args, **kwargs):
        sized.append(args)
        return 1024

    monkeypatch.setattr(_ops, "_select_workspaces", {})
    monkeypatch.setattr(_ops._C, "select_pages_workspace_bytes", size)
    monkeypatch.setattr(_ops._C, "select_pages", select)
    meta = np.zeros((case.key_cache.shape[0], 2, 2, 64), dtype=np.float32)
    for stream in (11, 22, 11):
        ts.select_pages(
            case.query, meta, case.block_table, case.seq_lens, 2, block_size=16, stream=stream
        )
    (_, a), (_, b), (_, c) = selected
    assert a is not b and c is a
    assert len(sized) == 2  # a repeated call on a stream does not ask the core for the size
    assert all(a is not w and b is not w for w in (grown, w2))
