"""The workload: requests with shared system prompts, and the sequences that serve them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np

from .model import VOCAB_SIZE

NUM_SYSTEM_PROMPTS = 3
SYSTEM_PROMPT_TOKENS = (32, 80)  # range of lengths, in tokens
SUFFIX_TOKENS = (4, 32)
PARALLEL_SAMPLING_SHARE = 0.3  # requests asking for n=2 samples


@dataclass
class Request:
    req_id: int
    arrival_step: int
    prompt: np.ndarray  # int64 token ids
    new_tokens: list[int]  # tokens to generate, one entry per sample (n = len)
    samples_left: int = 0


@dataclass
class Sequence:
    """One sample of a request: the demo's own record of what the cache must hold."""

    seq_id: int
    request: Request
    target: int  # tokens to generate
    rng: np.random.Generator  # the "sampler", private so that scheduling never changes outputs
    tokens: list[int] = field(default_factory=list)  # token ids whose K/V are in the cache
    history: np.ndarray | None = None  # rounded K/V of `tokens`, float32 [layers, 2, cap, H, D]
    pending: int = -1  # sampled next token, appended by the next decode step
    generated: int = 0
    offloaded: bool = False  # preempted with its blocks in the compactor's host pool

    def extend_history(self, kv: np.ndarray) -> None:
        """Append rows of rounded K/V, kv [layers, 2, T, H, D], after the current tokens."""
        start, count = len(self.tokens), kv.shape[2]
        if self.history is None or self.history.shape[2] < start + count:
            capacity = max(64, 2 * (start + count))
            grown = np.empty(kv.shape[:2] + (capacity,) + kv.shape[3:], dtype=np.float32)
            if self.history is not None:
                grown[:, :, :start] = self.history[:, :, :start]
            self.history = grown
        self.history[:, :, start : start + count] = kv

    def sample(self) -> None:
        self.pending = int(self.rng.integers(VOCAB_SIZE))
        self.generated += 1


def make_requests(args: argparse.Namespace) -> list[Request]:
    """A seeded workload: prompts are one of a few system prompts plus a random suffix; arrivals
    are a Poisson process, the first few at step 0; 30% of the requests ask for two samples;
    each sample stops after a random number of tokens (as if it met an end-of-sequence)."""
    rng = np.random.default_rng([args.seed, 2])
    system_prompts = [
        rng.integers(VOCAB_SIZE, size=int(rng.integers(*SYSTEM_PROMPT_TOKENS, endpoint=True)))
        for _ in range(NUM_SYSTEM_PROMPTS)
    ]
    requests, step = [], 0.0
    for req_id in range(args.requests):
        if req_id >= 4:
            step += rng.exponential(args.arrival_interval)
        suffix = rng.integers(VOCAB_SIZE, size=int(rng.integers(*SUFFIX_TOKENS, endpoint=True)))
        prompt = np.concatenate([system_prompts[rng.integers(NUM_SYSTEM_PROMPTS)], suffix])
        n = 2 if rng.random() < PARALLEL_SAMPLING_SHARE else 1
        lo = max(2, args.max_new_tokens // 4)
        new_tokens = [int(rng.integers(lo, max(lo, args.max_new_tokens) + 1)) for _ in range(n)]
        requests.append(Request(req_id, int(step), prompt.astype(np.int64), new_tokens))
    return requests
