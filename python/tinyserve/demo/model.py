"""The synthetic model: queries, keys and values as fixed functions of token id and position."""

from __future__ import annotations

import numpy as np

VOCAB_SIZE = 1024
NUM_KV_HEADS = 4
NUM_Q_HEADS = 8  # GQA: two query heads share each KV head
HEAD_DIM = 64
ROPE_THETA = 10000.0


class SyntheticModel:
    """Queries, keys and values without weights: per-layer random embeddings of the token id,
    with rotary position embedding on queries and keys (so a key depends on where its token
    sits, and a block attached at the wrong position is caught). Everything is a pure function
    of (token id, position, layer, head), so a dense recomputation is always possible."""

    def __init__(self, seed: int, num_layers: int):
        rng = np.random.default_rng([seed, 1])
        shape = (VOCAB_SIZE, num_layers)
        self.key_table = rng.standard_normal(shape + (NUM_KV_HEADS, HEAD_DIM), dtype=np.float32)
        self.value_table = rng.standard_normal(shape + (NUM_KV_HEADS, HEAD_DIM), dtype=np.float32)
        self.query_table = rng.standard_normal(shape + (NUM_Q_HEADS, HEAD_DIM), dtype=np.float32)
        half = HEAD_DIM // 2
        self.inv_freq = ROPE_THETA ** (-np.arange(half, dtype=np.float64) / half)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotary embedding of x [T, layers, heads, D] at positions [T]."""
        angles = np.asarray(positions, dtype=np.float64)[:, None] * self.inv_freq
        cos = np.cos(angles).astype(np.float32)[:, None, None, :]
        sin = np.sin(angles).astype(np.float32)[:, None, None, :]
        half = HEAD_DIM // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def key_value(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 [layers, 2 (K, V), T, kv_heads, D]."""
        keys = self._rope(self.key_table[tokens], positions)
        values = self.value_table[tokens]
        return np.ascontiguousarray(np.stack([keys, values], axis=0).transpose(2, 0, 1, 3, 4))

    def query(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 [layers, T, q_heads, D]."""
        queries = self._rope(self.query_table[tokens], positions)
        return np.ascontiguousarray(queries.transpose(1, 0, 2, 3))
