"""Runs one decode shape a few times, for a profiler (ncu) to capture.

    ncu --kernel-name regex:decode --launch-skip 3 --launch-count 1 \
        python benchmarks/profile_decode.py BATCH CONTEXT [NHD|HND]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from bench_decode import decode_inputs

import tinyserve as ts


def main() -> None:
    batch, context = int(sys.argv[1]), int(sys.argv[2])
    layout = sys.argv[3] if len(sys.argv) > 3 else "NHD"
    q, kc, vc, table, lens = decode_inputs(batch, context, np.random.default_rng(0), layout)
    out = torch.empty_like(q)
    for _ in range(6):
        ts.paged_attention(q, kc, vc, table, lens, out, max_seq_len=context)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
