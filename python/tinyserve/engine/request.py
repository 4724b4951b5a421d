"""Requests, their sampling parameters, and the sequences (one per sample) that the engine
schedules."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

# on_token(request_id, sample_index, token_id): called once for every generated token, in order,
# as soon as the step that produced it ends.
TokenCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy (argmax; ties go to the
    lowest token id, as in ``torch.argmax``). Otherwise tokens are drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0: all) and
    to the smallest set whose probability reaches ``top_p``, with a generator seeded from
    ``seed`` (sample ``i`` of a request uses ``seed + i``), so a seeded request gives the same
    tokens on every run, whatever else is in the batch."""

    max_new_tokens: int = 32
    n: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"tinyserve.SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"tinyserve.SamplingParams: n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(
                f"tinyserve.SamplingParams: temperature must be >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"tinyserve.SamplingParams: top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"tinyserve.SamplingParams: top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the block manager (new, or preempted)
    RUNNING = "running"  # holds blocks; scheduled every step until finished
    SWAPPED = "swapped"  # preempted by offload: some of its blocks are in the host pool
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request: the tokens so far (prompt, then generated) and how many of them
    have their K/V in the cache. The step that computes the last token's K/V also yields the
    logits for the next token, so prefill, chunked prefill, decode and recomputation after
    preemption are all "compute tokens[num_computed:]"."""

    seq_id: int
    request: Request
    sample_index: int
    token_ids: list[int]
    generator: torch.Generator | None = None
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class Request:
    """A prompt and what to do with it. ``samples`` holds its sequences: one at first; a request
    with ``n > 1`` forks the others from it once the prompt is computed."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_token: TokenCallback | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    prefix_cache_hit_tokens: int = 0
    samples: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(
            s.status is SequenceStatus.FINISHED for s in self.samples
        )

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: each sample's generated token ids (and text, when the engine has a
    tokenizer), why each stopped (``"length"`` or ``"eos"``), and its time to first token."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    time_to_first_token: float
    prefix_cache_hit_tokens: int
    texts: list[str] | None = None
