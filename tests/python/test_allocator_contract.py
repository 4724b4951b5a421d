"""The BlockManager and Compactor contracts (DESIGN.md sections 4 and 5) on odd but legal
inputs, and a randomized run of every call against a simulated KV cache.

Each test states the contract in plain Python (what the engine would see in its cache), so it
does not lean on how the manager orders its free list, except where the contract names an order
(least recently used first)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tinyserve import BlockManager, Compactor, OutOfBlocks


def snapshot(bm: BlockManager, comp: Compactor | None = None, seq_ids=()) -> tuple:
    """Everything a rejected call must leave as it was."""
    seqs = {s: bm.seq_len(s) for s in seq_ids}
    if comp is None:
        return bm.stats(), seqs
    offloaded = {s: comp.num_offloaded(s) for s in seq_ids}
    return bm.stats(), seqs, offloaded, comp.num_free_host_blocks, comp.has_pending_plan


# ---- odd but legal inputs ------------------------------------------------------------------


def test_fork_of_a_fork_and_freeing_the_parent_before_its_children():
    bm = BlockManager(6, 4)
    bm.add_sequence(1)
    bm.append(1, 6)  # one full block, one partial (2 of 4 slots)
    bm.fork(1, 2)
    bm.check()
    bm.fork(2, 3)  # a fork of a fork shares the same blocks
    bm.check()
    shared = bm.block_ids(1).tolist()
    assert bm.block_ids(2).tolist() == shared and bm.block_ids(3).tolist() == shared
    assert bm.stats()["num_shared"] == 2 and bm.num_free_blocks == 4
    bm.free(1)  # the parent goes first: its children keep every block
    bm.check()
    assert bm.num_free_blocks == 4
    assert bm.block_ids(2).tolist() == shared and bm.block_ids(3).tolist() == shared
    # Still shared by 2 and 3: the first to append copies the partial block, the last writes in
    # place.
    slots3 = bm.append(3, 1)
    bm.check()
    copies = bm.take_copies().tolist()
    new_block = bm.block_ids(3).tolist()[1]
    assert copies == [[shared[1], new_block]] and new_block not in shared
    assert slots3.tolist() == [new_block * 4 + 2]
    slots2 = bm.append(2, 1)
    bm.check()
    assert bm.take_copies().shape == (0, 2)
    assert slots2.tolist() == [shared[1] * 4 + 2]
    bm.free(2)
    bm.check()
    bm.free(3)
    bm.check()
    assert bm.num_free_blocks == 6 and bm.stats()["num_used"] == 0


def test_a_prefix_hit_never_attaches_a_partially_filled_block():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    bm.add_sequence(1)
    bm.append(1, 6, list(range(6)))  # block 0 full (keyed), block 1 holds 2 tokens
    bm.check()
    # The same 6 tokens, and longer prompts through the partial block: only the full block hits.
    for seq_id, prompt in ((2, range(6)), (3, range(7)), (4, range(9))):
        assert bm.add_sequence(seq_id, list(prompt)) == 4
        bm.check()
        assert bm.block_ids(seq_id).tolist() == bm.block_ids(1).tolist()[:1]
    # A prompt of exactly one block leaves its last token to compute: no hit.
    assert bm.add_sequence(5, list(range(4))) == 0
    bm.check()
    assert bm.block_ids(5).tolist() == []
    # A hit sequence continues after the cached block, in a block of its own.
    slots = bm.append(2, 2, [4, 5])
    bm.check()
    assert bm.take_copies().shape == (0, 2)
    own = bm.block_ids(2).tolist()[1]
    assert own not in bm.block_ids(1).tolist() and slots.tolist() == [own * 4, own * 4 + 1]


def test_compaction_with_nothing_to_move_is_an_empty_plan_that_changes_nothing():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    comp = Compactor(bm, 2)
    bm.add_sequence(1)
    bm.append(1, 3, [1, 2, 3])  # blocks 0 and 1: already packed
    before = snapshot(bm, comp, [1])
    table = bm.block_ids(1).tolist()
    for target in (None, 2, 8):
        plan = comp.plan_compact(target)
        bm.check()
        assert plan.kind == "compact" and len(plan) == 0 and plan.num_bytes(64) == 0
        assert plan.src.dtype == np.int32 and plan.dst.dtype == np.int32
        comp.commit(plan)
        bm.check()
        assert snapshot(bm, comp, [1]) == before and bm.block_ids(1).tolist() == table


def test_compaction_keeps_cached_blocks_below_the_target_while_uncached_ones_are_free():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    comp = Compactor(bm)
    for seq_id, tokens in ((1, [1, 2]), (2, None), (3, None), (4, None)):
        bm.add_sequence(seq_id)
        bm.append(seq_id, 2, tokens)  # blocks 0..3; only block 0 is keyed
    bm.free(1)  # block 0: cached, free
    bm.free(2)  # block 1: uncached, free
    bm.check()
    plan = comp.plan_compact(3)  # block 3 must move below 3: block 1 is free and uncached
    bm.check()
    assert plan.src.tolist() == [3] and plan.dst.tolist() == [1]
    comp.commit(plan)
    bm.check()
    assert bm.block_ids(4).tolist() == [1]
    assert bm.stats()["num_cached"] == 1 and bm.stats()["evictions"] == 0
    assert bm.match_prefix([1, 2, 9])["tokens"] == 2
    # With no uncached free block left below the target, the cached one is taken.
    plan = comp.plan_compact(2)
    bm.check()
    assert plan.src.tolist() == [2] and plan.dst.tolist() == [0]
    comp.commit(plan)
    bm.check()
    assert bm.stats()["num_cached"] == 0 and bm.stats()["evictions"] == 1
    assert bm.match_prefix([1, 2, 9])["tokens"] == 0


def test_compaction_takes_the_least_recently_used_cached_block_first():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    comp = Compactor(bm)
    for seq_id in (1, 2, 3):
        bm.add_sequence(seq_id)
        bm.append(seq_id, 2, [seq_id, seq_id])  # blocks 0, 1, 2, each keyed
    bm.add_sequence(4)
    bm.append(4, 2)  # block 3, uncached
    bm.free(2)  # block 1 cached first: least recently used
    bm.free(1)  # block 0 cached next
    bm.check()
    plan = comp.plan_compact(3)  # block 3 must move, only cached blocks are free below 3
    assert plan.dst.tolist() == [1]
    comp.commit(plan)
    bm.check()
    assert bm.match_prefix([1, 1, 9])["tokens"] == 2  # the more recent one stays cached
    assert bm.match_prefix([2, 2, 9])["tokens"] == 0


def test_plan_compact_refuses_a_negative_target_from_python():
    bm = BlockManager(8, 2)
    comp = Compactor(bm)
    bm.add_sequence(1)
    bm.append(1, 8)
    bm.free(1)
    bm.add_sequence(2)
    bm.append(2, 3)
    before = snapshot(bm, comp, [2])
    for bad in (-1, -2, np.int64(-1)):
        with pytest.raises(ValueError, match="plan_compact: num_blocks must be >= 0 or None, got"):
            comp.plan_compact(bad)
        assert snapshot(bm, comp, [2]) == before
        bm.check()
    comp.abort(comp.plan_compact(None))  # the default still plans
    bm.check()


def test_evict_with_nothing_cached_and_recall_into_a_nearly_full_pool():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    comp = Compactor(bm, 4)
    bm.add_sequence(1)
    bm.append(1, 4, [1, 2, 3, 4])  # two keyed blocks, held
    before = snapshot(bm, comp, [1])
    with pytest.raises(OutOfBlocks, match="plan_evict: need 1 cached unreferenced blocks, got 0"):
        comp.plan_evict(1)  # cached blocks that are still referenced cannot be evicted
    assert snapshot(bm, comp, [1]) == before
    bm.check()
    comp.commit(comp.plan_evict(0))
    bm.check()
    assert snapshot(bm, comp, [1]) == before

    comp.commit(comp.plan_offload_sequences([1]))
    bm.check()
    assert comp.num_offloaded(1) == 2 and bm.num_free_blocks == 6
    # Five of six device blocks taken: one free block for two offloaded ones.
    bm.add_sequence(2)
    bm.append(2, 10)
    bm.check()
    before = snapshot(bm, comp, [1, 2])
    with pytest.raises(OutOfBlocks, match="plan_recall: need 2 free device blocks, got 1"):
        comp.plan_recall([1])
    assert snapshot(bm, comp, [1, 2]) == before
    with pytest.raises(RuntimeError, match="block_table: sequence 1 has 2 offloaded"):
        bm.block_table([1])
    bm.check()
    # Exactly enough free blocks, one of them cached: recall takes it, dropping its key.
    bm.free(2)
    bm.add_sequence(3)
    bm.append(3, 2, [7, 7])
    bm.free(3)  # one cached free block, five uncached ones
    bm.add_sequence(4)
    bm.append(4, 8)  # four blocks, all uncached ones: the cached block is not needed yet
    bm.check()
    assert bm.num_free_blocks == 2 and bm.stats()["num_evictable"] == 1
    assert bm.match_prefix([7, 7, 9])["tokens"] == 2
    plan = comp.plan_recall([1])
    bm.check()
    assert plan.kind == "recall" and len(plan) == 2 and plan.num_bytes(10) == 20
    comp.commit(plan)
    bm.check()
    assert comp.num_offloaded(1) == 0 and bm.num_free_blocks == 0
    assert bm.stats()["num_cached"] == 0 and bm.stats()["evictions"] == 1
    table, lens = bm.block_table([1])
    assert lens.tolist() == [4] and len(set(table[0].tolist()) & set(bm.block_ids(4).tolist())) == 0


# ---- a randomized run against a simulated cache --------------------------------------------


class Run:
    """Plays an engine over one int per cache slot: copies and plans are executed on the
    simulated device and host caches, tokens written where append said. After every call each
    sequence must read its own history through its block table, the manager's statistics must
    agree with what the tables show, and check() must pass; a rejected call must change
    nothing."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        r = self.rng
        self.n, self.bs, self.num_host = r.randint(1, 10), r.choice([1, 2, 3, 4]), r.randint(0, 6)
        self.bm = BlockManager(self.n, self.bs, enable_prefix_caching=r.random() < 0.6)
        self.comp = Compactor(self.bm, self.num_host)
        self.device = np.full(self.n * self.bs, -1, np.int64)
        self.host = np.full(max(self.num_host, 1) * self.bs, -1, np.int64)
        self.history: dict[int, list[int]] = {}
        self.next_value = 1000  # values of tokens appended without ids: unique
        self.rejected = 0

    def state(self) -> tuple:
        return snapshot(self.bm, self.comp, sorted(self.history))

    def write(self, slots: np.ndarray, values: list[int]) -> None:
        for src, dst in self.bm.take_copies().tolist():  # before the step's writes
            self.device[dst * self.bs : (dst + 1) * self.bs] = self.device[
                src * self.bs : (src + 1) * self.bs
            ]
        assert slots.dtype == np.int64 and len(set(slots.tolist())) == len(slots)
        self.device[slots] = values

    def verify(self) -> None:
        bm, bs = self.bm, self.bs
        bm.check()
        holders: dict[int, int] = {}
        on_device = True
        for seq_id, history in self.history.items():
            assert bm.seq_len(seq_id) == len(history)
            if self.comp.num_offloaded(seq_id):
                on_device = False
                continue
            blocks = bm.block_ids(seq_id).tolist()
            assert len(blocks) == -(-len(history) // bs)
            table, lens = bm.block_table([seq_id])
            assert table[0].tolist() == blocks and lens.tolist() == [len(history)]
            read = [int(self.device[blocks[i // bs] * bs + i % bs]) for i in range(len(history))]
            assert read == history, seq_id
            for b in blocks:
                holders[b] = holders.get(b, 0) + 1
        stats = bm.stats()
        assert stats["num_free"] == bm.num_free_blocks
        assert stats["num_free"] + stats["num_used"] == self.n
        assert stats["num_tokens"] == sum(len(h) for h in self.history.values())
        assert stats["num_sequences"] == len(self.history)
        if on_device:
            assert stats["num_used"] == len(holders)
            assert stats["num_shared"] == sum(1 for c in holders.values() if c > 1)
            filled = {}  # tokens in each held block (its holders agree on the count)
            for seq_id, history in self.history.items():
                for i, b in enumerate(bm.block_ids(seq_id).tolist()):
                    filled[b] = min(bs, len(history) - i * bs)
            assert stats["waste_slots"] == sum(bs - f for f in filled.values())

    def add(self) -> None:
        r, bm = self.rng, self.bm
        seq_id = r.randint(-5, 40)
        if seq_id in self.history:
            with pytest.raises(ValueError, match="seq_id already exists"):
                bm.add_sequence(seq_id)
            return
        prompt = [r.randrange(3) for _ in range(r.randint(0, 3 * self.bs))]
        hit = bm.add_sequence(seq_id, prompt if r.random() < 0.8 else None)
        assert 0 <= hit <= max(len(prompt) - 1, 0) and hit % self.bs == 0
        if not bm.prefix_caching:
            assert hit == 0
        self.history[seq_id] = prompt[:hit]
        self.verify()  # the attached blocks hold the prompt's prefix
        rest = prompt[hit:]
        if rest and r.random() < 0.7:
            before = self.state()
            try:
                self.append_one(seq_id, rest)
            except OutOfBlocks:
                assert self.state() == before
                self.rejected += 1

    def append_one(self, seq_id: int, token_ids: list[int]) -> None:
        slots = self.bm.append(seq_id, len(token_ids), token_ids)
        self.write(slots, token_ids)
        self.history[seq_id] += token_ids

    def append(self) -> None:
        r, live = self.rng, list(self.history)
        seq_ids = r.sample(live, r.randint(1, len(live)))
        counts = [r.choice([0, 1, self.bs, r.randint(0, 2 * self.bs)]) for _ in seq_ids]
        if len(seq_ids) == 1 and r.random() < 0.5:
            self.append_one(seq_ids[0], [r.randrange(3) for _ in range(counts[0])])
            return
        slots = self.bm.append_batch(seq_ids, np.array(counts, np.int64))
        values = list(range(self.next_value, self.next_value + sum(counts)))
        self.next_value += len(values)
        self.write(slots, values)
        offset = 0
        for seq_id, count in zip(seq_ids, counts):
            self.history[seq_id] += values[offset : offset + count]
            offset += count

    def fork(self) -> None:
        parent, child = self.rng.choice(list(self.history)), self.rng.randint(-5, 40)
        if child in self.history:
            with pytest.raises(ValueError, match="child_id already exists"):
                self.bm.fork(parent, child)
            return
        self.bm.fork(parent, child)
        self.history[child] = list(self.history[parent])

    def free(self) -> None:
        seq_id = self.rng.choice(list(self.history))
        self.bm.free(seq_id)
        del self.history[seq_id]
        with pytest.raises(KeyError):
            self.bm.free(seq_id)

    def signal(self) -> None:
        r, live = self.rng, list(self.history)
        self.comp.touch(r.sample(live, r.randint(0, len(live))))
        if r.random() < 0.3:
            self.comp.record_hits(np.array([r.randint(0, 3) for _ in range(self.n)], np.int32))

    def plan(self) -> None:
        r, comp, bs = self.rng, self.comp, self.bs
        kind = r.choice(["evict", "offload", "offload_sequences", "recall", "compact"])
        live = list(self.history)
        if kind == "evict":
            plan = comp.plan_evict(r.randint(0, 2))
        elif kind == "offload":
            plan = comp.plan_offload(r.randint(0, 2))
        elif kind == "offload_sequences":
            plan = comp.plan_offload_sequences(r.sample(live, r.randint(0, len(live))))
        elif kind == "recall":
            plan = comp.plan_recall(r.sample(live, r.randint(0, len(live))))
        else:
            used = self.bm.stats()["num_used"]
            target = None if r.random() < 0.5 else r.randint(0, self.n)
            plan = comp.plan_compact(target)
            target = used if target is None else target
        self.bm.check()
        src, dst = plan.src.tolist(), plan.dst.tolist()
        assert plan.kind == kind.split("_")[0]
        assert len(set(src)) == len(src) and len(set(dst)) == len(dst)
        assert plan.num_bytes(3) == (0 if kind == "evict" else 3 * len(src))
        if kind == "evict":
            assert dst == []
        else:
            assert len(dst) == len(src)
        if kind == "compact":
            assert all(s >= target for s in src) and all(d < target for d in dst)
        with pytest.raises(RuntimeError, match="still pending"):
            comp.plan_evict(0)  # plans never overlap
        if r.random() < 0.2:
            before = self.state()
            comp.abort(plan)
            assert self.state()[:4] == before[:4] and not comp.has_pending_plan
            assert self.state()[0] == before[0]
            return
        device, host = self.device.copy(), self.host.copy()
        for s, d in zip(src, dst):
            if kind == "recall":
                self.device[d * bs : (d + 1) * bs] = host[s * bs : (s + 1) * bs]
            elif kind == "compact":
                self.device[d * bs : (d + 1) * bs] = device[s * bs : (s + 1) * bs]
            elif kind.startswith("offload"):
                self.host[d * bs : (d + 1) * bs] = device[s * bs : (s + 1) * bs]
        comp.commit(plan)
        if kind == "compact":
            for seq_id in self.history:
                if not self.comp.num_offloaded(seq_id):
                    assert all(b < target for b in self.bm.block_ids(seq_id).tolist())

    def step(self) -> None:
        r = self.rng
        action = r.random()
        before = self.state()
        try:
            if action < 0.2 or not self.history:
                self.add()
            elif action < 0.45:
                self.append()
            elif action < 0.55:
                self.fork()
            elif action < 0.65:
                self.free()
            elif action < 0.75:
                self.signal()
            else:
                self.plan()
        except (OutOfBlocks, RuntimeError) as e:
            # Out of blocks, or a sequence with offloaded blocks asked to append: nothing changed.
            assert isinstance(e, OutOfBlocks) or "offloaded" in str(e), e
            assert self.state() == before
            self.rejected += 1
        self.verify()


def test_random_calls_keep_every_sequence_readable_and_rejected_calls_change_nothing():
    rejected = 0
    for seed in range(200):
        run = Run(seed)
        for _ in range(50):
            run.step()
        rejected += run.rejected
    assert rejected > 50  # the rejected paths were exercised, not just the happy ones


def test_a_block_whose_copy_is_dropped_is_not_left_in_the_prefix_cache():
    """Copy-on-write fills a new block's first tokens; when its sequence is freed before
    take_copies(), the copy is dropped, so the block's content is incomplete and must not be
    findable by a later prompt, even though its own appended tokens made it full and keyed."""
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    bm.add_sequence(1)
    bm.append(1, 2, [1, 2])
    bm.fork(1, 2)
    bm.append(2, 2, [3, 4])  # copies block 0 into a new block, which the two tokens fill
    bm.check()
    assert bm.stats()["num_cached"] == 1 and bm.match_prefix([1, 2, 3, 4, 5])["tokens"] == 4
    bm.free(2)
    bm.check()
    assert bm.take_copies().shape == (0, 2)
    assert bm.stats()["num_cached"] == 0 and bm.stats()["num_evictable"] == 0
    assert bm.match_prefix([1, 2, 3, 4, 5])["tokens"] == 0
    assert bm.add_sequence(3, [1, 2, 3, 4, 5]) == 0
    bm.check()
    # Once the copy was handed out (and so ran), the key stays through a free.
    bm.fork(1, 4)
    bm.append(4, 2, [3, 4])
    assert bm.take_copies().shape == (1, 2)
    bm.free(4)
    bm.check()
    assert bm.add_sequence(5, [1, 2, 3, 4, 5]) == 4
    bm.check()
