"""CachePool: the memory of a paged KV cache that grows and shrinks in granules."""

from __future__ import annotations

import sys
from typing import Any

from . import _tinyserve as _C

__all__ = ["CachePool"]


def _dtype_name(dtype: Any) -> str:
    # None passes through as "None": NumPy would read it as float64, naming a dtype never given.
    if isinstance(dtype, str) or dtype is None:
        return str(dtype)
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch.") :]
    import numpy as np

    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def _device_name(device: Any) -> str:
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device)
    if text == "cuda":
        # As torch reads "cuda": the current device, where torch has chosen one.
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return f"cuda:{torch.cuda.current_device()}"
        return "cuda:0"
    return text


class CachePool(_C.CachePool):
    """The KV cache tensors of ``num_layers`` layers in memory that grows and shrinks.

    One address range is reserved for ``max_blocks`` blocks of every tensor (per layer: K, V,
    and with ``page_meta=True`` the page summaries); physical memory backs it in granules up to
    ``num_blocks``. On CUDA this is the driver's virtual memory management: ``shrink`` unmaps the
    tail and returns it to the driver (``cudaMemGetInfo`` shows it), where any allocation, in this
    process or another, can use it. On the CPU it is an mmap reservation; ``shrink`` returns the
    pages to the OS.

    ``key(layer)``, ``value(layer)``, ``page_meta(layer)`` and ``tensors()`` return DLPack arrays
    over the pool's memory (no copy), shaped ``[num_blocks, block_size, num_kv_heads, head_dim]``
    (``layout="HND"``: the permuted view of HND storage). Pass them to tinyserve's ops as they
    are, or to a framework: ``torch.from_dlpack(pool.key(0))``, ``numpy.from_dlpack``,
    ``cupy.from_dlpack``. Base addresses never move; after ``grow`` or ``shrink`` fetch the views
    again, and never touch a block at or past ``num_blocks`` through an older view.

    Args:
        dtype: "float16", "bfloat16", "float32", "float8_e4m3fn" (a float8 cache: pass its
            scales to the ops, as for any float8 cache), or a torch / NumPy dtype. Float8 views
            are float8 DLPack arrays, which torch and JAX take (NumPy has no float8 type).
        device: "cpu", "cuda" (torch's current device if torch has initialised CUDA, else 0),
            "cuda:N", an int N, or a torch.device.
        layout: "NHD" or "HND" (how a block is stored).
        page_meta: also hold per-layer page summaries ``[num_blocks, num_kv_heads, 2, head_dim]``.
        page_meta_dtype: the summaries' dtype: None (the caches'), or "float8_e4m3fn" /
            ``torch.float8_e4m3fn`` (half the bytes of 16-bit summaries; see docs/selection.md);
            over float8 caches also "float16", "bfloat16" or "float32" (the query's precision).
        granule_bytes: the mapping unit; 0 picks the driver's recommended granularity (CUDA,
            usually 2 MiB) or the page size (CPU).
        num_blocks: blocks to back at construction.
    """

    def __init__(
        self,
        num_layers: int,
        max_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any = "float16",
        device: Any = "cpu",
        *,
        layout: str = "NHD",
        page_meta: bool = False,
        granule_bytes: int = 0,
        num_blocks: int = 0,
        page_meta_dtype: Any = None,
    ) -> None:
        super().__init__(
            num_layers,
            max_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            _dtype_name(dtype),
            _device_name(device),
            layout,
            page_meta,
            granule_bytes,
            num_blocks,
            None if page_meta_dtype is None else _dtype_name(page_meta_dtype),
        )
