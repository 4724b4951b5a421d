"""The engine: requests in, tokens out, one batched model step at a time."""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections.abc import Mapping
from collections.abc import Sequence as SequenceOf
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

import tinyserve

from .cuda_graphs import DecodeGraphs, default_batch_sizes
from .kv import (
    ENGINE_PAGE_SUMMARY,
    PAGE_SUMMARIES,
    AttentionBatch,
    PagedKVCache,
    attention_batch_arrays,
    step_sparse_budget,
    upload_attention_batch,
)
from .request import (
    Request,
    RequestOutput,
    SamplingParams,
    Sequence,
    SequenceStatus,
    TokenCallback,
    checked_number,
)
from .sampling import greedy_tokens, make_generator, sample_token
from .scheduler import Scheduler


def _count(op: str, name: str, value: Any, least: int) -> int:
    """An integer argument at least ``least``."""
    count = checked_number(op, name, value)
    if count < least:
        raise ValueError(f"{op}: {name} must be >= {least}, got {count}")
    return count


def _holds_integers(dtype: Any) -> bool:
    """Whether an array dtype (torch's or NumPy's) is an integer type (bool is not)."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    try:
        return np.dtype(dtype).kind in "iu"
    except TypeError:
        return False


def _kv_cache_dtype(value: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the model's (None, "auto"), or float8 e4m3fn ("fp8",
    "float8_e4m3fn", torch.float8_e4m3fn)."""
    if value is None or value == "auto" or value == model_dtype:
        return model_dtype
    if value in ("fp8", "float8_e4m3fn", torch.float8_e4m3fn):
        return torch.float8_e4m3fn
    raise ValueError(
        "tinyserve.Engine: kv_cache_dtype must be None or 'auto' (the model's dtype), or 'fp8' "
        f"(float8 e4m3fn), got {value!r}"
    )


class ModelRunner(Protocol):
    """What the engine needs from a model (``tinyserve.integrations.transformers.
    TransformersRunner`` is one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: set[int]
    max_model_len: int | None
    # Optional: the number of token ids the model embeds; add_request refuses ids outside it.
    vocab_size: int | None

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits (float32) of the rows ``logits_rows`` (every row when None) of the step's
        tokens (int64, on the runner's device), after writing all their keys and values through
        ``batch``. Must launch work only (no host synchronisation, no allocation whose size
        depends on device data): the engine captures it in CUDA graphs."""
        ...


@dataclass
class EngineStats:
    """Counters since the engine was made. Times are in seconds of wall clock; ``busy_time`` is
    the time spent inside :meth:`Engine.step`."""

    steps: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # rows run through the model (prefill, recompute and decode)
    generated_tokens: int = 0
    busy_time: float = 0.0
    prefix_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache, not computed
    prefix_cache_hit_blocks: int = 0
    copy_on_write_blocks: int = 0
    forks: int = 0
    preemptions: int = 0
    offloads: int = 0  # blocks moved to the host pool by preemption through the compactor
    recalls: int = 0  # blocks brought back from it
    # Offloaded blocks dropped from the host pool because their sequence was recomputed instead
    # (it could not come back while other preempted sequences kept device blocks).
    discarded_offloads: int = 0
    sparse_decode_steps: int = 0  # decode steps that attended through select_pages
    # Decode steps with sparse decode on where every sequence fit the budget: they attended
    # densely (the same pages select_pages would keep, without its launches).
    sparse_fitting_steps: int = 0
    cuda_graph_steps: int = 0  # decode steps replayed from a captured CUDA graph
    aborted_requests: int = 0  # requests stopped by Engine.abort_request
    peak_blocks_used: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    time_to_first_token: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.busy_time if self.busy_time > 0 else 0.0

    def summary(self) -> str:
        ttft = self.time_to_first_token
        ttft_text = (
            f"mean {1e3 * float(np.mean(ttft)):.1f} ms, max {1e3 * max(ttft):.1f} ms"
            if ttft
            else "n/a"
        )
        return "\n".join(
            [
                f"tokens/s: {self.tokens_per_second:.1f} ({self.generated_tokens} tokens "
                f"generated in {self.busy_time:.2f} s, {self.steps} steps)",
                f"time to first token: {ttft_text}",
                f"prefix-cache hits: {self.prefix_cache_hit_tokens} prompt tokens "
                f"({self.prefix_cache_hit_blocks} blocks) of {self.prompt_tokens}",
                f"blocks: {self.blocks_used} used, {self.blocks_free} free "
                f"(peak {self.peak_blocks_used} used); copy-on-write copies: "
                f"{self.copy_on_write_blocks}, forks: {self.forks}",
                f"preemptions: {self.preemptions}; "
                + (f"aborted requests: {self.aborted_requests}; " if self.aborted_requests else "")
                + f"offloads/recalls: {self.offloads}/{self.recalls} blocks"
                + (f" ({self.discarded_offloads} discarded)" if self.discarded_offloads else "")
                + f"; sparse decode steps: {self.sparse_decode_steps}"
                + (
                    f" (and {self.sparse_fitting_steps} dense: every sequence fit the budget)"
                    if self.sparse_fitting_steps
                    else ""
                ),
            ]
        )


class Engine:
    """A continuous-batching engine over a model runner, with tinyserve owning the KV cache.

    Requests join with :meth:`add_request` at any time; each :meth:`step` schedules the running
    and waiting sequences (:class:`~tinyserve.engine.scheduler.Scheduler`), runs the pending
    copy-on-write block copies, runs the model once on every scheduled token (prefill chunks
    and decode tokens together) and samples the next token of every sequence whose tokens are
    all computed. Finished sequences leave the batch in the same step.

    ``num_blocks`` x ``block_size`` tokens of K/V fit in the pool (all layers);
    ``max_num_batched_tokens`` bounds the tokens computed in one step (longer prompts are
    prefilled in chunks). With ``num_host_blocks > 0`` a :class:`tinyserve.Compactor` with a host
    pool of that many blocks preempts by offload (see
    :class:`~tinyserve.engine.scheduler.Scheduler`); otherwise preemption recomputes.
    ``sparse_budget_tokens`` turns on sparse decode: each decode query reads the
    ``ceil(sparse_budget_tokens / block_size)`` pages that ``select_pages`` picks for it per KV
    head, the first page (an attention sink, when that is two pages or more) and the last page
    among them (the pages' summaries are kept beside the cache); prefill steps, layers with a
    sliding window, and steps where every sequence has no more pages than that attend densely.
    ``sparse_dense_layers``: the first layers attend densely in every step (Quest keeps two;
    on SmolLM2 attention there is diffuse, see docs/selection.md).
    ``sparse_summary`` is the page summary that selection scores (``summary=`` of
    :func:`tinyserve.select_pages`): the engine uses ``"minmax_damped"``
    (:data:`~tinyserve.engine.kv.ENGINE_PAGE_SUMMARY`, the best on SmolLM2 in
    docs/selection.md) unless told ``"minmax"`` (Quest's bound, the library's default) or
    ``"meanstd"``. ``sparse_summary_dtype="fp8"`` (or ``"float8_e4m3fn"``,
    ``torch.float8_e4m3fn``) keeps the min/max summaries in float8, rounded outward: half the
    bytes that selection reads each step under a 16-bit cache; not with ``"meanstd"``. The
    default (None or ``"auto"``) keeps them in the model's dtype.
    ``kv_cache_dtype="fp8"`` stores keys and values as float8 e4m3fn (half the bytes of a 16-bit
    cache, a quarter of float32's), quantised as ``x / kv_cache_scale`` (one scale for every
    layer and head, default 1; values beyond 448 times it saturate) and dequantised inside
    attention, with or without an elastic pool (``max_num_blocks``); with sparse decode its page
    summaries are of the keys as stored.
    ``packed_prefill`` picks how prefill rows reach ``paged_attention``: packed with
    ``query_start_loc`` (default), or each row as a decode query
    (:func:`~tinyserve.engine.kv.build_attention_batch`).

    ``cuda_graphs`` (on a CUDA device; ignored elsewhere): decode steps replay CUDA graphs of
    the model's forward captured when the engine is made, one per batch size in
    ``cuda_graph_batch_sizes`` (default: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... up to
    ``min(max_num_seqs, 256)``); a step of ``B`` decodes runs the smallest captured size
    ``>= B``, the extra rows padding that writes and reads nothing
    (:class:`~tinyserve.engine.cuda_graphs.DecodeGraphs`; with sparse decode, each size is
    captured selecting and dense). Steps with prefill rows, and decode steps larger than the
    largest size, run eagerly."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 1024,
        max_num_seqs: int = 256,
        tokenizer: Any = None,
        packed_prefill: bool = True,
        num_host_blocks: int = 0,
        sparse_budget_tokens: int | None = None,
        sparse_summary: str = ENGINE_PAGE_SUMMARY,
        cuda_graphs: bool = True,
        cuda_graph_batch_sizes: SequenceOf[int] | None = None,
        kv_cache_dtype: str | torch.dtype | None = None,
        kv_cache_scale: float = 1.0,
        max_num_blocks: int | None = None,
        sparse_dense_layers: int = 0,
        sparse_summary_dtype: str | torch.dtype | None = None,
    ):
        op = "tinyserve.Engine"
        num_blocks = _count(op, "num_blocks", num_blocks, 1)
        block_size = _count(op, "block_size", block_size, 1)
        num_host_blocks = _count(op, "num_host_blocks", num_host_blocks, 0)
        max_num_batched_tokens = _count(op, "max_num_batched_tokens", max_num_batched_tokens, 1)
        max_num_seqs = _count(op, "max_num_seqs", max_num_seqs, 1)
        if max_num_blocks is not None:
            max_num_blocks = _count(op, "max_num_blocks", max_num_blocks, 1)
        sparse_dense_layers = _count(op, "sparse_dense_layers", sparse_dense_layers, 0)
        for name, flag in (
            ("enable_prefix_caching", enable_prefix_caching),
            ("packed_prefill", packed_prefill),
            ("cuda_graphs", cuda_graphs),
        ):
            if not isinstance(flag, (bool, np.bool_)):  # "no" would read as true
                raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
        # Checked whatever the cache and device, so that a bad value is not ignored silently.
        kv_cache_scale = checked_number(op, "kv_cache_scale", kv_cache_scale, integral=False)
        if not 0 < kv_cache_scale < math.inf:
            raise ValueError(f"{op}: kv_cache_scale must be finite and > 0, got {kv_cache_scale}")
        if cuda_graph_batch_sizes is not None:
            if isinstance(cuda_graph_batch_sizes, (str, bytes)) or not hasattr(
                cuda_graph_batch_sizes, "__iter__"
            ):
                raise TypeError(
                    f"{op}: cuda_graph_batch_sizes must be a sequence of ints, got "
                    f"{type(cuda_graph_batch_sizes).__name__}"
                )
            cuda_graph_batch_sizes = [
                _count(op, "cuda_graph_batch_sizes entries", size, 1)
                for size in cuda_graph_batch_sizes
            ]
            if not cuda_graph_batch_sizes:
                raise ValueError(f"{op}: cuda_graph_batch_sizes must not be empty, got []")
        self.runner = runner
        self.tokenizer = tokenizer
        self.packed_prefill = packed_prefill
        self.sparse_budget = 0
        if sparse_budget_tokens is not None:
            sparse_budget_tokens = _count(op, "sparse_budget_tokens", sparse_budget_tokens, 1)
            self.sparse_budget = -(-sparse_budget_tokens // block_size)
        if max_num_blocks is not None and max_num_blocks < num_blocks:
            raise ValueError(
                f"tinyserve.Engine: max_num_blocks must be >= num_blocks ({num_blocks}), got "
                f"{max_num_blocks}"
            )
        kv_dtype = _kv_cache_dtype(kv_cache_dtype, runner.dtype)
        if sparse_summary not in PAGE_SUMMARIES:
            raise ValueError(
                "tinyserve.Engine: sparse_summary must be one of "
                f"{', '.join(repr(name) for name in PAGE_SUMMARIES)}, got {sparse_summary!r}"
            )
        meta_dtype = None  # the model's
        if sparse_summary_dtype not in (None, "auto") and sparse_summary_dtype != runner.dtype:
            if sparse_summary_dtype not in ("fp8", "float8_e4m3fn", torch.float8_e4m3fn):
                raise ValueError(
                    "tinyserve.Engine: sparse_summary_dtype must be None or 'auto' (the model's "
                    f"dtype), or 'fp8' (float8 e4m3fn), got {sparse_summary_dtype!r}"
                )
            meta_dtype = torch.float8_e4m3fn
            if sparse_summary == "meanstd":
                raise ValueError(
                    "tinyserve.Engine: float8 page summaries hold the min/max summaries "
                    "('minmax_damped', 'minmax'), got sparse_summary 'meanstd'"
                )

        self.block_manager = tinyserve.BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.kv_cache = PagedKVCache(
            runner.num_layers,
            num_blocks,
            block_size,
            runner.num_kv_heads,
            runner.head_dim,
            runner.dtype,
            runner.device,
            page_meta=self.sparse_budget > 0,
            page_summary=sparse_summary,
            page_meta_dtype=meta_dtype,
            kv_dtype=kv_dtype,
            kv_scale=kv_cache_scale,
            max_blocks=max_num_blocks,
            dense_layers=sparse_dense_layers,
        )
        self.compactor = None
        run_plan = None
        if num_host_blocks > 0:
            self.compactor = tinyserve.Compactor(self.block_manager, num_host_blocks)
            host_caches = tinyserve.allocate_host_pool(self.kv_cache.tensors(), num_host_blocks)

            def run_plan(plan: Any) -> None:
                # The cache's current tensors: an elastic pool's views change when it resizes.
                tinyserve.execute_plan(plan, self.kv_cache.tensors(), host_caches)

        # The compactor that packs an elastic pool before it shrinks (a manager takes one).
        self._pool_compactor = self.compactor
        if self.kv_cache.pool is not None and self._pool_compactor is None:
            self._pool_compactor = tinyserve.Compactor(self.block_manager, 0)

        self.scheduler = Scheduler(
            self.block_manager,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            compactor=self.compactor,
            run_plan=run_plan,
        )
        self.stats = EngineStats(blocks_free=num_blocks)
        self.graphs: DecodeGraphs | None = None
        self._graph_sizes: list[int] = []
        if cuda_graphs and self.kv_cache.device.type == "cuda":
            sizes = cuda_graph_batch_sizes
            if sizes is None:
                sizes = default_batch_sizes(min(max_num_seqs, 256))
            self._graph_sizes = list(sizes)
            self._capture_graphs()
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._requests: dict[int, Request] = {}  # the unfinished requests, by id

    def _capture_graphs(self) -> None:
        """(Re)capture the decode graphs over the cache's current tensors."""
        self.graphs = None  # the old graphs' memory goes first
        block_size = self.block_manager.block_size
        # The longest sequence the pool (at its largest) and the model admit.
        longest = self.kv_cache.max_blocks * block_size
        if self.runner.max_model_len is not None:
            longest = min(longest, self.runner.max_model_len)
        self.graphs = DecodeGraphs(
            self.runner,
            self.kv_cache,
            batch_sizes=self._graph_sizes,
            max_blocks=-(-longest // block_size),
            sparse_budget=self.sparse_budget,
        )

    # -- an elastic pool ----------------------------------------------------------------------

    def shrink_pool(self, num_blocks: int | None = None) -> dict[str, int]:
        """Give KV memory back (an engine made with ``max_num_blocks``): the live blocks are
        packed below ``num_blocks`` (default: as many as are in use) by the compactor, the
        manager and the pool shrink to it, and the memory past it is unmapped (on CUDA returned
        to the driver). Between steps. Refused, changing nothing, below the blocks in use or
        when an unfinished request would no longer fit. Returns
        :func:`tinyserve.compact_and_shrink`'s ``{"num_blocks", "moved_blocks", "freed_bytes"}``."""
        pool = self._elastic_pool("shrink_pool")
        if num_blocks is None:  # the blocks in use, and at least one
            num_blocks = max(self.block_manager.stats()["num_used"], 1)
        num_blocks = _count("tinyserve.Engine.shrink_pool", "num_blocks", num_blocks, 1)
        if num_blocks > pool.num_blocks:
            raise ValueError(
                f"tinyserve.Engine.shrink_pool: num_blocks must be <= the current "
                f"{pool.num_blocks}, got {num_blocks}"
            )
        self._check_requests_fit(num_blocks, "shrink_pool")
        result = tinyserve.compact_and_shrink(
            self.block_manager, self._pool_compactor, pool, num_blocks
        )
        self._pool_resized()
        return result

    def grow_pool(self, num_blocks: int) -> dict[str, int]:
        """Back more of an elastic pool (up to ``max_num_blocks``) and give the blocks to the
        manager. Returns :func:`tinyserve.grow_pool`'s ``{"num_blocks", "added_bytes"}``."""
        pool = self._elastic_pool("grow_pool")
        num_blocks = _count("tinyserve.Engine.grow_pool", "num_blocks", num_blocks, 1)
        if not pool.num_blocks <= num_blocks <= pool.max_blocks:
            raise ValueError(
                f"tinyserve.Engine.grow_pool: num_blocks must be in [{pool.num_blocks}, "
                f"{pool.max_blocks}] (the current size and max_num_blocks), got {num_blocks}"
            )
        result = tinyserve.grow_pool(self.block_manager, pool, num_blocks)
        self._pool_resized()
        return result

    def _elastic_pool(self, op: str) -> Any:
        if self.kv_cache.pool is None:
            raise RuntimeError(
                f"tinyserve.Engine.{op}: the engine's KV cache is not elastic, got an engine "
                "made without max_num_blocks"
            )
        return self.kv_cache.pool

    def _check_requests_fit(self, num_blocks: int, op: str) -> None:
        capacity = num_blocks * self.block_manager.block_size
        for request in self._requests.values():
            total = len(request.prompt_ids) + request.params.max_new_tokens
            if total > capacity:
                raise ValueError(
                    f"tinyserve.Engine.{op}: unfinished request {request.request_id} needs "
                    f"{total} tokens, more than {num_blocks} blocks hold ({capacity})"
                )

    def _pool_resized(self) -> None:
        self.kv_cache.fetch_pool_views()
        if self.graphs is not None:
            self._capture_graphs()
        self._update_block_stats()

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: SequenceOf[int],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
    ) -> int:
        """Queue a prompt (token ids); returns the request id. ``on_token(request_id,
        sample_index, token_id)`` streams each generated token."""
        prompt, params = self._checked_request(prompt_ids, params, on_token)
        return self._queue(prompt, params, on_token)

    def _checked_request(
        self, prompt_ids: Any, params: SamplingParams | None, on_token: TokenCallback | None
    ) -> tuple[list[int], SamplingParams]:
        """add_request's arguments checked, the prompt as a list of token ids: what it refuses
        is refused here, before anything is queued."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(
                "tinyserve.Engine.add_request: params must be a SamplingParams, got "
                f"{type(params).__name__}"
            )
        if on_token is not None and not callable(on_token):
            raise TypeError(
                "tinyserve.Engine.add_request: on_token must be callable or None, got "
                f"{type(on_token).__name__}"
            )
        prompt = self._token_ids(prompt_ids)
        if not prompt:
            raise ValueError(
                "tinyserve.Engine.add_request: the prompt must not be empty, got 0 tokens"
            )
        total = len(prompt) + params.max_new_tokens
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise ValueError(
                "tinyserve.Engine.add_request: prompt plus max_new_tokens must fit in the pool "
                f"({capacity} tokens), got {total}"
            )
        limit = self.runner.max_model_len
        if limit is not None and total > limit:
            raise ValueError(
                "tinyserve.Engine.add_request: prompt plus max_new_tokens must fit in the "
                f"model's context ({limit} tokens), got {total}"
            )
        return prompt, params

    def _queue(
        self, prompt: list[int], params: SamplingParams, on_token: TokenCallback | None
    ) -> int:
        """A checked request queued; its id."""
        request = Request(
            request_id=next(self._request_ids),
            prompt_ids=prompt,
            params=params,
            on_token=on_token,
            arrival_time=time.perf_counter(),
        )
        request.samples.append(self._new_sequence(request, 0, list(prompt)))
        self.scheduler.add(request.samples[0])
        self.stats.prompt_tokens += len(prompt)
        self._requests[request.request_id] = request
        return request.request_id

    def abort_request(self, request_id: int) -> bool:
        """Stop a request now (a client went away): its samples leave the batch, their blocks
        are freed (offloaded ones too) and no output is made for it. True if it was unfinished;
        False for an id that finished, was aborted or never existed. Safe between steps and from
        an ``on_token`` callback (the rest of that step skips it)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.samples:
            self.scheduler.abort(seq)
        request.aborted = True
        self.stats.aborted_requests += 1
        self._update_block_stats()
        return True

    def _token_ids(self, prompt_ids: Any) -> list[int]:
        """The prompt as a list of ints, each a token id of the model's vocabulary (an id past
        it would fail inside the model's embedding, on CUDA as a device-side assert)."""
        if isinstance(prompt_ids, (str, bytes)):
            raise TypeError(
                "tinyserve.Engine.add_request: prompt_ids must be token ids, got "
                f"{type(prompt_ids).__name__}: encode the text with the tokenizer first"
            )
        ndim = getattr(prompt_ids, "ndim", 1)
        if ndim != 1:
            raise ValueError(
                f"tinyserve.Engine.add_request: prompt_ids must be 1-D, got {ndim} dimensions"
            )
        refused = TypeError(
            "tinyserve.Engine.add_request: prompt_ids must be a sequence of integer token ids, "
            f"got {type(prompt_ids).__name__}"
        )
        dtype = getattr(prompt_ids, "dtype", None)
        if dtype is not None and hasattr(prompt_ids, "tolist"):
            # An array (NumPy, torch): its dtype says what it holds, and one conversion (one
            # transfer from a device) gives the ints, with no Python object per token on its side.
            if not _holds_integers(dtype):
                raise refused
            prompt = prompt_ids.tolist()
        else:
            if isinstance(prompt_ids, (AbstractSet, Mapping)):  # no order of its own
                raise TypeError(
                    "tinyserve.Engine.add_request: prompt_ids must be an ordered sequence of "
                    f"token ids, got {type(prompt_ids).__name__}"
                )
            prompt = []
            try:
                for t in prompt_ids:  # TypeError for something that is no sequence, too
                    if isinstance(t, bool):  # an int to Python, not a token id
                        raise TypeError
                    prompt.append(operator.index(t))
            except TypeError:
                raise refused from None
        vocab = getattr(self.runner, "vocab_size", None)
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            bound = "" if vocab is None else f" and < {vocab} (the model's vocabulary)"
            raise ValueError(
                f"tinyserve.Engine.add_request: token ids must be >= 0{bound}, got {bad[0]}"
            )
        return prompt

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def generate(
        self,
        prompts: SequenceOf[SequenceOf[int]],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[RequestOutput | None]:
        """Run the prompts to completion together; outputs in prompt order (None for a request
        that an ``on_token`` callback aborted). A prompt refused refuses the call: every prompt
        is checked before any is queued."""
        checked = [self._checked_request(p, params, on_token) for p in prompts]
        ids = [self._queue(prompt, p, on_token) for prompt, p in checked]
        done: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            for output in self.step():
                done[output.request_id] = output
        # A request aborted meanwhile (from a callback) has no output: None in its place.
        return [done.get(i) for i in ids]

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished in it."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return []
        copies = self.block_manager.take_copies()
        self.kv_cache.copy_blocks(copies)
        self.stats.copy_on_write_blocks += len(copies)

        seq_ids = [s.seq_id for s in plan.seqs]
        table, lens = self.block_manager.block_table(seq_ids)
        token_ids = np.fromiter(
            itertools.chain.from_iterable(
                s.token_ids[s.num_computed : s.num_computed + n]
                for s, n in zip(plan.seqs, plan.rows)
            ),
            np.int64,
        )
        rows = np.asarray(plan.rows, np.int64)
        computed = np.fromiter((s.num_computed for s in plan.seqs), np.int64, len(plan.seqs))
        row_ends = np.cumsum(rows)
        # Each sequence's rows are its positions num_computed, num_computed + 1, ...
        positions = np.arange(row_ends[-1]) + np.repeat(computed - (row_ends - rows), rows)
        arrays, max_seq_len, decode_only = attention_batch_arrays(
            np.concatenate(plan.slots), table, lens, rows, self.packed_prefill
        )
        use_graph = (
            decode_only
            and self.graphs is not None
            and self.graphs.fits(len(plan.seqs), table.shape[1])
        )
        # Selection only where some sequence outgrew the budget.
        sparse_budget = step_sparse_budget(
            self.sparse_budget, decode_only, max_seq_len, self.kv_cache.block_size
        )
        # The sequences whose tokens are all computed after this step: they sample one.
        num_tokens = np.fromiter((len(s.token_ids) for s in plan.seqs), np.int64, len(plan.seqs))
        finishing = np.flatnonzero(computed + rows == num_tokens)
        if use_graph:
            logits = self.graphs.run(
                token_ids,
                positions,
                arrays["slot_mapping"],
                table,
                arrays["seq_lens"],
                select=bool(sparse_budget),
            )
            if len(finishing) < len(plan.seqs):  # a one-token prefill chunk, not its last
                logits = logits[torch.from_numpy(finishing).to(logits.device)]
            self.stats.cuda_graph_steps += 1
        else:
            # The step's inputs and its attention batch reach the device in one transfer.
            batch, (ids, pos, logits_rows) = upload_attention_batch(
                self.kv_cache,
                arrays,
                max_seq_len,
                decode_only,
                sparse_budget,
                extra=[token_ids, positions, row_ends[finishing] - 1],
            )
            logits = self.runner.forward(ids, pos, batch, logits_rows)
        if self.sparse_budget and decode_only and self._some_layer_selects():
            if sparse_budget:
                self.stats.sparse_decode_steps += 1
            else:
                self.stats.sparse_fitting_steps += 1
        for seq, n in zip(plan.seqs, plan.rows):
            seq.num_computed += n
        if self.compactor is not None:
            self.compactor.touch(seq_ids)  # recency: the blocks these sequences attended
        self.stats.computed_tokens += len(token_ids)
        self.stats.steps += 1

        finished = self._sample([plan.seqs[i] for i in finishing], logits)
        self._update_block_stats()
        self.stats.busy_time += time.perf_counter() - start
        return finished

    def _some_layer_selects(self) -> bool:
        """Whether a decode step past the budget selects pages in some layer: one after the
        first dense_layers without a sliding window. The windows are known from the layers'
        attention calls, which every sequence's prefill (eager) has made before its decode."""
        kv = self.kv_cache
        return any(
            layer not in kv.windowed_layers
            for layer in range(kv.dense_layers, self.runner.num_layers)
        )

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        # A request with n > 1 forks its other samples once its prompt is computed: they share
        # the prompt's blocks and each draws its own first token from the same logits.
        rows: list[tuple[Sequence, int]] = []
        for row, seq in enumerate(seqs):
            rows.append((seq, row))
            request = seq.request
            if seq.sample_index == 0 and len(request.samples) < request.params.n:
                for index in range(1, request.params.n):
                    child = self._new_sequence(request, index, list(seq.token_ids))
                    request.samples.append(child)
                    self.scheduler.admit_fork(seq, child)
                    self.stats.forks += 1
                    rows.append((child, row))
        # One argmax over every row and one transfer, rather than gathering the greedy rows; the
        # rows that sample (on the CPU) reach the host together too, not one transfer each.
        greedy_ids = greedy_tokens(logits) if any(s.request.params.greedy for s, _ in rows) else []
        sampled = sorted({row for s, row in rows if not s.request.params.greedy})
        host_logits = {}
        if sampled:
            picked = logits[torch.tensor(sampled, device=logits.device)].to("cpu", torch.float32)
            host_logits = dict(zip(sampled, picked))
        tokens = [
            greedy_ids[row]
            if seq.request.params.greedy
            else sample_token(host_logits[row], seq.request.params, seq.generator)
            for seq, row in rows
        ]
        self._record_logprobs(rows, tokens, logits)
        now = time.perf_counter()  # the step's tokens are on the host: its GPU work is done
        finished: list[RequestOutput] = []
        eos_ids = self.runner.eos_token_ids
        for (seq, _), token in zip(rows, tokens):
            if seq.request.aborted:  # by an on_token callback earlier in this loop
                continue
            params = seq.request.params
            seq.token_ids.append(token)
            self.stats.generated_tokens += 1
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                self.stats.time_to_first_token.append(now - request.arrival_time)
            if request.on_token is not None:
                request.on_token(request.request_id, seq.sample_index, token)
                if request.aborted:  # by this very callback: its blocks are already free
                    continue
            if token in eos_ids and not params.ignore_eos:
                self.scheduler.finish(seq, "eos")
            elif token in params.stop_token_ids:
                self.scheduler.finish(seq, "stop")
            elif seq.num_generated >= params.max_new_tokens:
                self.scheduler.finish(seq, "length")
            else:
                continue
            if request.finished:
                request.finish_time = now
                self._requests.pop(request.request_id, None)
                finished.append(self._output(request))
        return finished

    @staticmethod
    def _record_logprobs(
        rows: list[tuple[Sequence, int]], tokens: list[int], logits: torch.Tensor
    ) -> None:
        """Each picked token's log-probability (and the top k) for the samples that ask: one
        log-softmax over their rows and one transfer."""
        wanted = [i for i, (seq, _) in enumerate(rows) if seq.request.params.logprobs is not None]
        if not wanted:
            return
        device = logits.device
        picked_rows = torch.tensor([rows[i][1] for i in wanted], device=device)
        logprobs = logits[picked_rows].float().log_softmax(-1)
        chosen = torch.tensor([tokens[i] for i in wanted], device=device)
        own = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        k = min(max(rows[i][0].request.params.logprobs for i in wanted), logprobs.shape[1])
        top_values, top_ids = [], []
        if k > 0:
            # Stable: ties to the lower token id.
            order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
            top_values = order.values[:, :k].tolist()
            top_ids = order.indices[:, :k].tolist()
        for j, i in enumerate(wanted):
            seq = rows[i][0]
            seq.logprobs.append(own[j])
            n = seq.request.params.logprobs
            seq.top_logprobs.append(dict(zip(top_ids[j][:n], top_values[j][:n])) if n and k else {})

    # -- helpers ----------------------------------------------------------------------------

    def _new_sequence(self, request: Request, index: int, tokens: list[int]) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            sample_index=index,
            token_ids=tokens,
            generator=make_generator(request.params, index),
            status=SequenceStatus.WAITING,
        )

    def _output(self, request: Request) -> RequestOutput:
        token_ids = [s.generated_ids for s in request.samples]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
        with_logprobs = request.params.logprobs is not None
        return RequestOutput(
            request_id=request.request_id,
            prompt_ids=request.prompt_ids,
            token_ids=token_ids,
            finish_reasons=[s.finish_reason or "" for s in request.samples],
            time_to_first_token=request.time_to_first_token or 0.0,
            prefix_cache_hit_tokens=request.prefix_cache_hit_tokens,
            texts=texts,
            logprobs=[s.logprobs for s in request.samples] if with_logprobs else None,
            top_logprobs=[s.top_logprobs for s in request.samples] if with_logprobs else None,
        )

    def _update_block_stats(self) -> None:
        stats = self.block_manager.stats()
        self.stats.blocks_used = stats["num_used"]
        self.stats.blocks_free = stats["num_free"]
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, stats["num_used"])
        self.stats.prefix_cache_hit_blocks = self.scheduler.prefix_cache_hit_blocks
        self.stats.prefix_cache_hit_tokens = self.scheduler.prefix_cache_hit_tokens
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.offloads = self.scheduler.num_offloaded_blocks
        self.stats.recalls = self.scheduler.num_recalled_blocks
        self.stats.discarded_offloads = self.scheduler.num_discarded_blocks
