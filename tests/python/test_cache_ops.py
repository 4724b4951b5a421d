"""reshape_and_cache, copy_blocks and swap_blocks against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import tinyserve as ts
from arrays import CACHE_LAYOUTS, DTYPES, asarray, backends, cache_pair, f64, require, sync, torch


def random_cache(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 1), (80, 7), (256, 32)])
def test_reshape_and_cache(rng, backend, dtype, layout, head_dim, block_size):
    fw, device = backend
    require(fw, dtype)
    num_blocks, heads = 13, 3
    num_tokens = int(rng.integers(1, num_blocks * block_size))
    k_init = random_cache(rng, (num_blocks, block_size, heads, head_dim))
    v_init = random_cache(rng, (num_blocks, block_size, heads, head_dim))
    kc, vc = cache_pair(k_init, v_init, fw, dtype, device, layout)
    before_k, before_v = f64(kc), f64(vc)
    slots = rng.choice(num_blocks * block_size, size=num_tokens, replace=False).astype(np.int64)
    slots[rng.random(num_tokens) < 0.2] = -1  # padding tokens are skipped
    key = asarray(rng.standard_normal((num_tokens, heads, head_dim)), fw, dtype, device)
    # value as a strided view: every other row of a larger buffer
    big_value = asarray(rng.standard_normal((2 * num_tokens, heads, head_dim)), fw, dtype, device)
    value = big_value[::2]
    ts.reshape_and_cache(key, value, kc, vc, asarray(slots, fw, device=device))
    sync(fw, device)

    expect_k, expect_v = before_k.copy(), before_v.copy()
    flat_k = expect_k.reshape(-1, heads, head_dim)
    flat_v = expect_v.reshape(-1, heads, head_dim)
    keep = slots >= 0
    flat_k[slots[keep]] = f64(key)[keep]
    flat_v[slots[keep]] = f64(value)[keep]
    np.testing.assert_array_equal(f64(kc), expect_k)  # exact copies, nothing else touched
    np.testing.assert_array_equal(f64(vc), expect_v)


def block_pairs(rng, num_blocks, num_pairs):
    ids = rng.permutation(num_blocks)[: 2 * num_pairs].astype(np.int32)
    return ids[:num_pairs].copy(), ids[num_pairs:].copy()


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_many_layers(rng, backend):
    """Every pair in every tensor: K and V of several layers in mixed layouts and dtypes, plus a
    page-metadata-shaped tensor, in one call."""
    fw, device = backend
    num_blocks, block_size, heads, head_dim = 40, 16, 2, 64
    tensors, expected = [], []
    dtypes = ["float32", "float16"] + (["bfloat16"] if fw == "torch" else [])
    for layer in range(3):
        dtype = dtypes[layer % len(dtypes)]
        layout = CACHE_LAYOUTS[layer % len(CACHE_LAYOUTS)]
        k, v = cache_pair(
            random_cache(rng, (num_blocks, block_size, heads, head_dim)),
            random_cache(rng, (num_blocks, block_size, heads, head_dim)),
            fw,
            dtype,
            device,
            layout,
        )
        tensors += [k, v]
    meta = asarray(random_cache(rng, (num_blocks, heads, 2, head_dim)), fw, "float32", device)
    tensors.append(meta)
    expected = [f64(t) for t in tensors]
    src, dst = block_pairs(rng, num_blocks, 12)
    ts.copy_blocks(tensors, asarray(src, fw, device=device), asarray(dst, fw, device=device))
    sync(fw, device)
    for t, e in zip(tensors, expected):
        e[dst] = e[src]
        np.testing.assert_array_equal(f64(t), e)


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_non_dense_block(rng, backend):
    """A cache whose blocks are not one contiguous run (head_dim padded inside a wider buffer)."""
    fw, device = backend
    base = asarray(random_cache(rng, (10, 4, 2, 48)), fw, "float32", device)
    cache = base[..., :32]
    expected = f64(cache)
    src, dst = block_pairs(rng, 10, 3)
    ts.copy_blocks([cache], asarray(src, fw, device=device), asarray(dst, fw, device=device))
    sync(fw, device)
    expected[dst] = expected[src]
    np.testing.assert_array_equal(f64(cache), expected)
    np.testing.assert_array_equal(f64(base)[..., 32:], f64(base)[..., 32:])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["NHD", "HND_combined"])
def test_swap_blocks_roundtrip(rng, backend, layout):
    """Offload device blocks to a host pool and recall them into other device blocks."""
    fw, device = backend
    require(fw, "float16")
    num_blocks, host_blocks = 30, 12
    shape = (num_blocks, 16, 2, 64)
    kc, _ = cache_pair(
        random_cache(rng, shape), random_cache(rng, shape), fw, "float16", device, layout
    )
    host_shape = (host_blocks,) + shape[1:]
    # the host pool mirrors the device cache's layout; with a CUDA device it is pinned
    host_k, _ = cache_pair(
        random_cache(rng, host_shape),
        random_cache(rng, host_shape),
        fw,
        "float16",
        "cpu",
        layout,
        pinned=device == "cuda",
    )
    dev_before, host_before = f64(kc), f64(host_k)
    out_src = rng.choice(num_blocks, 5, replace=False).astype(np.int32)
    out_dst = rng.choice(host_blocks, 5, replace=False).astype(np.int32)
    ts.swap_blocks(kc, host_k, out_src, out_dst)
    sync(fw, device)
    host_expect = host_before.copy()
    host_expect[out_dst] = dev_before[out_src]
    np.testing.assert_array_equal(f64(host_k), host_expect)

    back_dst = np.setdiff1d(np.arange(num_blocks), out_src)[:5].astype(np.int32)
    ts.swap_blocks(host_k, kc, out_dst, back_dst)
    sync(fw, device)
    dev_expect = dev_before.copy()
    dev_expect[back_dst] = dev_before[out_src]
    np.testing.assert_array_equal(f64(kc), dev_expect)


def test_swap_blocks_same_tensor_rejects_overlap(rng):
    cache = random_cache(rng, (8, 4, 1, 16))
    before = cache.copy()
    with pytest.raises(ValueError, match="both a source and a destination"):
        ts.swap_blocks(cache, cache, np.array([1, 2], np.int32), np.array([2, 3], np.int32))
    np.testing.assert_array_equal(cache, before)


def test_empty_calls_are_no_ops(rng):
    cache = random_cache(rng, (4, 2, 1, 8))
    before = cache.copy()
    none = np.zeros(0, np.int32)
    ts.copy_blocks([cache], none, none)
    ts.copy_blocks([], none, none)
    ts.swap_blocks(cache, cache.copy(), none, none)
    ts.reshape_and_cache(
        np.zeros((0, 1, 8), np.float32),
        np.zeros((0, 1, 8), np.float32),
        cache,
        cache.copy(),
        np.zeros(0, np.int64),
    )
    np.testing.assert_array_equal(cache, before)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_torch_cpu_views_share_memory(rng):
    """Writes through tinyserve land in the torch tensor itself (DLPack, no copy)."""
    cache = torch.zeros((4, 2, 1, 8))
    key = torch.from_numpy(rng.standard_normal((1, 1, 8)).astype(np.float32))
    ts.reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([5], dtype=torch.int64))
    assert torch.equal(cache[2, 1], key[0])
