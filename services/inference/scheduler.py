"""Who runs this step, and with how many tokens: continuous batching under the kernel's policy.

Every live request is in one of three states:
    RUNNING    in the batch, holding KV blocks;
    SUSPENDED  out of the batch (preempted by a more urgent request, or held: its process is
               stopped or throttled), still holding its KV blocks;
    WAITING    holding no blocks: new, or preempted and dropped, to be recomputed from its tokens.
Each step the policy (services/inference/policy.py) orders the requests and picks the batch. Suspending is
free: the blocks stay where they are, and a suspended request resumes at the next step it is
picked. Blocks are taken back only when memory is short, in this order: from idle contexts (least
recently used first), from held requests, then from suspended ones, least urgent first, then from
running requests less urgent than the one that needs them. A dropped request is recomputed later: on this machine prefill runs many times faster
per token than decoding, and the CPU has no cheaper "host memory" to move blocks to, so dropping
is the cheap choice whenever keeping is impossible (a CUDA driver could swap to host instead).

Each step has a token budget. Decoding requests (one pending token) are always served, so a long
prompt never stalls them; prefilling requests get what is left, a chunk at a time.

A process's kv_blocks limit is enforced here: a request may not grow its process past the limit,
which counts the blocks the process holds on every model the service runs (``elsewhere``, which
the service installs: each model's engine has its own pool). Its process's idle contexts give way
first; then it waits for its process's other requests on this model (the least urgent of them
may be dropped for it); it fails with the limit named if it cannot fit beside what its requests
hold on the other models (their idle contexts there give way first: ``reclaim_elsewhere``).

Never: talk to the driver, or change a request's tokens (the engine does both).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.inference.policy import Policy
from services.inference.blocks import BlockAllocator
from services.inference.contexts import Context
from services.inference.sequence import Sequence, Status


@dataclass
class Batch:
    steps: list[tuple[Sequence, int]] = field(default_factory=list)   # (sequence, tokens it feeds this step)
    preempted: list[Sequence] = field(default_factory=list)   # dropped their blocks this step
    starved: list[Sequence] = field(default_factory=list)     # alone, it still cannot fit in the KV pool
    over_quota: list[tuple[Sequence, str]] = field(default_factory=list)   # cannot fit in its kv_blocks

    def __bool__(self) -> bool:
        return bool(self.steps)


class Scheduler:
    def __init__(self, blocks: BlockAllocator, max_running: int = 32, token_budget: int = 256,
                 policy: Policy | None = None, clock=time.monotonic):
        if max_running < 1 or token_budget < 1:
            raise ValueError(f"need max_running >= 1 and token_budget >= 1, got {max_running}, {token_budget}")
        self.blocks = blocks
        self.max_running = max_running
        self.token_budget = token_budget
        self.policy = policy or Policy()
        self.clock = clock
        self.seqs: list[Sequence] = []      # every live request, in arrival order
        self.contexts: dict[int, Context] = {}   # the engine's open contexts (their blocks can be taken)
        # What a process holds on the service's other models, {model: (blocks, of which its
        # requests')}, and taking back its least recently used idle context there (False: it has
        # none). The inference service installs both (Resident.load); alone, an engine has no others.
        self.elsewhere: Callable[[int], dict[str, tuple[int, int]]] = lambda pid: {}
        self.reclaim_elsewhere: Callable[[int], bool] = lambda pid: False

    # ------------------------------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        seq.last_served = self.clock()
        self.policy.joined(seq.pid)
        self.seqs.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or cancelled request leaves at once; its blocks are free for the next step."""
        if seq in self.seqs:
            self.seqs.remove(seq)
        self.blocks.free(seq.seq_id)
        self.forget_if_idle(seq.pid)

    def forget_if_idle(self, pid: int) -> None:
        """A process with no request left need not be remembered by the policy."""
        if not any(s.pid == pid for s in self.seqs):
            self.policy.forget(pid, self.clock())

    def has_work(self) -> bool:
        return bool(self.seqs)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is Status.RUNNING]

    @property
    def waiting(self) -> list[Sequence]:
        """Not in the batch: waiting for blocks or a slot, or suspended."""
        return [s for s in self.seqs if s.status is not Status.RUNNING]

    def held_blocks(self, pid: int) -> int:
        """KV blocks a process holds here: its requests' and its contexts', shared ones counted once."""
        return self.blocks.distinct([s.seq_id for s in self.seqs if s.pid == pid] +
                                    [c.owner for c in self.contexts.values() if c.pid == pid])

    def request_blocks(self, pid: int) -> int:
        """KV blocks a process's requests hold here (its idle contexts' are not counted)."""
        return self.blocks.distinct([s.seq_id for s in self.seqs if s.pid == pid])

    def held_elsewhere(self, pid: int) -> int:
        return sum(held for held, _ in self.elsewhere(pid).values())

    def idle_contexts(self, pid: int | None = None) -> list[Context]:
        """Contexts holding blocks with no turn in flight (of one process), least recently used first."""
        return sorted((c for c in self.contexts.values() if c.busy is None and self.blocks.table(c.owner)
                       and (pid is None or c.pid == pid)), key=lambda c: c.last_used)

    def evict(self, ctx: Context) -> None:
        """Take an idle context's blocks back; its next turn recomputes its history."""
        self.blocks.free(ctx.owner)
        ctx.tokens = []

    def order(self, now: float | None = None) -> list[Sequence]:
        """Every live request, most deserving first."""
        now = self.clock() if now is None else now
        key = self.policy.key
        return sorted(self.seqs, key=lambda s: key(s.pid, s.last_served, s.arrival,
                                                   s.status is Status.RUNNING, now))

    # ------------------------------------------------------------------------------------------ one step

    def schedule(self) -> Batch:
        now = self.clock()
        batch, policy = Batch(), self.policy
        chosen: list[Sequence] = []
        top = None
        for s in self.order(now):
            s.hold = policy.hold(s.pid, now)
            if s.hold:
                continue
            e = policy.effective(s.pid, s.last_served, now)
            if top is None:
                top = e
            s.benched = e > top + policy.band
            if not s.benched and len(chosen) < self.max_running:
                chosen.append(s)
        picked = set(chosen)
        for s in self.seqs:
            if s.status is Status.RUNNING and s not in picked:
                self._suspend(s)

        decoders = sum(1 for s in chosen if s.pending == 1)
        prefill_budget = max(0, self.token_budget - decoders)
        for s in chosen:
            if s not in picked:                  # dropped a moment ago for a more urgent request
                continue
            want = 1 if s.pending == 1 else min(s.pending, prefill_budget)
            if want == 0:
                continue
            n = self._fit(s, want, chosen, picked, batch)
            if n == 0:
                if s.status is Status.RUNNING:
                    self._suspend(s)
                continue
            self.blocks.grow(s.seq_id, s.num_computed + n)
            if s.status is not Status.RUNNING:
                s.status = Status.RUNNING
            s.last_served = now
            batch.steps.append((s, n))
            if s.pending > 1:
                prefill_budget -= n
        batch.steps.sort(key=lambda x: x[0].pending > 1)     # decoders first, for the driver's sake
        return batch

    def _fit(self, s: Sequence, want: int, chosen: list[Sequence], picked: set, batch: Batch) -> int:
        """How many of s's `want` tokens can get KV blocks now (0: none), making room if it may."""
        blocks, size = self.blocks, self.blocks.block_size
        have = len(blocks.table(s.seq_id))
        prefill = s.pending > 1

        def room(extra_blocks: int) -> int:
            return min(want, (have + extra_blocks) * size - s.num_computed)

        # the process's own limit first
        limit = self.policy.procs[s.pid].limits.get("kv_blocks") if s.pid in self.policy.procs else None
        if limit is not None:
            while (n := room(limit - self.held_blocks(s.pid) - self.held_elsewhere(s.pid))) \
                    < (want if not prefill else 1):
                if blocks.blocks_for(s.num_computed + 1) > limit - self.held_elsewhere(s.pid):
                    if self.reclaim_elsewhere(s.pid):
                        continue                 # an idle context of its on another model gave way
                    batch.over_quota.append((s, self._quota_message(s, limit)))
                    picked.discard(s)
                    return 0
                idle = self.idle_contexts(s.pid)
                if idle:
                    self.evict(idle[0])
                    continue
                sibling = self._victim([x for x in self.seqs if x.pid == s.pid and x is not s
                                        and blocks.table(x.seq_id)], s, chosen)
                if sibling is None:
                    return 0                     # a more urgent sibling holds them; wait for it
                self._drop(sibling, batch, picked)
            want = n
        # then the pool
        while (n := room(blocks.num_free)) < (want if not prefill else 1):
            idle = self.idle_contexts()
            if idle:
                self.evict(idle[0])
                continue
            holders = [x for x in self.seqs if x is not s and blocks.table(x.seq_id)]
            if not holders:                      # the whole pool cannot hold it
                batch.starved.append(s)
                picked.discard(s)
                return 0
            victim = self._victim(holders, s, chosen)
            if victim is None:
                return 0                         # everyone holding blocks is more urgent: wait
            self._drop(victim, batch, picked)
        return max(0, n)

    def _victim(self, holders: list[Sequence], s: Sequence, chosen: list[Sequence]) -> Sequence | None:
        """Whose blocks go: held requests first, then suspended, then running ones chosen after s;
        the least urgent of the first group that has any. None if only more urgent ones hold blocks."""
        rank = {x: i for i, x in enumerate(chosen)}
        mine = rank.get(s, len(chosen))
        held = [x for x in holders if x.hold]
        suspended = [x for x in holders if not x.hold and x not in rank]
        later = [x for x in holders if rank.get(x, -1) > mine]
        for group in (held, suspended, later):
            if group:
                order = self.order()
                return max(group, key=order.index)
        return None

    def _suspend(self, s: Sequence) -> None:
        s.status = Status.SUSPENDED
        s.preemptions += 1

    def _drop(self, s: Sequence, batch: Batch | None, picked: set | None = None) -> None:
        """Take a request's blocks back: it will be recomputed from its tokens."""
        if s.status is Status.RUNNING:
            s.preemptions += 1
        self.blocks.free(s.seq_id)
        ctx = self.contexts.get(s.ctx) if s.ctx is not None else None
        if ctx is not None:                  # it shares the context's prefix: that goes too
            self.evict(ctx)
        s.num_computed = 0
        s.status = Status.WAITING
        if picked is not None:
            picked.discard(s)
        if batch is not None:
            batch.steps = [(x, n) for x, n in batch.steps if x is not s]
            batch.preempted.append(s)

    def evict_all(self) -> None:
        """The KV cache is gone (the driver restarted): every request with blocks is recomputed."""
        for s in self.seqs:
            if self.blocks.table(s.seq_id) or s.status is not Status.WAITING:
                self._drop(s, None)
        for ctx in self.contexts.values():
            self.evict(ctx)

    # ------------------------------------------------------------------------------------------ reports

    def _quota_message(self, s: Sequence, limit: int) -> str:
        need = self.blocks.blocks_for(s.num_computed + 1)
        return (f"pid {s.pid} reached its kv_blocks limit: this request needs {need} blocks of "
                f"{self.blocks.block_size} tokens ({s.num_computed + 1} tokens) and the limit is {limit}"
                f"{held_on(self.elsewhere(s.pid))}")

    def describe(self) -> list[dict]:
        """Every request in scheduling order, as the runqueue syscall shows it."""
        now, position, out = self.clock(), 0, []
        for s in self.order(now):
            hold = self.policy.hold(s.pid, now)
            if hold:
                state = hold
            elif s.status is Status.RUNNING:
                state = "running"
            elif s.benched:
                state = "suspended"
            else:
                state = "ready"
            pos = None
            if state in ("ready", "suspended"):
                position += 1
                pos = position
            p = self.policy.procs.get(s.pid)
            out.append({"pid": s.pid, "request": s.seq_id, "state": state,
                        "priority": p.priority if p else 0, "position": pos,
                        "kv_blocks": len(self.blocks.table(s.seq_id)), "prompt_tokens": len(s.prompt),
                        "generated": len(s.output), "waited_s": round(now - s.last_served, 3)})
        return out


def held_on(elsewhere: dict[str, tuple[int, int]], requests: bool = False) -> str:
    """", of which it holds 8 on other models (a: 8)": what a process holds on the other models
    (only its requests', with requests), for the message of a limit; "" if nothing."""
    held = {m: counts[requests] for m, counts in elsewhere.items() if counts[requests]}
    if not held:
        return ""
    return (f", of which {'its requests hold' if requests else 'it holds'} {sum(held.values())} "
            f"on other models ({', '.join(f'{m}: {b}' for m, b in sorted(held.items()))})")
