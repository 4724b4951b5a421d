"""Requests, their sampling parameters, and the sequences (one per sample) that the engine
schedules."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

# on_token(request_id, sample_index, token_id): called once for every generated token, in order,
# as soon as the step that produced it ends.
TokenCallback = Callable[[int, int, int], None]


def checked_number(op: str, name: str, value: object, integral: bool = True) -> int | float:
    """``value`` as an int (``integral``) or a float: Python and NumPy numbers pass; bools (ints
    to Python; NumPy's are no numbers) and everything else are a TypeError naming ``op`` and
    ``name``."""
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if integral else numbers.Real
    ):
        raise TypeError(
            f"{op}: {name} must be {'an integer' if integral else 'a number'}, got "
            f"{type(value).__name__} {value!r}"
        )
    return int(value) if integral else float(value)


def _integer(name: str, value: object) -> int:
    return checked_number("tinyserve.SamplingParams", name, value)


def _real(name: str, value: object) -> float:
    return checked_number("tinyserve.SamplingParams", name, value, integral=False)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy (argmax; ties go to the
    lowest token id, as in ``torch.argmax``). Otherwise tokens are drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0: all) and
    to the smallest set whose probability reaches ``top_p``, with a generator seeded from
    ``seed`` (sample ``i`` of a request uses ``seed + i``), so a seeded request gives the same
    tokens on every run, whatever else is in the batch (up to the last bits of the logits,
    which another batch can change: a draw within about 1e-6 of a boundary can flip)."""

    max_new_tokens: int = 32
    n: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    # Tokens that end a sample like EOS does (finish reason "stop"), whatever ignore_eos says.
    stop_token_ids: tuple[int, ...] = ()
    # Log-probabilities in the output: None (none), or k >= 0: each generated token's own under
    # the model's distribution (log-softmax of its logits, before temperature, top-k and top-p)
    # and the k most likely tokens' (ties to the lower id).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "n", "top_k"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        for name in ("temperature", "top_p"):
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise TypeError(
                "tinyserve.SamplingParams: ignore_eos must be a bool, got "
                f"{type(self.ignore_eos).__name__}"
            )
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(
            self.stop_token_ids, "__iter__"
        ):
            raise TypeError(
                "tinyserve.SamplingParams: stop_token_ids must be a sequence of token ids, got "
                f"{type(self.stop_token_ids).__name__}"
            )
        stops = tuple(
            _integer(f"stop_token_ids[{i}]", t) for i, t in enumerate(self.stop_token_ids)
        )
        if any(t < 0 for t in stops):
            raise ValueError(
                f"tinyserve.SamplingParams: stop_token_ids must be >= 0, got {min(stops)}"
            )
        object.__setattr__(self, "stop_token_ids", stops)
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", _integer("logprobs", self.logprobs))
            if self.logprobs < 0:
                raise ValueError(
                    f"tinyserve.SamplingParams: logprobs must be >= 0 or None, got {self.logprobs}"
                )
        if self.max_new_tokens < 1:
            raise ValueError(
                f"tinyserve.SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"tinyserve.SamplingParams: n must be >= 1, got {self.n}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(
                "tinyserve.SamplingParams: temperature must be finite and >= 0, got "
                f"{self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"tinyserve.SamplingParams: top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"tinyserve.SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - self.n:
            # torch.Generator.manual_seed takes [-2**63, 2**64); sample i uses seed + i.
            raise ValueError(
                f"tinyserve.SamplingParams: seed must be in [-2**63, 2**64 - n], got {self.seed}"
            )

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
    admitted: bool = False  # admitted once (a recomputation after preemption is not counted)
    finish_reason: str | None = None
    # With SamplingParams.logprobs: per generated token, its log-probability and the top ones.
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)

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
    aborted: bool = False

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
    tokenizer), why each stopped (``"length"``, ``"eos"``, or ``"stop"`` for one of
    ``stop_token_ids``; the stopping token is kept), and its time to first token. With
    ``SamplingParams.logprobs = k``: ``logprobs[s][i]`` is the log-probability of sample ``s``'s
    token ``i`` and ``top_logprobs[s][i]`` the ``k`` most likely tokens' ``{token: logprob}``."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    time_to_first_token: float
    prefix_cache_hit_tokens: int
    texts: list[str] | None = None
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[dict[int, float]]] | None = None
