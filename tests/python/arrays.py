"""Test helpers: put NumPy data into a framework's arrays (dtype, device, cache layout) and read
results back as float64."""

from __future__ import annotations

import numpy as np
import pytest

import reference
import tinyserve

try:
    import torch
except ImportError:  # torch is a test dependency, but keep NumPy-only runs possible
    torch = None

DTYPES = ["float32", "float16", "bfloat16"]
# Relative L2 error allowed against the float64 reference, by storage dtype: the inputs are
# rounded to the dtype before the reference sees them, so this bounds the kernel's own error
# (float32 accumulation, rounding of the output, 16-bit probabilities on tensor cores).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
CACHE_LAYOUTS = ["NHD", "HND", "NHD_combined", "HND_combined"]


def backends():
    """(framework, device) pairs to run: NumPy and torch on the CPU, torch on CUDA (marked)."""
    out = [pytest.param(("numpy", "cpu"), id="numpy-cpu")]
    if torch is not None:
        out.append(pytest.param(("torch", "cpu"), id="torch-cpu"))
        out.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda))
    return out


def require(fw: str, dtype: str) -> None:
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    if fw == "numpy" and dtype == "bfloat16":
        pytest.skip("NumPy has no bfloat16")


def _torch_dtype(dtype: str):
    return getattr(torch, dtype)


def asarray(x: np.ndarray, fw: str, dtype: str | None = None, device: str = "cpu"):
    """x converted to the framework, dtype and device (integer arrays keep their dtype)."""
    x = np.ascontiguousarray(x)
    if fw == "numpy":
        return x if dtype is None else x.astype(dtype)
    t = torch.from_numpy(x)
    if dtype is not None:
        t = t.to(_torch_dtype(dtype))
    return t.to(device)


def empty(shape, fw: str, dtype: str, device: str = "cpu", fill=np.nan):
    if fw == "numpy":
        return np.full(shape, fill, dtype=dtype)
    return torch.full(shape, fill, dtype=_torch_dtype(dtype), device=device)


def cache_pair(
    key: np.ndarray,
    value: np.ndarray,
    fw: str,
    dtype: str,
    device: str,
    layout: str,
    pinned: bool = False,
):
    """K and V caches with logical shape [N, P, H, D] in one of the storage layouts:
    NHD / HND (two tensors), or *_combined (two views of one [N, 2, ...] tensor). `pinned`
    (torch, host): the storage is page-locked."""
    n, p, h, d = key.shape
    combined = layout.endswith("_combined")
    hnd = layout.startswith("HND")
    storage = (n, 2, h, p, d) if hnd else (n, 2, p, h, d)
    if not combined:
        storage = storage[:1] + storage[2:]

    def alloc():
        if fw == "numpy":
            return np.empty(storage, dtype=dtype)
        return torch.empty(storage, dtype=_torch_dtype(dtype), device=device, pin_memory=pinned)

    def logical(t):  # storage -> logical [N, P, H, D] view
        if fw == "numpy":
            return t.transpose(0, 2, 1, 3) if hnd else t
        return t.permute(0, 2, 1, 3) if hnd else t

    if combined:
        buf = alloc()
        k, v = logical(buf[:, 0]), logical(buf[:, 1])
    else:
        k, v = logical(alloc()), logical(alloc())
    k[...] = asarray(key, fw, dtype, device)
    v[...] = asarray(value, fw, dtype, device)
    return k, v


def f64(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def sync(fw: str, device: str) -> None:
    if fw == "torch" and device == "cuda":
        torch.cuda.synchronize()


def cuda_ok() -> bool:
    return tinyserve.cuda_available() and torch is not None and torch.cuda.is_available()


def random_row_split(rng, batch: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(query_start_loc int32 [batch + 1], rows per sequence): `total` query rows cut among
    `batch` sequences at random (a sequence may get none), as a graph replay rewrites them."""
    cuts = np.sort(rng.integers(0, total + 1, size=batch - 1))
    starts = np.concatenate([[0], cuts, [total]]).astype(np.int32)
    return starts, np.diff(starts)


def prefill_graph_buffers(batch, total, max_blocks, num_q_heads, head_dim, device="cuda"):
    """(query, query_start_loc, block_table, seq_lens, out, lse) torch buffers of a prefill step
    that a CUDA graph captures and later replays with new contents: float16 query and out of
    `total` rows, int32 offsets ([0, ..., total] until rewritten), table and lengths, float32
    lse."""
    q = torch.zeros((total, num_q_heads, head_dim), dtype=torch.float16, device=device)
    starts = torch.zeros((batch + 1,), dtype=torch.int32, device=device)
    starts[-1] = total
    table = torch.zeros((batch, max_blocks), dtype=torch.int32, device=device)
    lens = torch.full((batch,), total, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    lse = torch.empty((total, num_q_heads), dtype=torch.float32, device=device)
    return q, starts, table, lens, out, lse


def replay_prefill_step(replay, rng, buffers, kc, vc, new_starts, rows, num_blocks, block_size):
    """Writes a new prefill step into the buffers of prefill_graph_buffers (offsets new_starts of
    `rows` rows a sequence, lengths of at least those rows, a random table and random queries),
    NaN-poisons out and lse, runs `replay` (a captured graph's replay) and checks every row
    against the float64 reference."""
    q, starts, table, lens, out, lse = buffers
    batch, max_blocks = tuple(table.shape)
    total = q.shape[0]
    new_lens = (rows + rng.integers(0, max_blocks * block_size - total, size=batch)).astype(
        np.int32
    )
    new_table = rng.integers(0, num_blocks, size=(batch, max_blocks)).astype(np.int32)
    new_q = rng.standard_normal(tuple(q.shape)).astype(np.float32)
    q.copy_(torch.from_numpy(new_q).to(q.device, q.dtype))
    starts.copy_(torch.from_numpy(np.asarray(new_starts, np.int32)).to(starts.device))
    table.copy_(torch.from_numpy(new_table).to(table.device))
    lens.copy_(torch.from_numpy(new_lens).to(lens.device))
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    replay()
    if q.is_cuda:
        torch.cuda.synchronize()
    ref, ref_lse = reference.paged_prefill(
        f64(q), f64(kc), f64(vc), new_table, new_lens, np.asarray(new_starts, np.int32)
    )
    assert not np.isnan(f64(out)).any() and not np.isnan(f64(lse)).any()
    assert reference.rel_error(f64(out), ref) < TOLERANCE[str(q.dtype).split(".")[-1]]
    np.testing.assert_allclose(f64(lse), ref_lse, rtol=1e-4, atol=1e-3)


def check_offsets_stay_in_bounds(attend, q, bad_offsets) -> None:
    """For each of `bad_offsets` (query_start_loc values the device is handed unchecked),
    attend(query_start_loc, out, lse) must write every row of out and lse (no NaN left) and
    nothing outside them: both sit between NaN guard rows of one buffer, which must stay NaN. q:
    the call's torch query, whose shape, dtype and device out takes."""
    total = q.shape[0]
    out_all = torch.full((total + 2,) + tuple(q.shape[1:]), np.nan, dtype=q.dtype, device=q.device)
    lse_all = torch.full((total + 2, q.shape[1]), np.nan, dtype=torch.float32, device=q.device)
    for bad in bad_offsets:
        starts = torch.from_numpy(np.asarray(bad, np.int32)).to(q.device)
        attend(starts, out_all[1:-1], lse_all[1:-1])
        if q.is_cuda:
            torch.cuda.synchronize()
        assert torch.isnan(out_all[0]).all() and torch.isnan(out_all[-1]).all(), bad
        assert torch.isnan(lse_all[0]).all() and torch.isnan(lse_all[-1]).all(), bad
        assert not torch.isnan(out_all[1:-1]).any(), bad
        assert not torch.isnan(lse_all[1:-1]).any(), bad


def prefill_reference(q, kc, vc, case, **options):
    """float64 reference (out, lse) of a prefill case (block_table, seq_lens, query_start_loc)
    for the attention options of the call (options the reference has no use for are ignored)."""
    return reference.paged_prefill(
        f64(q),
        f64(kc),
        f64(vc),
        case.block_table,
        case.seq_lens,
        case.query_start_loc,
        scale=options.get("scale"),
        window_left=options.get("window_left", -1),
        logits_soft_cap=options.get("logits_soft_cap", 0.0),
    )


def check_prefill(out, lse, ref_out, ref_lse, dtype):
    """Every row written, and out / lse within the dtype's tolerance of the reference."""
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert reference.rel_error(out, ref_out) < TOLERANCE[dtype]
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-4, atol=1e-3)
