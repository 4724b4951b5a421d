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


def copy_blocks_and_check(rng, tensors, num_blocks, num_pairs, fw, device):
    """copy_blocks over `tensors` with num_pairs random (src, dst) pairs; every tensor must then
    equal its copy from before the call with the blocks moved in NumPy."""
    expected = [f64(t) for t in tensors]
    src, dst = block_pairs(rng, num_blocks, num_pairs)
    ts.copy_blocks(tensors, asarray(src, fw, device=device), asarray(dst, fw, device=device))
    sync(fw, device)
    for t, e in zip(tensors, expected):
        e[dst] = e[src]
        np.testing.assert_array_equal(f64(t), e)


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_many_layers(rng, backend):
    """Every pair in every tensor: K and V of several layers in mixed layouts and dtypes, plus a
    page-metadata-shaped tensor, in one call."""
    fw, device = backend
    num_blocks, block_size, heads, head_dim = 40, 16, 2, 64
    tensors = []
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
    copy_blocks_and_check(rng, tensors, num_blocks, 12, fw, device)


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


# Element types that the block copies move as bytes, by framework.
BYTE_DTYPES = {
    "numpy": ["int8", "bool", "uint8", "int16", "uint16", "float64", "complex64", "complex128"],
    "torch": ["int8", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "bfloat16"]
    + ["float64", "complex128", "int64"],
}
ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "bfloat16": 2}
ITEMSIZE.update({"float64": 8, "complex64": 8, "complex128": 16, "int64": 8})
ITEMSIZE.update(dict.fromkeys(["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"], 1))


def random_bytes_array(rng, shape, dtype, fw, device):
    """Random bit patterns of `dtype` (bool: 0 or 1), shape `shape`, in the framework."""
    itemsize = ITEMSIZE[dtype]
    raw = rng.integers(0, 256, size=shape[:-1] + (shape[-1] * itemsize,), dtype=np.uint8)
    if dtype == "bool":
        raw &= 1
    if fw == "numpy":
        return raw.view(dtype)
    return torch.from_numpy(raw).to(device).view(getattr(torch, dtype))


def as_bytes(a) -> np.ndarray:
    """The array's bytes, [..., last * itemsize] uint8, on the host."""
    if torch is not None and isinstance(a, torch.Tensor):
        return a.view(torch.uint8).cpu().numpy()
    return a.view(np.uint8)


def byte_dtype_params():
    out = []
    for fw, dtypes in BYTE_DTYPES.items():
        backend = {"numpy": [("numpy", "cpu")], "torch": [("torch", "cpu"), ("torch", "cuda")]}[fw]
        for fw_device in backend:
            marks = [pytest.mark.cuda] if fw_device[1] == "cuda" else []
            for dtype in dtypes:
                out.append(
                    pytest.param(
                        fw_device, dtype, id=f"{fw_device[0]}-{fw_device[1]}-{dtype}", marks=marks
                    )
                )
    return out


@pytest.mark.parametrize("backend,dtype", byte_dtype_params())
@pytest.mark.parametrize("id_dtype", ["int32", "int64"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_copy_blocks_any_element_type(rng, backend, dtype, id_dtype, padded):
    """copy_blocks moves bytes: every element type, int32 or int64 ids, dense blocks and blocks
    that are not one contiguous run (the strided path). Nothing outside the blocks changes."""
    fw, device = backend
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    num_blocks, shape = 12, (4, 2, 6)
    width = shape[-1] + (3 if padded else 0)
    bases = [random_bytes_array(rng, (num_blocks,) + shape[:-1] + (width,), dtype, fw, device)]
    bases.append(random_bytes_array(rng, (num_blocks, 3, 5), dtype, fw, device))
    caches = [bases[0][..., : shape[-1]], bases[1]]
    before = [as_bytes(b).copy() for b in bases]
    src, dst = block_pairs(rng, num_blocks, 4)
    ts.copy_blocks(
        caches,
        asarray(src.astype(id_dtype), fw, device=device),
        asarray(dst.astype(id_dtype), fw, device=device),
    )
    sync(fw, device)
    itemsize = ITEMSIZE[dtype]
    for base, old in zip(bases, before):
        expected = old.copy()
        expected[dst] = old[src]
        if base is bases[0]:  # the padding columns of every block keep their bytes
            expected[..., shape[-1] * itemsize :] = old[..., shape[-1] * itemsize :]
        np.testing.assert_array_equal(as_bytes(base), expected)


@pytest.mark.parametrize("backend", backends())
def test_copy_blocks_numpy_default_integer_ids(rng, backend):
    """Ids as NumPy makes them by default (int64), straight from a list."""
    fw, device = backend
    cache = asarray(random_cache(rng, (9, 2, 1, 4)), fw, "float32", device)
    expected = f64(cache)
    src, dst = np.array([0, 3, 5]), np.array([8, 1, 2])
    assert src.dtype == np.int64
    ts.copy_blocks([cache], asarray(src, fw, device=device), asarray(dst, fw, device=device))
    sync(fw, device)
    expected[dst] = expected[src]
    np.testing.assert_array_equal(f64(cache), expected)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("id_dtype", ["int32", "int64"])
def test_copy_blocks_more_pairs_than_a_grid_dimension(rng, backend, id_dtype):
    """70,000 pairs (CUDA: more than a grid's y extent of 65,535) through the strided path
    (blocks with a gap inside) and the dense one."""
    fw, device = backend
    num_blocks, num_pairs = 140_001, 70_000
    padded = asarray(rng.standard_normal((num_blocks, 2, 2)), fw, "float32", device)
    dense = asarray(rng.standard_normal((num_blocks, 3)), fw, "float16", device)
    caches = [padded[:, :, :1], dense]
    before = [f64(padded), f64(dense)]
    ids = rng.permutation(num_blocks)[: 2 * num_pairs].astype(id_dtype)
    src, dst = ids[:num_pairs], ids[num_pairs:]
    ts.copy_blocks(caches, asarray(src, fw, device=device), asarray(dst, fw, device=device))
    sync(fw, device)
    expect_padded, expect_dense = before[0].copy(), before[1].copy()
    expect_padded[dst, :, 0] = before[0][src, :, 0]
    expect_dense[dst] = before[1][src]
    np.testing.assert_array_equal(f64(padded), expect_padded)
    np.testing.assert_array_equal(f64(dense), expect_dense)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("id_dtype", ["int32", "int64"])
@pytest.mark.parametrize("dtype", ["int8", "bool", "float64"])
def test_swap_blocks_any_element_type(rng, backend, id_dtype, dtype):
    """swap_blocks moves bytes too, with int32 or int64 host ids, both ways."""
    fw, device = backend
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    dev = random_bytes_array(rng, (10, 4, 2, 8), dtype, fw, device)
    host = random_bytes_array(rng, (6, 4, 2, 8), dtype, fw, "cpu")
    if fw == "torch" and device == "cuda":
        host = host.pin_memory()
    dev_before, host_before = as_bytes(dev).copy(), as_bytes(host).copy()
    src = np.array([7, 0, 3], id_dtype)
    dst = np.array([5, 2, 0], id_dtype)
    ts.swap_blocks(dev, host, src, dst)
    sync(fw, device)
    host_expect = host_before.copy()
    host_expect[dst] = dev_before[src]
    np.testing.assert_array_equal(as_bytes(host), host_expect)
    back = np.array([1, 2, 4], id_dtype)
    ts.swap_blocks(host, dev, dst, back)
    sync(fw, device)
    dev_expect = dev_before.copy()
    dev_expect[back] = host_expect[dst]
    np.testing.assert_array_equal(as_bytes(dev), dev_expect)


@pytest.mark.parametrize("backend", backends())
def test_one_dimensional_block_tensors(rng, backend):
    """A tensor of one value per block (per-block scales, flags) is indexed by block along its
    only dimension: copy_blocks moves its entries with a cache's blocks in the same call (a
    strided view too), and swap_blocks moves them between host and device."""
    fw, device = backend
    num_blocks = 24
    cache = asarray(random_cache(rng, (num_blocks, 4, 2, 8)), fw, "float32", device)
    scales = asarray(random_cache(rng, (num_blocks,)), fw, "float32", device)
    flags = asarray(rng.integers(-100, 100, num_blocks), fw, "int32", device)
    wide = asarray(random_cache(rng, (num_blocks, 3)), fw, "float32", device)
    column = wide[:, 1]  # stride 3 elements
    tensors = [cache, scales, flags, column]
    wide_before = f64(wide)
    copy_blocks_and_check(rng, tensors, num_blocks, 7, fw, device)
    np.testing.assert_array_equal(f64(wide)[:, [0, 2]], wide_before[:, [0, 2]])

    host = asarray(np.full(10, np.nan, np.float32), fw, "float32", "cpu")
    if fw == "torch" and device == "cuda":
        host = host.pin_memory()
    before = f64(scales)
    out_src, out_dst = np.array([3, 17, 0], np.int32), np.array([9, 0, 4], np.int32)
    ts.swap_blocks(scales, host, out_src, out_dst)
    sync(fw, device)
    host_now = f64(host)
    np.testing.assert_array_equal(host_now[out_dst], before[out_src])
    assert np.isnan(np.delete(host_now, out_dst)).all()
    back = np.array([5, 6, 7], np.int32)
    ts.swap_blocks(host, scales, out_dst, back)
    sync(fw, device)
    expect = before.copy()
    expect[back] = before[out_src]
    np.testing.assert_array_equal(f64(scales), expect)


def test_block_copies_refuse_conjugate_views():
    """A torch tensor with its conjugate bit set (x.conj() of a complex tensor) reads as values
    its memory does not hold: copy_blocks and swap_blocks refuse it as a source or a
    destination, naming it, and write nothing (as torch's own __dlpack__ refuses it); the
    resolved tensor copies its conjugated values."""
    if torch is None:
        pytest.skip("torch is not installed")
    src = torch.tensor([[1 + 2j], [3 + 4j]], dtype=torch.complex64)
    view = src.conj()
    assert view.is_conj()
    pair = (torch.tensor([0]), torch.tensor([1]))
    other = torch.zeros(2, 1, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"swap_blocks: src_cache is a torch tensor with its conj"):
        ts.swap_blocks(view, other, *pair)
    with pytest.raises(ValueError, match=r"swap_blocks: dst_cache is a torch tensor with its conj"):
        ts.swap_blocks(other, view, *pair)
    with pytest.raises(ValueError, match=r"copy_blocks: caches\[1\] is a torch tensor with its"):
        ts.copy_blocks([other, view], *pair)
    assert not other.any()
    ts.swap_blocks(view.resolve_conj(), other, *pair)
    assert other[1, 0] == 1 - 2j
