"""Who runs this step, and with how many tokens: continuous batching with chunked prefill and preemption.

Each step has a token budget. Decoding sequences (one pending token) are served first, so a long prompt
never stalls them; prefilling sequences get what is left of the budget, a chunk at a time; waiting
sequences are admitted while there is budget, a free running slot and free blocks. When a running
sequence needs a block and none is free, the policy picks a victim among the running (by default the
newest): its blocks are freed and it goes back to waiting, to be recomputed from its tokens later.

The policy is the hook for the kernel's priority scheduler (issue 4): any object with `next_waiting`
and `victim` will do.

Never: talk to the driver, or change a sequence's tokens (the engine does both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.inference.blocks import BlockAllocator
from services.inference.sequence import Sequence, Status


class Policy(Protocol):
    def next_waiting(self, waiting: list[Sequence]) -> Sequence: ...
    def victim(self, running: list[Sequence]) -> Sequence: ...


class FirstComeFirstServed:
    """Admit the oldest request first; preempt the newest. Preempted requests keep their place."""

    def next_waiting(self, waiting: list[Sequence]) -> Sequence:
        return min(waiting, key=lambda s: s.arrival)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=lambda s: s.arrival)


@dataclass
class Batch:
    steps: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens it feeds this step)
    preempted: list[Sequence] = field(default_factory=list)
    starved: list[Sequence] = field(default_factory=list)   # alone, it still cannot fit in the KV pool

    def __bool__(self) -> bool:
        return bool(self.steps)


class Scheduler:
    def __init__(self, blocks: BlockAllocator, max_running: int = 32, token_budget: int = 256,
                 policy: Policy | None = None):
        if max_running < 1 or token_budget < 1:
            raise ValueError(f"need max_running >= 1 and token_budget >= 1, got {max_running}, {token_budget}")
        self.blocks = blocks
        self.max_running = max_running
        self.token_budget = token_budget
        self.policy = policy or FirstComeFirstServed()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or cancelled sequence leaves at once; its blocks are free for the next step."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------ one step

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.token_budget
        # decoders first (one token each), then the chunks of prompts already being prefilled
        for seq in sorted(self.running, key=lambda s: (s.pending > 1, s.arrival)):
            if budget == 0:
                break
            if seq not in self.running:          # preempted a moment ago to make room for an older one
                continue
            n = self._make_room(seq, min(seq.pending, budget), batch)
            if n:
                self.blocks.grow(seq.seq_id, seq.num_computed + n)
                batch.steps.append((seq, n))
                budget -= n
        if batch.preempted:              # memory is short: admitting now would only thrash
            return batch
        while self.waiting and budget and len(self.running) < self.max_running:
            seq = self.policy.next_waiting(self.waiting)
            n = min(seq.pending, budget)
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed + n):
                if not self.running and not self.blocks.can_grow(seq.seq_id, seq.num_computed + 1):
                    self.waiting.remove(seq)     # the whole pool cannot hold it
                    batch.starved.append(seq)
                    continue
                break                            # wait for blocks; admitting never preempts
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = Status.RUNNING
            self.blocks.grow(seq.seq_id, seq.num_computed + n)
            batch.steps.append((seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, n: int, batch: Batch) -> int:
        """How many of seq's n tokens fit, preempting newer sequences if needed; 0 if seq was preempted."""
        while True:
            fits = min(n, (len(self.blocks.table(seq.seq_id)) + self.blocks.num_free) * self.blocks.block_size
                       - seq.num_computed)
            if fits == n or (fits > 0 and seq.pending > 1):   # a prompt chunk may shrink instead
                return fits
            others = [s for s in self.running if s is not seq]
            if not others:
                self.running.remove(seq)
                self.blocks.free(seq.seq_id)
                batch.starved.append(seq)
                return 0
            victim = self.policy.victim(others + [seq])
            self._preempt(victim, batch)
            if victim is seq:
                return 0

    def _preempt(self, seq: Sequence, batch: Batch | None) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.waiting.append(seq)
        if batch is not None:
            batch.steps = [(s, n) for s, n in batch.steps if s is not seq]
            batch.preempted.append(seq)

    def evict_all(self) -> None:
        """The KV cache is gone (the driver restarted): every running sequence is recomputed."""
        for seq in list(self.running):
            self._preempt(seq, None)
