"""The README's Python example runs as written (CPU), so the documentation stays in step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    out, lse = scope["out"], scope["lse"]
    assert out.shape == (1, 8, 64) and np.isfinite(out).all() and np.isfinite(lse).all()
    assert scope["pairs"].shape == (1, 2)  # the fork's shared partial block was copied once
    # the copy ran: the child's new last block holds the parent's token data
    src, dst = scope["pairs"][0]
    np.testing.assert_array_equal(scope["k_cache"][dst][:8], scope["k_cache"][src][:8])
