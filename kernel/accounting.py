"""What the kernel counts for each process, and what it tells a service about a caller.

All of it is declared elsewhere, so nothing here knows a service by name: a syscall's row lists
the caller context its handler needs (``Syscall.caller``), a service's reply says what the call
used (its usage item, ``wire.USAGE``), and a service with model work reports it in an EVENT
``sched``. Never: a branch on a service's or a syscall's name.
"""

from __future__ import annotations

from typing import Any, Callable

from syscalls.table import MODEL_LIMITS, SYSCALLS

from .proctable import STOPPED, Process, ProcessTable


def model_limits(proc: Process) -> dict:
    return {r: v for r, v in proc.limits.items() if r in MODEL_LIMITS}


def storage_allowance(proc: Process) -> dict | None:
    """Storage enforces the limit inside the write's transaction; it needs what is left."""
    limit = proc.limits.get("storage_bytes")
    if limit is None:
        return None
    return {"pid": proc.pid, "limit": limit, "left": limit - proc.bytes_stored}


# One row per caller context a syscall row may name (syscalls.schema.CALLER_CONTEXT): how to read
# it off the process now; None leaves the key out.
CONTEXT: dict[str, Callable[[Process], Any]] = {
    "priority": lambda proc: proc.priority,
    "stopped": lambda proc: proc.state == STOPPED,
    "limits": model_limits,
    "storage_allowance": storage_allowance,
}

# Kept by a service between calls (a scheduler holds a request for many steps), and changed by
# syscalls (nice, kill -STOP, setrlimit): a service whose rows take one hears of a change at once.
PUSHED = ("priority", "stopped", "limits")
PUSHED_TO = frozenset(s.target for s in SYSCALLS if set(s.caller) & set(PUSHED))

# Usage item key -> the counter of the process it adds to.
CHARGED = {"tokens_in": "tokens_in", "tokens_out": "tokens_out", "storage_bytes": "bytes_stored"}

WORK = ("state", "kv_blocks", "sequences", "contexts")     # what a model work report holds per process


def caller_context(proc: Process, keys: tuple[str, ...]) -> dict:
    """The context a row's ``caller`` asks for, as the process stands now."""
    out = {}
    for key in keys:
        value = CONTEXT[key](proc)
        if value is not None:
            out[key] = value
    return out


def pushed(proc: Process) -> dict:
    """What ``sched_update`` tells a service about a process whose pushed context changed."""
    return {"pid": proc.pid, **caller_context(proc, PUSHED)}


def charge(proc: Process, usage: Any) -> None:
    """Add what a service says a call used to its process's counters; unknown keys are ignored,
    so a newer service cannot break an older kernel."""
    if not isinstance(usage, dict):
        return
    for key, n in usage.items():
        counter = CHARGED.get(key)
        if counter is not None and type(n) is int:
            setattr(proc, counter, getattr(proc, counter) + n)


def record_work(table: ProcessTable, service: str, procs: Any) -> None:
    """A service's report of each process's model work now; a process it leaves out has none."""
    if not isinstance(procs, list):
        return
    seen = set()
    for entry in procs:
        if isinstance(entry, dict) and type(entry.get("pid")) is int:
            proc = table.get(entry["pid"])
            if proc is not None:
                proc.model = {k: entry.get(k) for k in WORK}
                proc.model_by = service
                seen.add(proc.pid)
    for proc in table:
        if proc.model and proc.model_by == service and proc.pid not in seen:
            proc.model, proc.model_by = {}, None


def rates(table: ProcessTable, dt: float) -> None:
    """Each process's generated tokens per second, smoothed (half of it is the last second)."""
    for proc in table:
        if proc.tokens_out != proc.rate_mark or proc.tok_s:
            rate = (proc.tokens_out - proc.rate_mark) / max(dt, 1e-3)
            proc.tok_s = round(0.5 * proc.tok_s + 0.5 * rate, 1) if rate or proc.tok_s >= 0.1 else 0.0
            proc.rate_mark = proc.tokens_out
