"""The paged KV cache that the engine owns, and the per-step attention batch that every layer's
attention reads: where to write the step's new keys and values, and which pages each query row
attends to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import tinyserve

# The page summary the engine's sparse decode uses unless told otherwise: the damped min/max
# score kept the most attention mass on SmolLM2 and found the passkey as often as dense decode
# (docs/selection.md). The library's own default is Quest's bound ("minmax").
ENGINE_PAGE_SUMMARY = "minmax_damped"
# Every summary select_pages knows (the engine's choice first).
PAGE_SUMMARIES = ("minmax_damped", "minmax", "meanstd")


class PagedKVCache:
    """One K and one V tensor per layer, each ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` (tinyserve's NHD layout), indexed by the block ids of a
    :class:`tinyserve.BlockManager`. Fresh blocks hold NaN so that a read of a slot that was
    never written shows up in the output instead of passing silently. With ``page_meta``, each
    layer also gets page summaries ``[num_blocks, num_kv_heads, 2, head_dim]`` (kept by
    ``reshape_and_cache``, read by ``select_pages`` for sparse decode), indexed by block like the
    caches so that block copies and the compactor move them along. ``page_summary`` names the
    summary those pages keep and sparse decode scores (``summary=`` of
    :func:`tinyserve.select_pages`); the engine's choice is ``ENGINE_PAGE_SUMMARY``.
    ``page_meta_dtype``: the summaries' dtype, ``dtype`` (None) or ``torch.float8_e4m3fn`` (the
    min/max summaries only).

    ``max_blocks`` (elastic): the tensors are views of a :class:`tinyserve.CachePool` that
    reserves ``max_blocks`` blocks and backs ``num_blocks`` of them (fresh blocks hold zeros
    there); after the pool shrinks or grows, :meth:`fetch_pool_views` takes new views.

    ``kv_dtype`` (default: ``dtype``) may be ``torch.float8_e4m3fn``: keys and values are then
    quantised as they are written (``x / kv_scale``, one scale for every layer and head) and
    dequantised in the attention kernels; fresh blocks hold float8's NaN (zeros in an elastic
    pool, a float8 :class:`tinyserve.CachePool`). Its page summaries
    (``dtype`` or float8) are of the keys as stored: ``x / kv_scale`` rounded to float8, times
    ``kv_scale``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        page_meta: bool = False,
        page_summary: str | None = None,
        page_meta_dtype: torch.dtype | None = None,
        kv_dtype: torch.dtype | None = None,
        kv_scale: float = 1.0,
        max_blocks: int | None = None,
        dense_layers: int = 0,
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.page_summary = ENGINE_PAGE_SUMMARY if page_summary is None else page_summary
        self.num_blocks = num_blocks
        self.max_blocks = num_blocks if max_blocks is None else max_blocks  # elastic: the most
        self.dense_layers = dense_layers  # sparse decode: the first layers that stay dense
        # Layers seen attending through a sliding window (sparse decode leaves them dense).
        self.windowed_layers: set[int] = set()
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        fp8 = self.kv_dtype == torch.float8_e4m3fn
        if not fp8 and self.kv_dtype != dtype:
            raise ValueError(
                "tinyserve.PagedKVCache: kv_dtype must be the model's dtype or "
                f"torch.float8_e4m3fn, got {self.kv_dtype}"
            )
        # (the writers refuse meanstd in float8: reshape_and_cache names it at the first write)
        if page_meta_dtype not in (None, dtype, torch.float8_e4m3fn):
            raise ValueError(
                "tinyserve.PagedKVCache: page_meta_dtype must be None, the cache's dtype or "
                f"torch.float8_e4m3fn, got {page_meta_dtype}"
            )
        # The summaries' dtype: the model's unless float8 is asked for, whatever the cache's.
        meta_dtype = dtype if page_meta_dtype is None else page_meta_dtype

        # The keyword arguments that the cache's writes and reads pass: float8's scales.
        self.scales = {"k_scale": float(kv_scale), "v_scale": float(kv_scale)} if fp8 else {}
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim
        self.bytes_per_block *= torch.empty((), dtype=self.kv_dtype).element_size()
        self.page_meta: list[torch.Tensor] | None = None
        # Elastic: the tensors live in a tinyserve.CachePool that reserves max_blocks blocks and
        # backs num_blocks of them; the engine shrinks and grows it.
        self.pool = None
        if max_blocks is not None:
            self.pool = tinyserve.CachePool(
                num_layers,
                max_blocks,
                block_size,
                num_kv_heads,
                head_dim,
                self.kv_dtype,
                self.device,
                page_meta=page_meta,
                num_blocks=num_blocks,
                page_meta_dtype=meta_dtype if page_meta else None,
            )
            self.fetch_pool_views()
            return

        def poisoned() -> torch.Tensor:
            if fp8:  # 0x7f: float8 e4m3fn's NaN (torch fills no float8 tensor on the CPU)
                return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(
                    torch.float8_e4m3fn
                )
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        self.layers = [(poisoned(), poisoned()) for _ in range(num_layers)]
        if page_meta:
            meta_shape = tinyserve.page_meta_shape(self.layers[0][0])
            self.page_meta = [
                torch.zeros(meta_shape, dtype=meta_dtype, device=device) for _ in range(num_layers)
            ]

    def fetch_pool_views(self) -> None:
        """Torch views of the elastic pool's tensors at its current size (after it was made,
        shrunk or grown: older views must not be used)."""
        pool = self.pool
        self.num_blocks = pool.num_blocks
        self.layers = [
            (torch.from_dlpack(pool.key(i)), torch.from_dlpack(pool.value(i)))
            for i in range(pool.num_layers)
        ]
        if pool.has_page_meta:
            self.page_meta = [torch.from_dlpack(pool.page_meta(i)) for i in range(pool.num_layers)]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by block (K and V of every layer, page summaries): what block
        copies and the compactor's moves must cover."""
        return [t for pair in self.layers for t in pair] + (self.page_meta or [])

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Run the block manager's pending copy-on-write pairs (``take_copies()``, int32
        ``[P, 2]``) over every layer in one call."""
        if len(pairs) == 0:
            return
        src, dst = upload([pairs[:, 0], pairs[:, 1]], self.device)
        tinyserve.copy_blocks(self.tensors(), src, dst)


@dataclass
class AttentionBatch:
    """Everything a layer's attention needs for one engine step, built once per step.

    The step's query rows are the tokens being computed, sequence after sequence (a decoding
    sequence has one row, a prefilling one a chunk of its prompt). ``slot_mapping`` (int64
    ``[rows]``) says where each row's key and value go. Attention is causal within the step: the
    row at position ``p`` of a sequence sees that sequence's keys ``0..p``.

    Two forms, chosen by :func:`build_attention_batch`, the only code that knows them besides
    :meth:`attend`:

    - packed (the default; ``query_start_loc`` set): ``block_table`` and ``seq_lens`` have one
      row per sequence and ``query_start_loc`` (int32 ``[B + 1]``) marks each sequence's rows,
      for ``paged_attention``'s prefill mode;
    - expanded (``query_start_loc`` None): every row is a decode query, with its sequence's
      block-table row repeated and ``seq_lens = p + 1``. Exact too, and costs a table row per
      query row; kept as the independent way to compute the same thing (the tests compare
      both). A step of decodes only (one row per sequence) is the same in both forms and needs
      neither."""

    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    query_start_loc: torch.Tensor | None = None
    decode_only: bool = False
    sparse_budget: int = 0  # pages each decode query reads (select_pages); 0: dense
    # Layers attended through this batch in the current forward (the model runner checks that
    # every layer was: a layer that attends some other way would read no cache).
    attention_calls: int = 0

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's new keys and values ``[rows, num_kv_heads, head_dim]`` (and update
        the written pages' summaries when the cache keeps them)."""
        key_cache, value_cache = self.kv_cache.layers[layer]
        meta = self.kv_cache.page_meta
        extra = dict(self.kv_cache.scales)
        if meta is not None:
            extra.update(page_meta=meta[layer], summary=self.kv_cache.page_summary)
        tinyserve.reshape_and_cache(key, value, key_cache, value_cache, self.slot_mapping, **extra)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        scale: float | None = None,
        window_left: int = -1,
        logits_soft_cap: float = 0.0,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the step's query rows ``[rows, num_q_heads, head_dim]`` over the cache
        (after :meth:`write`); returns ``[rows, num_q_heads, head_dim]``. ``sinks``
        ``[num_q_heads]``: a learned logit per query head that joins every row's softmax
        without a value (gpt-oss): the output is scaled by ``Z / (Z + exp(sink))``, ``Z`` the
        sum of the row's exponentiated scores, from the log-sum-exp the kernel returns."""
        key_cache, value_cache = self.kv_cache.layers[layer]
        if window_left >= 0:
            self.kv_cache.windowed_layers.add(layer)
        packed = {} if self.query_start_loc is None else {"query_start_loc": self.query_start_loc}
        table, lens = self.block_table, self.seq_lens
        if (
            self.sparse_budget
            and self.decode_only
            and window_left < 0
            and layer >= self.kv_cache.dense_layers
        ):
            # Sparse decode: per KV head, the pages whose summaries promise the largest scores
            # for this query (the last page always), then the same kernel over those pages.
            table, lens = tinyserve.select_pages(
                query,
                self.kv_cache.page_meta[layer],
                table,
                lens,
                self.sparse_budget,
                block_size=self.kv_cache.block_size,
                # The first page always kept (attention sinks): on SmolLM2 it lifts the selected
                # share of attention from 0.93 to 0.95 of the oracle's (docs/selection.md).
                num_sink_pages=1 if self.sparse_budget >= 2 else 0,
                summary=self.kv_cache.page_summary,
            )
        result = tinyserve.paged_attention(
            query,
            key_cache,
            value_cache,
            table,
            lens,
            scale=scale,
            window_left=window_left,
            logits_soft_cap=logits_soft_cap,
            max_seq_len=self.max_seq_len,
            return_lse=sinks is not None,
            **packed,
            **self.kv_cache.scales,
        )
        if sinks is None:
            return result
        out, lse = result
        # Z / (Z + exp(sink)) = sigmoid(lse - sink); rows that attend nothing have lse = -inf
        # and stay zero.
        keep = torch.sigmoid(lse - sinks.to(device=lse.device, dtype=torch.float32))
        return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as tensors on ``device``. On CUDA they travel together: packed into one pinned
    host buffer (from torch's caching host allocator, which keeps it until the copy has run)
    and copied in one asynchronous transfer, so a step pays one copy instead of one per array.
    Elsewhere each array is wrapped as it is (``torch.from_numpy``)."""
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    offsets = []
    nbytes = 0
    for a in arrays:
        offsets.append(nbytes)
        nbytes += -(-a.nbytes // 16) * 16  # every array starts 16-byte aligned
    host = torch.empty(max(nbytes, 16), dtype=torch.uint8, pin_memory=True)
    host_bytes = host.numpy()
    for a, offset in zip(arrays, offsets):
        host_bytes[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
    staged = host.to(device, non_blocking=True)
    return [
        staged[offset : offset + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape)
        for a, offset in zip(arrays, offsets)
    ]


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def attention_batch_arrays(
    slot_mapping: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    rows_per_seq: np.ndarray,
    packed: bool = True,
) -> tuple[dict[str, np.ndarray], int, bool]:
    """The host side of :func:`build_attention_batch`: the arrays ``slot_mapping``,
    ``block_table``, ``seq_lens`` and (packed, with prefill rows) ``query_start_loc``, then
    ``max_seq_len`` and whether the step is decodes only."""
    rows_per_seq = np.asarray(rows_per_seq, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int32)
    decode_only = bool(np.all(rows_per_seq == 1))
    arrays = {"slot_mapping": np.ascontiguousarray(slot_mapping, np.int64)}
    if decode_only or packed:
        table, lens = block_table, seq_lens
        if not decode_only:
            starts = np.concatenate([[0], np.cumsum(rows_per_seq)]).astype(np.int32)
            arrays["query_start_loc"] = starts
    else:
        seq_of_row = np.repeat(np.arange(len(rows_per_seq)), rows_per_seq)
        # Position of each row: its sequence's length, minus the rows after it in the sequence.
        ends = np.cumsum(rows_per_seq)
        rows_after = ends[seq_of_row] - 1 - np.arange(len(seq_of_row))
        lens = (seq_lens[seq_of_row] - rows_after).astype(np.int32)
        table = block_table[seq_of_row]
    arrays["block_table"] = np.ascontiguousarray(table, np.int32)
    arrays["seq_lens"] = np.ascontiguousarray(lens, np.int32)
    max_seq_len = int(seq_lens.max()) if len(seq_lens) else 0
    return arrays, max_seq_len, decode_only


def step_sparse_budget(
    sparse_budget: int, decode_only: bool, max_seq_len: int, block_size: int
) -> int:
    """The pages per query that a step's attention selects (0: dense): ``sparse_budget`` for a
    step of decodes only whose longest sequence (``max_seq_len`` tokens) has more pages than
    that. Steps with prefill rows stay dense, and so do steps where every sequence fits the
    budget: selection would keep every page, and the dense step reads the same keys without
    selection's launches."""
    if not decode_only or -(-max_seq_len // block_size) <= sparse_budget:
        return 0
    return sparse_budget


def upload_attention_batch(
    kv_cache: PagedKVCache,
    arrays: dict[str, np.ndarray],
    max_seq_len: int,
    decode_only: bool,
    sparse_budget: int,
    extra: list[np.ndarray] | None = None,
) -> tuple[AttentionBatch, list[torch.Tensor]]:
    """The attention batch of :func:`attention_batch_arrays`' output on the cache's device, and
    ``extra`` arrays (the step's other inputs) uploaded in the same transfer. ``sparse_budget``
    is the step's own (:func:`step_sparse_budget`)."""
    extra = extra or []
    tensors = upload(extra + list(arrays.values()), kv_cache.device)
    batch_tensors = dict(zip(arrays, tensors[len(extra) :]))
    batch = AttentionBatch(
        kv_cache=kv_cache,
        slot_mapping=batch_tensors["slot_mapping"],
        block_table=batch_tensors["block_table"],
        seq_lens=batch_tensors["seq_lens"],
        max_seq_len=max_seq_len,
        query_start_loc=batch_tensors.get("query_start_loc"),
        decode_only=decode_only,
        sparse_budget=sparse_budget,
    )
    return batch, tensors[: len(extra)]


def build_attention_batch(
    kv_cache: PagedKVCache,
    slot_mapping: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    rows_per_seq: np.ndarray,
    *,
    packed: bool = True,
    sparse_budget: int = 0,
) -> AttentionBatch:
    """The attention batch of a step from the block manager's view after the step's appends:
    ``block_table`` int32 ``[B, max_blocks]`` and ``seq_lens`` int32 ``[B]`` (lengths including
    this step's tokens), ``rows_per_seq`` int ``[B]`` (this step's tokens of each sequence,
    which are its last ones), ``slot_mapping`` int64 ``[sum(rows_per_seq)]``. ``packed`` picks
    the form. ``sparse_budget`` > 0 makes a step of decodes only attend through
    ``select_pages`` (that many pages per query) where some sequence has more pages than that
    (:func:`step_sparse_budget`)."""
    arrays, max_seq_len, decode_only = attention_batch_arrays(
        slot_mapping, block_table, seq_lens, rows_per_seq, packed
    )
    sparse_budget = step_sparse_budget(sparse_budget, decode_only, max_seq_len, kv_cache.block_size)
    return upload_attention_batch(kv_cache, arrays, max_seq_len, decode_only, sparse_budget)[0]
