"""Fault injection: a self-test of the check."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine


def inject_fault(engine: Engine) -> str:
    """Negate one cached token's K and V in layer 0 (in the running sequence with the most
    tokens left), as a stray write would; the next check must catch it."""
    seq = max(engine.running, key=lambda s: s.target - s.generated)
    position = len(seq.tokens) // 2
    bs = engine.args.block_size
    block = int(engine.bm.block_ids(seq.seq_id)[position // bs])
    for kind in (0, 1):
        cache = engine.kv[0, kind]
        cache[block, position % bs] = -cache[block, position % bs]
    engine.fault_injected = True
    return f"negated cached K/V of token {position} of sequence {seq.seq_id} (block {block})"
