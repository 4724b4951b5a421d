"""The check: every attention output against a dense float64 NumPy computation over the K/V
history that the demo keeps for each sequence itself (never read back from the cache)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .model import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS

if TYPE_CHECKING:
    from .engine import Engine
    from .workload import Sequence

# Relative L2 error allowed between the kernel's output and the float64 reference, by storage
# dtype. The reference sees the same dtype-rounded q/k/v as the kernel, so this bounds only the
# kernel's own arithmetic and the rounding of its output (the library's tests use these bounds).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


class DemoFailure(Exception):
    """A check failed: the attention output, the manager's invariants, or the final pool."""


def check_attention(
    engine: Engine, query: np.ndarray, outputs: list[np.ndarray], table: np.ndarray
) -> None:
    """Dense float64 attention over each running sequence's own history, every layer at once,
    compared with the paged kernel's output (relative L2 error per sequence and layer); then the
    block manager's invariants. Raises DemoFailure on a mismatch."""
    c = engine.counters
    group = NUM_Q_HEADS // NUM_KV_HEADS
    scale = 1.0 / math.sqrt(HEAD_DIM)
    out = np.stack(outputs)  # [layers, B, Hq, D]
    for b, seq in enumerate(engine.running):
        length = len(seq.tokens)
        hist = seq.history[:, :, :length].astype(np.float64)  # [layers, 2, L, H, D]
        q = query[:, b].astype(np.float64).reshape(-1, NUM_KV_HEADS, group, HEAD_DIM)
        logits = np.einsum("nhgd,nlhd->nhgl", q, hist[:, 0]) * scale
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        expected = np.einsum("nhgl,nlhd->nhgd", p, hist[:, 1]).reshape(-1, NUM_Q_HEADS, HEAD_DIM)
        diff = np.linalg.norm((out[:, b] - expected).reshape(len(out), -1), axis=1)
        norm = np.linalg.norm(expected.reshape(len(out), -1), axis=1)
        errors = diff / np.maximum(norm, 1e-30)
        worst = int(np.argmax(np.nan_to_num(errors, nan=np.inf)))
        error = float(errors[worst])
        if not error <= engine.tolerance:  # NaN (an unwritten slot was read) fails too
            raise DemoFailure(explain(engine, seq, b, worst, error, table))
        c.max_error = max(c.max_error, error)
    c.checks += 1
    engine.bm.check()


def explain(
    engine: Engine, seq: Sequence, b: int, layer: int, error: float, table: np.ndarray
) -> str:
    """The failure, and (reading the cache back, for diagnosis only) the first token whose
    cached K or V differs from the sequence's history."""
    length = len(seq.tokens)
    message = (
        f"step {engine.step}: paged_attention of sequence {seq.seq_id} (request "
        f"{seq.request.req_id}, {length} tokens, layer {layer}) differs from the float64 "
        f"reference: relative error {error:.3g} > tolerance {engine.tolerance:.3g}"
    )
    bs = engine.args.block_size
    positions = np.arange(length)
    blocks = table[b, positions // bs]
    for kind, name in ((0, "key"), (1, "value")):
        cached = engine.arrays.to_f64(engine.kv[layer, kind])[blocks, positions % bs]
        expected = seq.history[layer, kind, :length].astype(np.float64)
        bad = np.flatnonzero(~np.all(cached == expected, axis=(1, 2)))
        if len(bad):
            pos = int(bad[0])
            message += (
                f"\n  first wrong cached {name}: token {pos} (block {blocks[pos]}, slot "
                f"{blocks[pos] * bs + pos % bs}); {len(bad)} token(s) differ"
            )
            break
    return message
