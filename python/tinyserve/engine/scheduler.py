"""Continuous batching: which sequences compute which tokens in the next step, and the block
manager calls that reserve their slots."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

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

    1. every running sequence that is decoding gets one token (``append_batch``, all or
       nothing); when the pool is short, the most recently admitted running sequence is
       preempted and the batch retried;
    2. running sequences in the middle of a chunked prefill get their next chunk;
    3. waiting sequences (new, or preempted) are admitted first come, first served while the
       step's token budget (``max_num_batched_tokens``) and the pool allow: with prefix caching
       ``add_sequence`` attaches the cached full blocks of the prompt, and only the rest is
       computed (``append`` with the token ids, so the new full blocks become cached too).

    Preemption frees the victim's blocks and puts it back at the head of the waiting queue: it
    is recomputed from its tokens (its prompt and what it generated) when readmitted, mostly
    from the prefix cache when its blocks have not been reused meanwhile. This is the one place
    to change for preemption by offload (a compactor's ``plan_offload`` / ``plan_recall``)."""

    def __init__(
        self,
        block_manager: tinyserve.BlockManager,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
    ):
        if max_num_batched_tokens < 1:
            raise ValueError(
                "tinyserve.Scheduler: max_num_batched_tokens must be >= 1, got "
                f"{max_num_batched_tokens}"
            )
        if max_num_seqs < 1:
            raise ValueError(f"tinyserve.Scheduler: max_num_seqs must be >= 1, got {max_num_seqs}")
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit_fork(self, parent: Sequence, child: Sequence) -> None:
        """A sample forked from ``parent`` (sharing all its blocks) runs right after it."""
        self.bm.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> StepPlan:
        while True:
            plan = StepPlan()
            self._schedule_decodes(plan)
            budget = self.max_num_batched_tokens - plan.num_rows
            budget = self._schedule_running_prefills(plan, budget)
            self._admit_waiting(plan, budget)
            if plan.seqs or not self.has_work():
                return plan
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
            self.prefix_cache_hit_tokens += cached
            if seq.sample_index == 0 and seq.request.first_token_time is None:
                seq.request.prefix_cache_hit_tokens = cached
            plan.add(seq, chunk, slots)
            budget -= chunk

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
