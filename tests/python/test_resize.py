"""Changing a BlockManager's number of usable blocks (resize), the per-sequence offload plan,
and giving memory back: compact -> resize -> CachePool.shrink -> work continues -> grow.

The property test reuses test_compactor's random workloads with its caches in a CPU CachePool,
adding compact + shrink and grow steps; after every step every live token's K/V and page
summary is read back through the block tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compactor import (
    BLOCK_SIZE,
    HEAD_DIM,
    NUM_BLOCKS,
    NUM_HEADS,
    NUM_HOST,
    NUM_LAYERS,
    Workload,
    update_meta,
)

import tinyserve
from tinyserve import BlockManager, CachePool, Compactor, OutOfBlocks

MAX_BLOCKS = 2 * NUM_BLOCKS


def everything(bm: BlockManager) -> tuple:
    """What a refused call must leave unchanged: stats, size, free count, every table."""
    return (bm.stats(), bm.num_blocks, bm.num_free_blocks)


def fill(bm: BlockManager, seq_id: int, tokens) -> None:
    cached = bm.add_sequence(seq_id, tokens)
    bm.append(seq_id, len(tokens) - cached, tokens[cached:])


# ---- BlockManager.resize ---------------------------------------------------------------------


def test_grow_appends_free_blocks_at_the_back_and_shrink_takes_them_away():
    bm = BlockManager(4, 2)
    bm.append(*_new(bm, 0), 3)  # blocks 0, 1
    bm.resize(7)
    bm.check()
    assert bm.num_blocks == 7 and bm.stats()["num_blocks"] == 7
    assert bm.num_free_blocks == 5 and bm.stats()["num_used"] == 2
    _new(bm, 1)
    # The old free blocks come first, then the new ones in id order.
    assert bm.append(1, 10).tolist()[::2] == [4, 6, 8, 10, 12]
    bm.check()
    bm.free(1)
    bm.resize(2)
    bm.check()
    assert bm.num_blocks == 2 and bm.num_free_blocks == 0 and bm.block_ids(0).tolist() == [0, 1]
    with pytest.raises(OutOfBlocks):
        bm.append(0, 2)
    bm.resize(2)  # no change
    bm.free(0)
    bm.resize(0)  # an idle manager may hold no block at all
    bm.check()
    assert bm.stats()["num_blocks"] == 0 and bm.num_free_blocks == 0
    bm.resize(3)
    bm.check()
    _new(bm, 2)
    assert sorted(set((bm.append(2, 6) // 2).tolist())) == [0, 1, 2]
    bm.check()


def _new(bm: BlockManager, seq_id: int) -> tuple[int]:
    bm.add_sequence(seq_id)
    return (seq_id,)


def test_shrink_refuses_blocks_in_use_and_changes_nothing():
    bm = BlockManager(6, 2)
    _new(bm, 0)
    bm.append(0, 8)  # blocks 0..3
    _new(bm, 1)
    bm.append(1, 2)  # block 4
    bm.free(0)
    before = everything(bm)
    with pytest.raises(RuntimeError, match=r"resize: block 4 is in use .*got 3"):
        bm.resize(3)
    assert everything(bm) == before
    bm.check()
    bm.resize(5)
    bm.check()
    assert bm.block_ids(1).tolist() == [4] and bm.num_free_blocks == 4


def test_shrink_refuses_a_block_a_pending_copy_reads():
    bm = BlockManager(4, 2)
    _new(bm, 9)
    bm.append(9, 2)  # block 0
    _new(bm, 0)
    bm.append(0, 3)  # blocks 1, 2 (2 partial)
    bm.free(9)  # block 0 at the free list's head
    bm.fork(0, 1)
    bm.append(1, 1)  # copy-on-write: 2 -> 0
    bm.free(0)  # block 2 is free but the pending copy reads it
    assert bm.block_ids(1).tolist() == [1, 0]
    before = everything(bm)
    with pytest.raises(RuntimeError, match="block 2 is read by a pending copy-on-write pair"):
        bm.resize(2)
    assert everything(bm) == before
    bm.check()
    assert bm.take_copies().tolist() == [[2, 0]]
    bm.resize(2)
    bm.check()


def test_shrink_drops_the_prefix_keys_of_cached_blocks_it_takes_away():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    fill(bm, 0, prompt)  # blocks 0..3, three keyed
    bm.free(0)
    assert bm.match_prefix(prompt)["blocks"] == 3
    evictions = bm.stats()["evictions"]
    bm.resize(2)  # keyed blocks 0, 1 stay; 2 goes
    bm.check()
    s = bm.stats()
    assert s["num_cached"] == 2 and s["num_evictable"] == 2 and s["evictions"] == evictions + 1
    assert bm.match_prefix(prompt)["blocks"] == 2
    assert bm.add_sequence(1, prompt) == 4
    bm.check()


def test_resize_waits_for_a_pending_plan_and_checks_its_argument():
    bm = BlockManager(4, 2)
    comp = Compactor(bm, 2)
    plan = comp.plan_compact()
    with pytest.raises(RuntimeError, match="resize: a compactor plan is pending"):
        bm.resize(8)
    comp.abort(plan)
    for bad in (-1, 2**26 + 1):
        with pytest.raises(ValueError, match=rf"BlockManager.resize: num_blocks must be .*{bad}"):
            bm.resize(bad)
    with pytest.raises(TypeError):
        bm.resize(2.0)
    assert bm.num_blocks == 4
    bm.check()


def test_the_compactor_respects_the_new_size():
    bm = BlockManager(8, 2)
    comp = Compactor(bm, 4)
    _new(bm, 0)
    bm.append(0, 4)
    bm.resize(5)
    with pytest.raises(ValueError, match=r"plan_compact: num_blocks must be in \[0, 5\]"):
        comp.plan_compact(6)
    with pytest.raises(ValueError, match="hits must have num_blocks \\(5\\) entries"):
        comp.record_hits([0] * 8)
    comp.record_hits([1] * 5)
    plan = comp.plan_offload(2)
    comp.commit(plan)
    bm.resize(1)  # offloaded blocks are on the host: no device block is in use
    bm.check()
    with pytest.raises(OutOfBlocks, match="need 2 free device blocks, got 1"):
        comp.plan_recall([0])
    bm.resize(3)
    plan = comp.plan_recall([0])
    assert plan.dst.tolist() == [0, 1]  # the free list after the resizes: 0, then 1, 2
    comp.commit(plan)
    bm.check()
    assert bm.seq_len(0) == 4 and max(bm.block_ids(0)) < 3


# ---- plan_offload_sequences ------------------------------------------------------------------


def test_offload_sequences_moves_only_blocks_no_other_sequence_holds():
    bm = BlockManager(10, 2, enable_prefix_caching=True)
    comp = Compactor(bm, 4)
    fill(bm, 0, [1, 2, 3, 4, 5])  # blocks 0, 1 keyed, 2 partial
    bm.fork(0, 1)  # shares all three
    fill(bm, 2, [1, 2, 3, 4, 9, 9, 9])  # attaches 0, 1; own 3 (keyed), 4
    shared = bm.block_ids(2).tolist()
    plan = comp.plan_offload_sequences([2, 2])
    assert plan.kind == "offload" and plan.src.tolist() == sorted(shared[2:])
    comp.commit(plan)
    bm.check()
    assert comp.num_offloaded(2) == 2 and bm.block_table([0, 1])[1].tolist() == [5, 5]
    # Both holders of blocks 0..2 listed: they go too (once each).
    plan = comp.plan_offload_sequences([0, 1])
    assert sorted(plan.src.tolist()) == [2] and len(plan.dst) == 1
    comp.abort(plan)
    before = (bm.stats(), comp.num_free_host_blocks)
    with pytest.raises(KeyError):
        comp.plan_offload_sequences([0, 77])
    assert (bm.stats(), comp.num_free_host_blocks) == before
    bm.free(1)
    before = (bm.stats(), comp.num_free_host_blocks)
    with pytest.raises(OutOfBlocks, match="need 3 free host blocks, got 2"):
        comp.plan_offload_sequences([0, 2])  # blocks 0, 1 (held by both) and 2
    assert (bm.stats(), comp.num_free_host_blocks) == before
    assert not comp.has_pending_plan
    bm.check()


# ---- the property test with a CachePool ------------------------------------------------------


class PoolCaches:
    """The workload's tensors in a CPU CachePool (K, V and page summaries per layer; layer 0's
    summaries are the ones kept up to date). Views are fetched again after every resize."""

    def __init__(self):
        self.pool = CachePool(
            NUM_LAYERS,
            MAX_BLOCKS,
            BLOCK_SIZE,
            NUM_HEADS,
            HEAD_DIM,
            "float32",
            "cpu",
            page_meta=True,
            num_blocks=NUM_BLOCKS,
        )
        for t in self.device:
            t[...] = np.nan
        self.host = tinyserve.allocate_host_pool(self.device, NUM_HOST)

    @property
    def device(self):
        return [np.from_dlpack(t) for t in self.pool.tensors()]

    @property
    def kv(self):
        p = self.pool
        return [np.from_dlpack(f(layer)) for layer in range(NUM_LAYERS) for f in (p.key, p.value)]

    @property
    def meta(self):
        return np.from_dlpack(self.pool.page_meta(0))

    def read(self, x):
        return np.asarray(x)

    def write(self, values, slots):
        kv = self.kv
        for layer in range(NUM_LAYERS):
            k = np.ascontiguousarray(values[:, layer, 0])
            v = np.ascontiguousarray(values[:, layer, 1])
            tinyserve.reshape_and_cache(k, v, kv[2 * layer], kv[2 * layer + 1], slots)
        update_meta(self.meta, values, slots)


class ResizingWorkload(Workload):
    def __init__(self, caches, data):
        super().__init__(caches, data)
        self.shrinks = self.grows = 0

    def step(self):
        op = self.draw(st.sampled_from(["base", "base", "base", "base", "shrink", "grow"]))
        if op == "base":
            return super().step()
        try:
            getattr(self, "op_" + op)()
        except OutOfBlocks:
            pass
        self.bm.check()
        assert self.c.pool.num_blocks == self.bm.num_blocks

    def op_hits(self):
        n = self.bm.num_blocks
        self.comp.record_hits(self.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))

    def make_plan(self, kind, stats):
        if kind == "compact":
            n = self.bm.num_blocks
            target = self.draw(st.one_of(st.none(), st.integers(max(stats["num_used"] - 1, 0), n)))
            return self.comp.plan_compact(target)
        if kind == "offload" and self.tokens and self.draw(st.booleans()):
            victims = self.draw(st.lists(st.sampled_from(sorted(self.tokens)), max_size=3))
            return self.comp.plan_offload_sequences(victims)
        return super().make_plan(kind, stats)

    def op_shrink(self):
        n = self.bm.num_blocks
        used = self.bm.stats()["num_used"]
        target = self.draw(st.integers(max(used - 1, 0), n))
        # A resize below a block in use is refused, and nothing changes.
        in_use = {b for s in self.on_device() for b in self.bm.block_ids(s).tolist()}
        if any(b >= target for b in in_use) and self.draw(st.booleans()):
            before = (self.bm.stats(), self.observed())
            with pytest.raises(RuntimeError, match="is in use"):
                self.bm.resize(target)
            assert (self.bm.stats(), self.observed()) == before
        before_bytes = self.c.pool.mapped_bytes
        result = tinyserve.compact_and_shrink(self.bm, self.comp, self.c.pool, target)
        self.bm.check()
        self.c.pool.check()
        assert result["num_blocks"] == self.bm.num_blocks == self.c.pool.num_blocks == target
        assert result["freed_bytes"] == before_bytes - self.c.pool.mapped_bytes >= 0
        self.shrinks += 1
        self.verify()

    def op_grow(self):
        old = self.bm.num_blocks
        n = self.draw(st.integers(old, MAX_BLOCKS))
        result = tinyserve.grow_pool(self.bm, self.c.pool, n)
        assert result["num_blocks"] == self.bm.num_blocks == self.c.pool.num_blocks == n
        # New blocks' contents are unspecified: poison them so a stale read shows.
        for t in self.c.device:
            t[old:] = np.nan
        self.grows += 1
        self.bm.check()
        self.verify()


RESIZES = []


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_compact_shrink_and_grow_preserve_every_token_and_page_summary(data):
    work = ResizingWorkload(PoolCaches(), data)
    for _ in range(data.draw(st.integers(10, 80))):
        work.step()
    work.finish()
    RESIZES.append((work.plans, work.shrinks, work.grows))


def test_the_resize_property_test_shrank_and_grew():
    if not RESIZES:
        pytest.skip("the property test did not run in this session")
    plans, shrinks, grows = (sum(x) for x in zip(*RESIZES))
    assert plans >= 500 and shrinks >= 300 and grows >= 300, (plans, shrinks, grows)


# ---- compact_and_shrink / grow_pool ----------------------------------------------------------


def small_pool(num_blocks=16, **kw):
    # A block is 1 KiB per tensor (4 tokens x 2 heads x 32 x float32), 4 tensors.
    return CachePool(2, 64, 4, 2, 32, "float32", "cpu", num_blocks=num_blocks, **kw)


def test_compact_and_shrink_gives_the_tail_back_and_grow_pool_takes_it_again():
    pool = small_pool(16, granule_bytes=4096)  # 16 KiB per tensor: 4 granules each
    bm = BlockManager(16, 4)
    comp = Compactor(bm)
    rng = np.random.default_rng(5)
    for t in pool.tensors():
        np.from_dlpack(t)[...] = rng.standard_normal(np.from_dlpack(t).shape)
    for s in range(4):
        _new(bm, s)
        bm.append(s, 8)  # 2 blocks each: blocks 0..7
    for s in (0, 2):
        bm.free(s)  # blocks 0..1 and 4..5 free; 2..3 and 6..7 used
    expected = [
        np.from_dlpack(t)[bm.block_ids(1).tolist() + bm.block_ids(3).tolist()].copy()
        for t in pool.tensors()
    ]
    mapped = pool.mapped_bytes
    result = tinyserve.compact_and_shrink(bm, comp, pool)
    bm.check()
    pool.check()
    assert result == {"num_blocks": 4, "moved_blocks": 2, "freed_bytes": mapped - pool.mapped_bytes}
    assert pool.mapped_bytes == 4 * 4096  # 4 tensors x one granule: the packed floor
    got = [
        np.from_dlpack(t)[bm.block_ids(1).tolist() + bm.block_ids(3).tolist()]
        for t in pool.tensors()
    ]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    with pytest.raises(OutOfBlocks):
        _new(bm, 5)
        bm.append(5, 1)
    bm.free(5)
    result = tinyserve.grow_pool(bm, pool, 12)
    assert result == {"num_blocks": 12, "added_bytes": 4 * 2 * 4096}
    _new(bm, 5)
    bm.append(5, 32)  # the 8 new blocks
    bm.check()
    pool.check()


def test_compact_and_shrink_refuses_before_changing_anything():
    pool = small_pool(16)
    bm = BlockManager(8, 4)
    comp = Compactor(bm)
    with pytest.raises(ValueError, match="same number of blocks.*pool.num_blocks=16"):
        tinyserve.compact_and_shrink(bm, comp, pool)
    with pytest.raises(ValueError, match="same number of blocks"):
        tinyserve.grow_pool(bm, pool, 20)
    bm.resize(16)
    _new(bm, 0)
    bm.append(0, 18)  # 5 blocks, the last partial
    state = (bm.stats(), pool.num_blocks, pool.mapped_bytes)
    with pytest.raises(OutOfBlocks):
        tinyserve.compact_and_shrink(bm, comp, pool, 4)
    bm.fork(0, 1)
    bm.append(1, 1)  # a pending copy-on-write pair
    state = (bm.stats(), pool.num_blocks, pool.mapped_bytes)
    with pytest.raises(RuntimeError, match="copy-on-write pairs are pending"):
        tinyserve.compact_and_shrink(bm, comp, pool)
    with pytest.raises(ValueError, match="grow_pool: num_blocks must be >= the current 16"):
        tinyserve.grow_pool(bm, pool, 8)
    with pytest.raises(ValueError):  # past the pool's reservation
        tinyserve.grow_pool(bm, pool, 65)
    assert (bm.stats(), pool.num_blocks, pool.mapped_bytes) == state
    assert not comp.has_pending_plan
    bm.check()


@pytest.mark.parametrize(
    "bad, error",
    [
        (-1, ValueError),
        (-5, ValueError),
        (True, tinyserve.ArgumentTypeError),
        (6.0, tinyserve.ArgumentTypeError),
        ("6", tinyserve.ArgumentTypeError),
    ],
)
def test_compact_and_shrink_refuses_a_bad_target_before_committing(bad, error):
    """The target is checked before any plan, so the call cannot commit a compaction and then
    fail to resize."""
    pool = small_pool(16)
    bm = BlockManager(16, 4)
    comp = Compactor(bm)
    for s in range(3):
        _new(bm, s)
        bm.append(s, 8)  # blocks 0..5
    bm.free(0)  # blocks 0..1 free: a compaction would move blocks
    tables = {s: bm.block_ids(s).tolist() for s in (1, 2)}
    state = (bm.stats(), pool.num_blocks, pool.mapped_bytes)
    with pytest.raises(error, match="^tinyserve.compact_and_shrink: num_blocks must be"):
        tinyserve.compact_and_shrink(bm, comp, pool, bad)
    assert (bm.stats(), pool.num_blocks, pool.mapped_bytes) == state
    assert {s: bm.block_ids(s).tolist() for s in (1, 2)} == tables
    assert not comp.has_pending_plan
    bm.check()
    pool.check()
    result = tinyserve.compact_and_shrink(bm, comp, pool, np.int64(6))
    assert result["num_blocks"] == 6 and type(result["num_blocks"]) is int
    bm.check()
    pool.check()


@pytest.mark.parametrize("num_used", [1, 3, 4, 5, 7, 9, 12])
def test_compact_and_shrink_keeps_exactly_the_granules_of_the_kept_blocks(num_used):
    """Blocks of 1 KiB per tensor in 4 KiB granules: a target off the granule boundary keeps
    the one partly used granule per tensor, and no whole granule past the last kept block."""
    pool = small_pool(16, granule_bytes=4096)
    bm = BlockManager(16, 4)
    comp = Compactor(bm)
    for s in range(16):
        _new(bm, s)
        bm.append(s, 4)  # one block each
    rng = np.random.default_rng(num_used)
    keep = sorted(rng.choice(16, size=num_used, replace=False).tolist())
    for s in set(range(16)) - set(keep):
        bm.free(s)
    before = pool.mapped_bytes
    result = tinyserve.compact_and_shrink(bm, comp, pool)
    bm.check()
    pool.check()
    per_tensor = -(-num_used * 1024 // 4096) * 4096
    assert pool.num_tensors == 4
    assert pool.mapped_bytes == 4 * per_tensor
    assert result["num_blocks"] == pool.num_blocks == bm.num_blocks == num_used
    assert result["freed_bytes"] == before - pool.mapped_bytes
    assert max(max(bm.block_ids(s).tolist()) for s in keep) == num_used - 1


@pytest.mark.cuda
def test_compact_and_shrink_returns_device_memory_to_the_driver():
    torch = pytest.importorskip("torch")
    # 64 MiB per tensor at full size: 2048 blocks of 16 x 8 x 128 fp16.
    pool = CachePool(2, 2048, 16, 8, 128, "float16", "cuda", num_blocks=2048)
    bm = BlockManager(2048, 16)
    comp = Compactor(bm)
    keep = []
    for s in range(64):
        _new(bm, s)
        bm.append(s, 16 * 16)  # 16 blocks each
        if s % 4:
            bm.free(s)
        else:
            keep.append(s)
    torch.cuda.synchronize()
    tensors = [torch.from_dlpack(t) for t in pool.tensors()]
    for t in tensors:
        t.normal_()
    ids = [b for s in keep for b in bm.block_ids(s).tolist()]
    expected = [t[ids].clone() for t in tensors]
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    mapped = pool.mapped_bytes
    result = tinyserve.compact_and_shrink(bm, comp, pool)
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info()[0]
    assert result["num_blocks"] == 256 and result["freed_bytes"] == mapped - pool.mapped_bytes
    granule = pool.granule_bytes
    # The driver shows the bytes back, to the granule (other allocations may move it a little).
    assert free_after - free_before >= result["freed_bytes"] - granule
    ids = [b for s in keep for b in bm.block_ids(s).tolist()]
    assert max(ids) < 256
    got = [torch.from_dlpack(t)[ids] for t in pool.tensors()]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    bm.check()
    pool.check()
    tinyserve.grow_pool(bm, pool, 2048)
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] <= free_after - result["freed_bytes"] + granule
    bm.check()


def test_readme_compact_and_shrink_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Reclaiming memory", 1)[1]
    block = section.split("```python\n", 2)[2].split("```", 1)[0]
    assert "compact_and_shrink" in block
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    bm, pool = scope["bm"], scope["pool"]
    bm.check()
    pool.check()
    assert bm.num_blocks == pool.num_blocks == 64 and bm.num_free_blocks == 50


def test_compact_and_shrink_aborts_the_plan_when_the_copies_fail(monkeypatch):
    pool = small_pool(16)
    bm = BlockManager(16, 4)
    comp = Compactor(bm)
    for s in range(3):
        _new(bm, s)
        bm.append(s, 8)
    bm.free(0)
    state = (bm.stats(), [bm.block_ids(s).tolist() for s in (1, 2)], pool.mapped_bytes)

    def broken(*args, **kwargs):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(tinyserve._compactor, "execute_plan", broken)
    with pytest.raises(RuntimeError, match="copy failed"):
        tinyserve.compact_and_shrink(bm, comp, pool)
    assert not comp.has_pending_plan
    assert (bm.stats(), [bm.block_ids(s).tolist() for s in (1, 2)], pool.mapped_bytes) == state
    assert bm.num_blocks == pool.num_blocks == 16
    bm.check()


@pytest.mark.parametrize("bad", [True, 12.0, "12", None])
def test_grow_pool_refuses_a_target_that_is_not_an_int(bad):
    """Refused before the pool grows, as the ArgumentTypeError of every bad kind of argument;
    a NumPy integer is an int."""
    pool = small_pool(8)
    bm = BlockManager(8, 4)
    state = (bm.stats(), pool.num_blocks, pool.mapped_bytes)
    with pytest.raises(
        tinyserve.ArgumentTypeError,
        match=f"^tinyserve.grow_pool: num_blocks must be an int, got {type(bad).__name__}$",
    ):
        tinyserve.grow_pool(bm, pool, bad)
    assert (bm.stats(), pool.num_blocks, pool.mapped_bytes) == state
    bm.check()
    pool.check()
    result = tinyserve.grow_pool(bm, pool, np.int32(12))
    assert result["num_blocks"] == 12 and type(result["num_blocks"]) is int
    assert bm.num_blocks == 12 and pool.num_blocks >= 12
    bm.check()
    pool.check()
