"""Picking the next token from a row of logits: greedy or seeded sampling."""

from __future__ import annotations

import torch

from .request import SamplingParams


def make_generator(params: SamplingParams, sample_index: int) -> torch.Generator | None:
    """A CPU generator for one sample, or None for greedy decoding. Seeded requests get
    ``seed + sample_index``; unseeded ones a random seed."""
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + sample_index)
    return generator


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Argmax of every row of ``[rows, vocab]`` logits, in one device-to-host transfer."""
    return logits.argmax(dim=-1).tolist()


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One token drawn from one row of logits ``[vocab]`` under ``params`` (not greedy: the
    engine takes greedy tokens from :func:`greedy_tokens`). Sampling runs in float32 on the CPU
    so that a seed gives the same token on any device."""
    scores = logits.detach().to("cpu", torch.float64)
    # The largest made 0 before the temperature divides (softmax, top-k and top-p do not change),
    # in float64, where any temperature > 0 is > 0: a tiny one sends the others to -inf, greedy,
    # rather than overflowing to inf (or, below float32's range, dividing 0 by 0).
    scores = ((scores - scores.max()) / params.temperature).to(torch.float32)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose probability reaches top_p: a token is dropped when the
        # tokens before it already reach it.
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
