"""The engine: continuous batching over the BlockManager and the ops, as a serving engine runs
them (admission with prefix-cache hits, fork for parallel sampling, decode steps with
copy-on-write, preemption when the pool runs out: by offload to a host pool through the
Compactor, or by recomputation; freeing finished sequences)."""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import tinyserve

from .arrays import Arrays
from .check import DemoFailure, check_attention
from .faults import inject_fault
from .model import HEAD_DIM, NUM_KV_HEADS, SyntheticModel
from .workload import Request, Sequence


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
    preempted_frees: int = 0  # preempted sequences freed for recomputation
    offloads: int = 0  # preemptions whose blocks went to the host pool
    offloaded_blocks: int = 0
    recalls: int = 0
    recalled_blocks: int = 0
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
    """The serving loop: admits waiting requests, runs decode steps over the running batch, and
    checks the attention outputs as it goes (see check.py)."""

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
        # Preemption by offload: a victim's blocks go to a host pool laid out like the caches
        # and come back when it is readmitted, instead of being recomputed.
        self.compactor = tinyserve.Compactor(self.bm, args.host_blocks)
        self.host = tinyserve.allocate_host_pool(self.caches, args.host_blocks)
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

    def _has_room(self, blocks: int) -> bool:
        """Whether the pool can give ``blocks`` free blocks and keep some for the running
        sequences' next decode steps: each needs a new block every block_size steps, so a
        quarter of the batch covers the next few steps."""
        return self.bm.num_free_blocks - blocks >= max(1, len(self.running) // 4)

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
        # and so do the cached blocks it would attach that are free now.
        match = self.bm.match_prefix(tokens)
        needed = -(-len(tokens) // self.args.block_size) - match["blocks"] + match["free_blocks"]
        if not self._has_room(needed):
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
            if isinstance(item, Sequence) and item.offloaded:  # preempted by offload: recall
                if self._recall(item):
                    self.waiting.popleft()
                    self.running.append(item)
                    continue
                if self.running:
                    break
                # Nothing runs, so nothing will free blocks: the device blocks that other
                # offloaded sequences still share keep this one out. Recompute it instead.
                self.bm.free(item.seq_id)
                item.offloaded = False
                c.sequences_freed += 1
                c.preempted_frees += 1
                continue
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
        """Preempt the most recently admitted running sequence and queue it in front. Its blocks
        that no other sequence holds go to the host pool (Compactor.plan_offload_sequences: one
        swap_blocks call per cache), to be recalled when it is readmitted. When the host pool
        cannot take them (or the victim holds none of its own), the victim is freed and
        recomputed instead: its tokens were all written in earlier steps, so the keys it leaves
        in the prefix cache are backed by real K/V (and its recomputation often hits them)."""
        c = self.counters
        victim = self.running.pop()
        self.waiting.appendleft(victim)
        c.preemptions += 1
        try:
            plan = self.compactor.plan_offload_sequences([victim.seq_id])
        except tinyserve.OutOfBlocks:
            plan = None
        if plan is not None and len(plan) == 0:
            self.compactor.abort(plan)
            plan = None
        if plan is None:
            self.bm.free(victim.seq_id)
            c.sequences_freed += 1
            c.preempted_frees += 1
            return
        tinyserve.execute_plan(plan, self.caches, self.host)
        self.compactor.commit(plan)
        victim.offloaded = True
        c.offloads += 1
        c.offloaded_blocks += len(plan)
        self.log(
            f"offload  step  {self.step:>8}: sequence {victim.seq_id} preempted, "
            f"{_count(len(plan), 'block')} to the host pool "
            f"({self.compactor.num_free_host_blocks} host blocks free)"
        )

    def _recall(self, seq: Sequence) -> bool:
        """Bring an offloaded sequence's blocks back (one swap_blocks call per cache) if the
        pool can take them with the same margin admission keeps; False when it cannot yet."""
        t = time.perf_counter()
        if not self._has_room(self.compactor.num_offloaded(seq.seq_id)):
            self._timed("manager", t)
            return False
        plan = self.compactor.plan_recall([seq.seq_id])
        t = self._timed("manager", t)
        tinyserve.execute_plan(plan, self.caches, self.host)
        t = self._timed("kernels", t)
        self.compactor.commit(plan)
        self._timed("manager", t)
        seq.offloaded = False
        self.counters.recalls += 1
        self.counters.recalled_blocks += len(plan)
        self.log(
            f"recall   step  {self.step:>8}: sequence {seq.seq_id} resumed, "
            f"{_count(len(plan), 'block')} back from the host pool (nothing recomputed)"
        )
        return True

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
            check_attention(self, query, [self.arrays.to_f64(o) for o in outputs], table)
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
                    self.log(f"fault    step  {self.step:>8}: {inject_fault(self)}")
                self.decode_step()
                if c.decode_steps % args.progress_every == 0:
                    self.log(self.report_admissions(report_from))
                    self.log(self.progress())
                    report_from = self.step + 1
            self.step += 1
        self.log(self.report_admissions(report_from))

        offloaded = [s for s in self.waiting if isinstance(s, Sequence) and s.offloaded]
        for seq in self.running + offloaded:  # cut off by --steps
            self.bm.free(seq.seq_id)
            self.counters.sequences_freed += 1
        self.running = []
        self.bm.check()
        stats = self.bm.stats()
        if stats["num_used"] or stats["num_sequences"] or stats["num_offloaded"]:
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
            f"{_count(c.preemptions, 'preemption')} ({c.offloads} offloaded, "
            f"{c.recalls} recalled) | {error}"
        )
