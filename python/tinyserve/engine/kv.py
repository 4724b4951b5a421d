"""The paged KV cache that the engine owns, and the per-step attention batch that every layer's
attention reads: where to write the step's new keys and values, and which pages each query row
attends to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import tinyserve


class PagedKVCache:
    """One K and one V tensor per layer, each ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` (tinyserve's NHD layout), indexed by the block ids of a
    :class:`tinyserve.BlockManager`. Fresh blocks hold NaN so that a read of a slot that was
    never written shows up in the output instead of passing silently."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers = [
            (
                torch.full(shape, float("nan"), dtype=dtype, device=device),
                torch.full(shape, float("nan"), dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim
        self.bytes_per_block *= torch.empty((), dtype=dtype).element_size()

    def tensors(self) -> list[torch.Tensor]:
        """Every cache tensor (K and V of every layer): what block copies must cover."""
        return [t for pair in self.layers for t in pair]

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Run the block manager's pending copy-on-write pairs (``take_copies()``, int32
        ``[P, 2]``) over every layer in one call."""
        if len(pairs) == 0:
            return
        src = torch.from_numpy(np.ascontiguousarray(pairs[:, 0])).to(self.device)
        dst = torch.from_numpy(np.ascontiguousarray(pairs[:, 1])).to(self.device)
        tinyserve.copy_blocks(self.tensors(), src, dst)


@dataclass
class AttentionBatch:
    """Everything a layer's attention needs for one engine step, built once per step.

    The step's query rows are the tokens being computed, sequence after sequence (a decoding
    sequence has one row, a prefilling one a chunk of its prompt). ``slot_mapping`` (int64
    ``[rows]``) says where each row's key and value go. Attention is causal within the step: the
    row at position ``p`` of a sequence sees that sequence's keys ``0..p``.

    Today every row is issued as a decode query (``paged_attention`` without
    ``query_start_loc``): ``row_block_table`` repeats the sequence's block table row for each of
    its rows and ``row_seq_lens`` is ``p + 1``. That is exact, and costs a table row per query
    row. :func:`build_attention_batch` and :meth:`attend` are the only two places that know
    this form."""

    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor
    row_block_table: torch.Tensor
    row_seq_lens: torch.Tensor
    max_seq_len: int

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's new keys and values ``[rows, num_kv_heads, head_dim]``."""
        key_cache, value_cache = self.kv_cache.layers[layer]
        tinyserve.reshape_and_cache(key, value, key_cache, value_cache, self.slot_mapping)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        scale: float | None = None,
        window_left: int = -1,
        logits_soft_cap: float = 0.0,
    ) -> torch.Tensor:
        """Attention of the step's query rows ``[rows, num_q_heads, head_dim]`` over the cache
        (after :meth:`write`); returns ``[rows, num_q_heads, head_dim]``."""
        key_cache, value_cache = self.kv_cache.layers[layer]
        return tinyserve.paged_attention(
            query,
            key_cache,
            value_cache,
            self.row_block_table,
            self.row_seq_lens,
            scale=scale,
            window_left=window_left,
            logits_soft_cap=logits_soft_cap,
            max_seq_len=self.max_seq_len,
        )


def build_attention_batch(
    kv_cache: PagedKVCache,
    slot_mapping: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    rows_per_seq: np.ndarray,
) -> AttentionBatch:
    """The attention batch of a step from the block manager's view after the step's appends:
    ``block_table`` int32 ``[B, max_blocks]`` and ``seq_lens`` int32 ``[B]`` (lengths including
    this step's tokens), ``rows_per_seq`` int ``[B]`` (this step's tokens of each sequence,
    which are its last ones), ``slot_mapping`` int64 ``[sum(rows_per_seq)]``."""
    rows_per_seq = np.asarray(rows_per_seq, dtype=np.int64)
    seq_of_row = np.repeat(np.arange(len(rows_per_seq)), rows_per_seq)
    # Position of each row: its sequence's length, minus the rows after it in the sequence.
    ends = np.cumsum(rows_per_seq)
    rows_after = ends[seq_of_row] - 1 - np.arange(len(seq_of_row))
    row_seq_lens = (seq_lens[seq_of_row] - rows_after).astype(np.int32)
    row_block_table = np.ascontiguousarray(block_table[seq_of_row])
    device = kv_cache.device
    return AttentionBatch(
        kv_cache=kv_cache,
        slot_mapping=torch.from_numpy(np.ascontiguousarray(slot_mapping, np.int64)).to(device),
        row_block_table=torch.from_numpy(row_block_table).to(device),
        row_seq_lens=torch.from_numpy(row_seq_lens).to(device),
        max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
    )
