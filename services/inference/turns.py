"""Whose step runs next on the device: one driver step at a time across the models, by priority.

Every model's driver shares the machine: on a CPU two drivers decoding at once only slow each
other down (each step's threads fight over the same cores), and on a GPU their kernels queue up
anyway. So each Resident's step loop takes a turn before it sends a step and gives it back when
the step returns. The turn goes to the most urgent waiting step (the best effective priority of
its batch, as the policy computes it: nice level, improved by waiting); among equals, to the one
that asked first, and since every step asks again, equals take turns step by step.

A step much more urgent than the one that holds the device (by more than the policy's band)
has that step given up between two layers (the driver's ``abort``), as within one model; a
merely more urgent one has a step decoding ahead hand back after the token in progress. And a
model that gives its turn back with more to do, much more urgent than everyone waiting, keeps
it for its next step (for at most RESERVE_S): otherwise a waiting model less urgent by far
would slip a whole step in between each two of the urgent one's, at every one of its steps.

Never: decide anything within a model (that is its Engine's policy), or hold a turn across an
await other than the step itself.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

RESERVE_S = 0.05        # how long a turn kept for an urgent model's next step waits for it


class Turns:
    def __init__(self, band: int):
        self.band = band
        self.holder = None                   # the Resident whose step runs now (or kept for it)
        self.holder_priority = 0
        self._waiting: list[list] = []       # heap of [priority, order, Resident, future]
        self._order = itertools.count()
        self._kept: asyncio.TimerHandle | None = None   # the turn is kept for holder's next step

    async def take(self, model, priority: int) -> None:
        """Wait for model's turn to step at this priority (lower is more urgent)."""
        if self._kept is not None and self.holder is model:
            self._kept.cancel()
            self._kept, self.holder_priority = None, priority
            return
        if self.holder is None and not self._waiting:
            self.holder, self.holder_priority = model, priority
            return
        fut = asyncio.get_running_loop().create_future()
        entry = [priority, next(self._order), model, fut]
        heapq.heappush(self._waiting, entry)
        if self.holder is not None and self.holder is not model and self._kept is None:
            if priority + self.band < self.holder_priority:
                self.holder.give_up_step()
            elif priority < self.holder_priority:
                self.holder.yield_now()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():      # granted as it was cancelled: pass it on
                self.give(model)
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def give(self, model, again: int | None = None) -> None:
        """model's step is over: the next turn goes to the most urgent waiter, unless model will
        step again at priority ``again`` and is much more urgent than all of them."""
        if self.holder is not model:
            return
        if self._kept is not None:
            self._kept.cancel()
            self._kept = None
        best = min((e[0] for e in self._waiting if not e[3].done()), default=None)
        if again is not None and best is not None and again + self.band < best:
            self.holder_priority = again
            self._kept = asyncio.get_running_loop().call_later(RESERVE_S, self._expire, model)
            return
        self.holder = None
        while self._waiting:
            priority, _, nxt, fut = heapq.heappop(self._waiting)
            if not fut.done():
                self.holder, self.holder_priority = nxt, priority
                fut.set_result(None)
                return

    def _expire(self, model) -> None:
        """The model the turn was kept for did not take it: the waiters go on."""
        self._kept = None
        self.give(model)

    def waiting(self) -> int:
        return sum(1 for e in self._waiting if not e[3].done())
