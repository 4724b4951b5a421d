"""Running a Compactor's MovePlan on an engine's caches, and the host pool that offload needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _interop
from ._ops import _renamed, _shape, copy_blocks, swap_blocks
from ._tinyserve import ArgumentTypeError


def _ids_on_device_of(ids: np.ndarray, like: Any, stream: Any = None) -> Any:
    """The int32 block ids where copy_blocks wants them: on the caches' device. They are copied
    on the framework's current stream; when the caller names another stream, that copy is
    waited for, so the launch on `stream` cannot read them early."""
    if not _interop.is_cuda(like):
        return ids
    fw = _interop.framework(like)
    if fw == "torch":
        import torch

        on_device = torch.from_numpy(ids).to(like.device)
        if stream is not None:
            torch.cuda.current_stream(like.device).synchronize()
        return on_device
    if fw == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            on_device = cupy.asarray(ids)
            if stream is not None:
                cupy.cuda.get_current_stream().synchronize()
            return on_device
    raise RuntimeError(
        "tinyserve.execute_plan: device moves on CUDA need torch or cupy caches, "
        f"got {type(like).__name__}"
    )


def execute_plan(
    plan: Any,
    device_caches: Sequence[Any],
    host_caches: Sequence[Any] | None = None,
    *,
    stream: Any = None,
) -> None:
    """Run a Compactor's plan on the engine's caches; commit it afterwards.

    ``device_caches`` is every tensor indexed by device block along dimension 0 (each layer's K
    and V caches, page metadata ``[num_blocks, num_kv_heads, 2, head_dim]``, ...);
    ``host_caches`` the matching host pool tensors (see :func:`allocate_host_pool`), in the same
    order, for offload and recall. A compaction is one ``copy_blocks`` call over every device
    tensor (one launch on CUDA); offload and recall are one ``swap_blocks`` call per tensor,
    each moving every block of the plan, once every tensor pair has been checked (a refused
    call moves nothing). An evict plan moves nothing. Calls are queued on
    ``stream`` (default: the caches' framework's current stream), so the plan may be committed
    as soon as this returns: later work on that stream sees the moved blocks.
    """
    kind = getattr(plan, "kind", None)
    if kind not in ("evict", "offload", "recall", "compact"):
        what = f"kind {kind!r}" if hasattr(plan, "kind") else type(plan).__name__
        raise ArgumentTypeError(f"tinyserve.execute_plan: plan must be a MovePlan, got {what}")
    devices = _interop.array_list(device_caches, "execute_plan", "device_caches", "cache tensors")
    if kind == "evict" or len(plan) == 0 or not devices:
        return
    src, dst = plan.src, plan.dst
    if kind == "compact":
        like = devices[0]
        copy_blocks(
            devices,
            _ids_on_device_of(src, like, stream),
            _ids_on_device_of(dst, like, stream),
            stream=stream,
        )
        return
    hosts = _interop.array_list(host_caches, "execute_plan", "host_caches", "cache tensors")
    if len(hosts) != len(devices):
        raise ValueError(
            "tinyserve.execute_plan: host_caches must match device_caches one to one "
            f"({len(devices)} tensors), got {len(hosts)}"
        )
    pairs = list(zip(devices, hosts) if kind == "offload" else zip(hosts, devices))
    # Every pair is checked before the first block moves, so that a refused call writes nothing
    # (a recall half done would leave cached prefix blocks holding other data): the arrays
    # through a call that moves no block, the ids against each tensor's block count.
    none = src[:0]
    sides = ("device", "host") if kind == "offload" else ("host", "device")
    for from_cache, to_cache in pairs:
        try:
            swap_blocks(from_cache, to_cache, none, none, stream=stream)
        except (ValueError, TypeError, RuntimeError) as e:
            raise _renamed(e, "swap_blocks", "execute_plan") from None
        for ids, cache, side in ((src, from_cache, sides[0]), (dst, to_cache, sides[1])):
            count = _shape(cache, "execute_plan", f"a {side} cache")[0]
            if int(ids.max()) >= count:
                raise ValueError(
                    f"tinyserve.execute_plan: the plan's block ids must be below the {count} "
                    f"blocks of every {side} cache, got {int(ids.max())}"
                )
    for from_cache, to_cache in pairs:
        swap_blocks(from_cache, to_cache, src, dst, stream=stream)


def _host_strides(cache: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a host pool whose block is laid out like the cache's block. A block
    must be one contiguous run with no dimension reversed, as swap_blocks moves it (a negative
    stride would also place elements before the pool's buffer)."""
    block_elems = math.prod(shape[1:])
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(shape[1:], strides[1:]))
    reversed_dim = any(n > 1 and s < 0 for n, s in zip(shape[1:], strides[1:]))
    if block_elems and (span != block_elems or reversed_dim):
        raise ValueError(
            "tinyserve.allocate_host_pool: a block of every cache must be one contiguous run of "
            f"memory, got shape {shape} with strides {strides}"
        )
    return (block_elems, *strides[1:])


def allocate_host_pool(device_caches: Sequence[Any], num_host_blocks: int) -> list[Any]:
    """Host tensors for a Compactor's host pool: one per cache tensor, with ``num_host_blocks``
    blocks along dimension 0 and each block laid out like the cache's (so ``swap_blocks`` moves
    a block as one run of bytes). Torch caches get torch tensors, pinned when the cache is on
    CUDA; CuPy caches get pinned NumPy arrays; anything else gets NumPy arrays. Tensors that
    only speak DLPack (a CachePool's) are read as NumPy arrays on the host, and through torch on
    CUDA or in a dtype NumPy lacks."""
    caches = _interop.array_list(
        device_caches, "allocate_host_pool", "device_caches", "cache tensors"
    )
    num_host_blocks = _interop.int_argument(
        num_host_blocks, "allocate_host_pool", "num_host_blocks"
    )
    if num_host_blocks < 0:
        raise ValueError(
            "tinyserve.allocate_host_pool: num_host_blocks must be an int >= 0, "
            f"got {num_host_blocks}"
        )
    pools = []
    for cache in caches:
        cache = _with_layout(cache)
        fw = _interop.framework(cache)
        shape = (num_host_blocks, *tuple(int(n) for n in cache.shape[1:]))
        if fw == "torch":
            import torch

            strides = _host_strides(cache, tuple(cache.shape), tuple(cache.stride()))
            pools.append(
                torch.empty_strided(
                    shape,
                    strides,
                    dtype=cache.dtype,
                    device="cpu",
                    pin_memory=_interop.is_cuda(cache),
                )
            )
            continue
        dtype = np.dtype(cache.dtype)
        element_strides = tuple(int(s) // dtype.itemsize for s in cache.strides)
        strides = _host_strides(cache, tuple(cache.shape), element_strides)
        count = num_host_blocks * strides[0]
        if fw == "cupy":
            import cupyx

            flat = cupyx.empty_pinned((count,), dtype)
        else:
            flat = np.empty((count,), dtype)
        pools.append(
            np.lib.stride_tricks.as_strided(flat, shape, tuple(s * dtype.itemsize for s in strides))
        )
    return pools


def _with_layout(cache: Any) -> Any:
    """A cache that only speaks DLPack (a CachePool's tensors) as an array that names its shape,
    strides and dtype, over the same memory: NumPy on the host where NumPy has the dtype, else
    torch. Arrays of a framework are returned as they are."""
    if hasattr(cache, "shape") and hasattr(cache, "dtype"):
        return cache
    if not _interop.is_cuda(cache):
        try:
            return np.from_dlpack(cache)
        except (TypeError, ValueError, BufferError, RuntimeError):
            pass  # a dtype NumPy lacks (bfloat16): through torch
    try:
        import torch
    except ImportError as e:
        raise TypeError(
            "tinyserve.allocate_host_pool: a cache NumPy cannot view (on a CUDA device, or of a "
            f"dtype NumPy lacks) needs torch installed, got {type(cache).__name__}"
        ) from e
    return torch.from_dlpack(cache)


def _pool_tensors(pool: Any) -> list[Any]:
    """The pool's tensors as execute_plan takes them: as they are on the CPU, through torch on
    CUDA (the block ids of a device move are copied to the device through the framework)."""
    tensors = list(pool.tensors())
    if str(pool.device).startswith("cuda"):
        try:
            import torch
        except ImportError as e:
            raise RuntimeError(
                "tinyserve.compact_and_shrink: a CUDA pool's moves run through torch, "
                "got no torch installed"
            ) from e
        tensors = [torch.from_dlpack(t) for t in tensors]
    return tensors


def _same_size(block_manager: Any, pool: Any, op: str) -> None:
    if pool.num_blocks != block_manager.num_blocks:
        raise ValueError(
            f"tinyserve.{op}: the pool and the block manager must have the same number of "
            f"blocks, got pool.num_blocks={pool.num_blocks} and "
            f"block_manager.num_blocks={block_manager.num_blocks}"
        )


def compact_and_shrink(
    block_manager: Any,
    compactor: Any,
    pool: Any,
    num_blocks: int | None = None,
    *,
    stream: Any = None,
) -> dict[str, int]:
    """Give a cache pool's unused memory back: pack the live blocks below ``num_blocks``
    (default: the number of used blocks), then make that the manager's and the pool's size.

    The sequence is ``compactor.plan_compact(num_blocks)``, :func:`execute_plan` over every
    tensor of ``pool`` (one ``copy_blocks`` call), ``compactor.commit``,
    ``block_manager.resize(num_blocks)`` and ``pool.shrink(num_blocks)``, which unmaps every
    granule past the last kept block (on CUDA it goes back to the driver). Cached free blocks at
    or above ``num_blocks`` lose their prefix keys. Everything that can be refused is refused
    before anything changes: a pool and manager of different sizes (``ValueError``), a target
    below the used blocks (``OutOfBlocks``), a ``num_blocks`` that is not an int >= 0
    (``TypeError``, ``ValueError``), a pending plan or copy-on-write pairs
    (``RuntimeError``). If the copies fail, the plan is aborted and nothing changed.

    Returns ``{"num_blocks", "moved_blocks", "freed_bytes"}``: the new size, the blocks the
    compaction moved and the memory the pool unmapped (whole granules).
    """
    _same_size(block_manager, pool, "compact_and_shrink")
    if num_blocks is not None:
        # Checked here, before any plan, so that the error names this call and nothing is
        # planned or committed for a target that resize() would refuse.
        num_blocks = _interop.int_argument(num_blocks, "compact_and_shrink", "num_blocks")
        if num_blocks < 0:
            raise ValueError(
                f"tinyserve.compact_and_shrink: num_blocks must be >= 0 or None, got {num_blocks}"
            )
    plan = compactor.plan_compact(num_blocks)
    try:
        execute_plan(plan, _pool_tensors(pool), stream=stream)
    except BaseException:
        compactor.abort(plan)
        raise
    # The default target is the used count that plan_compact saw: nothing changed since.
    target = block_manager.stats()["num_used"] if num_blocks is None else num_blocks
    compactor.commit(plan)
    before = pool.mapped_bytes
    # Every block at or above the target is free now, and no plan or copy pair is pending
    # (plan_compact refused those), so neither call below can refuse.
    block_manager.resize(target)
    pool.shrink(target)
    return {
        "num_blocks": target,
        "moved_blocks": len(plan),
        "freed_bytes": before - pool.mapped_bytes,
    }


def grow_pool(block_manager: Any, pool: Any, num_blocks: int) -> dict[str, int]:
    """The reverse of :func:`compact_and_shrink`: back blocks up to ``num_blocks`` in ``pool``
    (``pool.grow``), then give them to the manager as free blocks (``block_manager.resize``).
    The pool grows first, so when memory runs out (``RuntimeError``) the manager is unchanged.
    Returns ``{"num_blocks", "added_bytes"}``."""
    _same_size(block_manager, pool, "grow_pool")
    num_blocks = _interop.int_argument(num_blocks, "grow_pool", "num_blocks")
    if num_blocks < block_manager.num_blocks:
        raise ValueError(
            "tinyserve.grow_pool: num_blocks must be >= the current "
            f"{block_manager.num_blocks} blocks, got {num_blocks}"
        )
    before = pool.mapped_bytes
    pool.grow(num_blocks)
    try:
        block_manager.resize(num_blocks)
    except BaseException:
        pool.shrink(block_manager.num_blocks)
        raise
    return {"num_blocks": num_blocks, "added_bytes": pool.mapped_bytes - before}
