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

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import tinyserve

# Relative L2 error allowed between the kernel's output and the float64 reference, by storage
# dtype. The reference sees the same dtype-rounded q/k/v as the kernel, so this bounds only the
# kernel's own arithmetic and the rounding of its output (the library's tests use these bounds).
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

VOCAB_SIZE = 1024
NUM_KV_HEADS = 4
NUM_Q_HEADS = 8  # GQA: two query heads share each KV head
HEAD_DIM = 64
ROPE_THETA = 10000.0
NUM_SYSTEM_PROMPTS = 3
SYSTEM_PROMPT_TOKENS = (32, 80)  # range of lengths, in tokens
SUFFIX_TOKENS = (4, 32)
PARALLEL_SAMPLING_SHARE = 0.3  # requests asking for n=2 samples


class DemoFailure(Exception):
    """A check failed: the attention output, the manager's invariants, or the final pool."""


# ---------------------------------------------------------------------------------------------
# The synthetic model


class SyntheticModel:
    """Queries, keys and values without weights: per-layer random embeddings of the token id,
    with rotary position embedding on queries and keys (so a key depends on where its token
    sits, and a block attached at the wrong position is caught). Everything is a pure function
    of (token id, position, layer, head), so a dense recomputation is always possible."""

    def __init__(self, seed: int, num_layers: int):
        rng = np.random.default_rng([seed, 1])
        shape = (VOCAB_SIZE, num_layers)
        self.key_table = rng.standard_normal(shape + (NUM_KV_HEADS, HEAD_DIM), dtype=np.float32)
        self.value_table = rng.standard_normal(shape + (NUM_KV_HEADS, HEAD_DIM), dtype=np.float32)
        self.query_table = rng.standard_normal(shape + (NUM_Q_HEADS, HEAD_DIM), dtype=np.float32)
        half = HEAD_DIM // 2
        self.inv_freq = ROPE_THETA ** (-np.arange(half, dtype=np.float64) / half)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotary embedding of x [T, layers, heads, D] at positions [T]."""
        angles = np.asarray(positions, dtype=np.float64)[:, None] * self.inv_freq
        cos = np.cos(angles).astype(np.float32)[:, None, None, :]
        sin = np.sin(angles).astype(np.float32)[:, None, None, :]
        half = HEAD_DIM // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def key_value(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 [layers, 2 (K, V), T, kv_heads, D]."""
        keys = self._rope(self.key_table[tokens], positions)
        values = self.value_table[tokens]
        return np.ascontiguousarray(np.stack([keys, values], axis=0).transpose(2, 0, 1, 3, 4))

    def query(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 [layers, T, q_heads, D]."""
        queries = self._rope(self.query_table[tokens], positions)
        return np.ascontiguousarray(queries.transpose(1, 0, 2, 3))


# ---------------------------------------------------------------------------------------------
# Arrays: NumPy on the CPU, torch for bfloat16 and for CUDA


class Arrays:
    """Allocation and transfers in the framework that holds the KV cache."""

    def __init__(self, device: str, dtype: str):
        self.device = device
        self.dtype = dtype
        self.use_torch = device == "cuda" or dtype == "bfloat16"
        if self.use_torch:
            import torch

            self.torch = torch
            self.torch_dtype = getattr(torch, dtype)
        self.framework = "torch" if self.use_torch else "NumPy"

    def nan(self, shape: tuple[int, ...]) -> Any:
        """A new array of the storage dtype filled with NaN: a slot read before it was written
        turns the attention output into NaN, which the check reports."""
        if self.use_torch:
            return self.torch.full(shape, float("nan"), dtype=self.torch_dtype, device=self.device)
        return np.full(shape, np.nan, dtype=self.dtype)

    def put(self, array: np.ndarray) -> Any:
        """A host array on the device; floating-point arrays are converted to the storage dtype
        (they are already rounded to it), integer arrays keep their dtype."""
        array = np.ascontiguousarray(array)
        floating = array.dtype.kind == "f"
        if self.use_torch:
            t = self.torch.from_numpy(array)
            return t.to(device=self.device, dtype=self.torch_dtype if floating else t.dtype)
        return array.astype(self.dtype, copy=False) if floating else array

    def round(self, array: np.ndarray) -> np.ndarray:
        """float32 values rounded to the storage dtype (exactly representable in float32)."""
        if self.dtype == "float32":
            return array
        if self.use_torch:
            t = self.torch.from_numpy(np.ascontiguousarray(array))
            return t.to(self.torch_dtype).to(self.torch.float32).numpy()
        return array.astype(self.dtype).astype(np.float32)

    def to_f64(self, array: Any) -> np.ndarray:
        if self.use_torch:
            return array.detach().to("cpu", self.torch.float64).numpy()
        return np.asarray(array, dtype=np.float64)

    def nbytes(self, array: Any) -> int:
        if self.use_torch:
            return array.numel() * array.element_size()
        return array.nbytes

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Requests and sequences


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


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class Counters:
    decode_steps: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0  # prompt tokens written by prefills (the cache covered the rest)
    prefix_hit_tokens: int = 0
    recomputed_tokens: int = 0  # tokens prefilled again after a preemption
    requests_finished: int = 0
    sequences_forked: int = 0
    sequences_freed: int = 0
    cow_copies: int = 0
    copy_calls: int = 0
    preemptions: int = 0
    checks: int = 0
    max_error: float = 0.0
    peak_used: int = 0
    peak_shared: int = 0
    peak_running: int = 0
    used_slots: int = 0  # summed over decode steps, for the mean waste
    waste_slots: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("manager", "kernels", "model", "check"), 0.0)
    )


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


class Engine:
    def __init__(self, args: argparse.Namespace, arrays: Arrays, log: Callable[[str], None]):
        self.args = args
        self.arrays = arrays
        self.log = log
        self.model = SyntheticModel(args.seed, args.layers)
        self.bm = tinyserve.BlockManager(args.blocks, args.block_size, enable_prefix_caching=True)
        # One allocation for every layer's K and V: [layers, 2, blocks, block_size, H, D]; each
        # kv[l, 0] / kv[l, 1] is a cache in the logical layout the ops take.
        self.kv = arrays.nan((args.layers, 2, args.blocks, args.block_size, NUM_KV_HEADS, HEAD_DIM))
        self.caches = [self.kv[layer, kind] for layer in range(args.layers) for kind in (0, 1)]
        self.tolerance = args.tolerance
        self.next_seq_id = 0
        self.waiting: collections.deque[Request | Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.counters = Counters()
        self.step = 0
        self.since_report = collections.Counter()  # admissions since the last progress line
        self.fault_injected = False

    # -- timing -----------------------------------------------------------------------------

    def _timed(self, part: str, start: float) -> float:
        now = time.perf_counter()
        self.counters.seconds[part] += now - start
        return now

    # -- prefill ----------------------------------------------------------------------------

    def _write(self, slots: np.ndarray, kv_rounded: np.ndarray) -> None:
        """reshape_and_cache of rounded K/V [layers, 2, T, H, D] into every layer's cache."""
        slot_mapping = self.arrays.put(slots)
        for layer in range(self.args.layers):
            tinyserve.reshape_and_cache(
                self.arrays.put(kv_rounded[layer, 0]),
                self.arrays.put(kv_rounded[layer, 1]),
                self.kv[layer, 0],
                self.kv[layer, 1],
                slot_mapping,
            )

    def _prefill(self, seq: Sequence, tokens: np.ndarray) -> int | None:
        """Registers seq under a new id, attaches the cached prefix of `tokens`, appends and
        writes the rest. Returns the tokens found in the prefix cache, or None (nothing changed)
        when the pool cannot take the prompt now."""
        c = self.counters
        t = time.perf_counter()
        # Admission control, read-only: the prompt takes its uncached blocks from the free list,
        # and so do the cached blocks it would attach that are free now. Keep blocks free for the
        # running sequences' next decode steps: each needs a new block every block_size steps,
        # so a quarter of the batch covers the next few steps.
        match = self.bm.match_prefix(tokens)
        needed = -(-len(tokens) // self.args.block_size) - match["blocks"] + match["free_blocks"]
        if self.bm.num_free_blocks - needed < max(1, len(self.running) // 4):
            self._timed("manager", t)
            return None
        seq_id = self.next_seq_id
        self.next_seq_id += 1
        cached = self.bm.add_sequence(seq_id, tokens)
        try:
            slots = self.bm.append(seq_id, len(tokens) - cached, tokens[cached:])
        except tinyserve.OutOfBlocks:
            self.bm.free(seq_id)
            self._timed("manager", t)
            return None
        t = self._timed("manager", t)
        seq.seq_id = seq_id
        if seq.history is None:  # a new prompt: the model computes all of it
            kv = self.model.key_value(tokens, np.arange(len(tokens)))
            seq.extend_history(self.arrays.round(kv))
            seq.tokens = [int(x) for x in tokens]
        t = self._timed("model", t)
        # A prefix hit skips computing and writing the covered tokens: the block manager
        # promises their K/V are already in the attached blocks, and the checks hold it to that.
        self._write(slots, seq.history[:, :, cached : len(tokens)])
        self._timed("kernels", t)
        c.prefix_hit_tokens += cached
        c.prefill_tokens += len(tokens) - cached
        return cached

    def admit(self) -> None:
        """Prefill waiting work in order (preempted sequences first: they were put in front)
        until the pool is too full."""
        c, report = self.counters, self.since_report
        while self.waiting:
            item = self.waiting[0]
            if isinstance(item, Sequence):  # preempted earlier: recompute its tokens
                tokens = np.asarray(item.tokens, dtype=np.int64)
                cached = self._prefill(item, tokens)
                if cached is None:
                    break
                self.waiting.popleft()
                self.running.append(item)
                c.recomputed_tokens += len(tokens) - cached
                report.update(recomputed=1, tokens=len(tokens), hits=cached)
                continue
            request = item
            rng_base = [self.args.seed, 3, request.req_id]
            parent = Sequence(
                -1, request, request.new_tokens[0], np.random.default_rng(rng_base + [0])
            )
            cached = self._prefill(parent, request.prompt)
            if cached is None:
                break
            self.waiting.popleft()
            report.update(new=1, tokens=len(request.prompt), hits=cached)
            request.samples_left = len(request.new_tokens)
            parent.sample()  # the prefill's logits give each sample its first token
            samples = [parent]
            for index in range(1, len(request.new_tokens)):
                # Parallel sampling: the child shares every block of the prompt; the shared
                # partial last block is copied on the first decode step (copy-on-write).
                t = time.perf_counter()
                child_id = self.next_seq_id
                self.next_seq_id += 1
                self.bm.fork(parent.seq_id, child_id)
                self._timed("manager", t)
                child = Sequence(
                    child_id,
                    request,
                    request.new_tokens[index],
                    np.random.default_rng(rng_base + [index]),
                    tokens=list(parent.tokens),
                    history=parent.history.copy(),
                )
                child.sample()
                samples.append(child)
                c.sequences_forked += 1
            report["forked"] += len(samples) > 1
            self.running.extend(samples)
            c.tokens_generated += len(samples)

    def report_admissions(self, first_step: int) -> str:
        """What was prefilled since the last report, in a line ('' when nothing was)."""
        r = self.since_report
        if not r["new"] and not r["recomputed"]:
            return ""
        self.since_report = collections.Counter()
        parts = []
        if r["new"]:
            parts.append(_count(r["new"], "new request"))
            if r["forked"]:
                parts[-1] += f" ({r['forked']} forked for n=2)"
        if r["recomputed"]:
            parts.append(_count(r["recomputed"], "preempted sequence") + " recomputed")
        steps = f"{first_step}-{self.step}"
        return (
            f"prefill  steps {steps:>8}: {', '.join(parts)}; {r['tokens']} tokens, "
            f"{r['hits']} of them from the prefix cache"
        )

    # -- decode -----------------------------------------------------------------------------

    def _preempt(self) -> None:
        """Free the most recently admitted running sequence and queue it for recomputation. Its
        tokens were all written in earlier steps, so the keys it leaves in the prefix cache are
        backed by real K/V (and its recomputation often hits them)."""
        victim = self.running.pop()
        self.bm.free(victim.seq_id)
        self.waiting.appendleft(victim)
        self.counters.preemptions += 1
        self.counters.sequences_freed += 1

    def _finish(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        self.counters.sequences_freed += 1
        seq.request.samples_left -= 1
        if seq.request.samples_left == 0:
            self.counters.requests_finished += 1

    def decode_step(self) -> None:
        c, args = self.counters, self.args
        t = time.perf_counter()
        while True:
            seq_ids = np.array([s.seq_id for s in self.running], dtype=np.int64)
            try:
                slots = self.bm.append_batch(seq_ids, 1)
                break
            except tinyserve.OutOfBlocks:
                if len(self.running) == 1:
                    raise
                self._preempt()
        pairs = self.bm.take_copies()
        table, lens = self.bm.block_table(seq_ids)
        t = self._timed("manager", t)

        batch = len(self.running)
        tokens = np.array([s.pending for s in self.running], dtype=np.int64)
        positions = np.array([len(s.tokens) for s in self.running], dtype=np.int64)
        kv = self.arrays.round(self.model.key_value(tokens, positions))
        query = self.arrays.round(self.model.query(tokens, positions))
        for b, seq in enumerate(self.running):
            seq.extend_history(kv[:, :, b : b + 1])
            seq.tokens.append(seq.pending)
        t = self._timed("model", t)

        if len(pairs):
            # Before anything writes: the copy sources must still hold the shared content.
            src, dst = self.arrays.put(pairs[:, 0]), self.arrays.put(pairs[:, 1])
            tinyserve.copy_blocks(self.caches, src, dst)
            c.cow_copies += len(pairs)
            c.copy_calls += 1
        self._write(slots, kv)
        table_d, lens_d = self.arrays.put(table), self.arrays.put(lens)
        outputs = [
            tinyserve.paged_attention(
                self.arrays.put(query[layer]), self.kv[layer, 0], self.kv[layer, 1], table_d, lens_d
            )
            for layer in range(args.layers)
        ]
        self.arrays.synchronize()
        t = self._timed("kernels", t)

        if args.check_every > 0 and c.decode_steps % args.check_every == 0:
            self._check(query, [self.arrays.to_f64(o) for o in outputs], table)
            t = self._timed("check", t)

        stats = self.bm.stats()
        c.peak_used = max(c.peak_used, stats["num_used"])
        c.peak_shared = max(c.peak_shared, stats["num_shared"])
        c.peak_running = max(c.peak_running, batch)
        c.used_slots += stats["num_used"] * args.block_size
        c.waste_slots += stats["waste_slots"]
        c.decode_steps += 1
        still_running = []
        for seq in self.running:
            if seq.generated == seq.target:
                self._finish(seq)
            else:
                seq.sample()
                c.tokens_generated += 1
                still_running.append(seq)
        self.running = still_running
        self._timed("manager", t)

    # -- the check --------------------------------------------------------------------------

    def _check(self, query: np.ndarray, outputs: list[np.ndarray], table: np.ndarray) -> None:
        """Dense float64 attention over each sequence's own history, every layer at once,
        compared with the paged kernel's output (relative L2 error per sequence and layer)."""
        c = self.counters
        group = NUM_Q_HEADS // NUM_KV_HEADS
        scale = 1.0 / math.sqrt(HEAD_DIM)
        out = np.stack(outputs)  # [layers, B, Hq, D]
        for b, seq in enumerate(self.running):
            length = len(seq.tokens)
            hist = seq.history[:, :, :length].astype(np.float64)  # [layers, 2, L, H, D]
            q = query[:, b].astype(np.float64).reshape(-1, NUM_KV_HEADS, group, HEAD_DIM)
            logits = np.einsum("nhgd,nlhd->nhgl", q, hist[:, 0]) * scale
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            expected = np.einsum("nhgl,nlhd->nhgd", p, hist[:, 1]).reshape(
                -1, NUM_Q_HEADS, HEAD_DIM
            )
            diff = np.linalg.norm((out[:, b] - expected).reshape(len(out), -1), axis=1)
            norm = np.linalg.norm(expected.reshape(len(out), -1), axis=1)
            errors = diff / np.maximum(norm, 1e-30)
            worst = int(np.argmax(np.nan_to_num(errors, nan=np.inf)))
            error = float(errors[worst])
            if not error <= self.tolerance:  # NaN (an unwritten slot was read) fails too
                raise DemoFailure(self._explain(seq, b, worst, error, table))
            c.max_error = max(c.max_error, error)
        c.checks += 1
        self.bm.check()

    def _explain(self, seq: Sequence, b: int, layer: int, error: float, table: np.ndarray) -> str:
        """The failure, and (reading the cache back, for diagnosis only) the first token whose
        cached K or V differs from the sequence's history."""
        length = len(seq.tokens)
        message = (
            f"step {self.step}: paged_attention of sequence {seq.seq_id} (request "
            f"{seq.request.req_id}, {length} tokens, layer {layer}) differs from the float64 "
            f"reference: relative error {error:.3g} > tolerance {self.tolerance:.3g}"
        )
        bs = self.args.block_size
        positions = np.arange(length)
        blocks = table[b, positions // bs]
        for kind, name in ((0, "key"), (1, "value")):
            cached = self.arrays.to_f64(self.kv[layer, kind])[blocks, positions % bs]
            expected = seq.history[layer, kind, :length].astype(np.float64)
            bad = np.flatnonzero(~np.all(cached == expected, axis=(1, 2)))
            if len(bad):
                pos = int(bad[0])
                message += (
                    f"\n  first wrong cached {name}: token {pos} (block {blocks[pos]}, slot "
                    f"{blocks[pos] * bs + pos % bs}); {len(bad)} token(s) differ"
                )
                break
        return message

    # -- fault injection (a self-test of the check) -----------------------------------------

    def inject_fault(self) -> str:
        """Negate one cached token's K and V in layer 0 (in the running sequence with the most
        tokens left), as a stray write would; the next check must catch it."""
        seq = max(self.running, key=lambda s: s.target - s.generated)
        position = len(seq.tokens) // 2
        bs = self.args.block_size
        block = int(self.bm.block_ids(seq.seq_id)[position // bs])
        for kind in (0, 1):
            cache = self.kv[0, kind]
            cache[block, position % bs] = -cache[block, position % bs]
        self.fault_injected = True
        return f"negated cached K/V of token {position} of sequence {seq.seq_id} (block {block})"

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, requests: list[Request]) -> None:
        """Steps until every request finished (or --steps), then frees what is left and checks
        that the pool is empty. Raises DemoFailure (or the library's error) on a failed check."""
        args, c = self.args, self.counters
        arrivals = collections.deque(requests)
        report_from = 0
        while arrivals or self.waiting or self.running:
            if args.steps and c.decode_steps >= args.steps:
                break
            if not self.running and not self.waiting:
                self.step = max(self.step, arrivals[0].arrival_step)  # idle: skip ahead
            while arrivals and arrivals[0].arrival_step <= self.step:
                self.waiting.append(arrivals.popleft())
            self.admit()
            if self.running:
                if 0 <= args.inject_fault <= self.step and not self.fault_injected:
                    self.log(f"fault    step  {self.step:>8}: {self.inject_fault()}")
                self.decode_step()
                if c.decode_steps % args.progress_every == 0:
                    self.log(self.report_admissions(report_from))
                    self.log(self.progress())
                    report_from = self.step + 1
            self.step += 1
        self.log(self.report_admissions(report_from))

        for seq in self.running:  # cut off by --steps
            self.bm.free(seq.seq_id)
            self.counters.sequences_freed += 1
        self.running = []
        self.bm.check()
        stats = self.bm.stats()
        if stats["num_used"] or stats["num_sequences"]:
            raise DemoFailure(f"every sequence was freed but blocks are still in use: {stats}")
        self.log(
            f"drain    step  {self.step - 1:>8}: every sequence freed, the manager's invariants "
            f"hold; {stats['num_free']} blocks free, {stats['num_evictable']} of them still cached"
        )
        if self.fault_injected:
            raise DemoFailure("the injected fault was not detected (are checks off?)")

    def progress(self) -> str:
        c, s = self.counters, self.bm.stats()
        error = f"max err {c.max_error:.1e}" if c.checks else "not checked"
        return (
            f"decode   step  {self.step:>8}: {len(self.running)} running, "
            f"{len(self.waiting)} waiting, {c.requests_finished} finished | "
            f"blocks {s['num_used']} used, {s['num_shared']} shared, "
            f"{s['num_evictable']} evictable | "
            f"{_count(c.cow_copies, 'cow copy', 'cow copies')}, "
            f"{_count(c.preemptions, 'preemption')} | {error}"
        )


# ---------------------------------------------------------------------------------------------
# The command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyserve demo",
        description=(
            "Continuous-batching decode simulation over tinyserve's BlockManager and ops, with "
            "prefix caching, parallel sampling (fork + copy-on-write), preemption, and every "
            "attention output checked against a dense float64 NumPy reference. Exits 1 if a "
            "check fails. See docs/demo.md."
        ),
    )
    size = p.add_argument_group("workload and pool size")
    size.add_argument(
        "--requests", type=int, default=32, help="requests to serve (default: %(default)s)"
    )
    size.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="most tokens a sample generates; each stops at a random length between a quarter "
        "of this and this (default: %(default)s)",
    )
    size.add_argument(
        "--arrival-interval",
        type=float,
        default=1.5,
        help="mean decode steps between arrivals; the first 4 arrive at once "
        "(default: %(default)s)",
    )
    size.add_argument(
        "--steps",
        type=int,
        default=0,
        help="stop after this many decode steps and free what is left (default: 0, run until "
        "every request finished)",
    )
    size.add_argument(
        "--blocks", type=int, default=80, help="KV-cache blocks in the pool (default: %(default)s)"
    )
    size.add_argument(
        "--block-size", type=int, default=16, help="tokens per block (default: %(default)s)"
    )
    size.add_argument("--layers", type=int, default=2, help="model layers (default: %(default)s)")
    size.add_argument(
        "--seed", type=int, default=0, help="seeds the model and the workload (default: 0)"
    )
    run = p.add_argument_group("device and checks")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (the default): cuda when torch with CUDA and a CUDA build of tinyserve are "
        "present, else cpu",
    )
    run.add_argument(
        "--dtype",
        choices=tuple(TOLERANCE),
        default="float32",
        help="KV cache, query and output dtype; bfloat16 needs torch (default: %(default)s)",
    )
    run.add_argument(
        "--check-every",
        type=int,
        default=1,
        help="check attention against the float64 reference every N decode steps; 0 never "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest relative error accepted (default: by dtype, "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
        + ")",
    )
    run.add_argument(
        "--progress-every",
        type=int,
        default=16,
        help="print a progress line every N decode steps (default: %(default)s)",
    )
    run.add_argument(
        "--inject-fault",
        type=int,
        default=-1,
        metavar="STEP",
        help="self-test of the check: corrupt one cached token before decode step STEP; the "
        "demo must then fail",
    )
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def _resolve_device(requested: str) -> tuple[str | None, str]:
    """(device, reason): device None when the request cannot be met."""

    def cuda_ready() -> tuple[bool, str]:
        if not tinyserve.cuda_available():
            return False, "tinyserve was built without CUDA or sees no CUDA device"
        try:
            import torch
        except ImportError:
            return False, "the CUDA path uses torch, which is not installed"
        if not torch.cuda.is_available():
            return False, "torch has no CUDA"
        return True, ""

    if requested == "cpu":
        return "cpu", ""
    ok, why = cuda_ready()
    if requested == "cuda":
        return ("cuda", "") if ok else (None, why)
    return ("cuda", "") if ok else ("cpu", why)


def _validate(args: argparse.Namespace) -> str | None:
    for name in ("requests", "max_new_tokens", "blocks", "block_size", "layers"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.max_new_tokens < 2:
        return f"--max-new-tokens must be at least 2, got {args.max_new_tokens}"
    if args.arrival_interval < 0 or args.steps < 0 or args.check_every < 0:
        return "--arrival-interval, --steps and --check-every must not be negative"
    if args.progress_every < 1:
        return f"--progress-every must be at least 1, got {args.progress_every}"
    # The longest sequence (system prompt + suffix + output) must fit in the pool on its own,
    # or preemption could not make progress.
    longest = SYSTEM_PROMPT_TOKENS[1] + SUFFIX_TOKENS[1] + args.max_new_tokens
    needed = -(-longest // args.block_size) + 1
    if args.blocks < needed:
        return (
            f"--blocks {args.blocks} is too small: the longest possible sequence ({longest} "
            f"tokens) needs {needed - 1} blocks of {args.block_size}, plus one kept free"
        )
    return None


def _summary(engine: Engine, device_line: str, wall: float) -> list[str]:
    c, args, stats = engine.counters, engine.args, engine.bm.stats()
    left = args.requests - c.requests_finished
    prompt_tokens = c.prefix_hit_tokens + c.prefill_tokens
    hit_share = c.prefix_hit_tokens / max(1, prompt_tokens)
    waste = 100.0 * c.waste_slots / max(1, c.used_slots)
    check = (
        f"{c.max_error:.2e} max relative error over {c.checks} checked steps (tolerance "
        f"{engine.tolerance:.2g}): OK"
        if c.checks
        else "not checked (--check-every 0)"
    )
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in c.seconds.items())
    hit_blocks = c.prefix_hit_tokens // args.block_size
    cut_off = f", {left} cut off by --steps" if left else ""
    return [
        "summary",
        f"  device         {device_line}",
        f"  steps          {c.decode_steps} decode steps, peak batch {c.peak_running}",
        (
            f"  tokens         {c.tokens_generated} generated; {prompt_tokens} prompt tokens "
            f"prefilled: {c.prefill_tokens} written ({c.recomputed_tokens} recomputed after "
            f"preemption), {c.prefix_hit_tokens} found in the prefix cache"
        ),
        f"  requests       {c.requests_finished} finished of {args.requests}{cut_off}",
        (
            f"  sequences      {c.sequences_forked} forked, {c.sequences_freed} freed "
            f"({c.preemptions} by preemption)"
        ),
        (
            f"  blocks         {args.blocks} x {args.block_size} slots: peak {c.peak_used} used, "
            f"peak {c.peak_shared} shared; at the end {stats['num_used']} used, "
            f"{stats['num_cached']} holding prefix-cache keys"
        ),
        f"  waste          {waste:.1f}% of used slots held no token (mean over steps)",
        (
            f"  prefix hits    {c.prefix_hit_tokens} tokens = {hit_blocks} blocks "
            f"({100 * hit_share:.0f}% of prompt tokens); {stats['evictions']} cached blocks "
            f"evicted for reuse"
        ),
        f"  copy-on-write  {c.cow_copies} block copies in {c.copy_calls} copy_blocks calls",
        f"  preemptions    {c.preemptions}",
        f"  attention      {check}",
        f"  wall time      {wall:.2f}s ({parts})",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 ok, 1 a check failed, 2 bad arguments)."""
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help, or an argparse error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    error = _validate(args)
    device, why = _resolve_device(args.device)
    if error is None and device is None:
        error = f"--device cuda is not available: {why}"
    if error is None and args.dtype == "bfloat16" and device == "cpu":
        try:
            import torch  # noqa: F401
        except ImportError:
            error = "--dtype bfloat16 needs torch (NumPy has no bfloat16)"
    if error is not None:
        print(f"tinyserve demo: {error}", file=sys.stderr)
        return 2
    if args.tolerance is None:
        args.tolerance = TOLERANCE[args.dtype]

    def log(line: str) -> None:
        if line and not args.quiet:
            print(line, flush=True)

    start = time.perf_counter()
    arrays = Arrays(device, args.dtype)
    engine = Engine(args, arrays, log)
    threads = f", {tinyserve.num_threads()} threads" if device == "cpu" else ""
    device_line = f"{device} ({arrays.framework} {args.dtype}{threads})"
    if args.device == "auto" and why:
        device_line += f"; CUDA not used: {why}"
    log(
        f"setup    {device_line}\n"
        f"         model: {args.layers} layers, {NUM_Q_HEADS} query heads on {NUM_KV_HEADS} KV "
        f"heads x {HEAD_DIM}, synthetic K/V/Q (no weights)\n"
        f"         pool: {args.blocks} blocks x {args.block_size} slots, "
        f"{arrays.nbytes(engine.kv) / 2**20:.1f} MiB of KV cache, prefix caching on\n"
        f"         workload: {args.requests} requests, {NUM_SYSTEM_PROMPTS} shared system "
        f"prompts, ~{PARALLEL_SAMPLING_SHARE:.0%} with n=2 samples, up to "
        f"{args.max_new_tokens} new tokens each"
    )
    try:
        engine.serve(make_requests(args))
    except (DemoFailure, RuntimeError) as failure:
        kind = "check" if isinstance(failure, DemoFailure) else type(failure).__name__
        print(f"FAIL ({kind}) {failure}", flush=True)
        return 1
    wall = time.perf_counter() - start
    print("\n".join(_summary(engine, device_line, wall)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
