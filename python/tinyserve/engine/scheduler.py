"""Continuous batching: which sequences compute which tokens in the next step, and the block
manager calls that reserve their slots."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import tinyserve

from .request import Sequence, SequenceStatus


@dataclass
class StepPlan:
    """One step: ``seqs[i]`` computes its next ``rows[i]`` tokens (its last ``rows[i]`` tokens
    after this step's appends), written at ``slots`` (int64, concatenated in ``seqs`` order).
    Decoding sequences (one row each) come first, then prefill chunks."""

    seqs: list[Sequence] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def add(self, seq: Sequence, rows: int, slots: np.ndarray) -> None:
        self.seqs.append(seq)
        self.rows.append(rows)
        self.slots.append(slots)


class Scheduler:
    """FIFO continuous batching over a :class:`tinyserve.BlockManager`.

    Every step, in this order:

    0. sequences preempted by offload come back first, oldest first, when the pool has room for
       their offloaded blocks plus one new block per running sequence (``plan_recall``);
    1. every running sequence that is decoding gets one token (``append_batch``, all or
       nothing); when the pool is short, the most recently admitted running sequence is
       preempted and the batch retried;
    2. running sequences in the middle of a chunked prefill get their next chunk;
    3. waiting sequences (new, or preempted by recomputation) are admitted first come, first
       served while the step's token budget (``max_num_batched_tokens``) and the pool allow:
       with prefix caching ``add_sequence`` attaches the cached full blocks of the prompt, and
       only the rest is computed (``append`` with the token ids, so the new full blocks become
       cached too).

    Preemption, with a :class:`tinyserve.Compactor` (``compactor`` and ``run_plan``, which runs a
    plan's copies on the caches): the blocks that the victim alone holds are offloaded to the
    host pool (``plan_offload_sequences``; blocks it shares stay on the device). The victim keeps
    its place in its sequence and resumes without recomputing anything once recalled. Without a
    compactor, when the host pool is full, or when the victim holds no block alone (offloading
    would free nothing, and its references would keep a sibling's copy-on-write from a block),
    the victim's blocks are freed and it goes back to the head of the waiting queue, to be
    recomputed from its tokens (prompt and generated so far) when readmitted, mostly from the
    prefix cache when its blocks have not been reused meanwhile. A preempted sequence that
    cannot come back because younger preempted ones keep device blocks (or a last running
    sequence that needs them) makes the youngest of those recompute instead."""

    def __init__(
        self,
        block_manager: tinyserve.BlockManager,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        compactor: Any = None,
        run_plan: Callable[[Any], None] | None = None,
    ):
        if max_num_batched_tokens < 1:
            raise ValueError(
                "tinyserve.Scheduler: max_num_batched_tokens must be >= 1, got "
                f"{max_num_batched_tokens}"
            )
        if max_num_seqs < 1:
            raise ValueError(f"tinyserve.Scheduler: max_num_seqs must be >= 1, got {max_num_seqs}")
        if (compactor is None) != (run_plan is None):
            raise ValueError(
                "tinyserve.Scheduler: compactor and run_plan go together, got only "
                + ("compactor" if run_plan is None else "run_plan")
            )
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.compactor = compactor
        self.run_plan = run_plan
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_offloaded_blocks = 0
        self.num_recalled_blocks = 0
        # Offloaded blocks freed on the host: their sequence was recomputed instead of recalled.
        self.num_discarded_blocks = 0
        self.prefix_cache_hit_tokens = 0  # prompt tokens found at first admissions
        self.prefix_cache_hit_blocks = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def admit_fork(self, parent: Sequence, child: Sequence) -> None:
        """A sample forked from ``parent`` (sharing all its blocks) runs right after it."""
        self.bm.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.status = SequenceStatus.RUNNING
        child.admitted = True
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is: its blocks (device and offloaded) are freed, and it
        leaves its queue."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.bm.has_sequence(seq.seq_id):
            self.bm.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def schedule(self) -> StepPlan:
        self._recall_swapped()
        while True:
            plan = StepPlan()
            self._schedule_decodes(plan)
            budget = self.max_num_batched_tokens - plan.num_rows
            budget = self._schedule_running_prefills(plan, budget)
            self._admit_waiting(plan, budget)
            if plan.seqs or not self.has_work():
                return plan
            if not self.running and self.swapped:
                if self._recall_swapped():
                    continue  # the preemptions above made room for it
                if len(self.swapped) > 1:
                    # The oldest cannot come back while the younger ones keep device blocks
                    # (those they share): the youngest is recomputed instead.
                    self._recompute_swapped(self.swapped.pop())
                    continue
                raise RuntimeError(
                    "tinyserve.Engine: a preempted sequence cannot come back: "
                    f"{self.bm.num_free_blocks} free blocks, got "
                    f"{self.compactor.num_offloaded(self.swapped[0].seq_id)} offloaded blocks"
                )
            if not self.running:
                seq = self.waiting[0]
                raise RuntimeError(
                    "tinyserve.Engine: the pool is too small for one sequence on its own: "
                    f"{self.bm.num_free_blocks} free blocks of {self.block_size} tokens, got a "
                    f"sequence of {len(seq.token_ids)} tokens"
                )
            # Running sequences hold every block and none can advance: make room.
            self._preempt(self.running[-1])

    def _schedule_decodes(self, plan: StepPlan) -> None:
        while True:
            decoding = [s for s in self.running if s.num_uncomputed == 1]
            if not decoding:
                return
            try:
                slots = self.bm.append_batch([s.seq_id for s in decoding], 1)
            except tinyserve.OutOfBlocks:
                if len(self.running) == 1 and self.swapped:
                    # Preempted sequences still hold device blocks the last running one needs.
                    self._recompute_swapped(self.swapped.pop())
                    continue
                if len(self.running) == 1:
                    raise RuntimeError(
                        "tinyserve.Engine: the pool is too small for one sequence on its own, "
                        f"got {len(self.running[0].token_ids)} tokens in "
                        f"{self.bm.stats()['num_blocks']} blocks of {self.block_size}"
                    ) from None
                self._preempt(self.running[-1])
                continue
            for i, seq in enumerate(decoding):
                plan.add(seq, 1, slots[i : i + 1])
            return

    def _schedule_running_prefills(self, plan: StepPlan, budget: int) -> int:
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed <= 1:
                continue
            chunk = min(seq.num_uncomputed, budget)
            start = seq.num_computed
            try:
                slots = self.bm.append(seq.seq_id, chunk, seq.token_ids[start : start + chunk])
            except tinyserve.OutOfBlocks:
                break
            plan.add(seq, chunk, slots)
            budget -= chunk
        return budget

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        if self.swapped:
            return  # preempted sequences come back before new ones take their room
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            match = self.bm.match_prefix(seq.token_ids)
            cached = match["tokens"]
            chunk = min(len(seq.token_ids) - cached, budget)
            blocks_needed = -(-(cached + chunk) // self.block_size) - match["blocks"]
            if self.bm.num_free_blocks < blocks_needed + match["free_blocks"]:
                return
            cached = self.bm.add_sequence(seq.seq_id, seq.token_ids)
            try:
                slots = self.bm.append(seq.seq_id, chunk, seq.token_ids[cached : cached + chunk])
            except tinyserve.OutOfBlocks:
                self.bm.free(seq.seq_id)
                return
            self.waiting.popleft()
            seq.num_computed = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if not seq.admitted:  # a recomputed sequence's hits are its own earlier blocks
                seq.admitted = True
                self.prefix_cache_hit_tokens += cached
                self.prefix_cache_hit_blocks += cached // self.block_size
                if seq.sample_index == 0:
                    seq.request.prefix_cache_hit_tokens = cached
            plan.add(seq, chunk, slots)
            budget -= chunk

    def _recall_swapped(self) -> bool:
        """Bring preempted sequences back while there is room; True if any came back."""
        recalled = False
        while self.swapped:
            seq = self.swapped[0]
            offloaded = self.compactor.num_offloaded(seq.seq_id)
            # Room for its blocks and for one new block of every running sequence and its own,
            # so that the recall is not undone by the next decode step; with nothing running,
            # room for its blocks (a sequence holding the whole pool needs no more).
            headroom = len(self.running) + 1 if self.running else 0
            if self.bm.num_free_blocks < offloaded + headroom:
                return recalled
            recalled = True
            if offloaded:
                self._run(self.compactor.plan_recall([seq.seq_id]))
                self.num_recalled_blocks += offloaded
            self.swapped.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return recalled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        if self.compactor is not None and self._offload(seq):
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            return
        self._requeue(seq)

    def _offload(self, seq: Sequence) -> bool:
        """Move the victim's blocks that it alone holds to the host pool
        (``plan_offload_sequences``: exactly its blocks, not whichever are coldest); False
        (nothing changed) when it holds none alone (offloading would free nothing, and its
        references would keep a sibling's copy-on-write from a block) or the host pool has no
        room for them."""
        try:
            plan = self.compactor.plan_offload_sequences([seq.seq_id])
        except tinyserve.OutOfBlocks:
            return False
        if len(plan) == 0:
            self.compactor.abort(plan)
            return False
        self._run(plan)
        self.num_offloaded_blocks += len(plan)
        return True

    def _recompute_swapped(self, seq: Sequence) -> None:
        """A preempted sequence gives up its blocks (device and host) and waits, first in line,
        to be recomputed."""
        self.num_discarded_blocks += self.compactor.num_offloaded(seq.seq_id)
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits first in line, to be recomputed."""
        self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _run(self, plan: Any) -> None:
        try:
            self.run_plan(plan)
        except BaseException:
            self.compactor.abort(plan)
            raise
        self.compactor.commit(plan)
