"""The process table: who is running, who is whose child, and what each has used.

A process is a program known to the kernel: one connection from a program, or a program the kernel
spawned (the connection it later opens binds to the same entry). PID 1 is the kernel itself; it
adopts orphans and reaps them. The table owns the parent/child links and the life cycle
(RUNNING/BLOCKED/STOPPED -> ZOMBIE -> gone); it never touches sockets or OS processes itself.
A RUNNING process with model work is shown as RUNNING (in the batch), READY (waiting for it) or
SUSPENDED (taken out of it), from what the service that schedules it reports.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RUNNING, BLOCKED, STOPPED, ZOMBIE = "RUNNING", "BLOCKED", "STOPPED", "ZOMBIE"
RESTARTING = "RESTARTING"      # a daemon between two runs, waiting out its backoff
READY, SUSPENDED = "READY", "SUSPENDED"     # its model work waits for the batch / was taken out of it
# a model scheduler's name for a process's model work -> the state ps shows
MODEL_STATES = {"running": RUNNING, "ready": READY, "suspended": SUSPENDED, "throttled": SUSPENDED,
                "stopped": STOPPED}
KERNEL_PID = 1


@dataclass(eq=False)
class Process:
    pid: int
    ppid: int
    uid: int | None
    name: str
    argv: list[str]
    priority: int = 0
    privileged: bool = False
    daemon: bool = False
    os_pid: int | None = None
    started: float = field(default_factory=time.time)
    state: str = RUNNING
    blocked: int = 0                      # calls the kernel holds waiting (wait, recv)
    limits: dict = field(default_factory=dict)   # resource -> limit; absent: unlimited
    ident: bytes | None = None            # the routing id of its connection, once connected
    spawned: bool = False                 # started by the kernel: it lives as long as its OS process
    spawn_token: str | None = None
    # how the kernel (re)starts it, for spawned programs (argv above may be renamed by hello)
    command: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    restart: str = "never"                # never | on-failure | always
    restarts: int = 0
    backoff: Any = None
    # counters
    syscalls: int = 0
    bytes_stored: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tok_s: float = 0.0                    # generated tokens per second, smoothed over a few seconds
    rate_mark: int = 0                    # tokens_out when tok_s was last computed
    model: dict = field(default_factory=dict)   # its model work, as the service running it last said:
                                          # {state: running|ready|suspended|..., kv_blocks, sequences, contexts}
    model_by: str | None = None           # that service, told when the process ends
    dropped: int = 0                      # published messages lost to a full mailbox
    advertised: dict = field(default_factory=dict)   # what it says it serves (advertise), for ps
    # messages
    mailbox: deque = field(default_factory=deque)
    mailbox_bytes: int = 0
    subscriptions: set[str] = field(default_factory=set)
    receiver: asyncio.Future | None = None
    # calls the process has open: its call id -> a handle the kernel can cancel
    in_flight: dict[int, Any] = field(default_factory=dict)
    # end of life
    exit_status: int | None = None
    exit_signal: str | None = None
    last_signal: str | None = None
    exit_waiters: list[asyncio.Future] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.state != ZOMBIE

    @property
    def shown_state(self) -> str:
        """The state ps shows: the process's own, refined by its model work while it has some."""
        if self.state != RUNNING:
            return self.state
        return MODEL_STATES.get(self.model.get("state"), RUNNING)

    def info(self) -> dict:
        model = self.model
        return {
            "pid": self.pid, "ppid": self.ppid, "uid": self.uid, "name": self.name,
            "argv": self.argv, "state": self.shown_state, "priority": self.priority,
            "started": self.started, "syscalls": self.syscalls, "bytes_stored": self.bytes_stored,
            "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "tok_s": self.tok_s,
            "kv_blocks": model.get("kv_blocks", 0), "sequences": model.get("sequences", 0),
            "contexts": model.get("contexts", 0),
            "privileged": self.privileged, "daemon": self.daemon, "os_pid": self.os_pid,
            "restart": self.restart, "restarts": self.restarts,
            "mailbox": len(self.mailbox), "dropped": self.dropped,
            "exit_status": self.exit_status, "exit_signal": self.exit_signal,
            "advertised": self.advertised,
        }


ENDED_NAMES = 4096      # names whose ended processes' tokens are kept apart; the rest are "(other)"


class ProcessTable:
    def __init__(self, kernel_uid: int, zombies_per_parent: int = 256):
        self.procs: dict[int, Process] = {}
        # tokens_in, tokens_out of every process that has ended, by name: with the live ones' (ps),
        # a per-name count that only grows (the gateway's /metrics counters)
        self.ended_tokens: dict[str, list[int]] = {}
        self.by_ident: dict[bytes, Process] = {}
        self.by_token: dict[str, Process] = {}
        self._next_pid = 2
        self.zombies_per_parent = zombies_per_parent
        self.procs[KERNEL_PID] = Process(KERNEL_PID, 0, kernel_uid, "kernel", ["kernel"],
                                         privileged=True)

    def __iter__(self):
        return iter(self.procs.values())

    def get(self, pid: int) -> Process | None:
        return self.procs.get(pid)

    def create(self, *, ppid: int, uid: int | None, name: str, argv: list[str], **kw: Any) -> Process:
        pid = self._alloc_pid()
        proc = Process(pid, ppid, uid, name, argv, **kw)
        self.procs[pid] = proc
        if proc.spawn_token:
            self.by_token[proc.spawn_token] = proc
        return proc

    def _alloc_pid(self) -> int:
        # Like Unix: increasing, wrapping at 2**22, skipping PIDs still in use.
        while self._next_pid in self.procs:
            self._next_pid = self._next_pid + 1 if self._next_pid < 1 << 22 else 2
        pid = self._next_pid
        self._next_pid = pid + 1 if pid < 1 << 22 else 2
        return pid

    def bind(self, proc: Process, ident: bytes) -> None:
        if proc.ident is not None:
            self.by_ident.pop(proc.ident, None)
        proc.ident = ident
        self.by_ident[ident] = proc

    def unbind(self, proc: Process) -> None:
        if proc.ident is not None:
            self.by_ident.pop(proc.ident, None)
            proc.ident = None

    def children(self, pid: int) -> list[Process]:
        return [p for p in self.procs.values() if p.ppid == pid and p.pid != pid]

    def is_descendant(self, pid: int, ancestor: int) -> bool:
        seen = set()
        while pid not in seen:
            if pid == ancestor:
                return True
            seen.add(pid)
            p = self.procs.get(pid)
            if p is None or p.ppid == 0:
                return False
            pid = p.ppid
        return False

    def end(self, proc: Process, status: int | None, signal: str | None) -> None:
        """The process has ended: record why, orphan its children, leave a zombie or vanish.

        The caller (the kernel) has already cancelled its calls and closed its connection.
        """
        if not proc.alive:
            return
        proc.exit_status, proc.exit_signal = status, signal
        proc.state = ZOMBIE
        if proc.tokens_in or proc.tokens_out:
            name = proc.name if proc.name in self.ended_tokens or len(self.ended_tokens) < ENDED_NAMES else "(other)"
            totals = self.ended_tokens.setdefault(name, [0, 0])
            totals[0] += proc.tokens_in
            totals[1] += proc.tokens_out
        self.unbind(proc)
        if proc.spawn_token:
            self.by_token.pop(proc.spawn_token, None)
        proc.mailbox.clear()
        proc.mailbox_bytes = 0
        proc.subscriptions.clear()
        for child in self.children(proc.pid):
            child.ppid = KERNEL_PID
            if not child.alive:              # init reaps the orphaned zombies at once
                self.reap(child)
        result = {"pid": proc.pid, "status": status, "signal": signal}
        for fut in proc.exit_waiters:
            if not fut.done():
                fut.set_result(result)
        proc.exit_waiters.clear()
        parent = self.procs.get(proc.ppid)
        if parent is None or parent.pid == KERNEL_PID or not parent.alive:
            self.reap(proc)
        else:
            self._limit_zombies(parent.pid)

    def reap(self, proc: Process) -> dict:
        self.procs.pop(proc.pid, None)
        return {"pid": proc.pid, "status": proc.exit_status, "signal": proc.exit_signal}

    def _limit_zombies(self, ppid: int) -> None:
        zombies = [p for p in self.children(ppid) if not p.alive]
        for old in zombies[: max(0, len(zombies) - self.zombies_per_parent)]:
            self.reap(old)
