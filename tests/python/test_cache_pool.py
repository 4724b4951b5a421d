"""CachePool: views, grow/shrink with data preserved, memory returned (to the OS on the CPU, to the
driver on CUDA), ops on pool tensors, errors. Every operation is followed by check() and by the
pool's accounting recomputed here from the configuration."""

from __future__ import annotations

import ctypes
import math
import mmap
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import reference as R
import tinyserve as ts
from arrays import TOLERANCE, f64, torch

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
ELEM = {"float16": 2, "bfloat16": 2, "float32": 4}


def expected_mapped(pool, num_blocks: int) -> int:
    """Mapped bytes recomputed from the configuration: each tensor backs whole granules."""
    g = pool.granule_bytes
    kv = pool.block_size * pool.num_kv_heads * pool.head_dim * ELEM[pool.dtype]
    meta_elem = 1 if pool.page_meta_dtype == "float8_e4m3fn" else ELEM[pool.dtype]
    meta = pool.num_kv_heads * 2 * pool.head_dim * meta_elem
    per_layer = 2 * math.ceil(num_blocks * kv / g) * g
    if pool.has_page_meta:
        per_layer += math.ceil(num_blocks * meta / g) * g
    return pool.num_layers * per_layer


def verify(pool, num_blocks: int) -> None:
    pool.check()
    assert pool.num_blocks == num_blocks
    assert pool.mapped_bytes == expected_mapped(pool, num_blocks)
    for t in pool.tensors():
        assert torch.from_dlpack(t).shape[0] == num_blocks


def as_torch(pool):
    return [torch.from_dlpack(t) for t in pool.tensors()]


def fill_random(rng, tensors, lo: int, hi: int):
    """Fresh random values (never zeros) into blocks [lo, hi) of every tensor."""
    for t in tensors:
        block = t[lo:hi]
        data = rng.uniform(0.5, 2.0, size=tuple(block.shape)) * rng.choice([-1, 1], block.shape)
        block.copy_(torch.from_numpy(data).to(t.dtype))


def snapshot(tensors, n: int):
    return [t[:n].to("cpu", torch.float64).clone() for t in tensors]


def assert_kept(tensors, saved, n: int):
    for t, s in zip(tensors, saved):
        np.testing.assert_array_equal(t[:n].to("cpu", torch.float64).numpy(), s[:n].numpy())


def make_pool(device="cpu", dtype="float16", **kw):
    args = dict(num_layers=3, max_blocks=64, block_size=16, num_kv_heads=2, head_dim=64)
    args.update(kw)
    return ts.CachePool(dtype=dtype, device=device, **args)


# --- shape, layout, accounting -----------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_meta", [False, True])
def test_views_shape_layout_and_accounting(dtype, layout, page_meta):
    pool = ts.CachePool(2, 50, 16, 4, 32, dtype, "cpu", layout=layout, page_meta=page_meta)
    verify(pool, 0)
    assert pool.granule_bytes == mmap.PAGESIZE
    assert (pool.dtype, pool.layout, pool.has_page_meta) == (dtype, layout, page_meta)
    per_layer = 3 if page_meta else 2
    assert pool.num_tensors == 2 * per_layer and len(pool.tensors()) == 2 * per_layer
    kv = 16 * 4 * 32 * ELEM[dtype]
    meta = 4 * 2 * 32 * ELEM[dtype]
    assert pool.bytes_per_block == 2 * (2 * kv + (meta if page_meta else 0))
    g = pool.granule_bytes
    reserved = 2 * (2 * math.ceil(50 * kv / g) + (math.ceil(50 * meta / g) if page_meta else 0))
    assert pool.reserved_bytes == reserved * g

    pool.grow(7)
    verify(pool, 7)
    k = torch.from_dlpack(pool.key(1))
    assert k.shape == (7, 16, 4, 32) and k.dtype == getattr(torch, dtype)
    if layout == "NHD":
        assert k.is_contiguous()
    else:  # HND storage: [blocks, heads, block_size, head_dim] in memory, permuted view
        assert k.permute(0, 2, 1, 3).is_contiguous()
    if page_meta:
        m = torch.from_dlpack(pool.page_meta(0))
        assert m.shape == (7, 4, 2, 32) and m.is_contiguous()
    # tensors() is layer by layer: K, V (, page summaries); every tensor has its own memory
    expected = []
    for layer in range(2):
        expected += [pool.key(layer), pool.value(layer)]
        if page_meta:
            expected.append(pool.page_meta(layer))
    ptrs = [torch.from_dlpack(t).data_ptr() for t in pool.tensors()]
    assert ptrs == [torch.from_dlpack(t).data_ptr() for t in expected]
    assert len(set(ptrs)) == len(ptrs) and all(p % g == 0 for p in ptrs)


@needs_torch
def test_views_alias_one_memory_across_frameworks(rng):
    pool = make_pool(num_blocks=5)
    a = np.from_dlpack(pool.value(2))
    t = torch.from_dlpack(pool.value(2))
    data = rng.standard_normal(a.shape).astype(np.float16)
    a[...] = data
    np.testing.assert_array_equal(t.numpy(), data)
    assert a.__array_interface__["data"][0] == t.data_ptr()


@needs_torch
def test_base_address_fixed_and_views_keep_pool_alive(rng):
    pool = make_pool(num_blocks=4)
    ptrs = [torch.from_dlpack(t).data_ptr() for t in pool.tensors()]
    pool.grow(40)
    pool.shrink(9)
    pool.grow(11)
    assert [torch.from_dlpack(t).data_ptr() for t in pool.tensors()] == ptrs
    k = torch.from_dlpack(pool.key(0))
    fill_random(rng, [k], 0, 11)
    saved = k.clone()
    del pool
    np.testing.assert_array_equal(k.numpy(), saved.numpy())  # memory still mapped


# --- grow / shrink -----------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("granule_pages", [1, 3])
def test_grow_shrink_random_walk_preserves_data(rng, granule_pages):
    """Random grows and shrinks against a model: blocks below num_blocks keep their contents,
    new blocks are written fresh, accounting is exact after every step."""
    pool = make_pool(
        max_blocks=120, page_meta=True, granule_bytes=granule_pages * mmap.PAGESIZE, dtype="float32"
    )
    n = 0
    saved = snapshot(as_torch(pool), 0)
    for _ in range(40):
        if rng.random() < 0.55:
            target = int(rng.integers(n, 121))
            pool.grow(target)
            tensors = as_torch(pool)
            assert_kept(tensors, saved, n)
            fill_random(rng, tensors, n, target)
        else:
            target = int(rng.integers(0, n + 1))
            pool.shrink(target)
            tensors = as_torch(pool)
            assert_kept(tensors, saved, target)
        n = target
        saved = snapshot(tensors, n)
        verify(pool, n)


class CachePoolMachine(RuleBasedStateMachine):
    """Grow, shrink, writes and rejected calls in any order against a NumPy model of the kept
    blocks; after every step the invariants hold and every kept block reads back unchanged."""

    MAX_BLOCKS = 40

    @initialize(
        layout=st.sampled_from(["NHD", "HND"]),
        granule_pages=st.sampled_from([1, 2]),
        start=st.integers(0, MAX_BLOCKS),
    )
    def make(self, layout, granule_pages, start):
        # a K/V block is 4 * 2 * 8 * 4 = 256 bytes: many blocks per granule, so partly used
        # granules are the common case
        self.pool = ts.CachePool(
            2,
            self.MAX_BLOCKS,
            4,
            2,
            8,
            "float32",
            "cpu",
            layout=layout,
            page_meta=True,
            granule_bytes=granule_pages * mmap.PAGESIZE,
            num_blocks=start,
        )
        self.counter = 0
        self.model = [np.empty((0,) + np.from_dlpack(t).shape[1:]) for t in self.pool.tensors()]
        self.write(0, start)

    def write(self, lo, hi):
        """Distinct values into blocks [lo, hi) of every tensor, mirrored in the model."""
        for i, t in enumerate(self.pool.tensors()):
            a = np.from_dlpack(t)
            values = self.counter + 1 + np.arange(np.prod(a[lo:hi].shape), dtype=np.float64)
            self.counter += len(values)
            a[lo:hi] = values.reshape(a[lo:hi].shape)
            m = self.model[i]
            self.model[i] = np.concatenate([m[:lo], a[lo:hi].astype(np.float64), m[hi:]])

    @rule(data=st.data())
    def grow(self, data):
        n = self.pool.num_blocks
        target = data.draw(st.integers(n, self.MAX_BLOCKS))
        self.pool.grow(target)
        self.write(n, target)

    @rule(data=st.data())
    def shrink(self, data):
        target = data.draw(st.integers(0, self.pool.num_blocks))
        self.pool.shrink(target)
        self.model = [m[:target] for m in self.model]

    @rule(data=st.data())
    def overwrite(self, data):
        n = self.pool.num_blocks
        lo = data.draw(st.integers(0, n))
        self.write(lo, data.draw(st.integers(lo, n)))

    @rule(data=st.data())
    def rejected(self, data):
        n = self.pool.num_blocks
        bad_grow = data.draw(
            st.one_of(st.integers(-5, n - 1), st.integers(self.MAX_BLOCKS + 1, 2**40))
        )
        bad_shrink = data.draw(st.one_of(st.integers(-(2**40), -1), st.integers(n + 1, 2**40)))
        if bad_grow >= 0 or n > 0:
            with pytest.raises(ValueError, match="grow: num_blocks must be in"):
                self.pool.grow(bad_grow)
        with pytest.raises(ValueError, match="shrink: num_blocks must be in"):
            self.pool.shrink(bad_shrink)

    @invariant()
    def consistent(self):
        n = self.pool.num_blocks
        self.pool.check()
        assert self.pool.mapped_bytes == expected_mapped(self.pool, n)
        for t, m in zip(self.pool.tensors(), self.model):
            a = np.from_dlpack(t)
            assert a.shape[0] == n == len(m)
            np.testing.assert_array_equal(a, m)


CachePoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCachePoolMachine = CachePoolMachine.TestCase


def test_threads_grow_and_shrink_one_pool(rng):
    """Threads growing and shrinking one pool: every call either succeeds or is rejected whole
    (another thread moved num_blocks first), and the pool stays consistent."""
    pool = make_pool(max_blocks=256)
    seeds = rng.integers(0, 2**32, size=4)
    errors = []

    def work(seed):
        local = np.random.default_rng(seed)
        try:
            for _ in range(200):
                n = pool.num_blocks
                try:
                    if local.random() < 0.5:
                        pool.grow(int(local.integers(n, 257)))
                    else:
                        pool.shrink(int(local.integers(0, n + 1)))
                except ValueError:
                    pass  # num_blocks moved between the read and the call
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(int(s),)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pool.check()
    assert pool.mapped_bytes == expected_mapped(pool, pool.num_blocks)


def test_rejected_resizes_with_views_gc_and_dropped_pools_in_a_subprocess(rng):
    """Rejected grow/shrink calls (the GIL released while they raise) interleaved with views
    fetched and dropped, pools dropped while their arrays live on (the arrays keep them alive),
    and garbage collection. In a subprocess under faulthandler, so that a crash here is one
    failing test with its traceback, not the end of the run."""
    code = textwrap.dedent(
        """
        import gc, mmap, sys
        import numpy as np, tinyserve as ts
        rng = np.random.default_rng(int(sys.argv[1]))
        survivors = []
        for step in range(400):
            pool = ts.CachePool(2, 40, 4, 2, 8, "float32", "cpu", page_meta=True,
                                granule_bytes=int(rng.integers(1, 3)) * mmap.PAGESIZE,
                                num_blocks=int(rng.integers(0, 41)))
            n = pool.num_blocks
            arrays = [np.from_dlpack(t) for t in pool.tensors()]
            for a in arrays:
                a[:] = step
            for bad, method in ((int(rng.integers(n + 1, 2**40)), pool.shrink),
                                (int(rng.integers(41, 2**40)), pool.grow),
                                (int(rng.integers(-(2**40), 0)), pool.shrink)):
                try:
                    method(bad)
                except ValueError as e:
                    assert "num_blocks must be in" in str(e), e
                else:
                    raise AssertionError(f"{method.__name__}({bad}) was accepted")
            if n > 0:
                try:
                    pool.grow(int(rng.integers(-5, n)))
                except ValueError:
                    pass
                else:
                    raise AssertionError("a grow below num_blocks was accepted")
            pool.check()
            assert all((a == step).all() for a in arrays)
            survivors.append(arrays[int(rng.integers(0, len(arrays)))])
            del pool, arrays  # the survivor keeps its pool alive
            if step % 7 == 0:
                gc.collect()
            if len(survivors) > 20:
                survivors[int(rng.integers(0, len(survivors)))][:] = -1.0
                survivors.pop(0)
        print("done", flush=True)
        """
    )
    seed = int(rng.integers(0, 2**31))
    run = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code, str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "done", (
        f"seed {seed}, exit {run.returncode}:\n{run.stderr[-4000:]}"
    )


def test_grow_and_shrink_to_the_same_size_change_nothing():
    pool = make_pool(num_blocks=10)
    before = pool.mapped_bytes
    pool.grow(10)
    pool.shrink(10)
    pool.check()
    assert pool.num_blocks == 10 and pool.mapped_bytes == before


def _resident_bytes(lo: int, hi: int) -> int:
    """Bytes of [lo, hi) resident in RAM, page by page (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (hi - lo + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


@needs_torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore semantics of Linux")
def test_shrink_returns_memory_to_the_os(rng):
    pool = make_pool(num_layers=1, max_blocks=2048, num_kv_heads=8, head_dim=128)  # 2 x 64 MiB
    pool.grow(2048)
    lo = torch.from_dlpack(pool.key(0)).data_ptr()
    hi = lo + pool.reserved_bytes
    assert _resident_bytes(lo, hi) == 0  # mapped, but no page touched yet
    fill_random(rng, as_torch(pool), 0, 2048)
    assert _resident_bytes(lo, hi) == pool.mapped_bytes == 128 << 20
    pool.shrink(100)
    verify(pool, 100)
    assert _resident_bytes(lo, hi) == pool.mapped_bytes
    pool.shrink(0)
    verify(pool, 0)
    assert _resident_bytes(lo, hi) == 0


def test_stale_view_past_the_blocks_faults():
    """Past num_blocks the memory is unmapped: a stale view faults, as it would on a GPU, rather
    than silently re-committing memory."""
    code = textwrap.dedent(
        """
        import numpy as np, tinyserve as ts
        pool = ts.CachePool(1, 64, 16, 2, 64, "float16", "cpu", num_blocks=64)
        stale = np.from_dlpack(pool.key(0))
        pool.shrink(1)
        stale[:1] = 1  # still mapped
        print("kept", flush=True)
        stale[-1] = 1
        print("not reached", flush=True)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "kept"
    assert run.returncode < 0  # killed by a signal (SIGSEGV)


# --- ops on pool tensors -----------------------------------------------------------------------


def pool_batch(rng, block_size: int, num_blocks: int):
    """Three sequences of 37, 1 and 70 tokens over distinct blocks of [0, num_blocks) in random
    order: (table int32 [3, max pages], lens int32 [3], slot_mapping int64 of every token)."""
    lens = np.array([37, 1, 70], dtype=np.int32)
    blocks = [-(-int(n) // block_size) for n in lens]
    perm = rng.permutation(num_blocks).astype(np.int32)
    table = np.zeros((3, max(blocks)), dtype=np.int32)
    used, slots = 0, []
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[used : used + nb]
        used += nb
        tok = np.arange(lens[b])
        slots.append(table[b, tok // block_size].astype(np.int64) * block_size + tok % block_size)
    return table, lens, np.concatenate(slots)


def check_copy_blocks(rng, tensors, device: str, as_numpy):
    """copy_blocks of 9 random blocks over every tensor against a NumPy copy of the contents
    (as_numpy: a tensor's contents as a comparable array); returns the contents before."""
    before = [as_numpy(t) for t in tensors]
    ids = rng.permutation(tensors[0].shape[0])
    src, dst = ids[:9].astype(np.int32), ids[9:18].astype(np.int32)
    ts.copy_blocks(tensors, torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device))
    if device != "cpu":
        torch.cuda.synchronize()
    after = [e.copy() for e in before]
    for t, e in zip(tensors, after):
        e[dst] = e[src]
        np.testing.assert_array_equal(as_numpy(t), e)
    return after


def run_ops_on_pool(rng, device: str, dtype: str, layout: str):
    """reshape_and_cache into pool K/V, paged_attention over them (float64 reference), then
    copy_blocks over every tensor of the pool (NumPy reference), in one pool."""
    block_size, heads, q_heads, head_dim = 16, 2, 4, 64
    pool = ts.CachePool(
        2, 64, block_size, heads, head_dim, dtype, device, layout=layout, page_meta=True
    )
    pool.grow(24)
    tensors = as_torch(pool)
    for t in tensors:
        t.fill_(float("nan"))
    table, lens, slot_mapping = pool_batch(rng, block_size, 24)
    tdtype = getattr(torch, dtype)
    k_new = torch.from_numpy(rng.standard_normal((len(slot_mapping), heads, head_dim))).to(tdtype)
    v_new = torch.from_numpy(rng.standard_normal((len(slot_mapping), heads, head_dim))).to(tdtype)
    key, value = tensors[3], tensors[4]  # layer 1
    ts.reshape_and_cache(
        k_new.to(device), v_new.to(device), key, value, torch.from_numpy(slot_mapping).to(device)
    )
    query = torch.from_numpy(rng.standard_normal((3, q_heads, head_dim))).to(tdtype).to(device)
    out = torch.full_like(query, float("nan"))
    ts.paged_attention(
        query,
        key,
        value,
        torch.from_numpy(table).to(device),
        torch.from_numpy(lens).to(device),
        out=out,
    )
    if device != "cpu":
        torch.cuda.synchronize()
    k_ref = np.full((24, block_size, heads, head_dim), np.nan)
    v_ref = k_ref.copy()
    k_ref[slot_mapping // block_size, slot_mapping % block_size] = f64(k_new)
    v_ref[slot_mapping // block_size, slot_mapping % block_size] = f64(v_new)
    ref, _ = R.paged_attention(f64(query), k_ref, v_ref, table, lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE[dtype]
    np.testing.assert_array_equal(f64(key), k_ref)
    np.testing.assert_array_equal(f64(value), v_ref)

    fill_random(rng, tensors, 0, 24)
    check_copy_blocks(rng, tensors, device, f64)
    pool.check()
    return pool


@needs_torch
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_ops_on_pool_tensors_cpu(rng, layout):
    run_ops_on_pool(rng, "cpu", "float32", layout)


def run_float8_summaries_pool(rng, device: str):
    """A pool whose page summaries are float8 e4m3fn (float16 caches): views and accounting (a
    summary block half the bytes of a float16 one), reshape_and_cache writing outward-rounded
    summaries into the pool (float64 reference: the keys' min rounded down and max rounded up to
    e4m3), select_pages over them, and the summaries kept through shrink and grow."""
    from test_selection_fp8 import ceil8, floor8

    block_size, heads, head_dim = 16, 2, 64
    pool = ts.CachePool(2, 64, block_size, heads, head_dim, "float16", device, page_meta=True,
                        page_meta_dtype=torch.float8_e4m3fn, num_blocks=24)  # fmt: skip
    assert pool.page_meta_dtype == "float8_e4m3fn" and pool.has_page_meta
    half = ts.CachePool(2, 64, block_size, heads, head_dim, "float16", device, page_meta=True)
    assert half.page_meta_dtype == "float16"
    meta_block = heads * 2 * head_dim
    assert pool.bytes_per_block == half.bytes_per_block - 2 * meta_block
    verify(pool, 24)
    key, value = torch.from_dlpack(pool.key(1)), torch.from_dlpack(pool.value(1))
    meta = torch.from_dlpack(pool.page_meta(1))
    assert meta.dtype == torch.float8_e4m3fn and meta.shape == (24, heads, 2, head_dim)
    meta.view(torch.uint8).fill_(0x7F)  # NaN
    n = 5 * block_size - 3
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
    keys = torch.from_numpy(rng.standard_normal((n, heads, head_dim)) * 3).half()
    ts.reshape_and_cache(keys.to(device), keys.to(device), key, value, slots.to(device), meta)
    if device != "cpu":
        torch.cuda.synchronize()
    got = f64(meta)
    k64 = f64(keys)[np.argsort(slots.numpy())]  # token order
    for block in range(5):
        page = k64[block * block_size : (block + 1) * block_size]
        want = np.stack([floor8(page.min(0)), ceil8(page.max(0))], axis=1)
        np.testing.assert_array_equal(got[block], want)
    assert np.isnan(got[5:]).all()
    table = torch.arange(64, dtype=torch.int32)[None].to(device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    query = torch.from_numpy(rng.integers(-2, 3, size=(1, 2 * heads, head_dim))).half()
    got_t, got_l = ts.select_pages(query.to(device), meta, table, lens, 3, block_size=block_size)
    want_t, want_l = R.select_pages(f64(query), got, table.cpu().numpy(), np.array([n]), 3,
                                    block_size, 0, "minmax", "sum")  # fmt: skip
    np.testing.assert_array_equal(got_t.cpu().numpy(), want_t)
    np.testing.assert_array_equal(got_l.cpu().numpy(), want_l)
    saved = meta.view(torch.uint8)[:5].cpu().clone()
    pool.shrink(5)
    verify(pool, 5)
    pool.grow(40)
    verify(pool, 40)
    kept = torch.from_dlpack(pool.page_meta(1)).view(torch.uint8)[:5].cpu()
    assert torch.equal(kept, saved)


@needs_torch
def test_float8_summaries_pool_cpu(rng):
    run_float8_summaries_pool(rng, "cpu")


def run_float8_cache_pool(rng, device: str, meta_dtype):
    """A pool of float8 e4m3fn caches: views and accounting (a K or V block one byte an
    element; the summaries in meta_dtype, None: float8 as the caches), reshape_and_cache
    quantising into it with per-KV-head scales (the test's own e4m3 encoder as the reference,
    bit for bit), paged_attention over it against float64 over the decoded values, summaries of
    the keys as stored, copy_blocks moving bytes over every tensor, and everything kept through
    shrink and grow."""
    from test_fp8 import decode_e4m3, quantise

    block_size, heads, q_heads, head_dim = 16, 2, 4, 64
    pool = ts.CachePool(2, 64, block_size, heads, head_dim, torch.float8_e4m3fn, device,
                        page_meta=True, page_meta_dtype=meta_dtype, num_blocks=24)  # fmt: skip
    meta_name = "float8_e4m3fn" if meta_dtype is None else str(meta_dtype).split(".")[-1]
    assert pool.dtype == "float8_e4m3fn" and pool.page_meta_dtype == meta_name
    meta_elem = {"float8_e4m3fn": 1, "float16": 2, "float32": 4}[meta_name]
    kv_block, meta_block = block_size * heads * head_dim, heads * 2 * head_dim * meta_elem
    assert pool.bytes_per_block == 2 * (2 * kv_block + meta_block)
    g = pool.granule_bytes
    assert pool.mapped_bytes == 2 * (
        2 * math.ceil(24 * kv_block / g) * g + math.ceil(24 * meta_block / g) * g
    )
    pool.check()
    tensors = as_torch(pool)
    key, value, meta = tensors[3], tensors[4], tensors[5]  # layer 1
    assert key.dtype == value.dtype == torch.float8_e4m3fn and key.shape == (24, 16, 2, 64)
    assert meta.shape == (24, heads, 2, head_dim)
    for t in tensors:
        t.view(torch.uint8).fill_(0x7F)  # float8 NaN everywhere: unwritten slots show
    table, lens, slot_mapping = pool_batch(rng, block_size, 24)
    n = len(slot_mapping)
    # The keys and queries in the summaries' dtype (16/32-bit summaries are the keys'), else
    # float16.
    tdtype = torch.float16 if meta_name == "float8_e4m3fn" else meta_dtype
    k_new = torch.from_numpy(rng.standard_normal((n, heads, head_dim)) * 4).to(tdtype)
    v_new = torch.from_numpy(rng.standard_normal((n, heads, head_dim)) * 4).to(tdtype)
    k_scale = np.array([0.5, 0.25], dtype=np.float32)
    v_scale = np.array([0.125, 1.0], dtype=np.float32)
    scales = dict(k_scale=torch.from_numpy(k_scale).to(device),
                  v_scale=torch.from_numpy(v_scale).to(device))  # fmt: skip
    ts.reshape_and_cache(k_new.to(device), v_new.to(device), key, value,
                         torch.from_numpy(slot_mapping).to(device), meta, **scales)  # fmt: skip
    query = torch.from_numpy(rng.standard_normal((3, q_heads, head_dim))).to(tdtype).to(device)
    out = torch.full_like(query, float("nan"))
    ts.paged_attention(query, key, value, torch.from_numpy(table).to(device),
                       torch.from_numpy(lens).to(device), out=out, **scales)  # fmt: skip
    if device != "cpu":
        torch.cuda.synchronize()
    k_bits = np.full((24, block_size, heads, head_dim), 0x7F, dtype=np.uint8)
    v_bits = k_bits.copy()
    page, offset = slot_mapping // block_size, slot_mapping % block_size
    k_bits[page, offset] = quantise(f64(k_new), k_scale[None, :, None])
    v_bits[page, offset] = quantise(f64(v_new), v_scale[None, :, None])
    np.testing.assert_array_equal(key.view(torch.uint8).cpu().numpy(), k_bits)
    np.testing.assert_array_equal(value.view(torch.uint8).cpu().numpy(), v_bits)
    k_ref = decode_e4m3(k_bits) * k_scale[None, None, :, None]
    v_ref = decode_e4m3(v_bits) * v_scale[None, None, :, None]
    ref, _ = R.paged_attention(f64(query), k_ref, v_ref, table, lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE[str(tdtype).split(".")[-1]]
    # Summaries of the keys as stored: min and max of the written pages' decoded keys (float8
    # summaries round outward, so the float64 value lies within one e4m3 step).
    got = f64(meta)
    for blk in np.unique(page):
        rows = k_ref[blk][~np.isnan(k_ref[blk]).any(axis=(1, 2))]
        want = np.stack([rows.min(0), rows.max(0)], axis=1)
        if meta_name == "float8_e4m3fn":
            assert (got[blk, :, 0] <= want[:, 0]).all() and (got[blk, :, 1] >= want[:, 1]).all()
            np.testing.assert_allclose(got[blk], want, rtol=0.13, atol=2.0**-9)
        else:
            np.testing.assert_allclose(got[blk], want, rtol=1e-3)

    before = check_copy_blocks(rng, tensors, device, lambda t: t.view(torch.uint8).cpu().numpy())
    pool.shrink(5)
    pool.check()
    pool.grow(40)
    pool.check()
    for t, e in zip(as_torch(pool), before):
        np.testing.assert_array_equal(t[:5].view(torch.uint8).cpu().numpy(), e[:5])
    return pool


@needs_torch
@pytest.mark.parametrize("meta_dtype", [None, "float16", "float32"])
def test_float8_cache_pool_cpu(rng, meta_dtype):
    run_float8_cache_pool(rng, "cpu", None if meta_dtype is None else getattr(torch, meta_dtype))


def test_pool_arrays_go_to_ops_without_a_framework(rng):
    """The DLPack arrays themselves are accepted by the ops."""
    pool = make_pool(num_layers=1, num_blocks=8, dtype="float32")
    views = [np.from_dlpack(t) for t in pool.tensors()]
    for v in views:
        v[...] = rng.standard_normal(v.shape)
    before = [v.astype(np.float64) for v in views]
    src, dst = np.array([1, 6], dtype=np.int32), np.array([5, 0], dtype=np.int32)
    ts.copy_blocks(pool.tensors(), src, dst)
    for v, e in zip(views, before):
        e[dst] = e[src]
        np.testing.assert_array_equal(v, e)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=0), "CachePool: num_layers must be at least 1, got 0"),
        (dict(max_blocks=0), r"max_blocks must be in \[1, 2\^31 - 1\] .*, got 0"),
        (dict(max_blocks=2**31), r"max_blocks must be in .*, got 2147483648"),
        (dict(block_size=0), "block_size must be at least 1, got 0"),
        (dict(num_kv_heads=-1), "num_kv_heads must be at least 1, got -1"),
        (dict(head_dim=0), "head_dim must be at least 1, got 0"),
        (
            dict(dtype="int32"),
            "dtype must be float16, bfloat16, float32 or float8_e4m3fn, got int32",
        ),
        (
            dict(dtype=np.float64),
            "dtype must be float16, bfloat16, float32 or float8_e4m3fn, got f",
        ),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (dict(device="cuda:x"), "got 'cuda:x'"),
        (dict(layout="NDH"), "layout must be 'NHD' or 'HND', got 'NDH'"),
        (dict(granule_bytes=1000), f"granule_bytes must be a multiple of {mmap.PAGESIZE}"),
        (dict(num_blocks=65), r"num_blocks must be in \[0, max_blocks = 64\], got 65"),
        (dict(num_blocks=-1), r"num_blocks must be in \[0, max_blocks = 64\], got -1"),
        (dict(page_meta_dtype="float8_e4m3fn"), "float8_e4m3fn page summaries need page_meta, got"),
        (dict(page_meta_dtype="float16"), "float16 page summaries need page_meta, got page_meta"),
        (
            dict(page_meta=True, page_meta_dtype="int8"),
            "page_meta_dtype must be float16, bfloat16, float32 or float8_e4m3fn, got int8",
        ),
        (
            dict(dtype="float16", page_meta=True, page_meta_dtype="float32"),
            r"page_meta_dtype must be the caches' dtype \(float16\) or float8_e4m3fn, got float32",
        ),
        (
            dict(dtype="float8_e4m3fn", page_meta=True, page_meta_dtype="int8"),
            "page_meta_dtype must be float16, bfloat16, float32 or float8_e4m3fn, got int8",
        ),
        (dict(max_blocks=2**31 - 1, num_layers=2**20), "would reserve more than 2\\^60 bytes"),
        # Counted with the summaries' own elements: float32 summaries of a float8 cache at
        # block_size 1 take 8 bytes a (head, dim) against the K/V's 2, 2.5 x 2^60 in all here.
        (
            dict(
                num_layers=1,
                max_blocks=2**31 - 1,
                block_size=1,
                num_kv_heads=2**13,
                head_dim=2**14,
                dtype="float8_e4m3fn",
                page_meta=True,
                page_meta_dtype="float32",
            ),
            "would reserve more than 2\\^60 bytes",
        ),
    ],
)
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pool(**kwargs)


INT_RANGE = r"must be an int in \[-?\d+, \d+\]"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(num_layers=1.5),
            ts.ArgumentTypeError,
            "CachePool: num_layers must be an int, got float",
        ),
        (
            dict(max_blocks="64"),
            ts.ArgumentTypeError,
            "CachePool: max_blocks must be an int, got str",
        ),
        (
            dict(block_size=None),
            ts.ArgumentTypeError,
            "CachePool: block_size must be an int, got NoneType",
        ),
        (
            dict(num_kv_heads=2.0),
            ts.ArgumentTypeError,
            "CachePool: num_kv_heads must be an int, got float",
        ),
        (dict(head_dim=[64]), ts.ArgumentTypeError, "CachePool: head_dim must be an int, got list"),
        (
            dict(num_blocks=0.0),
            ts.ArgumentTypeError,
            "CachePool: num_blocks must be an int, got float",
        ),
        (
            dict(granule_bytes=4096.0),
            ts.ArgumentTypeError,
            "CachePool: granule_bytes must be an int, got",
        ),
        (dict(page_meta=1), ts.ArgumentTypeError, "CachePool: page_meta must be a bool, got int"),
        (
            dict(page_meta=None),
            ts.ArgumentTypeError,
            "CachePool: page_meta must be a bool, got NoneType",
        ),
        (dict(num_layers=2**31), ValueError, f"CachePool: num_layers {INT_RANGE}, got 2147483648"),
        (dict(block_size=-(2**40)), ValueError, f"block_size {INT_RANGE}, got -1099511627776"),
        (dict(num_kv_heads=2**40), ValueError, f"num_kv_heads {INT_RANGE}, got 1099511627776"),
        (dict(head_dim=2**63), ValueError, f"head_dim {INT_RANGE}, got 9223372036854775808"),
        (dict(max_blocks=2**64), ValueError, f"max_blocks {INT_RANGE}, got 18446744073709551616"),
        (dict(num_blocks=2**70), ValueError, f"num_blocks {INT_RANGE}, got {2**70}"),
        (dict(num_blocks=-(2**70)), ValueError, f"num_blocks {INT_RANGE}, got -{2**70}"),
        (dict(granule_bytes=-1), ValueError, f"CachePool: granule_bytes {INT_RANGE}, got -1"),
        (dict(granule_bytes=2**64), ValueError, f"granule_bytes {INT_RANGE}, got {2**64}"),
        (dict(layout=3), ValueError, "CachePool: layout must be a str, got 3"),
        (dict(layout=None), ValueError, "CachePool: layout must be a str, got NoneType"),
        (
            dict(dtype=None),
            ValueError,
            "CachePool: dtype must be float16, bfloat16, float32 or float8_e4m3fn, got None",
        ),
        # The sizes' product wraps size_t (2^21 * 2^21 * 2^22 * 2 bytes = 2^65): still refused.
        (
            dict(max_blocks=1, num_layers=1, block_size=2**21, num_kv_heads=2**21, head_dim=2**22),
            ValueError,
            "would reserve more than 2\\^60 bytes, got max_blocks 1 x block_size 2097152 x",
        ),
    ],
)
def test_constructor_argument_kinds_and_ranges(kwargs, error, message):
    """Every argument is converted with a message in the project's format, never nanobind's
    generic 'incompatible function arguments'."""
    with pytest.raises(error, match="^tinyserve\\.") as raised:
        make_pool(**kwargs)
    assert re.search(message, str(raised.value)), str(raised.value)


@pytest.mark.parametrize("layout", [3, None, b"NHD"])
def test_a_name_of_the_wrong_kind_is_an_argument_type_error(layout):
    """A non-str where a name goes is the wrong kind of argument, like a non-int where an int
    goes: the ArgumentTypeError that both `except TypeError` and `except ValueError` catch."""
    with pytest.raises(ts.ArgumentTypeError, match="^tinyserve.CachePool: layout must be a str"):
        make_pool(layout=layout)


def test_integer_like_arguments_are_accepted():
    pool = make_pool(num_layers=np.int32(2), max_blocks=np.int64(8), num_blocks=np.uint8(3))
    assert (pool.num_layers, pool.max_blocks, pool.num_blocks) == (2, 8, 3)
    pool.grow(np.int64(5))
    pool.shrink(np.int16(4))
    assert pool.num_blocks == 4
    assert np.from_dlpack(pool.key(np.int64(1))).shape[0] == 4
    pool.check()


def assert_rejected_calls_change_nothing(rng, cases_for):
    """Each (call, error, message) of cases_for(pool) on a filled 10-block pool raises `error`
    with a `tinyserve.` message matching `message`, and leaves blocks, summaries, mapping and
    block count as they were."""
    pool = make_pool(page_meta=True, num_blocks=10, dtype="float32")
    fill_random(rng, as_torch(pool), 0, 10)
    saved = snapshot(as_torch(pool), 10)
    mapped = pool.mapped_bytes
    for call, error, message in cases_for(pool):
        with pytest.raises(error, match="^tinyserve\\.") as raised:
            call()
        assert re.search(message, str(raised.value)), str(raised.value)
        verify(pool, 10)
        assert pool.mapped_bytes == mapped
        assert_kept(as_torch(pool), saved, 10)


@needs_torch
def test_method_arguments_of_the_wrong_kind_or_range_change_nothing(rng):
    assert_rejected_calls_change_nothing(
        rng,
        lambda pool: [
            (
                lambda: pool.grow(12.0),
                ts.ArgumentTypeError,
                "CachePool.grow: num_blocks must be an int, got",
            ),
            (lambda: pool.grow(2**70), ValueError, f"CachePool.grow: num_blocks {INT_RANGE}, got"),
            (
                lambda: pool.shrink("1"),
                ts.ArgumentTypeError,
                "CachePool.shrink: num_blocks must be an int, got",
            ),
            (
                lambda: pool.shrink(-(2**64)),
                ValueError,
                f"CachePool.shrink: num_blocks {INT_RANGE}",
            ),
            (
                lambda: pool.key(0.0),
                ts.ArgumentTypeError,
                "CachePool.key: layer must be an int, got float",
            ),
            (lambda: pool.value(2**40), ValueError, f"CachePool.value: layer {INT_RANGE}, got"),
            (
                lambda: pool.page_meta(None),
                ts.ArgumentTypeError,
                "CachePool.page_meta: layer must be an int",
            ),
        ],
    )


def test_cuda_device_without_backend_or_device():
    if not ts.cuda_compiled():
        with pytest.raises(RuntimeError, match="CachePool: device is cuda:0 but tinyserve was"):
            make_pool(device="cuda")
    else:
        with pytest.raises(RuntimeError, match="CachePool: device is cuda:97 but"):
            make_pool(device="cuda:97")


@needs_torch
def test_rejected_calls_change_nothing(rng):
    assert_rejected_calls_change_nothing(
        rng,
        lambda pool: [
            (lambda: pool.grow(9), ValueError, r"grow: num_blocks must be in \[num_blocks = 10, "),
            (lambda: pool.grow(65), ValueError, r"max_blocks = 64\], got 65"),
            (
                lambda: pool.shrink(11),
                ValueError,
                r"shrink: num_blocks must be in \[0, num_blocks = ",
            ),
            (lambda: pool.shrink(-1), ValueError, "got -1"),
            (lambda: pool.key(3), ValueError, r"CachePool.key: layer must be in \[0, 3\), got 3"),
            (lambda: pool.value(-1), ValueError, r"CachePool.value: layer must be .*, got -1"),
            (lambda: pool.page_meta(3), ValueError, "CachePool.page_meta: layer must be"),
        ],
    )
    plain = make_pool()
    with pytest.raises(ValueError, match="page_meta: the pool holds no page summaries"):
        plain.page_meta(0)


def test_framework_dtypes_and_devices_are_accepted():
    assert make_pool(dtype=np.float32).dtype == "float32"
    if torch is not None:
        assert make_pool(dtype=torch.bfloat16).dtype == "bfloat16"
        assert make_pool(device=torch.device("cpu")).device == "cpu"
    assert "CachePool(num_layers=3, num_blocks=0, max_blocks=64" in repr(make_pool())


# --- CUDA: virtual memory management -----------------------------------------------------------


def free_bytes() -> int:
    """Free device memory as the driver reports it, with torch's cached blocks given back so that
    only live allocations count."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.cuda
@needs_torch
def test_cuda_grow_shrink_preserves_data_and_returns_memory(rng):
    torch.cuda.init()
    pool = ts.CachePool(4, 4096, 16, 8, 128, "float16", "cuda", page_meta=True)  # 32 KiB blocks
    g = pool.granule_bytes
    assert g >= 2 << 20 and g % (2 << 20) == 0
    verify(pool, 0)
    assert pool.device == f"cuda:{torch.cuda.current_device()}"
    # the driver's free memory is read right around grow and shrink, which launch nothing, so the
    # difference is the pool's alone (a kernel's first launch can load code into device memory)
    free0 = free_bytes()
    pool.grow(3000)
    free1 = free_bytes()
    assert abs((free0 - free1) - pool.mapped_bytes) < g, (free0 - free1, pool.mapped_bytes)
    verify(pool, 3000)
    tensors = as_torch(pool)
    assert all(t.is_cuda for t in tensors)
    fill_random(rng, tensors, 0, 3000)
    saved = snapshot(tensors, 3000)

    mapped_before = pool.mapped_bytes
    free1 = free_bytes()
    pool.shrink(1000)
    free2 = free_bytes()
    freed = mapped_before - pool.mapped_bytes
    assert freed > 0
    assert abs((free2 - free1) - freed) < g, (free2 - free1, freed)
    verify(pool, 1000)
    assert_kept(as_torch(pool), saved, 1000)

    pool.grow(4096)
    verify(pool, 4096)
    tensors = as_torch(pool)
    assert_kept(tensors, saved, 1000)
    fill_random(rng, tensors, 1000, 4096)
    saved = snapshot(tensors, 4096)
    mapped_before = pool.mapped_bytes
    free3 = free_bytes()
    pool.shrink(0)
    assert abs((free_bytes() - free3) - mapped_before) < g
    verify(pool, 0)
    pool.grow(17)
    verify(pool, 17)
    fill_random(rng, as_torch(pool), 0, 17)
    mapped_before = pool.mapped_bytes
    free4 = free_bytes()
    del pool, tensors
    assert abs((free_bytes() - free4) - mapped_before) < g  # the destructor released it all


@pytest.mark.cuda
@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cuda_ops_on_pool_tensors(rng, dtype, layout):
    pool = run_ops_on_pool(rng, f"cuda:{torch.cuda.current_device()}", dtype, layout)
    # swap_blocks between the pool and a pinned host pool, both ways
    key = torch.from_dlpack(pool.key(0))
    fill_random(rng, [key], 0, pool.num_blocks)
    # the host pool mirrors the pool's storage layout, pinned
    n, bs, h, d = (10, *key.shape[1:])
    storage = (n, h, bs, d) if layout == "HND" else (n, bs, h, d)
    host = torch.empty(storage, dtype=key.dtype, pin_memory=True).fill_(float("nan"))
    if layout == "HND":
        host = host.permute(0, 2, 1, 3)
    before = f64(key)
    src = rng.choice(pool.num_blocks, 10, replace=False).astype(np.int32)
    dst = rng.permutation(10).astype(np.int32)
    ts.swap_blocks(key, host, src, dst)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(f64(host)[dst], before[src])
    back = rng.choice(pool.num_blocks, 10, replace=False).astype(np.int32)
    ts.swap_blocks(host, key, dst, back)
    torch.cuda.synchronize()
    expect = before.copy()
    expect[back] = before[src]
    np.testing.assert_array_equal(f64(key), expect)


@pytest.mark.cuda
@needs_torch
def test_cuda_freed_memory_serves_another_allocation():
    """The pool takes nearly all free memory, so an allocation fails; after shrink(0) the same
    allocation succeeds. Large granules keep this to a few hundred driver calls."""
    torch.cuda.init()
    torch.cuda.empty_cache()
    gib = 1 << 30
    block_bytes = 16 * 8 * 128 * 2
    margin = 3 * gib
    free0 = free_bytes()
    per_tensor = (free0 - margin) // 2 // gib * gib
    assert per_tensor >= gib, f"too little free device memory: {free0}"
    max_blocks = per_tensor // block_bytes
    pool = ts.CachePool(1, max_blocks, 16, 8, 128, "float16", "cuda", granule_bytes=gib)
    try:
        pool.grow(max_blocks)
        verify(pool, max_blocks)
        probe = 2 * margin
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(probe, dtype=torch.uint8, device="cuda")
        pool.shrink(0)
        verify(pool, 0)
        x = torch.empty(probe, dtype=torch.uint8, device="cuda")
        x.fill_(1)
        torch.cuda.synchronize()
        del x
    finally:  # a failure must not leave the device full for the tests after this one
        pool.shrink(0)
        torch.cuda.empty_cache()


@pytest.mark.cuda
@needs_torch
def test_cuda_grow_past_device_memory_is_all_or_nothing(rng):
    """Growing past the device's memory fails in the second tensor; the first tensor's new
    granules are released again and the pool is as before."""
    torch.cuda.init()
    torch.cuda.empty_cache()
    gib = 1 << 30
    total = torch.cuda.mem_get_info()[1]
    block_bytes = 16 * 8 * 128 * 2
    # each tensor alone fits in the free memory, the two together do not
    per_tensor = (free_bytes() // 2 + 2 * gib) // gib * gib
    assert per_tensor < total
    max_blocks = per_tensor // block_bytes
    pool = ts.CachePool(1, max_blocks, 16, 8, 128, "float16", "cuda", granule_bytes=gib)
    pool.grow(100)
    fill_random(rng, as_torch(pool), 0, 100)
    saved = snapshot(as_torch(pool), 100)
    mapped, free0 = pool.mapped_bytes, free_bytes()
    with pytest.raises(RuntimeError, match="CachePool.grow: CUDA driver error in cuMemCreate"):
        pool.grow(max_blocks)
    verify(pool, 100)
    assert pool.mapped_bytes == mapped
    assert abs(free_bytes() - free0) < gib
    assert_kept(as_torch(pool), saved, 100)


@needs_torch  # verify() reads the pool's tensors through torch
def test_documented_example_runs():
    """docs/cache_pool.md's example runs as written, and does what it says."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "cache_pool.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)[0]
    scope: dict = {}
    exec(compile(block, str(doc), "exec"), scope)
    pool = scope["pool"]
    verify(pool, 10)
    assert scope["k0"].shape == (10, 16, 2, 64)
    np.testing.assert_array_equal(scope["k0"], np.ones((10, 16, 2, 64), np.float32))


@pytest.mark.cuda
@needs_torch
def test_cuda_float8_summaries_pool(rng):
    run_float8_summaries_pool(rng, f"cuda:{torch.cuda.current_device()}")


@pytest.mark.cuda
@needs_torch
@pytest.mark.parametrize("meta_dtype", [None, "float16"])
def test_cuda_float8_cache_pool(rng, meta_dtype):
    run_float8_cache_pool(
        rng,
        f"cuda:{torch.cuda.current_device()}",
        None if meta_dtype is None else getattr(torch, meta_dtype),
    )
