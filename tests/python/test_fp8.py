"""FP8 (float8 e4m3fn) KV caches: quantising writes and dequantising decode attention.

The reference models the quantisation with its own NumPy e4m3 encoder (nearest value of a table
of all finite e4m3 values, ties to an even mantissa, saturation to +-448), then runs float64
attention over the decoded values times the scales. NumPy passes caches as uint8 bits with
``kv_dtype="float8_e4m3fn"``; torch passes ``torch.float8_e4m3fn`` tensors."""

from __future__ import annotations

import numpy as np
import pytest
from test_selection_fp8 import bits_of, ceil8, floor8, fp8_empty

import reference as R
import tinyserve as ts
from arrays import (
    TOLERANCE,
    check_offsets_stay_in_bounds,
    check_prefill,
    empty,
    f64,
    prefill_graph_buffers,
    prefill_reference,
    random_row_split,
    require,
    sync,
)

try:
    import torch
except ImportError:
    torch = None

try:
    import ml_dtypes
except ImportError:  # NumPy float8 summaries need it; torch ones do not
    ml_dtypes = None

FP8_NAN = 0x7F  # the bits that poison unwritten cache slots


# --- an independent float8 e4m3fn model --------------------------------------------------------


def decode_e4m3(bits: np.ndarray) -> np.ndarray:
    """float64 values of e4m3fn bit patterns (0x7f / 0xff are NaN)."""
    bits = np.asarray(bits, dtype=np.uint8).astype(np.int64)
    exp, mant = (bits >> 3) & 0xF, bits & 0x7
    normal = np.ldexp(1.0 + mant / 8.0, exp - 7)
    subnormal = np.ldexp(mant / 8.0, -6)
    value = np.where(exp == 0, subnormal, normal)
    value = np.where((exp == 0xF) & (mant == 0x7), np.nan, value)
    return np.where(bits & 0x80, -value, value)


_CODES = np.arange(0x7F, dtype=np.uint8)  # every finite non-negative code, in increasing order
_VALUES = decode_e4m3(_CODES)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """Bits of the e4m3fn value nearest to x (ties to an even mantissa), saturated to +-448."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.minimum(np.abs(x), _VALUES[-1])
    hi = np.clip(np.searchsorted(_VALUES, mag), 1, len(_VALUES) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - _VALUES[lo], _VALUES[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (_CODES[hi] % 2 == 0))
    code = np.where(pick_hi, _CODES[hi], _CODES[lo]).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)
    return np.where(np.isnan(x), np.uint8(FP8_NAN), code).astype(np.uint8)


def quantise(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What a write stores: x / scale in float32 (the kernels' division), encoded."""
    return encode_e4m3(np.float32(x) / np.float32(scale))


def test_encoder_model_known_values():
    """The test's own encoder on hand-checked values (a wrong model would pass everything else)."""
    x = np.array([0.0, 1.0, 1.0625, 1.1875, 448.0, 464.0, 1e9, -np.inf, 2.0**-9, 2.0**-10, -3.5])
    expected = [0x00, 0x38, 0x38, 0x3A, 0x7E, 0x7E, 0x7E, 0xFE, 0x01, 0x00, 0xC6]
    assert encode_e4m3(x).tolist() == expected
    assert decode_e4m3(np.array(expected, dtype=np.uint8)).tolist() == [
        0.0,
        1.0,
        1.0,
        1.25,
        448.0,
        448.0,
        448.0,
        -448.0,
        2.0**-9,
        0.0,
        -3.5,
    ]


# --- arrays ------------------------------------------------------------------------------------


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as the input dtype holds it (float64 result)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.float32(x)).to(torch.bfloat16).double().numpy()
    return np.asarray(x, dtype=dtype).astype(np.float64)


def _input(x: np.ndarray, fw: str, dtype: str, device: str):
    if fw == "numpy":
        return np.ascontiguousarray(x.astype(dtype))
    return torch.from_numpy(np.float32(x)).to(getattr(torch, dtype)).to(device)


def _fp8_caches(key_bits: np.ndarray, value_bits: np.ndarray, fw: str, device: str, layout: str):
    """Two float8 caches (logical [N, P, H, D]) holding the given bits, in NHD or HND storage."""

    def one(bits):
        storage = np.ascontiguousarray(bits.transpose(0, 2, 1, 3) if layout == "HND" else bits)
        if fw == "numpy":
            return storage.transpose(0, 2, 1, 3) if layout == "HND" else storage
        t = torch.from_numpy(storage).to(device).view(torch.float8_e4m3fn)
        return t.permute(0, 2, 1, 3) if layout == "HND" else t

    return one(key_bits), one(value_bits)


def _bits(cache) -> np.ndarray:
    if torch is not None and isinstance(cache, torch.Tensor):
        return cache.view(torch.uint8).cpu().numpy()
    return np.asarray(cache)


def _scales(rng, mode: str, num_kv_heads: int) -> np.ndarray:
    """Per-head scales as an array [num_kv_heads] (equal entries for a per-tensor scale)."""
    if mode == "tensor":
        return np.full(num_kv_heads, np.float32(rng.uniform(0.005, 0.05)), dtype=np.float32)
    return rng.uniform(0.002, 0.08, size=num_kv_heads).astype(np.float32)


def _scale_arg(scales: np.ndarray, mode: str, fw: str, device: str):
    if mode == "tensor":
        return scales[0]  # a NumPy float32 scalar: any real number is taken
    if fw == "numpy":
        return scales.copy()
    return torch.from_numpy(scales.copy()).to(device)


def _kv_dtype(fw: str):
    return "float8_e4m3fn" if fw == "numpy" else None


def fp8_backends():
    out = [pytest.param(("numpy", "cpu"), id="numpy-cpu")]
    out.append(pytest.param(("torch", "cpu"), id="torch-cpu"))
    out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda))
    return out


def _require(fw: str, dtype: str) -> None:
    if torch is None:
        pytest.skip("torch is needed for bfloat16 rounding and float8 tensors")
    require(fw, dtype)


# --- reshape_and_cache -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_reshape_and_cache_quantises(rng, backend, dtype, scale_mode, layout):
    """Every written element equals the encoder's bits for x / scale; every other slot keeps its
    poison; -1 slots write nothing. The inputs include saturating values, infinities and ties."""
    fw, device = backend
    _require(fw, dtype)
    num_blocks, block_size, heads, dim, tokens = 6, 4, 3, 32, 9
    x = rng.standard_normal((2, tokens, heads, dim)) * rng.choice(
        [0.01, 1.0, 30.0], (2, tokens, 1, 1)
    )
    special = [448.0, 464.0, 1e4, np.inf, -np.inf, 1.0625, 1.1875, 2.0**-10, -(2.0**-9), 0.0]
    x[:, 0, 0, : len(special)] = special
    k_scales, v_scales = _scales(rng, scale_mode, heads), _scales(rng, scale_mode, heads)
    # The specials are meant for the stored value: undo the scale of head 0 for them.
    x[0, 0, 0, : len(special)] *= k_scales[0]
    x[1, 0, 0, : len(special)] *= v_scales[0]
    x = _round_to(x, dtype)
    slots = rng.permutation(num_blocks * block_size)[:tokens].astype(np.int64)
    slots[3] = -1
    poison = np.full((num_blocks, block_size, heads, dim), FP8_NAN, dtype=np.uint8)
    kc, vc = _fp8_caches(poison, poison.copy(), fw, device, layout)
    ts.reshape_and_cache(
        _input(x[0], fw, dtype, device),
        _input(x[1], fw, dtype, device),
        kc,
        vc,
        slots if fw == "numpy" else torch.from_numpy(slots).to(device),
        k_scale=_scale_arg(k_scales, scale_mode, fw, device),
        v_scale=_scale_arg(v_scales, scale_mode, fw, device),
        kv_dtype=_kv_dtype(fw),
    )
    sync(fw, device)
    for cache, data, scales in ((kc, x[0], k_scales), (vc, x[1], v_scales)):
        expected = poison.copy().reshape(-1, heads, dim)
        written = slots >= 0
        expected[slots[written]] = quantise(data[written], scales[None, :, None])
        np.testing.assert_array_equal(_bits(cache).reshape(-1, heads, dim), expected)


# --- paged_attention ---------------------------------------------------------------------------


def _attention_case(rng, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, scale_mode):
    """A NaN-poisoned paged case whose caches hold quantised K/V: (case, key bits, value bits,
    k_scales, v_scales). Unwritten slots hold the float8 NaN."""
    case = R.PagedCase(rng, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size)
    k_scales = _scales(rng, scale_mode, num_kv_heads)
    v_scales = _scales(rng, scale_mode, num_kv_heads)
    # Magnitudes that use the float8 range: stored values around 1 / scale.
    key_bits = quantise(case.key_cache, k_scales[None, None, :, None])
    value_bits = quantise(case.value_cache, v_scales[None, None, :, None])
    return case, key_bits, value_bits, k_scales, v_scales


def _reference(case, query64, key_bits, value_bits, k_scales, v_scales, **kw):
    k = decode_e4m3(key_bits) * k_scales[None, None, :, None]
    v = decode_e4m3(value_bits) * v_scales[None, None, :, None]
    return R.paged_attention(query64, k, v, case.block_table, case.seq_lens, **kw)


def _run_attention(
    case, key_bits, value_bits, k_scales, v_scales, fw, device, dtype, layout, scale_mode, **kw
):
    kc, vc = _fp8_caches(key_bits, value_bits, fw, device, layout)
    q = _input(case.query, fw, dtype, device)
    if fw == "numpy":
        table, lens = case.block_table, case.seq_lens
        out = np.full(case.query.shape, np.nan, dtype=dtype)
    else:
        table = torch.from_numpy(case.block_table).to(device)
        lens = torch.from_numpy(case.seq_lens).to(device)
        out = torch.full(case.query.shape, float("nan"), dtype=getattr(torch, dtype), device=device)
    result = ts.paged_attention(
        q,
        kc,
        vc,
        table,
        lens,
        out,
        k_scale=_scale_arg(k_scales, scale_mode, fw, device),
        v_scale=_scale_arg(v_scales, scale_mode, fw, device),
        kv_dtype=_kv_dtype(fw),
        **kw,
    )
    sync(fw, device)
    assert result is out
    return f64(out), f64(q)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [
        (4, 4, 64, 16),
        (8, 2, 128, 16),
        (16, 2, 128, 1),
        (8, 1, 256, 32),
        (6, 2, 96, 8),
        (24, 2, 128, 16),
        (40, 2, 64, 16),
    ],
)
def test_paged_attention_fp8(
    rng, backend, dtype, layout, scale_mode, num_q_heads, num_kv_heads, head_dim, block_size
):
    """Decode over float8 caches against float64 attention over the dequantised values: MHA and
    GQA (groups of 12 and 20 fill more than half of a tensor-core CTA's 16 query rows, 20 in two
    CTAs of 16 and 4), head dims with and without a tensor-core kernel, page sizes 1 to 32."""
    fw, device = backend
    _require(fw, dtype)
    seq_lens = rng.integers(1, 300, size=3)
    seq_lens[1] = 0
    case, kb, vb, ks, vs = _attention_case(
        rng, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, scale_mode
    )
    out, q64 = _run_attention(case, kb, vb, ks, vs, fw, device, dtype, layout, scale_mode)
    ref, _ = _reference(case, q64, kb, vb, ks, vs)
    assert R.rel_error(out, ref) < TOLERANCE[dtype]


def _check_attention_and_lse(case, kb, vb, ks, vs, fw, device, num_splits, **kw):
    """Decode over float8 caches (float16 queries, NHD, per-KV-head scales) in num_splits splits
    against float64 attention over the dequantised values, then its log-sum-exp."""
    out, q64 = _run_attention(
        case, kb, vb, ks, vs, fw, device, "float16", "NHD", "head", num_splits=num_splits, **kw
    )
    ref, ref_lse = _reference(case, q64, kb, vb, ks, vs, **kw)
    assert R.rel_error(out, ref) < TOLERANCE["float16"]
    kc, vc = _fp8_caches(kb, vb, fw, device, "NHD")
    q = _input(case.query, fw, "float16", device)
    if fw == "torch":
        table = torch.from_numpy(case.block_table).to(device)
        lens = torch.from_numpy(case.seq_lens).to(device)
    else:
        table, lens = case.block_table, case.seq_lens
    _, lse = ts.paged_attention(
        q,
        kc,
        vc,
        table,
        lens,
        k_scale=_scale_arg(ks, "head", fw, device),
        v_scale=_scale_arg(vs, "head", fw, device),
        kv_dtype=_kv_dtype(fw),
        return_lse=True,
        num_splits=num_splits,
        **kw,
    )
    sync(fw, device)
    np.testing.assert_allclose(f64(lse), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_paged_attention_fp8_splits_window_lse(rng, backend, num_splits):
    """Split counts, a sliding window, a soft cap and the log-sum-exp over float8 caches."""
    fw, device = backend
    _require(fw, "float16")
    case, kb, vb, ks, vs = _attention_case(rng, [700, 1, 333, 64], 8, 2, 128, 16, "head")
    kw = dict(window_left=250, logits_soft_cap=20.0)
    _check_attention_and_lse(case, kb, vb, ks, vs, fw, device, num_splits, **kw)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_splits", [2, 3, 6])
def test_fp8_split_chunks_long_and_short(rng, backend, head_dim, num_splits):
    """Split decode over float8 caches with chunks of about 520 to 1,550 tokens (a split's chunk
    is the table's capacity over the count): on CUDA the swapped-MMA kernel takes chunks of at
    most 1,024 tokens (and every chunk at head_dim 256), the other kernel longer ones; both
    against float64, with the log-sum-exp, over lengths that end a chunk early, fill one or leave
    it empty."""
    fw, device = backend
    _require(fw, "float16")
    lens = [3073, 1, 0, 2048, 1025]
    case, kb, vb, ks, vs = _attention_case(rng, lens, 8, 2, head_dim, 16, "head")
    chunk = -(-case.block_table.shape[1] * 16 // num_splits)
    assert (chunk > 1024) == (num_splits < 6)  # both kernels of split launches
    _check_attention_and_lse(case, kb, vb, ks, vs, fw, device, num_splits)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("magnitude", [1e-20, 1e-5, 1e5, 1e30, "spread"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fp8_bfloat16_queries_of_any_magnitude(rng, backend, magnitude, head_dim):
    """bfloat16 queries over float8 caches far outside float16's range (the tensor-core kernel
    multiplies them in float16 after a power-of-two scaling), with the softmax scale making up
    for the magnitude; "spread": the query heads of a group 1 to 1e-6 of each other."""
    fw, device = backend
    _require(fw, "bfloat16")
    case, kb, vb, ks, vs = _attention_case(rng, [1, 130, 700], 8, 2, head_dim, 16, "head")
    if magnitude == "spread":
        factor = 10.0 ** rng.uniform(-6, 0, size=(1, 8, 1))
        scale = None
    else:
        factor = magnitude
        scale = 1.0 / (np.sqrt(head_dim) * magnitude)
    case.query = case.query * factor
    out, q64 = _run_attention(
        case, kb, vb, ks, vs, fw, device, "bfloat16", "NHD", "head", scale=scale
    )
    assert np.isfinite(out).all()
    ref, _ = _reference(case, q64, kb, vb, ks, vs, scale=scale)
    assert R.rel_error(out, ref) < TOLERANCE["bfloat16"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("window_left", [-1, 200])
def test_fp8_d64_tile_edges(rng, dtype, block_size, num_splits, window_left):
    """head_dim 64 over float8 caches on the tensor-core kernel (unsplit: 128-token tiles of 8
    warps; split: 64-token tiles of 4): lengths around every tile edge, split into chunks that end
    inside a tile, GQA groups of 4, and a window that starts the key range at an unaligned token;
    with the log-sum-exp."""
    _require("torch", dtype)
    lens = [1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300, 1000]
    case, kb, vb, ks, vs = _attention_case(rng, lens, 8, 2, 64, block_size, "head")
    kw = dict(num_splits=num_splits, window_left=window_left)
    out, q64 = _run_attention(case, kb, vb, ks, vs, "torch", "cuda", dtype, "NHD", "head", **kw)
    ref, ref_lse = _reference(case, q64, kb, vb, ks, vs, window_left=window_left)
    assert R.rel_error(out, ref) < TOLERANCE[dtype]
    kc, vc = _fp8_caches(kb, vb, "torch", "cuda", "NHD")
    _, lse = ts.paged_attention(
        _input(case.query, "torch", dtype, "cuda"),
        kc,
        vc,
        torch.from_numpy(case.block_table).cuda(),
        torch.from_numpy(case.seq_lens).cuda(),
        k_scale=_scale_arg(ks, "head", "torch", "cuda"),
        v_scale=_scale_arg(vs, "head", "torch", "cuda"),
        return_lse=True,
        **kw,
    )
    torch.cuda.synchronize()
    np.testing.assert_allclose(f64(lse), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_write_then_attend(rng, backend, dtype):
    """reshape_and_cache quantises and paged_attention reads back: the result matches float64
    attention over the encoder's bits for the same inputs."""
    fw, device = backend
    _require(fw, dtype)
    num_blocks, block_size, heads, group, dim = 40, 16, 2, 4, 128
    lens = np.array([150, 37, 200], dtype=np.int32)
    table = rng.permutation(num_blocks)[: 3 * 13].reshape(3, 13).astype(np.int32)
    slots = np.concatenate(
        [
            table[b, np.arange(n) // block_size] * block_size + np.arange(n) % block_size
            for b, n in enumerate(lens)
        ]
    ).astype(np.int64)
    k = _round_to(rng.standard_normal((len(slots), heads, dim)), dtype)
    v = _round_to(rng.standard_normal((len(slots), heads, dim)), dtype)
    k_scale, v_scale = 0.02, np.array([0.01, 0.03], dtype=np.float32)
    poison = np.full((num_blocks, block_size, heads, dim), FP8_NAN, dtype=np.uint8)
    kc, vc = _fp8_caches(poison, poison.copy(), fw, device, "NHD")
    if fw == "numpy":
        dev = lambda a: a  # noqa: E731
    else:
        dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    vs_arg = v_scale if fw == "numpy" else dev(v_scale)
    kv = _kv_dtype(fw)
    ts.reshape_and_cache(
        _input(k, fw, dtype, device),
        _input(v, fw, dtype, device),
        kc,
        vc,
        dev(slots),
        k_scale=k_scale,
        v_scale=vs_arg,
        kv_dtype=kv,
    )
    query = rng.standard_normal((3, heads * group, dim))
    q = _input(query, fw, dtype, device)
    out = ts.paged_attention(
        q, kc, vc, dev(table), dev(lens), k_scale=k_scale, v_scale=vs_arg, kv_dtype=kv
    )
    sync(fw, device)
    key_bits = np.full((num_blocks * block_size, heads, dim), FP8_NAN, dtype=np.uint8)
    value_bits = key_bits.copy()
    key_bits[slots] = quantise(k, np.float32(k_scale))
    value_bits[slots] = quantise(v, v_scale[None, :, None])
    shape = (num_blocks, block_size, heads, dim)
    kd = decode_e4m3(key_bits.reshape(shape)) * k_scale
    vd = decode_e4m3(value_bits.reshape(shape)) * v_scale[None, None, :, None]
    ref, _ = R.paged_attention(f64(q), kd, vd, table, lens)
    assert R.rel_error(f64(out), ref) < TOLERANCE[dtype]


# --- prefill (query_start_loc) ------------------------------------------------------------------


def _mixed_rows(rng, num_seqs: int, max_len: int):
    """(seq_lens, rows) of a ragged batch with every kind of sequence at least once: a decode
    step, a whole prompt, an append over a cached prefix of random length, a sequence with no
    rows and an empty one; the rest random."""
    kinds = ["decode", "prompt", "append", "none", "empty"]
    kinds += list(rng.choice(kinds[:3], size=num_seqs - len(kinds)))
    rng.shuffle(kinds)
    lens = rng.integers(2, max_len, size=num_seqs)
    rows = []
    for i, kind in enumerate(kinds):
        if kind == "empty":
            lens[i] = 0
        n = int(lens[i])
        append = int(rng.integers(1, n)) if n > 1 else n
        rows.append({"decode": 1, "prompt": n, "append": append, "none": 0, "empty": 0}[kind])
    return lens, rows


def _prefill_case(rng, lens, rows, num_q_heads, num_kv_heads, head_dim, block_size, scale_mode):
    """A NaN-poisoned prefill case (pages in random physical order) whose caches hold quantised
    K/V: (case, key bits, value bits, k_scales, v_scales)."""
    case = R.PagedCase(rng, lens, num_q_heads, num_kv_heads, head_dim, block_size, query_rows=rows)
    k_scales = _scales(rng, scale_mode, num_kv_heads)
    v_scales = _scales(rng, scale_mode, num_kv_heads)
    key_bits = quantise(case.key_cache, k_scales[None, None, :, None])
    value_bits = quantise(case.value_cache, v_scales[None, None, :, None])
    return case, key_bits, value_bits, k_scales, v_scales


def _device_array(fw: str, device: str):
    if fw == "numpy":
        return lambda a: a
    return lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _run_prefill(case, kb, vb, ks, vs, fw, device, dtype, layout, scale_mode, **kw):
    """tinyserve's prefill over the float8 caches (out and lse NaN-poisoned) and float64 causal
    attention over the dequantised values times the scales, the query as the dtype holds it:
    (out, lse, reference out, reference lse), all float64."""
    kc, vc = _fp8_caches(kb, vb, fw, device, layout)
    q = _input(case.query, fw, dtype, device)
    put = _device_array(fw, device)
    out = empty(tuple(q.shape), fw, dtype, device)
    lse = empty(tuple(q.shape[:2]), fw, "float32", device)
    ts.paged_attention(
        q,
        kc,
        vc,
        put(case.block_table),
        put(case.seq_lens),
        out,
        lse=lse,
        query_start_loc=put(case.query_start_loc),
        k_scale=_scale_arg(ks, scale_mode, fw, device),
        v_scale=_scale_arg(vs, scale_mode, fw, device),
        kv_dtype=_kv_dtype(fw),
        **kw,
    )
    sync(fw, device)
    k = decode_e4m3(kb) * ks[None, None, :, None]
    v = decode_e4m3(vb) * vs[None, None, :, None]
    ref, ref_lse = prefill_reference(q, k, v, case, **kw)
    return f64(out), f64(lse), ref, ref_lse


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [(4, 4, 64, 16), (8, 2, 128, 16), (8, 1, 96, 7), (6, 2, 256, 1)],
)
def test_prefill_fp8(
    rng, backend, dtype, layout, scale_mode, num_q_heads, num_kv_heads, head_dim, block_size
):
    """Prefill rows (query_start_loc) over float8 caches against float64 causal attention over
    the dequantised values: ragged batches mixing decode steps, prompts, appends over cached
    prefixes of random length, sequences with no rows and empty ones; MHA, GQA and MQA; head dims
    with and without a 16-bit tensor-core kernel (CUDA runs float8 prefill on CUDA cores); pages
    of 1, 7 and 16 tokens; per-tensor and per-KV-head scales; every row and log-sum-exp
    written."""
    fw, device = backend
    _require(fw, dtype)
    lens, rows = _mixed_rows(rng, 8, 150)
    case, kb, vb, ks, vs = _prefill_case(
        rng, lens, rows, num_q_heads, num_kv_heads, head_dim, block_size, scale_mode
    )
    check_prefill(*_run_prefill(case, kb, vb, ks, vs, fw, device, dtype, layout, scale_mode), dtype)


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 40, "logits_soft_cap": 20.0},
        {"window_left": 0},
        {"scale": -0.2, "logits_soft_cap": 5.0},
    ],
)
def test_prefill_fp8_splits_window_soft_cap(rng, backend, num_splits, scale_mode, options):
    """Long cached prefixes under a few query rows with the keys split and merged, a sliding
    window (one key per row at window 0), a soft cap and a negative scale, over float8 caches."""
    fw, device = backend
    _require(fw, "float16")
    lens, rows = [700, 1, 333, 64, 0], [50, 1, 20, 64, 0]
    case, kb, vb, ks, vs = _prefill_case(rng, lens, rows, 8, 2, 128, 16, scale_mode)
    kw = dict(num_splits=num_splits, **options)
    check_prefill(
        *_run_prefill(case, kb, vb, ks, vs, fw, device, "float16", "NHD", scale_mode, **kw),
        "float16",
    )


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype,group", [("float16", 16), ("bfloat16", 20), ("float32", 3)])
def test_prefill_fp8_large_groups(rng, backend, dtype, group):
    """GQA groups that fill (16) or overflow (20: two head tiles per KV head) the CUDA-core
    kernel's 16 rows per CTA, and one that does not divide them (3), over float8 caches."""
    fw, device = backend
    _require(fw, dtype)
    lens, rows = _mixed_rows(rng, 6, 90)
    case, kb, vb, ks, vs = _prefill_case(rng, lens, rows, 2 * group, 2, 64, 16, "head")
    check_prefill(*_run_prefill(case, kb, vb, ks, vs, fw, device, dtype, "HND", "head"), dtype)


@pytest.mark.parametrize("backend", fp8_backends())
def test_prefill_fp8_chunked_equals_one_pass(rng, backend):
    """A 300-token prompt attended in chunks of 1, 63, 100 and 136 rows over the same float8
    cache (the lengths growing with each chunk) gives the rows of one pass, beside a sequence
    taking a decode step."""
    fw, device = backend
    _require(fw, "float16")
    prompt = 300
    one, kb, vb, ks, vs = _prefill_case(rng, [prompt, 500], [prompt, 1], 8, 2, 128, 16, "head")
    full_out, full_lse, ref, ref_lse = _run_prefill(
        one, kb, vb, ks, vs, fw, device, "float16", "NHD", "head"
    )
    check_prefill(full_out, full_lse, ref, ref_lse, "float16")
    done = 0
    for chunk in [1, 63, 100, 136]:
        case = R.PagedCase(rng, [done + chunk, 500], 8, 2, 128, 16, query_rows=[chunk, 1])
        case.block_table = one.block_table
        case.query = np.concatenate([one.query[done : done + chunk], one.query[prompt:]])
        out, lse, ref, ref_lse = _run_prefill(
            case, kb, vb, ks, vs, fw, device, "float16", "NHD", "head"
        )
        check_prefill(out, lse, ref, ref_lse, "float16")
        assert R.rel_error(out[:chunk], full_out[done : done + chunk]) < TOLERANCE["float16"]
        np.testing.assert_allclose(lse[:chunk], full_lse[done : done + chunk], rtol=1e-4, atol=1e-3)
        done += chunk
    assert done == prompt


# --- argument checks ---------------------------------------------------------------------------


def _small_fp8(fw):
    poison = np.full((4, 4, 2, 16), FP8_NAN, dtype=np.uint8)
    return _fp8_caches(poison, poison.copy(), fw, "cpu", "NHD")


@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(k_scale=0.0), "k_scale must be positive and finite, got 0"),
        (dict(v_scale=-1.0), "v_scale must be positive and finite, got -1"),
        (dict(k_scale=float("nan")), "k_scale must be positive and finite"),
        (dict(v_scale=float("inf")), "v_scale must be positive and finite"),
        (dict(k_scale=np.ones(3, np.float32)), r"k_scale dimension 0 \(num_kv_heads"),
        (dict(k_scale=np.ones((2, 1), np.float32)), "k_scale must have 1 dimensions"),
        (dict(v_scale=np.ones(2, np.float16)), "v_scale must be float32, got float16"),
        (dict(v_scale=np.ones(2, np.float64)), "v_scale must be float32, got float64"),
        (dict(v_scale=np.array([1.0, -2.0], np.float32)), r"v_scale\[1\] must be positive"),
        (dict(k_scale=np.array([np.nan, 1.0], np.float32)), r"k_scale\[0\] must be positive"),
    ],
)
def test_bad_scales_write_nothing(rng, fw, bad, match):
    """A rejected scale raises ValueError before anything is written (caches keep their poison;
    attention's output stays NaN)."""
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    if fw == "torch":
        bad = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in bad.items()}
    kc, vc = _small_fp8(fw)
    kv = _kv_dtype(fw)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    slots = np.array([0, 5, 9], dtype=np.int64)
    if fw == "torch":
        x, slots = torch.from_numpy(x), torch.from_numpy(slots)
    with pytest.raises(ValueError, match=match):
        ts.reshape_and_cache(x, x, kc, vc, slots, kv_dtype=kv, **bad)
    assert (_bits(kc) == FP8_NAN).all() and (_bits(vc) == FP8_NAN).all()
    q = rng.standard_normal((1, 2, 16)).astype(np.float32)
    table, lens = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    out = np.full(q.shape, np.nan, np.float32)
    if fw == "torch":
        q, table, lens, out = (torch.from_numpy(a) for a in (q, table, lens, out))
    with pytest.raises(ValueError, match=match):
        ts.paged_attention(q, kc, vc, table, lens, out, kv_dtype=kv, **bad)
    assert np.isnan(f64(out)).all()


def test_scales_need_a_float8_cache(rng):
    cache = np.full((4, 4, 2, 16), np.nan, np.float32)
    x = rng.standard_normal((1, 2, 16)).astype(np.float32)
    with pytest.raises(
        ValueError, match="k_scale applies to float8_e4m3fn caches only, got a float32"
    ):
        ts.reshape_and_cache(x, x, cache, cache.copy(), np.array([0]), k_scale=2.0)
    with pytest.raises(ValueError, match="v_scale applies to float8_e4m3fn caches only"):
        ts.paged_attention(
            x,
            cache,
            cache,
            np.zeros((1, 1), np.int32),
            np.ones(1, np.int32),
            v_scale=np.ones(2, np.float32),
        )
    assert np.isnan(cache).all()


def test_kv_dtype_checks(rng):
    """NumPy's uint8 bits are float8 only when kv_dtype says so; other names and dtypes are
    refused."""
    bits = np.full((4, 4, 2, 16), FP8_NAN, np.uint8)
    x = rng.standard_normal((1, 2, 16)).astype(np.float32)
    slots = np.array([0])
    with pytest.raises(
        ValueError, match="key_cache must be float32, float16 or bfloat16, got uint8"
    ):
        ts.reshape_and_cache(x, x, bits, bits.copy(), slots)
    with pytest.raises(ValueError, match="kv_dtype must be None or 'float8_e4m3fn', got 'fp8'"):
        ts.reshape_and_cache(x, x, bits, bits.copy(), slots, kv_dtype="fp8")
    floats = np.zeros((4, 4, 2, 16), np.float32)
    with pytest.raises(ValueError, match="key_cache must be uint8 or float8_e4m3fn"):
        ts.reshape_and_cache(x, x, floats, floats.copy(), slots, kv_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="key must be float32, float16 or bfloat16, got int32"):
        ts.reshape_and_cache(
            x.astype(np.int32),
            x.astype(np.int32),
            bits,
            bits.copy(),
            slots,
            kv_dtype="float8_e4m3fn",
        )
    assert (bits == FP8_NAN).all()


def test_copy_and_swap_are_byte_copies(rng):
    """Block copies move float8 blocks bit for bit (NaN patterns included)."""
    if torch is None:
        pytest.skip("torch is not installed")
    bits = rng.integers(0, 256, size=(6, 4, 2, 16), dtype=np.uint8)
    cache = torch.from_numpy(bits.copy()).view(torch.float8_e4m3fn)
    ts.copy_blocks([cache], np.array([0, 2], np.int32), np.array([4, 5], np.int32))
    expected = bits.copy()
    expected[[4, 5]] = bits[[0, 2]]
    np.testing.assert_array_equal(cache.view(torch.uint8).numpy(), expected)
    dst = torch.zeros_like(cache)
    ts.swap_blocks(cache, dst, np.array([1], np.int32), np.array([3], np.int32))
    np.testing.assert_array_equal(dst.view(torch.uint8).numpy()[3], expected[1])


def test_copy_and_swap_take_ml_dtypes_numpy_arrays(rng):
    """NumPy caches of ml_dtypes' float8 (and bfloat16) types, which reshape_and_cache and
    paged_attention take, are block-copied and swapped bit for bit too (NumPy exports no such
    type: the copies read their bits); a swap pairs such an array with a torch tensor of the
    same type."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype, width in ((ml_dtypes.float8_e4m3fn, np.uint8), (ml_dtypes.bfloat16, np.uint16)):
        bits = rng.integers(0, np.iinfo(width).max + 1, size=(6, 4, 2, 16)).astype(width)
        cache = bits.copy().view(dtype)
        meta = rng.standard_normal((6, 2, 2, 16)).astype(np.float32)
        expected, expected_meta = bits.copy(), meta.copy()
        expected[[4, 5]] = bits[[0, 2]]
        expected_meta[[4, 5]] = meta[[0, 2]]
        ts.copy_blocks([cache, meta], np.array([0, 2], np.int32), np.array([4, 5], np.int32))
        np.testing.assert_array_equal(cache.view(width), expected)
        np.testing.assert_array_equal(meta, expected_meta)
        dst = np.zeros_like(cache)
        ts.swap_blocks(cache, dst, np.array([1, 5], np.int32), np.array([3, 0], np.int32))
        np.testing.assert_array_equal(dst.view(width)[[3, 0]], expected[[1, 5]])
        np.testing.assert_array_equal(dst.view(width)[[1, 2, 4, 5]], 0)
    if torch is not None:
        bits = rng.integers(0, 256, size=(6, 4, 2, 16), dtype=np.uint8)
        host = bits.copy().view(ml_dtypes.float8_e4m3fn)
        other = torch.zeros((6, 4, 2, 16), dtype=torch.float8_e4m3fn)
        ts.swap_blocks(host, other, np.array([2], np.int32), np.array([1], np.int32))
        np.testing.assert_array_equal(other.view(torch.uint8).numpy()[1], bits[2])
        ts.swap_blocks(other, host, np.array([1], np.int32), np.array([4], np.int32))
        np.testing.assert_array_equal(host.view(np.uint8)[4], bits[2])


def test_scales_refuse_bools():
    """A bool where a float is expected (k_scale, v_scale, scale, logits_soft_cap) is refused
    with the argument named, before anything is written, as bools are for int arguments."""
    kc = np.zeros((2, 4, 1, 8), np.uint8)
    vc = np.zeros_like(kc)
    x = np.ones((1, 1, 8), np.float32)
    for name in ("k_scale", "v_scale"):
        with pytest.raises(ts.ArgumentTypeError, match=f"{name} must be a float, got bool"):
            ts.reshape_and_cache(
                x, x, kc, vc, np.array([0], np.int64), kv_dtype="float8_e4m3fn", **{name: True}
            )
        assert not kc.any() and not vc.any()
    kf, vf = np.ones((2, 4, 1, 8), np.float32), np.ones((2, 4, 1, 8), np.float32)
    table, lens = np.array([[0]], np.int32), np.array([3], np.int32)
    for name, value in (("k_scale", True), ("scale", True), ("logits_soft_cap", False)):
        out = np.full((1, 1, 8), np.nan, np.float32)
        cache = (kc, vc) if name == "k_scale" else (kf, vf)
        extra = {"kv_dtype": "float8_e4m3fn"} if name == "k_scale" else {}
        with pytest.raises(ts.ArgumentTypeError, match=f"{name} must be a float, got bool"):
            ts.paged_attention(x, *cache, table, lens, out, **{name: value}, **extra)
        assert np.isnan(out).all()


# --- CUDA only ---------------------------------------------------------------------------------


def _graph_write_buffers(shape, num_rows: int, device: str = "cuda"):
    """The device buffers a captured float8 write reads and writes: zeroed float8 caches of
    `shape`, per-head scales of 1, float16 keys and values of `num_rows` rows and their slots
    (-1: skipped until a replay writes real ones)."""
    num_kv_heads, head_dim = shape[2:]
    kc = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
    vc = torch.zeros_like(kc)
    k_scale = torch.ones(num_kv_heads, dtype=torch.float32, device=device)
    v_scale = torch.ones_like(k_scale)
    new_k = torch.zeros((num_rows, num_kv_heads, head_dim), dtype=torch.float16, device=device)
    new_v = torch.zeros_like(new_k)
    slots = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    return kc, vc, k_scale, v_scale, new_k, new_v, slots


def _fresh_writes(rng, block_table: np.ndarray, shape):
    """One replay's writes: per-head key and value scales, float16-rounded keys and values, and
    their slots, every position of every block in `block_table`."""
    block_size, num_kv_heads, head_dim = shape[1:]
    ks = rng.uniform(0.005, 0.05, size=num_kv_heads).astype(np.float32)
    vs = rng.uniform(0.005, 0.05, size=num_kv_heads).astype(np.float32)
    rows = (block_table.size * block_size, num_kv_heads, head_dim)
    kx = _round_to(rng.standard_normal(rows), "float16")
    vx = _round_to(rng.standard_normal(rows), "float16")
    slots = (block_table[..., None] * block_size + np.arange(block_size)).reshape(-1)
    return ks, vs, kx, vx, slots.astype(np.int64)


def _written_caches(kx, vx, ks, vs, slots, shape):
    """The model of zeroed float8 caches of `shape` after the write: (key bits by slot
    [num_slots, num_kv_heads, head_dim], dequantised keys and values in `shape`)."""
    key_bits = np.zeros((shape[0] * shape[1],) + tuple(shape[2:]), np.uint8)
    value_bits = key_bits.copy()
    key_bits[slots] = quantise(kx, ks[None, :, None])
    value_bits[slots] = quantise(vx, vs[None, :, None])
    kd = decode_e4m3(key_bits.reshape(shape)) * ks[None, None, :, None]
    vd = decode_e4m3(value_bits.reshape(shape)) * vs[None, None, :, None]
    return key_bits, kd, vd


@pytest.mark.cuda
def test_fp8_cuda_graph_replay_reads_device_scales(rng):
    """Quantising writes and decode captured in one CUDA graph with per-head scales in device
    memory: each replay uses the scales, inputs, tables and lengths of that moment."""
    num_blocks, block_size, heads, group, dim, batch, max_blocks = 64, 16, 2, 4, 128, 3, 8
    shape = (num_blocks, block_size, heads, dim)
    kc, vc, k_scale, v_scale, new_k, new_v, slots = _graph_write_buffers(
        shape, batch * max_blocks * block_size
    )
    q = torch.zeros((batch, heads * group, dim), dtype=torch.float16, device="cuda")
    table = torch.zeros((batch, max_blocks), dtype=torch.int32, device="cuda")
    lens = torch.ones((batch,), dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    splits, nbytes = ts.plan_paged_attention(q, kc, table, num_splits=3)
    workspace = torch.empty((nbytes,), dtype=torch.uint8, device="cuda")

    def step():
        ts.reshape_and_cache(new_k, new_v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
        ts.paged_attention(
            q,
            kc,
            vc,
            table,
            lens,
            out,
            k_scale=k_scale,
            v_scale=v_scale,
            num_splits=3,
            workspace=workspace,
        )

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new_lens = rng.integers(0, max_blocks * block_size + 1, size=batch).astype(np.int32)
        new_table = rng.permutation(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
        new_table = new_table.astype(np.int32)
        ks, vs, kx, vx, new_slots = _fresh_writes(rng, new_table, shape)
        k_scale.copy_(torch.from_numpy(ks))
        v_scale.copy_(torch.from_numpy(vs))
        new_k.copy_(torch.from_numpy(kx))
        new_v.copy_(torch.from_numpy(vx))
        slots.copy_(torch.from_numpy(new_slots))
        q.copy_(torch.from_numpy(rng.standard_normal(q.shape)).half())
        table.copy_(torch.from_numpy(new_table))
        lens.copy_(torch.from_numpy(new_lens))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        key_bits, kd, vd = _written_caches(kx, vx, ks, vs, new_slots, shape)
        stored = kc.view(torch.uint8).cpu().numpy().reshape(key_bits.shape)[new_slots]
        np.testing.assert_array_equal(stored, key_bits[new_slots])
        ref, _ = R.paged_attention(f64(q), kd, vd, new_table, new_lens)
        assert R.rel_error(f64(out), ref) < TOLERANCE["float16"]


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [None, 3])
def test_prefill_fp8_cuda_graph_replay(rng, num_splits):
    """Quantising writes and a mixed prefill/decode step captured in one CUDA graph over float8
    caches with per-head scales in device memory, the split planned (workspace kept by the Python
    layer) or fixed (workspace passed in): each replay uses the query_start_loc, lengths, tables,
    scales, keys, values and queries of that moment."""
    num_blocks, block_size, heads, group, dim, batch, max_blocks = 64, 16, 2, 4, 128, 4, 8
    total = 120  # query rows of every replay, split differently among the sequences
    shape = (num_blocks, block_size, heads, dim)
    kc, vc, k_scale, v_scale, new_k, new_v, slots = _graph_write_buffers(
        shape, batch * max_blocks * block_size
    )
    q, starts, table, lens, out, lse = prefill_graph_buffers(
        batch, total, max_blocks, heads * group, dim
    )
    kw = dict(
        lse=lse,
        num_splits=num_splits,
        query_start_loc=starts,
        max_seq_len=max_blocks * block_size,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    if num_splits is not None:
        _, nbytes = ts.plan_paged_attention(
            q, kc, table, num_splits=num_splits, query_start_loc=starts
        )
        kw["workspace"] = torch.empty((nbytes,), dtype=torch.uint8, device="cuda")

    def step():
        ts.reshape_and_cache(new_k, new_v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
        ts.paged_attention(q, kc, vc, table, lens, out, **kw)

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()  # warm-up outside capture (plans and allocates the kept workspace)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        step()
    for _ in range(3):
        new_starts, rows = random_row_split(rng, batch, total)
        prefix = rng.integers(0, max_blocks * block_size - rows + 1)
        new_lens = (rows + prefix).astype(np.int32)
        new_lens[rows == 0] = rng.integers(0, max_blocks * block_size + 1)
        new_table = rng.permutation(num_blocks)[: batch * max_blocks].reshape(batch, max_blocks)
        new_table = new_table.astype(np.int32)
        ks, vs, kx, vx, new_slots = _fresh_writes(rng, new_table, shape)
        for device_array, value in (
            (k_scale, ks),
            (v_scale, vs),
            (new_k, kx),
            (new_v, vx),
            (slots, new_slots),
            (q, rng.standard_normal(tuple(q.shape))),
            (starts, new_starts),
            (table, new_table),
            (lens, new_lens),
        ):
            device_array.copy_(torch.from_numpy(value))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _, kd, vd = _written_caches(kx, vx, ks, vs, new_slots, shape)
        ref, ref_lse = R.paged_prefill(f64(q), kd, vd, new_table, new_lens, new_starts)
        check_prefill(f64(out), f64(lse), ref, ref_lse, "float16")


@pytest.mark.cuda
def test_prefill_fp8_planned_split(rng):
    """One chunk of 64 rows over a 12k-token prefix in float8 caches: the planner splits it
    (the CUDA-core kernel's tiles alone would leave the GPU short of work), and the split result
    matches the reference."""
    case, kb, vb, ks, vs = _prefill_case(rng, [12000], [64], 16, 4, 128, 16, "tensor")
    put = _device_array("torch", "cuda")
    splits, nbytes = ts.plan_paged_attention(
        _input(case.query, "torch", "float16", "cuda"),
        _fp8_caches(kb, vb, "torch", "cuda", "NHD")[0],
        put(case.block_table),
        query_start_loc=put(case.query_start_loc),
    )
    assert splits > 1 and nbytes > 0
    check_prefill(
        *_run_prefill(case, kb, vb, ks, vs, "torch", "cuda", "float16", "NHD", "tensor"),
        "float16",
    )


@pytest.mark.cuda
def test_prefill_fp8_untrusted_device_offsets_stay_in_bounds(rng):
    """query_start_loc on the device is not checked: offsets that decrease, pass the last row or
    are negative touch no row outside out and lse (guard rows stay NaN), read nothing outside
    the float8 caches, and still write every row."""
    case, kb, vb, ks, vs = _prefill_case(rng, [50, 80, 30], [20, 30, 10], 8, 2, 96, 16, "head")
    kc, vc = _fp8_caches(kb, vb, "torch", "cuda", "NHD")
    q = _input(case.query, "torch", "float16", "cuda")
    total = q.shape[0]
    put = _device_array("torch", "cuda")
    table, seq_lens = put(case.block_table), put(case.seq_lens)
    k_scale = _scale_arg(ks, "head", "torch", "cuda")
    v_scale = _scale_arg(vs, "head", "torch", "cuda")
    check_offsets_stay_in_bounds(
        lambda starts, out, lse: ts.paged_attention(
            q,
            kc,
            vc,
            table,
            seq_lens,
            out,
            lse=lse,
            query_start_loc=starts,
            k_scale=k_scale,
            v_scale=v_scale,
        ),
        q,
        [[0, 40, 10, total], [0, 10, total + 500, total], [-30, 5, 20, total], [0, 0, 0, 0]],
    )


# --- per-KV-head tables and page summaries (selection) -----------------------------------------


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
def test_per_head_tables_fp8(rng, backend, dtype, layout, scale_mode):
    """Sparse decode over float8 caches: each KV head reads its own pages and length, dequantised
    with its own scale, against float64 attention over the dequantised values."""
    fw, device = backend
    _require(fw, dtype)
    block_size, heads, group, dim = 16, 3, 2, 64
    batch, num_blocks, width = 3, 30, 7
    key = rng.standard_normal((num_blocks, block_size, heads, dim))
    value = rng.standard_normal((num_blocks, block_size, heads, dim))
    k_scales, v_scales = _scales(rng, scale_mode, heads), _scales(rng, scale_mode, heads)
    key_bits = quantise(key * k_scales[:, None] * 40, k_scales[None, None, :, None])
    value_bits = quantise(value * v_scales[:, None] * 40, v_scales[None, None, :, None])
    table = np.stack(
        [[rng.permutation(num_blocks)[:width] for _ in range(heads)] for _ in range(batch)]
    ).astype(np.int32)
    lens = rng.integers(0, width * block_size + 1, size=(batch, heads)).astype(np.int32)
    lens[0, 0] = 0
    lens[1, 2] = 1
    kc, vc = _fp8_caches(key_bits, value_bits, fw, device, layout)
    q = _input(rng.standard_normal((batch, heads * group, dim)), fw, dtype, device)
    k64 = decode_e4m3(key_bits) * k_scales[None, None, :, None]
    v64 = decode_e4m3(value_bits) * v_scales[None, None, :, None]
    want = R.paged_attention_per_kv_head(f64(q), k64, v64, table, lens)
    if fw == "numpy":
        t, n = table, lens
    else:
        t, n = torch.from_numpy(table).to(device), torch.from_numpy(lens).to(device)
    for splits in (1, 3):
        if fw == "numpy":
            out = np.full(q.shape, np.nan, dtype=dtype)
        else:
            out = torch.full(q.shape, float("nan"), dtype=getattr(torch, dtype), device=device)
        ts.paged_attention(
            q,
            kc,
            vc,
            t,
            n,
            out,
            num_splits=splits,
            k_scale=_scale_arg(k_scales, scale_mode, fw, device),
            v_scale=_scale_arg(v_scales, scale_mode, fw, device),
            kv_dtype=_kv_dtype(fw),
        )
        sync(fw, device)
        assert R.rel_error(f64(out), want) < TOLERANCE[dtype]


def _fp8_meta(shape, meta_dtype, fw, device):
    """NaN-poisoned page summaries of `meta_dtype` (float8: test_selection_fp8's)."""
    if meta_dtype == "float8_e4m3fn":
        return fp8_empty(shape, fw, device)
    if fw == "numpy":
        return np.full(shape, np.nan, dtype=meta_dtype)
    return torch.full(shape, float("nan"), dtype=getattr(torch, meta_dtype), device=device)


def _meta64(meta) -> np.ndarray:
    """float64 values of page summaries of any dtype (float8 decoded from its bits)."""
    if "float8_e4m3fn" in str(getattr(meta, "dtype", "")):  # torch's or ml_dtypes' float8
        return decode_e4m3(bits_of(meta))
    return f64(meta)


def _summary_reference(stored, meta_dtype, summary):
    """Rows (min, max) or (mean, std) over axis 0 of keys as a float8 cache holds them (float32
    products), rounded as the summaries store them: float8 outward (floor8 / ceil8), 16-bit to
    nearest."""
    if summary == "meanstd":
        return np.stack([stored.mean(0), stored.std(0)])
    lo, hi = stored.min(0), stored.max(0)
    if meta_dtype == "float8_e4m3fn":
        return np.stack([floor8(lo), ceil8(hi)])
    return np.stack([_round_to(lo, meta_dtype), _round_to(hi, meta_dtype)])


def _check_summaries(meta, written, meta_dtype, summary, num_blocks):
    """Every written page's summary against the reference over its keys as stored; pages never
    written keep their NaN poison."""
    got = _meta64(meta)
    for block in range(num_blocks):
        if block not in written:
            assert np.isnan(got[block]).all()
            continue
        want = _summary_reference(np.stack(written[block]), meta_dtype, summary)
        for h in range(got.shape[1]):
            if summary == "meanstd":  # sums in another order (and float32 on the GPU)
                tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[meta_dtype]
                scale = np.abs(want[:, h]).max()
                np.testing.assert_allclose(got[block, h], want[:, h], rtol=tol, atol=tol * scale)
            else:  # min/max select a key exactly, then round once
                np.testing.assert_array_equal(got[block, h], want[:, h])


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scale_mode", ["tensor", "head"])
@pytest.mark.parametrize(
    "summary, float8_meta",
    [("minmax", False), ("meanstd", False), ("minmax", True)],
    ids=["minmax", "meanstd", "minmax-float8-summaries"],
)
def test_page_summaries_of_float8_caches(rng, backend, dtype, scale_mode, summary, float8_meta):
    """Page summaries written with a float8 cache, in the keys' dtype or float8, are of the keys
    as the cache holds them (x / k_scale rounded to e4m3, times k_scale, in float32): every page
    after each of two writes in random slot order (pages started, extended at later offsets,
    restarted at offset 0), against the float64 reference over the independent e4m3 model; then
    build_page_meta over the filled cache gives the same summaries."""
    fw, device = backend
    _require(fw, dtype)
    if fw == "numpy" and float8_meta and ml_dtypes is None:
        pytest.skip("NumPy float8 summaries need ml_dtypes")
    meta_dtype = "float8_e4m3fn" if float8_meta else dtype
    num_blocks, block_size, heads, dim = 7, 4, 2, 16
    k_scales, v_scales = _scales(rng, scale_mode, heads), _scales(rng, scale_mode, heads)
    poison = np.full((num_blocks, block_size, heads, dim), FP8_NAN, np.uint8)
    kc, vc = _fp8_caches(poison, poison.copy(), fw, device, "NHD")
    meta = _fp8_meta((num_blocks, heads, 2, dim), meta_dtype, fw, device)
    written = {}  # block -> keys as stored, in offset order
    # Call 1 fills offsets 0-2 of blocks 0-3; call 2 extends them at offset 3 and restarts
    # block 1 from offset 0 together with block 4, each call in random slot order.
    calls = [
        [(b, o) for b in range(4) for o in range(3)],
        [(b, 3) for b in (0, 2, 3)] + [(1, o) for o in range(4)] + [(4, o) for o in range(2)],
    ]
    for places in calls:
        places = [places[i] for i in rng.permutation(len(places))]
        x = rng.standard_normal((len(places), heads, dim)) * 40 * k_scales[None, :, None]
        x[0, 0, 0] = 600 * k_scales[0]  # saturates to 448 * scale
        x = _round_to(x, dtype)
        slots = np.array([b * block_size + o for b, o in places], np.int64)
        stored = np.float32(decode_e4m3(quantise(x, k_scales[None, :, None])))
        stored = stored * k_scales[None, :, None]  # float32 products, as the kernels form them
        for block in {b for b, o in places if o == 0}:
            written[block] = [None] * block_size
        for (block, offset), key in zip(places, stored.astype(np.float64)):
            written[block][offset] = key
        xs = _input(x, fw, dtype, device)
        ts.reshape_and_cache(
            xs,
            xs,
            kc,
            vc,
            _device_array(fw, device)(slots),
            meta,
            summary=summary,
            k_scale=_scale_arg(k_scales, scale_mode, fw, device),
            v_scale=_scale_arg(v_scales, scale_mode, fw, device),
            kv_dtype=_kv_dtype(fw),
        )
        sync(fw, device)
        keys = {b: [k for k in ks if k is not None] for b, ks in written.items()}
        _check_summaries(meta, keys, meta_dtype, summary, num_blocks)
    # The filled cache summarised again: the same summaries (min/max to the bit).
    lens = np.array([4, 4, 4, 4, 2], np.int32)
    table = np.array([[b, num_blocks - 1] for b in range(5)], np.int32)  # block 6 past the lengths
    rebuilt = _fp8_meta((num_blocks, heads, 2, dim), meta_dtype, fw, device)
    asdev = _device_array(fw, device)
    ts.build_page_meta(
        kc,
        asdev(table),
        asdev(lens),
        rebuilt,
        summary=summary,
        k_scale=_scale_arg(k_scales, scale_mode, fw, device),
        kv_dtype=_kv_dtype(fw),
    )
    sync(fw, device)
    _check_summaries(rebuilt, keys, meta_dtype, summary, num_blocks)
    if summary != "meanstd":
        np.testing.assert_array_equal(_meta64(rebuilt)[:5], _meta64(meta)[:5])


@pytest.mark.parametrize("backend", fp8_backends())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sparse_decode_over_float8_caches(rng, backend, dtype):
    """select_pages over summaries written with a float8 cache, then sparse decode: a key planted
    along the query is kept for every KV head under a 4-page budget, and the attention over the
    selected pages equals float64 attention over the same pages' keys as stored; a budget
    covering every page selects the dense table."""
    fw, device = backend
    _require(fw, dtype)
    block_size, heads, group, dim, length = 16, 2, 2, 64, 1000
    scales = _scales(rng, "head", heads)
    pages = (length + block_size - 1) // block_size
    num_blocks = pages + 3
    table = rng.permutation(num_blocks)[:pages].astype(np.int32)[None, :]
    x = rng.standard_normal((length, heads, dim))
    query = rng.standard_normal((1, heads * group, dim))
    needle = int(rng.integers(0, length - block_size))
    for h in range(heads):
        direction = query[0, group * h : group * (h + 1)].sum(0)
        x[needle, h] = 4 * direction / np.linalg.norm(direction) * np.sqrt(dim)
    x = _round_to(x * 40 * scales[None, :, None] / 4, dtype)
    pos = np.arange(length)
    slots = table[0, pos // block_size].astype(np.int64) * block_size + pos % block_size
    poison = np.full((num_blocks, block_size, heads, dim), FP8_NAN, np.uint8)
    kc, vc = _fp8_caches(poison, poison.copy(), fw, device, "NHD")
    meta = _fp8_meta((num_blocks, heads, 2, dim), dtype, fw, device)
    xs, q = _input(x, fw, dtype, device), _input(query, fw, dtype, device)
    scale = _scale_arg(scales, "head", fw, device)
    asdev = _device_array(fw, device)
    ts.reshape_and_cache(
        xs, xs, kc, vc, asdev(slots), meta, k_scale=scale, v_scale=scale, kv_dtype=_kv_dtype(fw)
    )
    lens = np.array([length], np.int32)
    stored = decode_e4m3(_bits(kc)).astype(np.float32) * scales[None, None, :, None]
    stored = stored.astype(np.float64)
    for budget in (4, pages):
        got_t, got_l = ts.select_pages(
            q, meta, asdev(table), asdev(lens), budget, block_size=block_size
        )
        out = ts.paged_attention(
            q, kc, vc, got_t, got_l, k_scale=scale, v_scale=scale, kv_dtype=_kv_dtype(fw)
        )
        sync(fw, device)
        t_np, l_np = np.asarray(f64(got_t), np.int32), np.asarray(f64(got_l), np.int32)
        if budget == pages:
            np.testing.assert_array_equal(t_np[0], np.repeat(table, heads, 0))
            np.testing.assert_array_equal(l_np[0], [length] * heads)
        else:
            for h in range(heads):
                assert table[0, needle // block_size] in t_np[0, h, :budget]
        want = R.paged_attention_per_kv_head(f64(q), stored, stored, t_np, l_np)
        assert R.rel_error(f64(out), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_float8_cache_summaries_refuse_bad_input(rng, fw):
    """Summaries of a float8 cache: a dtype other than the keys' (writes) or a float one
    (builds), mean/std in float8, and bad scales are refused with ValueError before anything is
    written; a scale is refused for a 16-bit cache."""
    if torch is None:
        pytest.skip("torch is not installed")
    kc, vc = _small_fp8(fw)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    slots = np.array([0, 5, 9], dtype=np.int64)
    table, lens = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    half = np.full((4, 2, 2, 16), np.nan, np.float16)
    ints32 = np.zeros((4, 2, 2, 16), np.int32)
    if fw == "torch":
        x, slots, table, lens, half, ints32 = (
            torch.from_numpy(a) for a in (x, slots, table, lens, half, ints32)
        )
    fp8_meta = (
        _fp8_meta((4, 2, 2, 16), "float8_e4m3fn", fw, "cpu")
        if (fw == "torch" or ml_dtypes is not None)
        else None
    )
    kv = _kv_dtype(fw)
    w = r"^tinyserve\.reshape_and_cache: "
    b = r"^tinyserve\.build_page_meta: "
    with pytest.raises(
        ValueError,
        match=w + r"page_meta must have the dtype of the keys written "
        r"\(float32\) or float8_e4m3fn, got float16",
    ):
        ts.reshape_and_cache(x, x, kc, vc, slots, half, kv_dtype=kv)
    with pytest.raises(
        ValueError,
        match=b + "page_meta of a float8_e4m3fn key cache must be "
        "float32, float16, bfloat16 or float8_e4m3fn, got int32",
    ):
        ts.build_page_meta(kc, table, lens, ints32, kv_dtype=kv)
    with pytest.raises(ValueError, match=b + "k_scale must be positive and finite, got -2"):
        ts.build_page_meta(kc, table, lens, half, k_scale=-2.0, kv_dtype=kv)
    if fp8_meta is not None:
        with pytest.raises(ValueError, match=b + "float8_e4m3fn page summaries take the min/max"):
            ts.build_page_meta(kc, table, lens, fp8_meta, summary="meanstd", kv_dtype=kv)
        assert np.isnan(_meta64(fp8_meta)).all()
    assert (_bits(kc) == FP8_NAN).all() and (_bits(vc) == FP8_NAN).all()
    assert np.isnan(f64(half)).all()
    floats = np.full((4, 4, 2, 16), np.nan, np.float32)
    floats_v, meta32 = floats.copy(), np.full((4, 2, 2, 16), np.nan, np.float32)
    if fw == "torch":
        floats, floats_v, meta32 = (torch.from_numpy(a) for a in (floats, floats_v, meta32))
    with pytest.raises(ValueError, match="k_scale applies to float8_e4m3fn caches only"):
        ts.reshape_and_cache(x, x, floats, floats_v, slots, meta32, k_scale=2.0)
    with pytest.raises(ValueError, match=b + "k_scale applies to float8_e4m3fn caches only"):
        ts.build_page_meta(floats, table, lens, meta32, k_scale=2.0)
    assert np.isnan(f64(floats)).all() and np.isnan(f64(meta32)).all()


def test_float8_cache_summaries_refuse_a_scale_inside_them(rng):
    """Per-head scales are read while the summaries are written: a k_scale (or v_scale) that is a
    view into page_meta is refused by both writers before anything is written."""
    kc, vc = _small_fp8("numpy")
    meta = np.full((4, 2, 2, 16), np.nan, np.float32)
    inside = meta.reshape(-1)[:2]  # two float32 entries of the summaries, valid scales
    inside[:] = 0.5
    before = meta.copy()
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    slots = np.array([0, 5, 9], dtype=np.int64)
    table, lens = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    overlap = "page_meta and {} must not share memory"
    for name in ("k_scale", "v_scale"):
        with pytest.raises(ValueError, match=overlap.format(name)):
            ts.reshape_and_cache(
                x, x, kc, vc, slots, meta, kv_dtype="float8_e4m3fn", **{name: inside}
            )
    with pytest.raises(ValueError, match=overlap.format("k_scale")):
        ts.build_page_meta(kc, table, lens, meta, k_scale=inside, kv_dtype="float8_e4m3fn")
    assert (_bits(kc) == FP8_NAN).all() and (_bits(vc) == FP8_NAN).all()
    np.testing.assert_array_equal(meta, before)  # NaN-aware


@pytest.mark.parametrize("explicit", [False, True], ids=["inferred", "kv_dtype"])
def test_numpy_float8_caches_of_ml_dtypes(rng, explicit):
    """NumPy caches of ml_dtypes' float8_e4m3fn go in as they are (both caches viewed, whether
    kv_dtype is given or found from the key cache): written like uint8 bit caches, attended
    like them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    n, p, h, d = 4, 16, 2, 64
    kc = np.zeros((n, p, h, d), ml_dtypes.float8_e4m3fn)
    vc = np.zeros_like(kc)
    bits_k = np.zeros((n, p, h, d), np.uint8)
    bits_v = np.zeros_like(bits_k)
    x = rng.standard_normal((2, 40, h, d)).astype(np.float32)
    slots = rng.permutation(n * p)[:40].astype(np.int64)
    kw = {"kv_dtype": "float8_e4m3fn"} if explicit else {}
    ts.reshape_and_cache(x[0], x[1], kc, vc, slots, k_scale=0.5, v_scale=0.25, **kw)
    ts.reshape_and_cache(
        x[0], x[1], bits_k, bits_v, slots, k_scale=0.5, v_scale=0.25, kv_dtype="float8_e4m3fn"
    )
    np.testing.assert_array_equal(kc.view(np.uint8), bits_k)
    np.testing.assert_array_equal(vc.view(np.uint8), bits_v)
    q = rng.standard_normal((2, 4, d)).astype(np.float32)
    table = np.array([[0, 1, 2], [3, 2, 1]], np.int32)
    lens = np.array([40, 33], np.int32)
    out = ts.paged_attention(q, kc, vc, table, lens, k_scale=0.5, v_scale=0.25, **kw)
    k = decode_e4m3(bits_k) * 0.5
    v = decode_e4m3(bits_v) * 0.25
    ref, _ = R.paged_attention(q.astype(np.float64), k, v, table, lens)
    assert R.rel_error(out, ref) < TOLERANCE["float32"]
