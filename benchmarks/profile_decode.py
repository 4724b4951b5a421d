"""Runs one decode shape a few times, for a profiler (ncu) to capture.

    ncu --kernel-name regex:decode --launch-skip 3 --launch-count 1 \
        python benchmarks/profile_decode.py BATCH CONTEXT [NHD|HND]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import tinyserve as ts


def main() -> None:
    batch, context = int(sys.argv[1]), int(sys.argv[2])
    layout = sys.argv[3] if len(sys.argv) > 3 else "NHD"
    q_heads, kv_heads, dim, page = 32, 8, 128, 16
    pages = context // page
    table = torch.from_numpy(np.random.default_rng(0).permutation(batch * pages).astype(np.int32))
    table = table.view(batch, pages).cuda()
    shape = (batch * pages, page, kv_heads, dim)
    if layout == "HND":
        kc = torch.randn(
            (batch * pages, kv_heads, page, dim), dtype=torch.float16, device="cuda"
        ).transpose(1, 2)
    else:
        kc = torch.randn(shape, dtype=torch.float16, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.randn((batch, q_heads, dim), dtype=torch.float16, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    for _ in range(6):
        ts.paged_attention(q, kc, vc, table, lens, out, max_seq_len=context)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
