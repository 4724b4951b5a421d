"""python -m tinyserve demo: a continuous-batching decode simulation, checked as it runs.

A synthetic model (no weights: each token's queries, keys and values are fixed functions of its
id and position) is served the way an engine serves a real one. Requests arrive over time with
prompts that share system prompts, so the prefix cache hits; some ask for two samples, which
fork and then diverge through copy-on-write; finished sequences are freed; when the pool runs
out, the newest running sequence is preempted and recomputed later. Each decode step uses the
library exactly as an engine would:

    BlockManager: append_batch, take_copies, block_table   (host side)
    ops:          copy_blocks, reshape_and_cache, paged_attention   (every layer)

and the attention output is compared with a dense float64 NumPy computation over the K/V
history that the demo keeps for every sequence itself (never read back from the cache). Any
mismatch beyond the dtype's tolerance stops the demo with exit status 1.

See docs/demo.md for what is simulated, what is checked, the flags and a sample run.
"""

from .check import TOLERANCE, DemoFailure
from .cli import main

__all__ = ["TOLERANCE", "DemoFailure", "main"]
