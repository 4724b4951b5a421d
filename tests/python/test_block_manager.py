"""BlockManager: exact scenarios, errors, and a stateful property test against a Python model.

Every expected block id, slot and count in the scenarios below is derived by hand from the
documented semantics (docs/block_manager.md): the free list starts as 0..N-1, allocation takes its
head, free() releases tail first with keyed blocks to the back and unkeyed blocks to the front.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tinyserve
from tinyserve import BlockManager, OutOfBlocks

try:
    import torch
except ImportError:
    torch = None

# How an int argument outside int64 is refused.
INT64_RANGE = r"must be an int in \[-9223372036854775808, 9223372036854775807\]"

STAT_FIELDS = (
    "num_blocks",
    "num_free",
    "num_used",
    "num_cached",
    "num_evictable",
    "num_shared",
    "num_sequences",
    "num_tokens",
    "waste_slots",
    "prefix_hits",
    "prefix_queries",
    "evictions",
    "num_offloaded",
)


def snapshot(bm: BlockManager, seq_ids) -> tuple:
    """Everything observable about the manager, to compare before and after a failed call."""
    table, lens = bm.block_table(seq_ids)
    return (
        bm.stats(),
        bm.num_free_blocks,
        table.tolist(),
        lens.tolist(),
        [bm.block_ids(s).tolist() for s in seq_ids],
    )


def new_seq(bm: BlockManager, seq_id: int, num_tokens: int, token_ids=None) -> np.ndarray:
    assert bm.add_sequence(seq_id) == 0
    return bm.append(seq_id, num_tokens, token_ids)


# ---- construction and introspection --------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 16), "tinyserve.BlockManager: num_blocks must be >= 1, got 0"),
        ((-3, 16), "num_blocks must be >= 1, got -3"),
        (
            (2**31, 16),
            r"num_blocks must be <= 67108864 \(the host bookkeeping .*\), got 2147483648",
        ),
        ((2**26 + 1, 16), "num_blocks must be <= 67108864 .*got 67108865"),
        ((4, 0), "tinyserve.BlockManager: block_size must be >= 1, got 0"),
        ((4, 2**31), "block_size must be <= 2147483647, got 2147483648"),
    ],
)
def test_constructor_rejects_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        BlockManager(*args)


@pytest.mark.parametrize("flag, name", [(1, "int"), (None, "NoneType"), ("yes", "str")])
def test_constructor_takes_a_bool_for_prefix_caching(flag, name):
    with pytest.raises(
        tinyserve.ArgumentTypeError,
        match=f"^tinyserve.BlockManager: enable_prefix_caching must be a bool, got {name}$",
    ):
        BlockManager(4, 16, flag)
    for value in (True, False, np.bool_(True)):
        bm = BlockManager(4, 16, enable_prefix_caching=value)
        assert bm.prefix_caching == bool(value)
        bm.check()


def run_with_little_memory(body: str) -> None:
    """Runs `body` in a child process whose address space may grow by at most 256 MiB after
    tinyserve is loaded: a call that allocates in proportion to a huge request fails there with
    MemoryError instead of the error the body expects."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the address-space limit is set through /proc and RLIMIT_AS (Linux)")
    prelude = textwrap.dedent(
        """
        import resource
        import re
        import tinyserve as ts
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"child failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"


def test_a_huge_pool_is_refused_before_anything_is_allocated():
    # Issue 9, defect 6: 10**9 blocks used to run 12 s and 18 GiB into a bare MemoryError.
    with pytest.raises(
        ValueError,
        match=r"tinyserve.BlockManager: num_blocks must be <= 67108864 "
        r"\(the host bookkeeping takes about \d+ bytes per block\), got 1000000000",
    ):
        BlockManager(10**9, 16)
    run_with_little_memory(
        """
        try:
            ts.BlockManager(10**9, 16)
        except ValueError as e:
            assert "num_blocks must be <=" in str(e), e
        else:
            raise AssertionError("accepted")
        """
    )


def test_append_beyond_the_pool_fails_fast_and_allocates_nothing():
    # Issue 9, defect 5: the slot array (2**29 int64: 4 GiB) was built before the pool was
    # checked. tracemalloc sees NumPy's and nanobind's allocations through Python's allocator;
    # the child's address-space limit catches a C++ vector sized to the request.
    import tracemalloc

    bm = BlockManager(16, 16)
    bm.add_sequence(0)
    bm.add_sequence(1)
    tracemalloc.start()
    try:
        for call in (lambda: bm.append(0, 2**29), lambda: bm.append_batch([0, 1], [1, 2**29])):
            with pytest.raises(OutOfBlocks, match="need 3355443[23] free blocks, got 16"):
                call()
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert bm.seq_len(0) == bm.seq_len(1) == 0
    bm.check()
    run_with_little_memory(
        """
        bm = ts.BlockManager(16, 16)
        bm.add_sequence(0)
        bm.add_sequence(1)
        for call in (lambda: bm.append(0, 2**29), lambda: bm.append_batch([0, 1], [1, 2**29])):
            try:
                call()
            except ts.OutOfBlocks as e:
                assert re.search("need 3355443[23] free blocks, got 16", str(e)), e
            else:
                raise AssertionError("accepted")
        assert bm.seq_len(0) == bm.seq_len(1) == 0
        bm.check()
        """
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda bm: bm.append(2**63, 1),
            "append: seq_id " + INT64_RANGE + ", got 9223372036854775808",
        ),
        (lambda bm: bm.append(1, -(2**64)), "append: num_tokens " + INT64_RANGE + ", got -18446"),
        (lambda bm: bm.free(2**63), "free: seq_id " + INT64_RANGE + ", got 9223372036854775808"),
        (
            lambda bm: bm.fork(1, 2**70),
            "fork: child_id " + INT64_RANGE + ", got 1180591620717411303424",
        ),
        (lambda bm: bm.seq_len(-(2**63) - 1), "seq_len: seq_id " + INT64_RANGE + ", got -92233"),
        (lambda bm: bm.add_sequence(2**63), "add_sequence: seq_id " + INT64_RANGE),
        (lambda bm: bm.has_sequence(2**64), "has_sequence: seq_id " + INT64_RANGE),
        (lambda bm: bm.block_ids(2**64), "block_ids: seq_id " + INT64_RANGE),
        (
            lambda bm: bm.append(1, 2, [5, 2**64]),
            r"append: token_ids\[1\] " + INT64_RANGE + r", got 18446744073709551616",
        ),
        (
            lambda bm: bm.add_sequence(9, [2**64]),
            r"add_sequence: token_ids\[0\] " + INT64_RANGE + r", got 18446744073709551616",
        ),
        (
            lambda bm: bm.append_batch([1, 2**63], 1),
            r"append_batch: seq_ids\[1\] " + INT64_RANGE + r", got 9223372036854775808",
        ),
        (lambda bm: bm.append_batch([1], 2**63), "append_batch: num_tokens " + INT64_RANGE),
        (
            lambda bm: bm.append(1, 1, np.array([2**63], np.uint64)),
            r"append: token_ids\[0\] " + INT64_RANGE + r", got 9223372036854775808",
        ),
        (lambda bm: BlockManager(2**64, 4), "BlockManager: num_blocks " + INT64_RANGE),
    ],
)
def test_out_of_range_integers_name_the_argument_and_value(call, message):
    # Issue 9, defect 8: these raised nanobind's "incompatible function arguments" or "got list".
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 3, [1, 2, 3])
    before = snapshot(bm, [1])
    with pytest.raises(ValueError, match="tinyserve.*" + message):
        call(bm)
    assert snapshot(bm, [1]) == before
    bm.check()


def test_integer_array_dtype_errors_name_the_dtype():
    bm = BlockManager(8, 2)
    with pytest.raises(TypeError, match=r"append_batch: seq_ids must hold integers, got float64"):
        bm.append_batch(np.array([1.0]), 1)
    bm.add_sequence(0)
    before = snapshot(bm, [0])
    # NumPy float and bool scalars are counts of the wrong type, not of the wrong shape.
    for count, dtype in [(np.float64(2.0), "float64"), (np.float32(2.0), "float32")]:
        with pytest.raises(
            TypeError, match=rf"append_batch: num_tokens must hold integers, got {dtype}"
        ):
            bm.append_batch([0], count)
    with pytest.raises(TypeError, match=r"append_batch: num_tokens must hold integers, got bool"):
        bm.append_batch([0], np.bool_(True))
    with pytest.raises(TypeError, match=r"add_sequence: token_ids must hold integers, got float64"):
        bm.add_sequence(1, np.float64(1.0))
    assert snapshot(bm, [0]) == before and not bm.has_sequence(1)


def test_membership_takes_any_integer_id():
    """``x in manager`` answers as has_sequence for Python, NumPy and 0-d torch integers, and
    False for anything that is no id (a bool, a float, a string, an int beyond int64)."""
    bm = BlockManager(8, 2)
    bm.add_sequence(5)
    ids = [5, np.int64(5), np.int32(5), np.uint8(5)]
    if torch is not None:
        ids.append(torch.tensor(5))
    for seq_id in ids:
        assert seq_id in bm and bm.has_sequence(seq_id)
    for other in (6, np.int64(6), True, 5.0, "5", None, 2**70, -(2**70)):
        assert other not in bm


def test_fresh_manager_is_all_free():
    bm = BlockManager(7, 3, enable_prefix_caching=True)
    assert (bm.num_blocks, bm.block_size, bm.prefix_caching, bm.num_free_blocks) == (7, 3, True, 7)
    assert BlockManager(7, 3).prefix_caching is False
    expected = dict.fromkeys(STAT_FIELDS, 0)
    expected.update(num_blocks=7, num_free=7)
    assert bm.stats() == expected
    table, lens = bm.block_table([])
    assert table.shape == (0, 0) and lens.shape == (0,)
    assert table.dtype == np.int32 and lens.dtype == np.int32
    assert bm.take_copies().shape == (0, 2)
    assert repr(bm) == (
        "BlockManager(num_blocks=7, block_size=3, prefix_caching=True, num_free=7, num_sequences=0)"
    )
    bm.check()


def test_package_exports():
    assert tinyserve.BlockManager is BlockManager
    assert issubclass(OutOfBlocks, RuntimeError)


# ---- allocation, slots, free-list order ----------------------------------------------------


def test_slots_and_allocation_order():
    bm = BlockManager(8, 4)
    slots = new_seq(bm, 1, 6)
    assert slots.dtype == np.int64
    assert slots.tolist() == [0, 1, 2, 3, 4, 5]
    assert bm.block_ids(1).tolist() == [0, 1]
    assert new_seq(bm, 2, 1).tolist() == [8]  # block 2
    assert bm.append(1, 3).tolist() == [6, 7, 12]  # fills block 1, then block 3
    assert bm.block_ids(1).tolist() == [0, 1, 3]
    assert bm.seq_len(1) == 9 and bm.seq_len(2) == 1
    table, lens = bm.block_table([2, 1])
    assert table.tolist() == [[2, 0, 0], [0, 1, 3]]
    assert lens.tolist() == [1, 9]
    assert bm.num_free_blocks == 4
    bm.check()


def test_append_zero_tokens_is_a_no_op():
    bm = BlockManager(4, 4)
    new_seq(bm, 1, 2)
    bm.fork(1, 2)
    before = snapshot(bm, [1, 2])
    assert bm.append(2, 0).tolist() == []
    assert bm.append(2, 0, []).tolist() == []
    assert bm.append_batch([1, 2], 0).tolist() == []
    assert snapshot(bm, [1, 2]) == before  # no copy-on-write for zero tokens
    assert bm.take_copies().shape == (0, 2)
    bm.check()


def test_free_releases_tail_first_and_unkeyed_blocks_are_reused_first():
    bm = BlockManager(6, 2)
    new_seq(bm, 1, 6)  # blocks 0, 1, 2
    new_seq(bm, 2, 2)  # block 3; free list [4, 5]
    bm.free(1)  # 2 to the front, then 1, then 0: [0, 1, 2, 4, 5]
    assert bm.num_free_blocks == 5
    bm.check()
    slots = new_seq(bm, 3, 10)
    assert bm.block_ids(3).tolist() == [0, 1, 2, 4, 5]
    assert slots.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    bm.check()


def test_keyed_blocks_go_to_the_back_and_the_tail_of_a_chain_is_evicted_first():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 6, [1, 2, 3, 4, 5, 6])  # blocks 0, 1, 2, all full and keyed
    new_seq(bm, 2, 2)  # block 3, no token ids: not keyed
    assert bm.stats()["num_cached"] == 3
    bm.free(1)  # free list [4, 5, 2, 1, 0]: the tail block 2 is evicted first
    stats = bm.stats()
    assert (stats["num_free"], stats["num_evictable"], stats["num_cached"]) == (5, 3, 3)
    bm.check()

    new_seq(bm, 3, 5)  # takes 4, 5, then evicts 2
    assert bm.block_ids(3).tolist() == [4, 5, 2]
    stats = bm.stats()
    assert (stats["evictions"], stats["num_cached"], stats["num_evictable"]) == (1, 2, 2)
    assert stats["waste_slots"] == 1  # seq 3 holds 5 tokens in 3 blocks of 2
    bm.check()

    # The head of the chain is still cached and is found again.
    assert bm.add_sequence(4, [1, 2, 3, 4, 5]) == 4
    assert bm.block_ids(4).tolist() == [0, 1]
    stats = bm.stats()
    assert (stats["prefix_hits"], stats["prefix_queries"], stats["num_free"]) == (2, 2, 0)
    assert stats["num_evictable"] == 0
    with pytest.raises(OutOfBlocks, match="need 1 free blocks, got 0"):
        bm.append(4, 1, [5])
    bm.check()


# ---- prefix caching ------------------------------------------------------------------------


def test_prefix_hit_covers_at_most_len_minus_one_tokens():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(100, 112))
    new_seq(bm, 1, 12, prompt)  # three keyed blocks 0, 1, 2
    assert bm.add_sequence(2, prompt[:8]) == 4  # 8 tokens: (8 - 1) // 4 = 1 block
    assert bm.add_sequence(3, prompt[:9]) == 8
    assert bm.add_sequence(4, prompt) == 8  # the last block is left to compute
    assert bm.add_sequence(5, prompt + [7]) == 12
    assert bm.add_sequence(6, prompt[:4]) == 0  # (4 - 1) // 4 = 0 blocks: not even queried
    assert bm.add_sequence(7, []) == 0
    assert bm.block_ids(5).tolist() == [0, 1, 2]
    assert bm.seq_len(4) == 8 and bm.block_ids(4).tolist() == [0, 1]
    stats = bm.stats()
    assert stats["prefix_queries"] == 1 + 2 + 2 + 3
    assert stats["prefix_hits"] == 1 + 2 + 2 + 3
    assert stats["num_tokens"] == 12 + 4 + 8 + 8 + 12
    bm.check()


def test_prefix_lookup_stops_at_the_first_miss():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(12))
    new_seq(bm, 1, 12, prompt)
    second_block_differs = prompt[:4] + [99] + prompt[5:] + [0]
    assert bm.add_sequence(2, second_block_differs) == 4
    # The third block matches, but keys are chained: after a miss nothing further is found.
    first_block_differs = [99] + prompt[1:] + [0]
    assert bm.add_sequence(3, first_block_differs) == 0
    stats = bm.stats()
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (2 + 1, 1)
    # Same content at another position is another key.
    assert bm.add_sequence(4, prompt[4:8] + [0]) == 0
    bm.check()


def test_a_hit_on_an_evictable_block_takes_it_out_of_the_free_list():
    bm = BlockManager(6, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 4, [5, 6, 7, 8])  # blocks 0, 1 keyed
    bm.free(1)  # free list [2, 3, 4, 5, 1, 0]
    assert bm.stats()["num_evictable"] == 2
    assert bm.add_sequence(2, [5, 6, 7, 8, 9]) == 4
    assert bm.block_ids(2).tolist() == [0, 1]
    assert bm.num_free_blocks == 4
    assert bm.stats()["num_evictable"] == 0
    bm.check()
    # The four free blocks are the others; the hit blocks are never handed out again.
    new_seq(bm, 3, 8)
    assert bm.block_ids(3).tolist() == [2, 3, 4, 5]
    with pytest.raises(OutOfBlocks):
        new_seq(bm, 4, 1)
    assert bm.stats()["evictions"] == 0
    bm.check()


def test_a_hit_after_free_reuses_the_same_blocks_and_the_cache_survives_refills():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    assert bm.add_sequence(1, prompt) == 0
    bm.append(1, len(prompt), prompt)  # blocks 0, 1 keyed, 2 partial
    bm.free(1)
    assert bm.add_sequence(2, prompt) == 8
    assert bm.block_ids(2).tolist() == [0, 1]
    # The engine appends the rest of the prompt itself.
    assert bm.append(2, 1, prompt[8:]).tolist() == [4 * 2]  # block 2 was unkeyed: reused first
    bm.check()


def test_identical_content_appended_twice_keeps_one_key():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 4, [1, 2, 3, 4])  # blocks 0, 1 keyed
    new_seq(bm, 2, 4, [1, 2, 3, 4])  # blocks 2, 3: same keys, left unkeyed
    assert bm.stats()["num_cached"] == 2
    bm.free(2)  # unkeyed: to the front
    bm.free(1)  # keyed: to the back
    assert bm.stats()["num_evictable"] == 2
    assert bm.add_sequence(3, [1, 2, 3, 4, 5]) == 4
    assert bm.block_ids(3).tolist() == [0, 1]
    assert new_seq(bm, 4, 1).tolist() == [4]  # block 2 is at the head
    bm.check()


def test_tokens_without_ids_end_keying_for_the_sequence():
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 1, [7])
    bm.append(1, 1)  # fills block 0 without the id of its second token
    bm.append(1, 2, [8, 9])  # later blocks are not keyed either
    assert bm.stats()["num_cached"] == 0
    new_seq(bm, 2, 4, [7, 8, 9, 10])
    bm.append_batch([2], [2])  # no token ids in a batch: seq 2 stops keying
    bm.append(2, 2, [11, 12])
    assert bm.stats()["num_cached"] == 2  # seq 2's first two blocks only
    # A sequence added without token ids and appended with them is keyed.
    new_seq(bm, 3, 2, [1, 1])
    assert bm.stats()["num_cached"] == 3
    bm.check()


def test_fork_carries_the_pending_token_ids_of_a_partial_block():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    new_seq(bm, 1, 2, [1, 2])
    bm.fork(1, 2)
    bm.append(2, 2, [3, 4])  # completes the child's (copied) block with the parent's ids
    bm.take_copies()
    assert bm.stats()["num_cached"] == 1
    assert bm.add_sequence(3, [1, 2, 3, 4, 0]) == 4
    assert bm.block_ids(3).tolist() == bm.block_ids(2).tolist()
    bm.check()


@pytest.mark.parametrize(
    "cached, probe",
    [
        ([5, 9], [5 + 31, 9 - 1]),  # defeats a polynomial hash with base 31
        ([5, 9], [9, 5]),
        ([1, 2], [1, 2 + 2**32]),  # differ only above 32 bits
        ([-1, 0], [2**63 - 1, 0]),
        ([0, 0], [0, 256]),  # differ in one byte of the second token
    ],
)
def test_different_block_contents_never_share_a_key(cached, probe):
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 2, cached)
    assert bm.add_sequence(2, probe + [0]) == 0
    assert bm.add_sequence(3, cached + [0]) == 2
    bm.check()


def test_keys_do_not_depend_on_block_ids_or_manager():
    prompt = [11, -22, 33, 2**62, 55]
    counts = []
    for skip in (0, 3):
        bm = BlockManager(8, 2, enable_prefix_caching=True)
        if skip:
            new_seq(bm, 99, 2 * skip)  # the prompt lands in other blocks
        new_seq(bm, 1, 4, prompt[:4])
        counts.append(bm.add_sequence(2, prompt))
        assert bm.block_ids(2).tolist() == bm.block_ids(1).tolist()
    assert counts == [4, 4]


def test_prefix_caching_off_ignores_token_ids():
    bm = BlockManager(8, 2)
    new_seq(bm, 1, 4, [1, 2, 3, 4])
    assert bm.add_sequence(2, [1, 2, 3, 4, 5]) == 0
    assert bm.stats()["num_cached"] == 0 and bm.stats()["prefix_queries"] == 0
    bm.check()


# ---- fork and copy-on-write ----------------------------------------------------------------


def test_copy_on_write_after_fork():
    bm = BlockManager(8, 4)
    new_seq(bm, 1, 6)  # blocks 0, 1 (2 tokens in 1)
    bm.fork(1, 2)
    assert bm.block_ids(2).tolist() == [0, 1] and bm.seq_len(2) == 6
    stats = bm.stats()
    assert (stats["num_shared"], stats["num_used"], stats["num_tokens"]) == (2, 2, 12)
    assert stats["waste_slots"] == 2  # a shared block counts once

    assert bm.append(2, 1).tolist() == [2 * 4 + 2]  # block 1 copied to block 2
    assert bm.block_ids(2).tolist() == [0, 2]
    assert bm.take_copies().tolist() == [[1, 2]]
    assert bm.take_copies().tolist() == []
    stats = bm.stats()
    assert (stats["num_shared"], stats["num_used"], stats["waste_slots"]) == (1, 3, 2 + 1)

    # Block 1 is the parent's alone now: it appends in place.
    assert bm.append(1, 1).tolist() == [1 * 4 + 2]
    assert bm.take_copies().tolist() == []
    bm.check()


def test_copy_pairs_feed_copy_blocks_directly():
    bm = BlockManager(6, 2)
    new_seq(bm, 1, 3)  # blocks 0, 1
    bm.fork(1, 2)
    bm.fork(1, 3)
    bm.append_batch([2, 3], 1)  # copies 1 -> 2 and 1 -> 3
    pairs = bm.take_copies()
    assert pairs.tolist() == [[1, 2], [1, 3]]
    assert pairs[:, 0].flags.c_contiguous and pairs[:, 1].flags.c_contiguous
    cache = np.random.default_rng(0).standard_normal((6, 2, 1, 4)).astype(np.float32)
    expected = cache.copy()
    expected[[2, 3]] = cache[1]
    tinyserve.copy_blocks([cache], pairs[:, 0], pairs[:, 1])
    np.testing.assert_array_equal(cache, expected)


def test_a_full_shared_last_block_needs_no_copy():
    bm = BlockManager(8, 4)
    new_seq(bm, 1, 8)
    bm.fork(1, 2)
    assert bm.append(2, 1).tolist() == [2 * 4]
    assert bm.take_copies().tolist() == []
    assert bm.block_ids(2).tolist() == [0, 1, 2]
    bm.check()


def test_batch_copies_for_every_holder_but_the_last_and_is_all_or_nothing():
    bm = BlockManager(5, 4)
    new_seq(bm, 1, 2)  # block 0
    bm.fork(1, 2)
    bm.fork(1, 3)  # block 0 held three times
    new_seq(bm, 9, 9)  # blocks 1, 2, 3; free list [4]
    before = snapshot(bm, [1, 2, 3, 9])
    with pytest.raises(OutOfBlocks, match="append_batch: need 2 free blocks, got 1"):
        bm.append_batch([1, 2, 3], 1)
    assert snapshot(bm, [1, 2, 3, 9]) == before
    assert bm.take_copies().tolist() == []
    bm.check()

    bm.free(9)  # 3, 2, 1 to the front: [1, 2, 3, 4]
    slots = bm.append_batch(np.array([1, 2, 3]), 1)
    assert slots.tolist() == [1 * 4 + 2, 2 * 4 + 2, 0 * 4 + 2]  # seq 3 writes in place
    assert bm.take_copies().tolist() == [[0, 1], [0, 2]]
    assert [bm.block_ids(s).tolist() for s in (1, 2, 3)] == [[1], [2], [0]]
    assert bm.stats()["num_shared"] == 0
    bm.check()


def test_out_of_blocks_in_append_changes_nothing():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    new_seq(bm, 1, 6, list(range(6)))  # blocks 0, 1
    bm.fork(1, 2)
    before = snapshot(bm, [1, 2])
    # The copy of block 1 (which then fills up) and 2 new blocks for the other 8 tokens.
    with pytest.raises(
        OutOfBlocks, match="tinyserve.BlockManager.append: need 3 free blocks, got 2"
    ):
        bm.append(2, 10, list(range(10)))
    assert snapshot(bm, [1, 2]) == before
    assert bm.take_copies().tolist() == []
    # The batch fails as a whole even though its first sequence alone would fit.
    with pytest.raises(OutOfBlocks, match="need 3 free blocks, got 2"):
        bm.append_batch([1, 2], [2, 7])
    assert snapshot(bm, [1, 2]) == before
    bm.check()
    bm.append(2, 6)  # exactly enough: the copy and one new block
    assert bm.num_free_blocks == 0
    bm.check()


def test_a_copy_whose_destination_is_freed_is_dropped():
    bm = BlockManager(8, 4)
    new_seq(bm, 1, 2)  # block 0
    bm.fork(1, 2)
    bm.append(2, 1)  # copy 0 -> 1
    bm.free(2)  # block 1 back to the front before the copy ran
    assert bm.take_copies().tolist() == []
    assert new_seq(bm, 3, 1).tolist() == [4]  # block 1 is reused first
    bm.check()


def test_a_freed_copy_source_is_not_reused_as_a_copy_destination():
    bm = BlockManager(8, 4)
    new_seq(bm, 1, 6)  # blocks 0, 1
    bm.fork(1, 2)
    new_seq(bm, 3, 2)  # block 2
    bm.fork(3, 4)  # free list [3, 4, 5, 6, 7]
    bm.append(2, 1)  # copy 1 -> 3
    bm.free(1)  # block 1 (read by the pending copy) to the front: [1, 4, 5, 6, 7]
    assert bm.append(4, 1).tolist() == [4 * 4 + 2]  # copy 2 -> 4: block 1 skipped
    assert new_seq(bm, 5, 1).tolist() == [1 * 4]  # a plain new block may take block 1
    assert bm.take_copies().tolist() == [[1, 3], [2, 4]]
    bm.check()


def test_copy_on_write_is_refused_when_only_pending_sources_are_free():
    bm = BlockManager(4, 4)
    new_seq(bm, 1, 6)  # blocks 0, 1
    bm.fork(1, 2)
    new_seq(bm, 3, 2)  # block 2
    bm.fork(3, 4)  # free list [3]
    bm.append(2, 1)  # copy 1 -> 3
    bm.free(1)  # free list [1], read by the pending copy
    before = snapshot(bm, [2, 3, 4])
    with pytest.raises(OutOfBlocks, match="take_copies"):
        bm.append(4, 1)
    assert snapshot(bm, [2, 3, 4]) == before
    assert bm.take_copies().tolist() == [[1, 3]]
    assert bm.append(4, 1).tolist() == [1 * 4 + 2]
    assert bm.take_copies().tolist() == [[2, 1]]
    bm.check()


def test_copying_a_block_that_awaits_its_own_copy_reads_the_original_source():
    bm = BlockManager(8, 4)
    new_seq(bm, 1, 6)  # blocks 0, 1
    bm.fork(1, 2)
    bm.append(2, 1)  # copy 1 -> 2
    bm.fork(2, 3)  # block 2 shared before its copy ran
    bm.append(3, 1)  # block 2 -> 3 would read a block still being written
    assert bm.take_copies().tolist() == [[1, 2], [1, 3]]
    bm.check()


# ---- errors --------------------------------------------------------------------------------


def test_unknown_and_freed_ids_raise_key_error():
    bm = BlockManager(4, 2)
    new_seq(bm, 1, 1)
    bm.free(1)
    with pytest.raises(KeyError, match="free: unknown seq_id, got 1"):
        bm.free(1)
    for call in (
        lambda: bm.free(5),
        lambda: bm.seq_len(1),
        lambda: bm.block_ids(1),
        lambda: bm.append(1, 1),
        lambda: bm.append_batch([1], 1),
        lambda: bm.block_table([1]),
        lambda: bm.fork(1, 2),
    ):
        with pytest.raises(KeyError):
            call()
    assert not bm.has_sequence(1) and 1 not in bm
    assert bm.stats()["num_free"] == 4
    bm.check()


def test_an_unknown_id_in_a_batch_changes_nothing():
    bm = BlockManager(8, 2)
    new_seq(bm, 1, 1)
    new_seq(bm, 2, 1)
    before = snapshot(bm, [1, 2])
    with pytest.raises(KeyError, match="append_batch: unknown seq_id, got 3"):
        bm.append_batch([1, 3, 2], 1)
    with pytest.raises(KeyError):
        bm.block_table([1, 3])
    assert snapshot(bm, [1, 2]) == before
    bm.check()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda bm: bm.append(1, -1), "append: num_tokens must be >= 0, got -1"),
        (lambda bm: bm.append(1, 2, [1]), r"token_ids must have num_tokens \(2\) entries, got 1"),
        (lambda bm: bm.append(1, 1, [1, 2]), r"\(1\) entries, got 2"),
        (lambda bm: bm.append(1, 2**31), "sequence length must stay <= 2147483647"),
        (lambda bm: bm.append_batch([1], [-2]), "num_tokens must be >= 0, got -2"),
        (lambda bm: bm.append_batch([], -1), "append_batch: num_tokens must be >= 0, got -1"),
        (lambda bm: bm.append_batch([1, 2, 1], 1), "seq_ids must be unique, got 1 twice"),
        (lambda bm: bm.append_batch([1, 2], [1]), "one entry per sequence"),
        (lambda bm: bm.add_sequence(2), "add_sequence: seq_id already exists, got 2"),
        (lambda bm: bm.fork(1, 2), "fork: child_id already exists, got 2"),
        (lambda bm: bm.append(1, 1, np.zeros((1, 1), np.int64)), "must be 1-D"),
    ],
)
def test_bad_arguments_raise_value_error_and_change_nothing(call, message):
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    new_seq(bm, 1, 3, [1, 2, 3])
    new_seq(bm, 2, 1, [4])
    before = snapshot(bm, [1, 2])
    with pytest.raises(ValueError, match=message):
        call(bm)
    assert snapshot(bm, [1, 2]) == before
    bm.check()


@pytest.mark.parametrize("bad", [[1.5], np.array([1.0]), "12", np.array([True]), object()])
def test_non_integer_ids_raise_type_error(bad):
    bm = BlockManager(8, 2)
    new_seq(bm, 1, 1)
    with pytest.raises(TypeError):
        bm.append_batch(bad, 1)
    with pytest.raises(TypeError):
        bm.append(1, 1, bad)


# ---- inputs and outputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        list,
        tuple,
        lambda v: np.asarray(v, np.int64),
        lambda v: np.asarray(v, np.int32),
        lambda v: np.asarray(v, np.uint16),
        lambda v: np.repeat(np.asarray(v, np.int64), 2)[::2],  # strided
        lambda v: memoryview(np.asarray(v, np.int64)),
    ],
)
def test_id_and_token_arguments_accept_lists_and_integer_arrays(make):
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    assert bm.add_sequence(1, make([4, 5, 6])) == 0
    assert bm.append(1, 3, make([4, 5, 6])).tolist() == [0, 1, 2]
    assert bm.add_sequence(2, make([4, 5, 6])) == 2
    assert bm.append_batch(make([2, 1]), make([1, 2])).tolist() == [4, 3, 6]
    table, lens = bm.block_table(make([1, 2]))
    assert table.tolist() == [[0, 1, 3], [0, 2, 0]] and lens.tolist() == [5, 3]
    assert bm.append_batch(make([1, 2]), np.int64(1)).tolist() == [7, 5]
    bm.check()


def test_returned_arrays_belong_to_the_caller():
    bm = BlockManager(8, 2)
    new_seq(bm, 1, 3)
    ids = bm.block_ids(1)
    table, lens = bm.block_table([1])
    for a in (ids, table, lens):
        a[...] = -7  # writable and not aliased with the manager
    assert bm.block_ids(1).tolist() == [0, 1]
    assert bm.block_table([1])[0].tolist() == [[0, 1]]
    bm.check()


def test_threads_appending_and_freeing_their_own_sequences():
    bm = BlockManager(4096, 4, enable_prefix_caching=True)
    threads, errors = [], []
    per_thread = 50

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                seq = t * 1000 + i
                bm.add_sequence(seq, [t, i, 1, 2, 3])
                bm.append(seq, 5 + i % 7, [t] * (5 + i % 7))
                bm.fork(seq, seq + 500)
                bm.append_batch([seq, seq + 500], [1, 2])
                bm.take_copies()
                if i % 3:
                    bm.free(seq)
                    bm.free(seq + 500)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    for t in range(4):
        threads.append(threading.Thread(target=work, args=(t,)))
        threads[-1].start()
    for th in threads:
        th.join()
    assert errors == []
    kept = sum(1 for i in range(per_thread) if i % 3 == 0)
    assert bm.stats()["num_sequences"] == 4 * kept * 2
    bm.check()


# ---- stats ---------------------------------------------------------------------------------


def test_stats_fields_are_exact():
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    prompt = list(range(10))
    new_seq(bm, 1, 10, prompt)  # blocks 0, 1 keyed; block 2 holds 2 tokens
    bm.fork(1, 2)
    assert bm.stats() == {
        "num_blocks": 10,
        "num_free": 7,
        "num_used": 3,
        "num_cached": 2,
        "num_evictable": 0,
        "num_shared": 3,
        "num_sequences": 2,
        "num_tokens": 20,
        "waste_slots": 2,
        "prefix_hits": 0,
        "prefix_queries": 0,
        "evictions": 0,
        "num_offloaded": 0,
    }
    assert bm.add_sequence(3, prompt) == 8
    assert bm.stats() == {
        "num_blocks": 10,
        "num_free": 7,
        "num_used": 3,
        "num_cached": 2,
        "num_evictable": 0,
        "num_shared": 3,
        "num_sequences": 3,
        "num_tokens": 28,
        "waste_slots": 2,
        "prefix_hits": 2,
        "prefix_queries": 2,
        "evictions": 0,
        "num_offloaded": 0,
    }
    bm.free(1)
    bm.free(2)
    assert bm.stats() == {
        "num_blocks": 10,
        "num_free": 8,
        "num_used": 2,
        "num_cached": 2,
        "num_evictable": 0,
        "num_shared": 0,
        "num_sequences": 1,
        "num_tokens": 8,
        "waste_slots": 0,
        "prefix_hits": 2,
        "prefix_queries": 2,
        "evictions": 0,
        "num_offloaded": 0,
    }
    bm.free(3)
    assert bm.stats() == {
        "num_blocks": 10,
        "num_free": 10,
        "num_used": 0,
        "num_cached": 2,
        "num_evictable": 2,
        "num_shared": 0,
        "num_sequences": 0,
        "num_tokens": 0,
        "waste_slots": 0,
        "prefix_hits": 2,
        "prefix_queries": 2,
        "evictions": 0,
        "num_offloaded": 0,
    }
    bm.check()


# ---- stateful property test ----------------------------------------------------------------


class Model:
    """A plain-Python statement of the BlockManager's semantics. Keys are the token-id tuples
    from the start of the sequence through the block (what the SHA-256 chain stands for)."""

    class Seq:
        def __init__(self) -> None:
            self.blocks: list[int] = []
            self.len = 0
            self.tokens: list[int] | None = []  # all token ids, while keyable

        def copy(self) -> Model.Seq:
            c = Model.Seq()
            c.blocks, c.len = list(self.blocks), self.len
            c.tokens = None if self.tokens is None else list(self.tokens)
            return c

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.n, self.bs, self.caching = num_blocks, block_size, caching
        self.ref = [0] * num_blocks
        self.fill = [0] * num_blocks
        self.key: list[tuple | None] = [None] * num_blocks
        self.cache: dict[tuple, int] = {}
        self.free = list(range(num_blocks))  # head is taken first
        self.seqs: dict[int, Model.Seq] = {}
        self.pairs: list[list] = []  # [src, dst]; dst None once dropped
        self.hits = self.queries = self.evictions = 0

    def read_by_pending(self, b: int) -> bool:
        return any(p[1] is not None and p[0] == b for p in self.pairs)

    def pending_pair_to(self, b: int):
        return next((p for p in self.pairs if p[1] == b), None)

    def take(self, for_copy: bool) -> int:
        b = next(x for x in self.free if not (for_copy and self.read_by_pending(x)))
        self.free.remove(b)
        if self.key[b] is not None:
            del self.cache[self.key[b]]
            self.key[b] = None
            self.evictions += 1
        self.ref[b] = 1
        return b

    def add(self, seq_id: int, prompt) -> int:
        if seq_id in self.seqs:
            raise ValueError
        s = Model.Seq()
        if self.caching and prompt:
            for i in range((len(prompt) - 1) // self.bs):
                self.queries += 1
                b = self.cache.get(tuple(prompt[: (i + 1) * self.bs]))
                if b is None:
                    break
                self.hits += 1
                if self.ref[b] == 0:
                    self.free.remove(b)
                self.ref[b] += 1
                s.blocks.append(b)
        s.len = len(s.blocks) * self.bs
        s.tokens = list(prompt[: s.len]) if prompt else []
        self.seqs[seq_id] = s
        return s.len

    def append(self, entries, token_ids=None) -> list[int]:
        seen = set()
        for seq_id, n in entries:
            if seq_id not in self.seqs:
                raise KeyError
            if n < 0 or seq_id in seen:
                raise ValueError
            seen.add(seq_id)
        drops: dict[int, int] = {}
        copies = new = 0
        for seq_id, n in entries:
            s = self.seqs[seq_id]
            if n == 0:
                continue
            new += -(-(s.len + n) // self.bs) - len(s.blocks)
            if s.len % self.bs:
                last = s.blocks[-1]
                if self.ref[last] - drops.get(last, 0) > 1:
                    copies += 1
                    drops[last] = drops.get(last, 0) + 1
        unread = sum(1 for b in self.free if not self.read_by_pending(b))
        if copies + new > len(self.free) or copies > unread:
            raise OutOfBlocks
        for seq_id, n in entries:
            s = self.seqs[seq_id]
            if n and s.len % self.bs and self.ref[s.blocks[-1]] > 1:
                src = s.blocks[-1]
                pending = self.pending_pair_to(src)
                dst = self.take(for_copy=True)
                self.fill[dst] = self.fill[src]
                self.pairs.append([pending[0] if pending else src, dst])
                self.ref[src] -= 1
                s.blocks[-1] = dst
        slots = []
        for seq_id, n in entries:
            s = self.seqs[seq_id]
            if n and self.caching and s.tokens is not None and token_ids is None:
                s.tokens = None
            for i in range(n):
                if s.len % self.bs == 0:
                    b = self.take(for_copy=False)
                    self.fill[b] = 0
                    s.blocks.append(b)
                b = s.blocks[-1]
                slots.append(b * self.bs + s.len % self.bs)
                self.fill[b] += 1
                s.len += 1
                if self.caching and s.tokens is not None:
                    s.tokens.append(token_ids[i])
                    if s.len % self.bs == 0 and tuple(s.tokens) not in self.cache:
                        self.cache[tuple(s.tokens)] = b
                        self.key[b] = tuple(s.tokens)
        return slots

    def fork(self, parent: int, child: int) -> None:
        if parent not in self.seqs:
            raise KeyError
        if child in self.seqs:
            raise ValueError
        self.seqs[child] = self.seqs[parent].copy()
        for b in self.seqs[child].blocks:
            self.ref[b] += 1

    def free_seq(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id)  # KeyError for unknown ids
        for b in reversed(s.blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                pair = self.pending_pair_to(b)
                if pair:
                    pair[1] = None
                    if self.key[b] is not None:  # its content will never be complete
                        del self.cache[self.key[b]]
                        self.key[b] = None
                if self.key[b] is not None:
                    self.free.append(b)
                else:
                    self.free.insert(0, b)

    def take_copies(self) -> list[list[int]]:
        out = [p for p in self.pairs if p[1] is not None]
        self.pairs = []
        return out

    def stats(self) -> dict:
        used = [b for b in range(self.n) if self.ref[b] > 0]
        return {
            "num_blocks": self.n,
            "num_free": len(self.free),
            "num_used": len(used),
            "num_cached": len(self.cache),
            "num_evictable": sum(1 for b in self.free if self.key[b] is not None),
            "num_shared": sum(1 for b in used if self.ref[b] > 1),
            "num_sequences": len(self.seqs),
            "num_tokens": sum(s.len for s in self.seqs.values()),
            "waste_slots": sum(self.bs - self.fill[b] for b in used),
            "prefix_hits": self.hits,
            "prefix_queries": self.queries,
            "evictions": self.evictions,
            "num_offloaded": 0,
        }


VOCAB = st.integers(0, 3)  # a small vocabulary, so blocks and prefixes repeat
STEMS = [[1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0], [1, 2, 3, 1, 1, 2, 3, 1], [2, 2, 2, 2, 2, 2, 2, 2]]


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager and the model with the same calls and compares everything after each.

    It also plays the engine over a simulated KV cache (one int per slot): appended tokens are
    written at the end of the step, after the step's copies (take_copies()) ran as one batch, as
    an engine runs copy_blocks before its kernels. A token's value is its id when it has one (so
    prefix-cache hits find the right content), else a value unique to it. After each step every
    live sequence must read its own history through its block table row."""

    @initialize(
        num_blocks=st.one_of(st.integers(1, 12), st.integers(13, 48)),
        block_size=st.sampled_from([1, 2, 3, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.model = Model(num_blocks, block_size, caching)
        self.bs = block_size
        self.data = np.full(num_blocks * block_size, -1, np.int64)
        self.history: dict[int, list[int]] = {}
        self.pending: dict[int, list[tuple[int, int]]] = {}  # unwritten (slot, value) per seq
        self.keyed_this_step: set[int] = set()
        self.next_id = 0
        self.next_value = 10**6

    # ---- helpers ----

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id * 3 + 1  # not dense, so ids are not mistaken for indices

    def live(self) -> list[int]:
        return sorted(self.model.seqs)

    def expect(self, model_call, real_call):
        """Runs both; they must raise the same exception type or return the same value."""
        try:
            expected = model_call()
        except (KeyError, ValueError, OutOfBlocks) as e:
            before = snapshot(self.bm, self.live())
            with pytest.raises(type(e)):
                real_call()
            assert snapshot(self.bm, self.live()) == before
            return None
        return expected, real_call()

    def record(self, entries, slots, token_ids) -> None:
        at = 0
        for seq_id, n in entries:
            if token_ids is not None:
                values = list(token_ids)
                self.keyed_this_step.add(seq_id)
            else:
                values = list(range(self.next_value, self.next_value + n))
                self.next_value += n
            self.history[seq_id].extend(values)
            self.pending[seq_id].extend(zip(slots[at : at + n], values))
            at += n

    def end_step(self) -> None:
        pairs = self.bm.take_copies()
        assert pairs.dtype == np.int32 and pairs.shape[1:] == (2,)
        assert pairs.tolist() == self.model.take_copies()
        src, dst = set(pairs[:, 0].tolist()), pairs[:, 1].tolist()
        assert len(set(dst)) == len(dst) and not src & set(dst), "not one hazard-free batch"
        before = self.data.copy()
        for s, d in pairs.tolist():
            self.data[d * self.bs : (d + 1) * self.bs] = before[s * self.bs : (s + 1) * self.bs]
        for writes in self.pending.values():
            for slot, value in writes:
                self.data[slot] = value
            writes.clear()
        self.keyed_this_step.clear()
        ids = self.live()
        table, lens = self.bm.block_table(ids)
        for row, seq_id in enumerate(ids):
            n = int(lens[row])
            positions = np.arange(n)
            slots = (
                table[row][positions // self.bs].astype(np.int64) * self.bs + positions % self.bs
            )
            assert self.data[slots].tolist() == self.history[seq_id], f"sequence {seq_id}"

    # ---- rules ----

    @rule(
        stem=st.sampled_from(STEMS),
        cut=st.integers(0, 12),
        suffix=st.lists(VOCAB, max_size=4),
        with_ids=st.booleans(),
        append_rest=st.integers(0, 3),
    )
    def add(self, stem, cut, suffix, with_ids, append_rest):
        seq_id = self.fresh_id()
        prompt = stem[:cut] + suffix
        given = prompt if with_ids else None
        expected, covered = self.expect(
            lambda: self.model.add(seq_id, given), lambda: self.bm.add_sequence(seq_id, given)
        )
        assert covered == expected
        self.history[seq_id] = prompt[:covered]
        self.pending[seq_id] = []
        if append_rest and covered < len(prompt):  # the engine prefills the rest
            self.append_to(seq_id, len(prompt) - covered, prompt[covered:] if with_ids else None)

    def append_to(self, seq_id, n, token_ids):
        result = self.expect(
            lambda: self.model.append([(seq_id, n)], token_ids),
            lambda: self.bm.append(seq_id, n, token_ids),
        )
        if result:
            expected, slots = result
            assert slots.tolist() == expected
            self.record([(seq_id, n)], expected, token_ids)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), n=st.integers(0, 6), with_ids=st.booleans())
    def append(self, data, n, with_ids):
        seq_id = data.draw(st.sampled_from(self.live()))
        token_ids = data.draw(st.lists(VOCAB, min_size=n, max_size=n)) if with_ids else None
        self.append_to(seq_id, n, token_ids)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), scalar=st.booleans())
    def append_batch(self, data, scalar):
        live = self.live()
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=6, unique=True))
        mistake = data.draw(st.integers(0, 19))
        if mistake == 0:
            ids.append(self.fresh_id())  # unknown: KeyError, nothing changes
        elif mistake == 1:
            ids.append(ids[0])  # repeated: ValueError, nothing changes
        if scalar:
            count = data.draw(st.integers(0, 2))
            counts = [count] * len(ids)
            arg = count
        else:
            counts = data.draw(st.lists(st.integers(0, 4), min_size=len(ids), max_size=len(ids)))
            arg = np.asarray(counts, np.int64)
        entries = list(zip(ids, counts))
        result = self.expect(
            lambda: self.model.append(entries), lambda: self.bm.append_batch(ids, arg)
        )
        if result:
            expected, slots = result
            assert slots.tolist() == expected
            self.record(entries, expected, None)

    @precondition(lambda self: self.model.seqs)
    @rule(
        data=st.data(),
        onto_existing=st.integers(0, 9),
        then_append=st.integers(0, 3),
        with_ids=st.booleans(),
    )
    def fork(self, data, onto_existing, then_append, with_ids):
        # Engines fork between steps, once the parent's tokens are written.
        self.end_step()
        parent = data.draw(st.sampled_from(self.live()))
        child = data.draw(st.sampled_from(self.live())) if onto_existing == 0 else self.fresh_id()
        if not self.expect(
            lambda: self.model.fork(parent, child), lambda: self.bm.fork(parent, child)
        ):
            return
        self.history[child] = list(self.history[parent])
        self.pending[child] = []
        if then_append:  # as parallel sampling does: the child diverges at once
            token_ids = data.draw(st.lists(VOCAB, min_size=then_append, max_size=then_append))
            self.append_to(child, then_append, token_ids if with_ids else None)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data(), oldest=st.booleans())
    def free(self, data, oldest):
        live = self.live()
        seq_id = live[0] if oldest else data.draw(st.sampled_from(live))
        if seq_id in self.keyed_this_step:
            # Blocks are keyed when appended; a sequence whose keyed tokens would never be
            # written (freed before its step ran) would leave wrong cached content behind.
            self.end_step()
        self.model.free_seq(seq_id)
        self.bm.free(seq_id)
        del self.history[seq_id]
        del self.pending[seq_id]  # a freed sequence's tokens are never computed
        with pytest.raises(KeyError):
            self.bm.free(seq_id)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def preempt(self, data):
        """Frees a sequence in the middle of a step, as a scheduler short of blocks does."""
        candidates = [s for s in self.live() if s not in self.keyed_this_step]
        if candidates:
            seq_id = data.draw(st.sampled_from(candidates))
            self.model.free_seq(seq_id)
            self.bm.free(seq_id)
            del self.history[seq_id]
            del self.pending[seq_id]

    @rule()
    def step(self):
        self.end_step()

    @invariant()
    def agrees_with_model(self):
        self.bm.check()
        assert self.bm.stats() == self.model.stats()
        assert self.bm.num_free_blocks == len(self.model.free)
        for seq_id, s in self.model.seqs.items():
            assert self.bm.seq_len(seq_id) == s.len
            assert self.bm.block_ids(seq_id).tolist() == s.blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_match_prefix_is_read_only_and_agrees_with_add_sequence():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    t = list(range(13))
    bm.add_sequence(0, t)
    bm.append(0, 13, t)
    bm.free(0)  # blocks of t's chain: keyed, free, evictable
    u = [100 + i for i in range(8)]
    bm.add_sequence(9, u)
    bm.append(9, 8, u)
    bm.free(9)
    before = bm.stats()
    match = bm.match_prefix(t)
    assert match == {"tokens": 12, "blocks": 3, "free_blocks": 3}
    assert bm.stats() == before  # no statistic counted the probe
    bm.check()
    # The LRU order is untouched: a new sequence still evicts the oldest cached blocks (t's
    # tail first), exactly as it would have without the probe.
    bm.add_sequence(2)
    bm.append(2, 8)
    assert sorted(bm.block_ids(2)) == [2, 5]
    assert bm.match_prefix(t) == {"tokens": 8, "blocks": 2, "free_blocks": 2}
    # add_sequence attaches what match_prefix reported
    assert bm.add_sequence(3, t) == 8
    assert bm.match_prefix(t) == {"tokens": 8, "blocks": 2, "free_blocks": 0}
    bm.check()


def test_match_prefix_edge_cases():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    assert bm.match_prefix([]) == {"tokens": 0, "blocks": 0, "free_blocks": 0}
    assert BlockManager(4, 4).match_prefix([1, 2, 3, 4, 5]) == {
        "tokens": 0,
        "blocks": 0,
        "free_blocks": 0,
    }
    with pytest.raises(TypeError):
        bm.match_prefix([1.5, 2.0])


def test_copy_on_write_needs_a_free_block_no_pending_copy_reads():
    """The one free block is the source of a pending copy-on-write pair: a second copy may not
    write it (the engine runs all pending copies in one batch), so the append is refused."""
    bm = BlockManager(2, 4)
    new_seq(bm, 1, 2)  # block A, partly full
    bm.fork(1, 2)
    bm.append(2, 1)  # copy A -> B pending; sequence 2 holds B
    bm.free(1)  # A is free, still read by the pending copy
    bm.fork(2, 3)
    bm.check()
    before = snapshot(bm, [2, 3])
    with pytest.raises(
        OutOfBlocks,
        match=r"append: need 1 free blocks that no pending copy reads \(copy-on-write\), got 0; "
        r"call take_copies\(\) and run the copies first",
    ):
        bm.append(3, 1)
    assert snapshot(bm, [2, 3]) == before
    bm.check()
    bm.take_copies()
    bm.append(3, 1)  # A may be written once its copy has run
    bm.check()


@pytest.mark.parametrize("bad, name", [(object(), "object"), ("12", "str"), (3, "int")])
def test_non_sequence_ids_name_the_accepted_kinds(bad, name):
    bm = BlockManager(8, 2)
    with pytest.raises(
        TypeError,
        match=rf"append_batch: seq_ids must be a list of ints or a 1-D integer array, got {name}",
    ):
        bm.append_batch(bad, 1)
