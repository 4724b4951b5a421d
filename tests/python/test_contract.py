"""The op signatures and argument errors as DESIGN.md §3 and §6 fix them, where the Python
wrappers (not the core) decide: positional arguments, and objects that are no arrays."""

from __future__ import annotations

import array

import numpy as np
import pytest

import reference as R
import tinyserve as ts


def test_paged_attention_takes_scale_after_out_positionally(rng):
    # DESIGN §3: paged_attention(query, key_cache, value_cache, block_table, seq_lens, out=None,
    # scale=None, ...).
    c = R.PagedCase(rng, [19, 1, 0], 6, 2, 32, 8)
    scale = float(rng.uniform(0.05, 0.5))
    out = np.full(c.query.shape, np.nan, np.float32)
    result = ts.paged_attention(
        c.query, c.key_cache, c.value_cache, c.block_table, c.seq_lens, out, scale
    )
    assert result is out
    expected, _ = R.paged_attention(
        c.query, c.key_cache, c.value_cache, c.block_table, c.seq_lens, scale=scale
    )
    assert R.rel_error(out, expected) < 1e-5
    # The scale really is the sixth positional argument: the default gives other numbers.
    default, _ = R.paged_attention(c.query, c.key_cache, c.value_cache, c.block_table, c.seq_lens)
    assert R.rel_error(out, default) > 1e-3

    allocated = ts.paged_attention(
        c.query, c.key_cache, c.value_cache, c.block_table, c.seq_lens, None, scale
    )
    assert R.rel_error(allocated, expected) < 1e-5


NOT_ARRAYS = [[[0.0] * 4] * 2, "query", None, 3.0]


@pytest.mark.parametrize("query", NOT_ARRAYS, ids=["list", "str", "None", "float"])
def test_paged_attention_names_a_query_that_is_no_array(query):
    k_cache = np.zeros((4, 2, 1, 4), np.float32)
    table = np.zeros((2, 1), np.int32)
    lens = np.ones(2, np.int32)
    with pytest.raises(TypeError, match=r"^tinyserve\.paged_attention: query must be an array"):
        ts.paged_attention(query, k_cache, k_cache.copy(), table, lens)
    with pytest.raises(TypeError, match=r"^tinyserve\.paged_attention: query must be an array"):
        ts.paged_attention(query, k_cache, k_cache.copy(), table, lens, return_lse=True)


@pytest.mark.parametrize("query", NOT_ARRAYS, ids=["list", "str", "None", "float"])
def test_select_pages_names_a_query_that_is_no_array(query):
    page_meta = np.zeros((4, 1, 2, 4), np.float32)
    table = np.zeros((2, 1), np.int32)
    lens = np.ones(2, np.int32)
    with pytest.raises(TypeError, match=r"^tinyserve\.select_pages: query must be an array"):
        ts.select_pages(query, page_meta, table, lens, 2, block_size=2)


def test_select_pages_names_page_meta_that_is_no_array():
    query = np.zeros((2, 1, 4), np.float32)
    table = np.zeros((2, 1), np.int32)
    lens = np.ones(2, np.int32)
    with pytest.raises(TypeError, match=r"^tinyserve\.select_pages: page_meta must be an array"):
        ts.select_pages(query, [1, 2], table, lens, 2, block_size=2)
    with pytest.raises(ValueError, match=r"^tinyserve\.select_pages: page_meta must have"):
        ts.select_pages(query, np.zeros(4, np.float32), table, lens, 2, block_size=2)


@pytest.mark.parametrize("budget", [2.5, None, "2"], ids=["float", "None", "str"])
def test_select_pages_names_a_budget_that_is_no_int(budget):
    query = np.zeros((2, 1, 4), np.float32)
    page_meta = np.zeros((4, 1, 2, 4), np.float32)
    table = np.zeros((2, 1), np.int32)
    lens = np.ones(2, np.int32)
    hits = np.zeros(4, np.int32)
    with pytest.raises(TypeError, match=r"^tinyserve\.select_pages: budget must be an int, got"):
        ts.select_pages(query, page_meta, table, lens, budget, block_size=2, hits=hits)
    assert (hits == 0).all()


def test_ops_take_buffer_protocol_queries_without_shape(rng):
    # DESIGN §2: anything nb::ndarray accepts, the buffer protocol included; array.array has
    # no .shape for the wrapper to allocate the output from.
    c = R.PagedCase(rng, [5], 2, 2, 4, 4)
    flat = array.array("f", c.query.ravel().tolist())
    with pytest.raises(ValueError, match=r"^tinyserve\.paged_attention: query must have 3"):
        ts.paged_attention(flat, c.key_cache, c.value_cache, c.block_table, c.seq_lens)


def test_page_meta_shape(rng):
    num_blocks, block_size, num_kv_heads, head_dim = rng.integers(1, 9, size=4)
    cache = np.zeros((num_blocks, block_size, num_kv_heads, head_dim), np.float32)
    assert ts.page_meta_shape(cache) == (num_blocks, num_kv_heads, 2, head_dim)
    with pytest.raises(ValueError, match=r"^tinyserve\.page_meta_shape: key_cache must have 4"):
        ts.page_meta_shape(cache[0])
    with pytest.raises(TypeError, match=r"^tinyserve\.page_meta_shape: key_cache must be an"):
        ts.page_meta_shape("cache")


class DLPackOnly:
    """A producer that offers nothing but DLPack (no .shape, no buffer protocol)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_arrays_without_shape_attributes_allocate_outputs(rng):
    """Outputs sized from an argument that has no ``.shape``: a DLPack-only query, and
    CachePool's own bfloat16 arrays (no buffer-protocol format exists for bfloat16)."""
    torch = pytest.importorskip("torch")
    case = R.PagedCase(rng, [20, 5], 4, 2, 64, 16)
    q = np.ascontiguousarray(case.query, np.float32)
    kc, vc = np.float32(case.key_cache), np.float32(case.value_cache)
    out = ts.paged_attention(DLPackOnly(q), kc, vc, case.block_table, case.seq_lens)
    assert isinstance(out, np.ndarray) and out.shape == q.shape
    np.testing.assert_array_equal(
        out, ts.paged_attention(q, kc, vc, case.block_table, case.seq_lens)
    )
    pool = ts.CachePool(1, 8, 16, 2, 64, "bfloat16", "cpu", page_meta=True, num_blocks=8)
    assert ts.page_meta_shape(pool.key(0)) == (8, 2, 2, 64)
    query = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    lens = torch.tensor([40], dtype=torch.int32)
    pages, kept = ts.select_pages(query, pool.page_meta(0), table, lens, 2, block_size=16)
    assert isinstance(pages, torch.Tensor) and pages.shape == (1, 2, 2)
    assert kept.tolist() == [[24, 24]]  # a full page and the last 8 tokens, per KV head
    # An output like a DLPack-only bfloat16 query has no NumPy dtype to be allocated with.
    with pytest.raises(TypeError, match="cannot allocate an output like a DLPackOnly whose dtype"):
        ts.paged_attention(DLPackOnly(query), pool.key(0), pool.value(0), table, lens)


def test_outputs_of_a_torch_subclass_query_are_torch_tensors(rng):
    """A query of the caller's own torch.Tensor subclass is torch's: the allocated output is a
    torch tensor, as for a plain one."""
    torch = pytest.importorskip("torch")

    class Tagged(torch.Tensor):
        pass

    case = R.PagedCase(rng, [20, 5], 4, 2, 64, 16)
    q = torch.from_numpy(np.float32(case.query)).as_subclass(Tagged)
    kc = torch.from_numpy(np.float32(case.key_cache))
    vc = torch.from_numpy(np.float32(case.value_cache))
    table, lens = torch.from_numpy(case.block_table), torch.from_numpy(case.seq_lens)
    out = ts.paged_attention(q, kc, vc, table, lens)
    assert isinstance(out, torch.Tensor)
    ref, _ = R.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_table, case.seq_lens
    )
    assert R.rel_error(np.asarray(torch.Tensor(out)), ref) < 1e-5


def _manager_with_cached_block(seed_token):
    manager = ts.BlockManager(4, 2, enable_prefix_caching=True)
    compactor = ts.Compactor(manager, num_host_blocks=2)
    tokens = [seed_token, seed_token + 1, seed_token + 2]
    manager.add_sequence(1, tokens)
    manager.append(1, 3, tokens)
    manager.free(1)
    manager.check()
    return manager, compactor


@pytest.mark.parametrize("finish", ["commit", "abort"])
def test_compactor_refuses_a_plan_of_another_compactor(finish):
    # DESIGN §5: commit(plan) applies that plan and abort(plan) forgets it; a plan handed out by
    # another compactor (whose serial once matched) must not commit or abort this one's.
    manager, compactor = _manager_with_cached_block(10)
    other_manager, other = _manager_with_cached_block(20)
    mine = compactor.plan_evict(1)
    theirs = other.plan_evict(1)
    before = manager.stats()
    with pytest.raises(
        ValueError, match=rf"^tinyserve\.Compactor\.{finish}: plan must be the pending"
    ):
        getattr(compactor, finish)(theirs)
    assert compactor.has_pending_plan and other.has_pending_plan
    assert manager.stats() == before
    manager.check()
    other_manager.check()
    compactor.commit(mine)
    other.commit(theirs)
    assert manager.stats()["evictions"] == 1 and other_manager.stats()["evictions"] == 1
    manager.check()
    other_manager.check()


def test_append_batch_counts_from_a_tensor():
    """append_batch's num_tokens as a torch tensor is an array (one count each), whatever its
    length: a one-element tensor for two sequences is refused, not read as a count for all;
    an int, a NumPy integer and a 0-d array count for every sequence."""
    torch = pytest.importorskip("torch")
    bm = ts.BlockManager(64, 4)
    for i in range(2):
        bm.add_sequence(i)
    slots = bm.append_batch([0, 1], torch.tensor([1, 2]))
    assert len(slots) == 3 and bm.seq_len(0) == 1 and bm.seq_len(1) == 2
    with pytest.raises(ValueError, match="num_tokens must have one entry per sequence"):
        bm.append_batch([0, 1], torch.tensor([3]))
    assert bm.seq_len(0) == 1 and bm.seq_len(1) == 2
    for each in (np.int64(2), torch.tensor(2), np.array(2)):
        bm.append_batch([0, 1], each)
    assert bm.seq_len(0) == 7 and bm.seq_len(1) == 8
    bm.check()


def test_bools_are_not_ints():
    """An int argument given True or False is refused (TypeError) with nothing changed: True
    would otherwise index as 1 and False as sequence 0."""
    bm = ts.BlockManager(8, 4)
    bm.add_sequence(0)
    bm.append(0, 3)
    comp = ts.Compactor(bm)
    calls = [
        lambda: bm.free(False),
        lambda: bm.add_sequence(True),
        lambda: bm.append(0, True),
        lambda: bm.resize(True),
        lambda: comp.plan_compact(True),
        lambda: ts.BlockManager(True, 4),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="must be an int, got bool"):
            call()
    assert bm.seq_len(0) == 3 and bm.stats()["num_blocks"] == 8
    bm.check()


def test_state_errors_name_what_they_got():
    """The compactor's state errors follow the error style too: `..., got <value>`."""
    bm = ts.BlockManager(8, 4)
    comp = ts.Compactor(bm)
    bm.add_sequence(0)
    bm.append(0, 2)
    bm.fork(0, 1)
    bm.append(1, 1)  # a shared partial block: one copy-on-write pair pending
    with pytest.raises(RuntimeError, match="run the copies first, got 1 pending pairs$"):
        comp.plan_compact()
    bm.take_copies()
    plan = comp.plan_compact()
    with pytest.raises(RuntimeError, match=f"commit or abort it first, got plan {plan.serial}$"):
        comp.plan_evict(0)
    with pytest.raises(RuntimeError, match=f"commit or abort it first, got plan {plan.serial}$"):
        bm.add_sequence(5)
    comp.abort(plan)
    with pytest.raises(RuntimeError, match=f"no plan is pending, got plan {plan.serial}$"):
        comp.commit(plan)
