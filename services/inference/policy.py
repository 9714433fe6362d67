"""The scheduling policy for model work, run by the inference service: which requests decode next.

The kernel owns every input of this policy: each process's priority, its limits, whether it is
stopped. It hands them to the inference service with every request and again whenever they change
(``nice``, ``setpriority``, ``setrlimit``, ``kill -STOP``/``-CONT``). The inference service runs
this policy at every step boundary, because a step is a few tens of milliseconds and a round trip to
the kernel per step would cost latency for nothing; the decisions are the kernel's all the same.

The rules, in order:
1. A process that is stopped, or has generated its ``tokens_per_minute`` in the last 60 s, has its
   requests held out of the batch (their KV blocks kept while memory allows).
2. Priorities are nice values, -20 (most urgent) to 19. A request's *effective* priority improves
   by one level for every ``aging_s`` seconds it has not been served, so nothing starves.
3. The batch is the most urgent requests, at most ``max_running``, and only those within ``band``
   levels of the most urgent one: a request much less urgent sits out while urgent work runs (a
   batch step costs every member latency), and comes back by aging or when the urgent work ends.
4. Among equals, processes share generated tokens fairly: each process has a virtual time that
   grows with every token it is given, weighted by its priority (CFS's 1.25x per nice level), and
   the process that has had least goes first. A running request keeps its place until another is
   behind it by more than ``quantum`` tokens, so that the batch does not churn every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from syscalls.table import MODEL_LIMITS

NICE_MIN, NICE_MAX = -20, 19
WINDOW_S = 60.0


def weight(nice: int) -> float:
    """A process's share per nice level: each level less urgent gets 1/1.25 of the share."""
    return 1.25 ** -nice


@dataclass
class ProcState:
    """What the policy knows of one process: the kernel's view of it, and what it has had."""

    pid: int
    priority: int = 0
    stopped: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    vtime: float = 0.0
    recent: deque = field(default_factory=deque)     # (time, tokens) generated in the last minute
    recent_total: int = 0

    def tokens_last_minute(self, now: float) -> int:
        while self.recent and now - self.recent[0][0] >= WINDOW_S:
            self.recent_total -= self.recent.popleft()[1]
        return self.recent_total

    def throttle_left(self, now: float) -> float:
        """Seconds until the process may generate again under tokens_per_minute (0: it may now)."""
        limit = self.limits.get("tokens_per_minute")
        if limit is None or self.tokens_last_minute(now) < limit:
            return 0.0
        over, t = self.recent_total - limit + 1, now
        for t, n in self.recent:
            over -= n
            if over <= 0:
                break
        return max(0.0, t + WINDOW_S - now)


class Policy:
    def __init__(self, band: int = 5, aging_s: float = 2.0, quantum: float = 16.0):
        self.band, self.aging_s, self.quantum = band, aging_s, quantum
        self.procs: dict[int, ProcState] = {}

    # -- the kernel's inputs --------------------------------------------------------------------
    def update(self, pid: int, *, priority: int | None = None, stopped: bool | None = None,
               limits: dict[str, Any] | None = None) -> ProcState:
        p = self.procs.get(pid)
        if p is None:
            p = self.procs[pid] = ProcState(pid, vtime=self._floor())
        if priority is not None:
            p.priority = max(NICE_MIN, min(NICE_MAX, int(priority)))
        if stopped is not None:
            p.stopped = bool(stopped)
        if limits is not None:
            p.limits = {k: int(v) for k, v in limits.items() if k in MODEL_LIMITS and v is not None}
        return p

    def joined(self, pid: int) -> None:
        """A process has a new request: one that was idle does not get to replay its idle time."""
        p = self.update(pid)
        p.vtime = max(p.vtime, self._floor() - self.quantum)

    def forget(self, pid: int, now: float) -> None:
        """The process has no request left: forget it, unless its last minute's tokens still count
        against its tokens_per_minute (its priority and limits come again with its next request)."""
        p = self.procs.get(pid)
        if p is not None and not (p.limits.get("tokens_per_minute") is not None and p.tokens_last_minute(now)):
            del self.procs[pid]

    def _floor(self) -> float:
        return min((p.vtime for p in self.procs.values()), default=0.0)

    # -- decisions ------------------------------------------------------------------------------
    def hold(self, pid: int, now: float) -> str | None:
        """Why a process's requests may not run now: "stopped", "throttled", or None."""
        p = self.procs.get(pid)
        if p is None:
            return None
        if p.stopped:
            return "stopped"
        if p.limits.get("tokens_per_minute") is not None and p.throttle_left(now) > 0:
            return "throttled"
        return None

    def effective(self, pid: int, last_served: float, now: float) -> int:
        p = self.procs.get(pid)
        nice = p.priority if p else 0
        return max(NICE_MIN, nice - int((now - last_served) / self.aging_s))

    def key(self, pid: int, last_served: float, arrival: int, running: bool, now: float) -> tuple:
        p = self.procs.get(pid)
        vtime = (p.vtime if p else 0.0) - (self.quantum if running else 0.0)
        return self.effective(pid, last_served, now), vtime, arrival

    def charge(self, pid: int, tokens: int, now: float) -> None:
        """The process was given `tokens` generated tokens."""
        p = self.procs.get(pid)
        if p is None:
            return
        p.vtime += tokens / weight(p.priority)
        if p.limits.get("tokens_per_minute") is not None:
            p.recent.append((now, tokens))
            p.recent_total += tokens
