"""The README's examples run as written (the Python one here; the C++ one is built against the
installed package in test_cpp.py), so the documentation stays in step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def dense_attention(query: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float64 decode attention of query [Hq, D] over one sequence's keys/values [L, Hkv, D]."""
    q_heads, head_dim = query.shape
    group = q_heads // keys.shape[1]
    k = np.repeat(keys.astype(np.float64), group, axis=1)  # [L, Hq, D]
    v = np.repeat(values.astype(np.float64), group, axis=1)
    logits = np.einsum("hd,lhd->hl", query.astype(np.float64), k) / np.sqrt(head_dim)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.einsum("hl,lhd->hd", p / p.sum(axis=1, keepdims=True), v)


def test_python_example_runs():
    blocks = readme_blocks("python")
    assert blocks, "README.md has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    bm, prompt, block_size = scope["bm"], scope["prompt"], scope["block_size"]

    # The second request hit the prefix cache for the prompt's full blocks and appended only the
    # rest: both sequences hold the prompt once, sharing its full blocks.
    full_blocks = len(prompt) // block_size
    assert scope["cached"] == full_blocks * block_size > 0
    assert bm.seq_len(0) == bm.seq_len(1) == len(prompt)
    np.testing.assert_array_equal(scope["lens"], [len(prompt), len(prompt)])
    table = scope["table"]
    np.testing.assert_array_equal(table[0, :full_blocks], table[1, :full_blocks])
    assert table[0, full_blocks] != table[1, full_blocks]  # each wrote its own partial block

    # Both outputs are attention over the prompt's K/V (nothing missing, nothing doubled).
    out, lse = scope["out"], scope["lse"]
    assert out.shape == (2, 8, 64) and np.isfinite(lse).all()
    for b in range(2):
        expected = dense_attention(scope["query"][b], scope["k"], scope["v"])
        np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-5)

    assert scope["pairs"].shape == (1, 2)  # the fork's shared partial block was copied once
    # the copy ran: the child's new last block holds the parent's token data
    src, dst = scope["pairs"][0]
    tail = len(prompt) % block_size
    np.testing.assert_array_equal(scope["k_cache"][dst][:tail], scope["k_cache"][src][:tail])
    bm.check()
