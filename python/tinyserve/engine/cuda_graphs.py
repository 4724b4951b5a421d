"""CUDA graphs of the engine's decode step: one captured model forward per batch-size bucket,
replayed with the step's inputs copied into static device buffers.

A decode step runs the whole model on one token per sequence. In eager mode that is a few
hundred small kernel launches, each issued by Python (transformers' modules, then tinyserve's
``reshape_and_cache`` and ``paged_attention`` per layer), and at small batch sizes the launches,
not the GPU, set the step's time. A replayed graph issues them all at once.

What makes one capture valid for every later step of its batch size:

- the inputs live in static device buffers (token ids, positions, slot mapping, block table,
  sequence lengths) that each replay overwrites in one host-to-device copy;
- tinyserve's kernels take every launch parameter from host values fixed at capture (shapes,
  the split count) and read lengths and tables on the device when they run. The split count is
  planned for the longest sequence the captured table can hold (``max_seq_len`` of the captured
  batch is the table's capacity), so it is valid whatever the lengths of a replay; a shorter
  sequence leaves some splits with no keys;
- with sparse decode each bucket is captured twice: with ``select_pages`` inside the graph (its
  output table and lengths are graph memory, so the pages are chosen again on every replay),
  and dense, replayed for steps where every sequence fits the budget (selection would keep
  every page: the dense graph reads the same keys without selection's launches);
- rows beyond the step's batch (padding up to the bucket) write nowhere (slot -1, which
  ``reshape_and_cache`` skips) and attend to nothing (length 0); their logits are never read.
  The model computes every row independently apart from attention, so padding rows cannot
  change the real rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .kv import AttentionBatch, PagedKVCache

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def default_batch_sizes(max_batch: int) -> list[int]:
    """The default buckets up to ``max_batch``, which is always the last one."""
    sizes = [s for s in DEFAULT_BATCH_SIZES if s < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    """CUDA graphs of the decode step of one engine (its model runner and KV cache), one per
    batch size in ``batch_sizes``, all captured when this is made and sharing one private memory
    pool (the graphs run one at a time, so their scratch memory can overlap).

    ``max_blocks``: the widest block table a replay may bring (blocks per sequence), fixed at
    capture. ``sparse_budget``: pages per query for sparse decode (0: dense), as in
    :class:`~tinyserve.engine.kv.AttentionBatch`; with it, each batch size has a selecting and
    a dense graph. ``capture=False`` captures nothing and runs
    the forward eagerly over the same padded static buffers that a replay reads (any device):
    the padding and bucketing checked without a GPU."""

    def __init__(
        self,
        runner: Any,
        kv_cache: PagedKVCache,
        *,
        batch_sizes: Sequence[int],
        max_blocks: int,
        sparse_budget: int = 0,
        capture: bool = True,
    ):
        sizes = sorted({int(s) for s in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(
                f"tinyserve.Engine: CUDA graph batch sizes must be >= 1, got {list(batch_sizes)}"
            )
        if max_blocks < 1:
            raise ValueError(f"tinyserve.Engine: max_blocks must be >= 1, got {max_blocks}")
        self.runner = runner
        self.kv_cache = kv_cache
        self.batch_sizes = sizes
        self.max_batch = sizes[-1]
        self.max_blocks = max_blocks
        device = kv_cache.device
        rows = self.max_batch
        # One host staging buffer and one device buffer with the same layout, so that a replay's
        # inputs travel in one copy: token ids, positions and slots (int64), lengths (int32), then
        # the block table (int32, row-major, so that a bucket's rows are a prefix of it).
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        nbytes = 0
        for name, dtype, shape in (
            ("token_ids", torch.int64, (rows,)),
            ("positions", torch.int64, (rows,)),
            ("slot_mapping", torch.int64, (rows,)),
            ("seq_lens", torch.int32, (rows,)),
            ("block_table", torch.int32, (rows, max_blocks)),
        ):
            self._layout.append((name, dtype, shape, nbytes))
            nbytes += -(-(math.prod(shape) * dtype.itemsize) // 16) * 16
        self.captured = capture and device.type == "cuda"
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.captured)
        self._device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        host = self._views(self._host)
        self._host_views = {k: v.numpy() for k, v in host.items()}
        self._device_views = self._views(self._device)
        # Rows start as padding: slot -1 writes nowhere, length 0 reads nothing.
        self._host_views["slot_mapping"][:] = -1
        self._device_views["slot_mapping"].fill_(-1)
        # Recorded after each copy out of the staging buffer, which the next step overwrites.
        self._copied = torch.cuda.Event() if self.captured else None
        self.pool = torch.cuda.graph_pool_handle() if self.captured else None
        self.sparse_budget = sparse_budget
        # Keyed by (batch size, whether the graph selects pages).
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        modes = [False, True] if sparse_budget else [False]
        capacity = max_blocks * kv_cache.block_size
        self._batches = {
            (size, select): AttentionBatch(
                kv_cache=kv_cache,
                slot_mapping=self._device_views["slot_mapping"][:size],
                block_table=self._device_views["block_table"][:size],
                seq_lens=self._device_views["seq_lens"][:size],
                max_seq_len=capacity,  # splits planned for the longest sequence the table holds
                decode_only=True,
                sparse_budget=sparse_budget if select else 0,
            )
            for size in sizes
            for select in modes
        }
        # Largest first: the smaller graphs then fit in the memory the larger ones freed.
        if self.captured:
            with torch.cuda.device(device):
                for size in reversed(sizes):
                    for select in modes:
                        self._capture(size, select)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for name, dtype, shape, offset in self._layout:
            nbytes = math.prod(shape) * dtype.itemsize
            views[name] = buffer[offset : offset + nbytes].view(dtype).view(shape)
        return views

    def _forward(self, size: int, select: bool = True) -> torch.Tensor:
        """The forward over the static buffers: selecting pages where ``select`` and the graphs
        decode sparsely, densely otherwise."""
        v = self._device_views
        batch = self._batches[(size, select and bool(self.sparse_budget))]
        return self.runner.forward(v["token_ids"][:size], v["positions"][:size], batch, None)

    def _capture(self, size: int, select: bool) -> None:
        # torch's pattern: warm up on a side stream (lazy initialisation, tinyserve's split
        # plans and workspaces, cuBLAS handles) so that nothing allocates outside the pool or
        # synchronises during capture. The buffers hold padding only: nothing is written.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(size, select)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, select)
        self._graphs[(size, select)] = (graph, logits)

    def bucket(self, batch: int) -> int | None:
        """The smallest captured batch size that holds ``batch`` rows, or None."""
        for size in self.batch_sizes:
            if size >= batch:
                return size
        return None

    def fits(self, batch: int, table_width: int) -> bool:
        return batch <= self.max_batch and table_width <= self.max_blocks

    def run(
        self,
        token_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        block_table: np.ndarray,
        seq_lens: np.ndarray,
        select: bool = True,
    ) -> torch.Tensor:
        """Logits ``[batch, vocab]`` (float32) of one decode step of ``batch = len(seq_lens)``
        sequences (one row each), after writing every row's keys and values into the cache.
        With sparse decode, ``select=False`` replays the dense graph (for a step where every
        sequence fits the budget). The result is a view of the graph's output: read it before
        the next replay."""
        batch = len(seq_lens)
        width = block_table.shape[1]
        if not self.fits(batch, width):
            raise ValueError(
                f"tinyserve.Engine: a decode step of {batch} sequences and {width} blocks does not "
                f"fit the CUDA graphs ({self.max_batch} sequences, {self.max_blocks} blocks)"
            )
        size = self.bucket(batch)
        # The staging buffer is reused: wait until the previous step's copy has read it (long
        # done by now, since sampling read that step's logits).
        if self._copied is not None:
            self._copied.synchronize()
        h = self._host_views
        h["token_ids"][:batch] = token_ids
        h["positions"][:batch] = positions
        h["slot_mapping"][:batch] = slot_mapping
        h["seq_lens"][:batch] = seq_lens
        h["block_table"][:batch, :width] = block_table
        # Padding rows: token 0 at position 0, written nowhere, attending to nothing.
        h["token_ids"][batch:size] = 0
        h["positions"][batch:size] = 0
        h["slot_mapping"][batch:size] = -1
        h["seq_lens"][batch:size] = 0
        # The inputs up to the bucket's last table row (the table is last in the buffers).
        _, table_dtype, _, table_offset = self._layout[-1]
        end = table_offset + size * self.max_blocks * table_dtype.itemsize
        self._device[:end].copy_(self._host[:end], non_blocking=self.captured)
        select = select and bool(self.sparse_budget)
        if not self.captured:
            return self._forward(size, select)[:batch]
        self._copied.record()
        graph, logits = self._graphs[(size, select)]
        graph.replay()
        return logits[:batch]
