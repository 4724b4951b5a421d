"""The ops, over any framework's arrays. Each wrapper works out the caller's framework once,
resolves the stream, allocates missing outputs through that framework, and calls the compiled
core once."""

from __future__ import annotations

import numbers
import operator
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _interop
from . import _tinyserve as _C
from ._tinyserve import ArgumentTypeError

__all__ = [
    "reshape_and_cache",
    "paged_attention",
    "plan_paged_attention",
    "copy_blocks",
    "swap_blocks",
    "build_page_meta",
    "page_meta_shape",
    "select_pages",
    "select_pages_workspace_bytes",
    "DEFAULT_SUMMARY",
]

# The default page summary: Quest's bound over per-page min/max, the contract's scoring
# (DESIGN.md). "minmax_damped" and "meanstd" are options (docs/selection.md compares them).
DEFAULT_SUMMARY = "minmax"

# CUDA scratch of the ops that take a workspace, one buffer per (op, framework, device, stream),
# grown when a call needs more: calls on one stream run in order, so they can share a buffer,
# while calls on two streams may overlap and must not. Buffers that were replaced stay
# referenced: a captured CUDA graph may still point at them.
_WORKSPACE_MIN_BYTES = 8 << 20
_workspaces: dict[tuple[str, str, str, int], Any] = {}
_retired_workspaces: list[Any] = []
_workspace_lock = threading.Lock()


# CUDA split plans of paged_attention by (shapes, dtype, device, stream, options): the split
# count and the stream's kept workspace that holds its partials (None when the call does not
# split). A plan depends on host values only, so a repeated call reuses it instead of asking the
# core again.
_MAX_PLANS = 4096
_plans: dict[tuple[Any, ...], tuple[int, Any]] = {}
# select_pages' kept workspaces by (shapes, dtypes, device, stream), so that a repeated call
# neither asks the core for the size nor takes the lock again.
_select_workspaces: dict[tuple[Any, ...], Any] = {}


def _remember(cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    """Keeps value under key in one of the host-value caches above, emptied when it holds
    _MAX_PLANS entries (a bound for callers whose shapes never repeat)."""
    if len(cache) >= _MAX_PLANS:
        cache.clear()
    cache[key] = value


def _workspace(like: Any, fw: str, nbytes: int, purpose: str, stream: int) -> Any:
    """The kept scratch buffer of at least nbytes for `purpose` on `stream` (a cudaStream_t)."""
    key = (purpose, fw, str(getattr(like, "device", "")), stream)
    with _workspace_lock:
        ws = _workspaces.get(key)
        if ws is None or ws.nbytes < nbytes:
            if ws is not None:
                _retired_workspaces.append(ws)
            size = max(nbytes, _WORKSPACE_MIN_BYTES)
            if ws is not None:
                size = max(size, 2 * ws.nbytes)
            ws = _interop.empty(like, (size,), "uint8", fw, purpose)
            _workspaces[key] = ws
        return ws


def _shape(array: Any, op: str, name: str) -> tuple[int, ...]:
    """The shape of an array argument that the wrapper reads before the core sees it (to
    allocate outputs), with the core's ArgumentTypeError for an object that is no array."""
    shape = getattr(array, "shape", None)
    if shape is None:
        # DLPack producers without .shape, and tinyserve's own arrays (CachePool's) of a dtype
        # the buffer protocol cannot describe (bfloat16): as the core imports them.
        try:
            shape = _C._array_shape(array)
        except Exception:  # noqa: BLE001 - a producer whose export fails: no array to us
            shape = None
        if shape is None:
            raise ArgumentTypeError(
                f"tinyserve.{op}: {name} must be an array (DLPack or buffer protocol), got "
                f"{type(array).__name__}"
            )
    return tuple(int(n) for n in shape)


def _scale(scale: Any) -> Any:
    """A float8 cache's scale for the core: a number (NumPy scalars included) as a float, an
    array (one scale per KV head) exported as it is."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return float(scale)
    return _interop.export(scale)


def _fp8_view(cache: Any, kv_dtype: str | None) -> tuple[Any, str | None]:
    """A NumPy array of ml_dtypes' float8_e4m3fn goes to the core as its uint8 bits, with
    ``kv_dtype`` saying what they are (NumPy itself has no float8 type to export). Each cache of
    a call is viewed on its own, whether ``kv_dtype`` was given or set by the other cache."""
    if kv_dtype in (None, "float8_e4m3fn") and _interop.framework(cache) == "numpy":
        if getattr(cache.dtype, "name", "") == "float8_e4m3fn":
            return cache.view("uint8"), "float8_e4m3fn"
    return cache, kv_dtype


def _meta_view(page_meta: Any) -> tuple[Any, str | None]:
    """Page summaries of ml_dtypes' float8_e4m3fn in a NumPy array go to the core as their uint8
    bits with ``meta_dtype="float8_e4m3fn"`` (as float8 caches do); anything else as it is."""
    if page_meta is None:
        return None, None
    return _fp8_view(page_meta, None)


def _as_bytes(array: Any) -> Any:
    """A NumPy array of an ml_dtypes type (float8, bfloat16, ...: NumPy has no type of its own
    to export for them) as unsigned integers of its width; anything else as it is. Block copies
    move bytes, so only the width matters to them."""
    if _interop.framework(array) == "numpy":
        dtype = getattr(array, "dtype", None)
        if getattr(getattr(dtype, "type", None), "__module__", "").startswith("ml_dtypes"):
            if dtype.itemsize in (1, 2, 4, 8):
                return array.view(f"uint{8 * dtype.itemsize}")
    return array


def _refuse_conjugate_views(arrays: Sequence[Any], op: str, names: Any) -> None:
    """Refuses a torch tensor whose conjugate bit is set (``x.conj()`` of a complex tensor): torch
    conjugates it when it is read, so its values are not the bytes in its memory, which are all
    DLPack describes; torch's own ``__dlpack__`` refuses it too. The block copies check it (they
    take complex types; the attention ops take none). ``names(i)``: the name of arrays[i]."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    tensor = torch.Tensor
    for i, array in enumerate(arrays):
        if isinstance(array, tensor) and array.is_conj():
            raise ValueError(
                f"tinyserve.{op}: {names(i)} is a torch tensor with its conjugate bit set (a "
                "lazy view whose values are not its memory's): pass .resolve_conj()"
            )


def _swap_pair(src_cache: Any, dst_cache: Any) -> tuple[Any, Any]:
    """The two caches of a swap as the core reads them: an ml_dtypes NumPy side as its bits
    (_as_bytes); a torch tensor opposite it then as the same unsigned integers, so that the two
    sides' dtypes still agree (float8 in torch, say, against float8 bits from NumPy)."""
    src_bytes, dst_bytes = _as_bytes(src_cache), _as_bytes(dst_cache)
    viewed_src, viewed_dst = src_bytes is not src_cache, dst_bytes is not dst_cache
    if viewed_src != viewed_dst:
        other = dst_cache if viewed_src else src_cache
        bits = src_bytes if viewed_src else dst_bytes
        if _interop.framework(other) == "torch" and other.element_size() == bits.dtype.itemsize:
            torch = sys.modules["torch"]
            viewed = other.view(getattr(torch, str(bits.dtype)))
            return (bits, viewed) if viewed_src else (viewed, bits)
    return src_bytes, dst_bytes


def _renamed(error: Exception, op: str, caller: str) -> Exception:
    """``error`` with the prefix ``tinyserve.<op>:`` of its message changed to the caller's op,
    the same exception type; other messages are kept."""
    message = str(error)
    prefix = f"tinyserve.{op}:"
    if not message.startswith(prefix):
        return error
    return type(error)(f"tinyserve.{caller}:" + message[len(prefix) :])


def _cuda_plan(
    query: Any,
    key_cache: Any,
    block_table: Any,
    query_start_loc: Any,
    fw: str,
    window_left: int,
    max_seq_len: int,
    num_splits: int,
    kv_dtype: str | None,
    stream: int,
) -> tuple[int, Any]:
    key = (
        query.shape,
        key_cache.shape,
        block_table.shape,
        query.dtype,
        key_cache.dtype,
        kv_dtype,
        _interop.device_key(query, fw),
        stream,
        window_left,
        max_seq_len,
        num_splits,
        # Prefill plans differ (tiles of query rows, not sequences); the offsets' values are not
        # read.
        query_start_loc is not None,
    )
    plan = _plans.get(key)
    if plan is None:
        x = _interop.export
        try:
            splits, nbytes = _C.plan_paged_attention(
                x(query),
                x(key_cache),
                x(block_table),
                window_left,
                max_seq_len,
                num_splits,
                x(query_start_loc),
                kv_dtype,
            )
        except (ValueError, TypeError, RuntimeError) as e:
            # The plan checks paged_attention's own arguments: its errors carry that op's name.
            raise _renamed(e, "plan_paged_attention", "paged_attention") from None
        plan = (
            splits,
            _workspace(query, fw, nbytes, "paged_attention", stream) if nbytes else None,
        )
        _remember(_plans, key, plan)
    return plan


def reshape_and_cache(
    key: Any,
    value: Any,
    key_cache: Any,
    value_cache: Any,
    slot_mapping: Any,
    page_meta: Any = None,
    *,
    summary: str = DEFAULT_SUMMARY,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_dtype: str | None = None,
    stream: Any = None,
) -> None:
    """Write new tokens' keys and values, ``[num_tokens, num_kv_heads, head_dim]``, into their
    cache slots. ``slot_mapping`` is int64 ``[num_tokens]``: slot = block * block_size + offset,
    -1 skips the token. Slots should be distinct within a call: where one repeats, which of its
    tokens the slot keeps is unspecified (tokens are written in parallel), and a page summary
    covers every key the call wrote to the page, the overwritten one included (for min/max a
    looser bound, still a bound). The caches have the logical shape
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any strides, last dim contiguous).

    With ``page_meta`` (``[num_blocks, num_kv_heads, 2, head_dim]``, the key cache's dtype or
    float8_e4m3fn, see :func:`page_meta_shape`), the summaries of the pages written are updated
    in the same call:
    a write at offset 0 restarts a page's summary from every key this call writes to it (in any
    order); a page written only at later offsets has its summary extended. ``summary`` is
    ``"minmax"`` (the default) or ``"minmax_damped"`` (both store the elementwise min and max)
    or ``"meanstd"`` (mean and standard deviation); it must match what :func:`select_pages` is
    told.
    Pages are assumed to fill in order of offset. Float8 summaries (``"minmax"`` and
    ``"minmax_damped"`` only) take half the bytes of 16-bit ones: minimums are rounded toward
    minus infinity and maximums toward plus infinity, saturating at +-448 (so a float8 box still
    bounds keys within that range).

    FP8 caches: caches of float8_e4m3fn (``torch.float8_e4m3fn``, ml_dtypes' ``float8_e4m3fn``,
    or uint8 arrays of its bits with ``kv_dtype="float8_e4m3fn"``) take float32, float16 or
    bfloat16 keys and values and store ``x / scale`` rounded to nearest even and saturated to
    +-448. ``k_scale``/``v_scale``: a positive number (one scale for the tensor, default 1) or a
    float32 array ``[num_kv_heads]`` (one per KV head) on the caches' device, read by CUDA
    kernels from device memory when they run. With ``page_meta`` (of the keys' dtype, or
    float8_e4m3fn) a float8 cache's summaries are of its keys as stored and read back,
    ``x / k_scale`` rounded to e4m3 times ``k_scale``, so that they bound what attention reads."""
    _interop.wait_ready(key, value, slot_mapping)
    key_cache, kv_dtype = _fp8_view(key_cache, kv_dtype)
    value_cache, kv_dtype = _fp8_view(value_cache, kv_dtype)
    page_meta, meta_dtype = _meta_view(page_meta)
    s = _interop.resolve_stream(stream, key_cache, "reshape_and_cache")
    x = _interop.export
    _C.reshape_and_cache(
        x(key),
        x(value),
        x(key_cache),
        x(value_cache),
        x(slot_mapping),
        page_meta=x(page_meta),
        summary=summary,
        k_scale=_scale(k_scale),
        v_scale=_scale(v_scale),
        kv_dtype=kv_dtype,
        meta_dtype=meta_dtype,
        stream=s,
    )


def page_meta_shape(key_cache: Any) -> tuple[int, int, int, int]:
    """The shape of the page summaries for ``key_cache``:
    ``(num_blocks, num_kv_heads, 2, head_dim)``."""
    shape = _shape(key_cache, "page_meta_shape", "key_cache")
    if len(shape) != 4:
        raise ValueError(
            "tinyserve.page_meta_shape: key_cache must have 4 dimensions [num_blocks, "
            f"block_size, num_kv_heads, head_dim], got {len(shape)} (shape {list(shape)})"
        )
    num_blocks, _, num_kv_heads, head_dim = shape
    return (num_blocks, num_kv_heads, 2, head_dim)


def build_page_meta(
    key_cache: Any,
    block_table: Any,
    seq_lens: Any,
    page_meta: Any,
    *,
    summary: str = DEFAULT_SUMMARY,
    k_scale: Any = None,
    kv_dtype: str | None = None,
    stream: Any = None,
) -> None:
    """Build the summaries of pages already in the cache (after loading a cache, or one written
    without ``page_meta``): every page holding tokens of the first ``seq_lens[b]`` tokens of each
    sequence (int32 ``block_table [batch, max_blocks]``, int32 ``seq_lens [batch]``) is summarised
    from its keys. A block listed by several sequences must hold the same tokens in each.
    ``summary`` as in :func:`reshape_and_cache` (default ``"minmax"``); ``page_meta`` of the
    key cache's dtype or float8_e4m3fn, rounded as there. A float8 cache (``kv_dtype`` as in
    :func:`reshape_and_cache`) is summarised as attention reads it, stored values times
    ``k_scale`` (a number or a float32 ``[num_kv_heads]`` array on its device), into
    ``page_meta`` of float32, float16, bfloat16 (the queries' dtype) or float8_e4m3fn."""
    _interop.wait_ready(key_cache, block_table, seq_lens)
    key_cache, kv_dtype = _fp8_view(key_cache, kv_dtype)
    page_meta, meta_dtype = _meta_view(page_meta)
    s = _interop.resolve_stream(stream, key_cache, "build_page_meta")
    x = _interop.export
    _C.build_page_meta(
        x(key_cache),
        x(block_table),
        x(seq_lens),
        x(page_meta),
        summary=summary,
        k_scale=_scale(k_scale),
        kv_dtype=kv_dtype,
        meta_dtype=meta_dtype,
        stream=s,
    )


def select_pages_workspace_bytes(query: Any, page_meta: Any, block_table: Any) -> int:
    """Bytes of CUDA scratch :func:`select_pages` needs for these shapes (0 for host arrays);
    pass a buffer of that many bytes as ``workspace=`` to allocate nothing per call."""
    x = _interop.export
    page_meta, meta_dtype = _meta_view(page_meta)
    return _C.select_pages_workspace_bytes(
        x(query), x(page_meta), x(block_table), meta_dtype=meta_dtype
    )


def select_pages(
    query: Any,
    page_meta: Any,
    block_table: Any,
    seq_lens: Any,
    budget: int,
    *,
    block_size: int,
    num_sink_pages: int = 0,
    summary: str = DEFAULT_SUMMARY,
    group_reduce: str = "sum",
    hits: Any = None,
    out: tuple[Any, Any] | None = None,
    workspace: Any = None,
    stream: Any = None,
) -> tuple[Any, Any]:
    """Query-aware page selection for decode. Returns ``(table, lens)``: int32
    ``[batch, num_kv_heads, budget]`` physical block ids (-1 past the kept pages) and int32
    ``[batch, num_kv_heads]`` token counts, ready for :func:`paged_attention`.

    ``query [batch, num_q_heads, head_dim]``; ``page_meta`` the summaries (see
    :func:`reshape_and_cache`; the query's dtype or float8_e4m3fn); ``block_table`` int32
    ``[batch, max_blocks]`` and ``seq_lens``
    int32 ``[batch]`` the dense table. ``budget`` counts pages (tokens = budget * block_size, the
    last page partial), including the last page and the sinks: at least ``num_sink_pages + 1``.

    Every page of a sequence is scored per KV head with its GQA group's query heads, combined by
    ``group_reduce`` (``"sum"``, the default: the group's scores added, or ``"max"``):
    ``"minmax"`` (the default) scores Quest's bound ``sum_d max(q_d * min_d, q_d * max_d)``;
    ``"minmax_damped"``
    ``sum_d (3/4 * max(q_d * min_d, q_d * max_d) + 1/4 * min(q_d * min_d, q_d * max_d))``,
    halfway between the page box's centre and Quest's bound; ``"meanstd"`` the estimate
    ``sum_d (q_d * mean_d + |q_d| * std_d)``. A sequence with at most ``budget`` pages keeps all
    of them (attention then equals dense attention); otherwise it keeps its first
    ``num_sink_pages`` pages, its last page and the best-scoring others (ties: the lower logical
    page; a NaN score counts as minus infinity, and ``group_reduce="max"`` leaves out a head
    scoring NaN), in logical order with the last page last; ``num_sink_pages=1`` is recommended with
    every summary (docs/selection.md). ``hits`` (int32 ``[num_blocks]``) gets one added for every
    block each (sequence, KV head) keeps. ``out`` may give ``(table, lens)`` to write;
    ``workspace`` CUDA scratch of :func:`select_pages_workspace_bytes` bytes (one buffer per
    device and stream is kept when omitted)."""
    _interop.wait_ready(query, page_meta, block_table, seq_lens)
    fw = _interop.framework(query)
    if out is None:
        query_shape = _shape(query, "select_pages", "query")
        meta_shape = _shape(page_meta, "select_pages", "page_meta")
        # The core checks the shapes and the budget and names what is wrong; allocate nothing
        # negative or fractional before it can.
        batch = query_shape[0] if query_shape else 0
        num_kv_heads = meta_shape[1] if len(meta_shape) > 1 else 0
        try:
            width = operator.index(budget)
        except TypeError:
            width = 0
        if not 0 <= width <= 2**31 - 1:  # the core names the budget out of its range
            width = 0
        table = _interop.empty(query, (batch, num_kv_heads, width), "int32", fw, "select_pages")
        lens = _interop.empty(query, (batch, num_kv_heads), "int32", fw, "select_pages")
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        table, lens = out
    else:
        # One array would unpack into its rows; name what is wrong instead.
        raise ArgumentTypeError(
            "tinyserve.select_pages: out must be None or a (table, lens) pair of arrays, got "
            f"{type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
        )
    x = _interop.export
    page_meta, meta_dtype = _meta_view(page_meta)
    cuda = _interop.is_cuda(query)
    s = _interop.resolve_stream(stream, query, "select_pages", cuda, fw)
    if workspace is None and cuda:
        key = (
            query.shape,
            page_meta.shape,
            block_table.shape,
            query.dtype,
            page_meta.dtype,
            _interop.device_key(query, fw),
            s,
        )
        workspace = _select_workspaces.get(key)
        if workspace is None:
            nbytes = _C.select_pages_workspace_bytes(
                x(query), x(page_meta), x(block_table), meta_dtype=meta_dtype
            )
            workspace = _workspace(query, fw, nbytes, "select_pages", s)
            _remember(_select_workspaces, key, workspace)
    _C.select_pages(
        x(query),
        x(page_meta),
        x(block_table),
        x(seq_lens),
        budget,
        block_size,
        x(table),
        x(lens),
        num_sink_pages=num_sink_pages,
        summary=summary,
        group_reduce=group_reduce,
        hits=x(hits),
        workspace=x(workspace),
        meta_dtype=meta_dtype,
        stream=s,
    )
    if cuda and _interop.any_jax(query, table):
        # JAX shares no stream with us: results handed back to JAX must be complete.
        _C._stream_synchronize(s)
    return table, lens


def plan_paged_attention(
    query: Any,
    key_cache: Any,
    block_table: Any,
    *,
    window_left: int = -1,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    query_start_loc: Any = None,
    kv_dtype: str | None = None,
    host_seq_lens: Any = None,
) -> tuple[int, int]:
    """``(num_splits, workspace_bytes)`` that :func:`paged_attention` uses for these arguments,
    from host-side values only (``query_start_loc``'s values are not read).

    ``host_seq_lens`` (decode, optional): the sequences' lengths as the caller knows them on the
    host, int32 ``[batch]`` (or ``[batch, num_kv_heads]`` with a per-KV-head table) in host
    memory (a NumPy array, a CPU tensor or a list). On CUDA, where they differ, the split count is
    balanced over them (each candidate count's thread blocks scheduled in launch order onto the
    GPU); otherwise the longest of them bounds the plan like ``max_seq_len``. Pass the returned
    count and a workspace of the returned size to :func:`paged_attention` (``num_splits=``,
    ``workspace=``): it plans from ``max_seq_len`` alone otherwise. The lengths are clamped like
    ``seq_lens``; the call itself still reads ``seq_lens``, so a stale plan stays correct."""
    key_cache, kv_dtype = _fp8_view(key_cache, kv_dtype)
    if isinstance(host_seq_lens, (list, tuple)):
        # Lengths are clamped like seq_lens, so an integer list clamps into int32; anything
        # else goes on for the core to name its dtype.
        host_seq_lens = np.asarray(host_seq_lens)
        if host_seq_lens.dtype.kind in "iu":
            host_seq_lens = host_seq_lens.clip(-(2**31), 2**31 - 1).astype(np.int32)
    x = _interop.export
    return _C.plan_paged_attention(
        x(query),
        x(key_cache),
        x(block_table),
        window_left=window_left,
        max_seq_len=-1 if max_seq_len is None else max_seq_len,
        num_splits=0 if num_splits is None else num_splits,
        query_start_loc=x(query_start_loc),
        kv_dtype=kv_dtype,
        host_seq_lens=x(host_seq_lens),
    )


def paged_attention(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    block_table: Any,
    seq_lens: Any,
    out: Any = None,
    scale: float | None = None,
    *,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    lse: Any = None,
    return_lse: bool = False,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    workspace: Any = None,
    query_start_loc: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    kv_dtype: str | None = None,
    stream: Any = None,
) -> Any:
    """Attention over a paged KV cache: decode (one query token per sequence), or prefill /
    append / chunked prefill with ``query_start_loc``.

    key_cache/value_cache ``[num_blocks, block_size, num_kv_heads, head_dim]``; block_table int32
    ``[batch, max_blocks]``; seq_lens int32 ``[batch]``, the sequences' lengths with the new
    tokens' keys and values already written. num_q_heads must be a multiple of num_kv_heads.

    Sparse decode: block_table int32 ``[batch, num_kv_heads, max_blocks]`` with seq_lens int32
    ``[batch, num_kv_heads]`` gives each KV head its own pages (what :func:`select_pages`
    returns); decode only, window_left -1.

    Decode (``query_start_loc=None``): query ``[batch, num_q_heads, head_dim]``, one row per
    sequence, attending to the whole sequence.

    Prefill: ``query_start_loc`` is int32 ``[batch + 1]``, cumulative (``[0, n_0, n_0 + n_1,
    ...]``), and query is ``[total_rows, num_q_heads, head_dim]``. Sequence ``i``'s rows
    ``query_start_loc[i]:query_start_loc[i + 1]`` are its last ``n_i`` tokens, at positions
    ``seq_lens[i] - n_i .. seq_lens[i] - 1``, attended causally: the row at position ``p`` sees
    keys ``0..p`` (``p - window_left .. p`` with a window). A batch may mix decode sequences (one
    row) and prefill sequences, and a sequence may have no rows. On the CPU, rejected with
    ``ValueError``, nothing written: a first entry other than 0, a decreasing entry, a last entry
    other than ``total_rows``, more rows than ``seq_lens[i]``. On CUDA the offsets stay on the
    device and are not checked (bad ones give wrong rows, never an access outside the cache or
    ``out``).

    Returns ``out`` (allocated like ``query`` when omitted), or ``(out, lse)`` with
    ``return_lse=True``; ``lse`` is the float32 natural-log sum of exp(logits) per query row and
    head, ``[rows, num_q_heads]`` (-inf for a row that sees no key).

    scale defaults to 1/sqrt(head_dim). window_left >= 0 attends to the last window_left + 1
    tokens only. logits_soft_cap > 0 applies cap * tanh(logits / cap). max_seq_len is an upper
    bound on seq_lens known on the host (it only guides the split). num_splits fixes the
    flash-decoding split (1 disables it; a fixed value makes results batch-invariant).
    workspace is CUDA scratch of at least ``plan_paged_attention(...)[1]`` bytes; when omitted,
    one buffer per device and stream is kept and reused (calls on different streams may run at
    once), and the split plan is remembered per shapes, dtype, device and options, so that a
    repeated call crosses into the core once.

    FP8 caches (float8_e4m3fn; see :func:`reshape_and_cache` for how NumPy passes them) are read
    as ``stored * k_scale`` and ``stored * v_scale``, dequantised in registers, in decode and
    prefill alike (on CUDA, prefill over them runs on CUDA cores); the query and the output keep
    their float32/float16/bfloat16 type. ``k_scale``/``v_scale`` as in
    :func:`reshape_and_cache`."""
    _interop.wait_ready(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    key_cache, kv_dtype = _fp8_view(key_cache, kv_dtype)
    value_cache, kv_dtype = _fp8_view(value_cache, kv_dtype)
    fw = _interop.framework(query)
    cuda = _interop.is_cuda(query)
    if out is None:
        out = _interop.empty(
            query, _shape(query, "paged_attention", "query"), fw=fw, op="paged_attention"
        )
    if lse is None and return_lse:
        lse = _interop.empty(
            query, _shape(query, "paged_attention", "query")[:2], "float32", fw, "paged_attention"
        )
    max_len = -1 if max_seq_len is None else max_seq_len
    splits = 0 if num_splits is None else num_splits
    s = _interop.resolve_stream(stream, query, "paged_attention", cuda, fw)
    if workspace is None and cuda:
        planned_splits, workspace = _cuda_plan(
            query,
            key_cache,
            block_table,
            query_start_loc,
            fw,
            window_left,
            max_len,
            splits,
            kv_dtype,
            s,
        )
        if workspace is not None:
            splits = planned_splits
    x = _interop.export
    _C.paged_attention(
        x(query),
        x(key_cache),
        x(value_cache),
        x(block_table),
        x(seq_lens),
        x(out),
        scale=scale,
        window_left=window_left,
        logits_soft_cap=logits_soft_cap,
        lse=x(lse),
        max_seq_len=max_len,
        num_splits=splits,
        workspace=x(workspace),
        query_start_loc=x(query_start_loc),
        k_scale=_scale(k_scale),
        v_scale=_scale(v_scale),
        kv_dtype=kv_dtype,
        stream=s,
    )
    if cuda and _interop.any_jax(query, out):
        # JAX shares no stream with us: results handed back to JAX must be complete.
        _C._stream_synchronize(s)
    return (out, lse) if return_lse else out


def copy_blocks(caches: Sequence[Any], src: Any, dst: Any, *, stream: Any = None) -> None:
    """Copy block ``src[i]`` to block ``dst[i]`` in every tensor of ``caches`` (a list or other
    sequence of arrays, each indexed by block along dimension 0: the K and V caches of every
    layer, page metadata, one value per block (``[num_blocks]``, any stride), ...; any element
    type, NumPy arrays of ml_dtypes' float8 and bfloat16 included: the copies move bytes).
    ``src`` and ``dst`` are
    int32 or int64 ``[num_pairs]`` on the caches' device; on CUDA all copies are one launch.
    ``BlockManager.take_copies()`` returns the pairs as ``[P, 2]``: pass ``pairs[:, 0]`` and
    ``pairs[:, 1]``. The tensors must not share memory, no block may be both a source and a
    destination, and no destination may repeat."""
    caches = _interop.array_list(caches, "copy_blocks", "caches", "arrays (list or tuple)")
    _refuse_conjugate_views(caches, "copy_blocks", lambda i: f"caches[{i}]")
    s = _interop.resolve_stream(stream, caches[0] if caches else src, "copy_blocks")
    x = _interop.export
    _C.copy_blocks([x(_as_bytes(c)) for c in caches], x(src), x(dst), stream=s)


def swap_blocks(src_cache: Any, dst_cache: Any, src: Any, dst: Any, *, stream: Any = None) -> None:
    """Copy block ``src[i]`` of ``src_cache`` to block ``dst[i]`` of ``dst_cache`` between host
    and device caches (offload and recall). The caches share dtype, block shape and layout; on
    CUDA the host side must be pinned (page-locked) memory. Any element type (the copies move
    bytes; a NumPy array of an ml_dtypes type pairs with a torch tensor of the same type).
    ``src`` and ``dst`` are int32 or int64 host arrays of one dtype; no destination may
    repeat."""
    _refuse_conjugate_views(
        (src_cache, dst_cache), "swap_blocks", lambda i: ("src_cache", "dst_cache")[i]
    )
    device_side = dst_cache if _interop.is_cuda(dst_cache) else src_cache
    _interop.wait_ready(src_cache)
    s = _interop.resolve_stream(stream, device_side, "swap_blocks")
    x = _interop.export
    src_cache, dst_cache = _swap_pair(src_cache, dst_cache)
    _C.swap_blocks(x(src_cache), x(dst_cache), x(src), x(dst), stream=s)
