"""The shell's commands for priorities and limits: nice, renice, ulimit.

A priority is a nice value, -20 (most urgent) to 19; the model's scheduler serves more urgent
requests first. Limits bound what a process may hold or use (``syscalls.table.RESOURCES``).
Making a process more urgent, or raising a limit, needs privilege.
"""

from __future__ import annotations

from syscalls import errors
from syscalls.table import RESOURCES

from ..builtin import (Failure, Shell, Streams, Usage, command, for_each, int_arg, options,
                       pid_arg)
from ..parse import Command, Word

MEANING = {
    "kv_blocks": "KV-cache blocks its requests may hold at once",
    "sequences": "requests it may have generating at once",
    "tokens_per_minute": "tokens it may generate per minute",
    "storage_bytes": "bytes it may add to storage",
}


@command("[-n N] [COMMAND [ARG...]]")
def cmd_nice(sh: Shell, io: Streams, args: list[str]) -> int:
    """Run COMMAND with a priority N (10 unless -n) less urgent than the shell's; take its status.
    Without COMMAND, print the shell's priority.

    COMMAND is any llmsh command: `nice gen ...` makes its calls from a connection of its own at
    that priority; `nice run PROG` gives the program's llmos processes that priority;
    `nice spawn PROG` and `nice run --daemon PROG` start it at that priority. A negative N (more
    urgent than the shell) needs privilege; without it nice fails and runs nothing.
    Example: nice -n 5 gen "Summarize the news"  # generate with a less urgent priority
    """
    opts, rest = options(args, "n:")
    if not rest:
        if opts:
            raise Usage("missing COMMAND")
        print(sh.call("getpriority"), file=io.stdout)
        return 0
    n = int_arg(opts.get("-n", "10"), "-n", -39, 39)
    base = sh.call("getpriority")
    child = sh.fork(sh.job, io)
    child.priority = base
    try:
        try:
            child.priority = child.call("nice", increment=n)
        except errors.EPERM:
            raise Failure(f"-n {n} would make {rest[0]} more urgent than this shell (priority "
                          f"{base}); that needs privilege")
        return child.run_command(Command(tuple(Word((a,), 0) for a in rest)), io)
    finally:
        child.close(0)


@command("[-n] PRIORITY PID...")
def cmd_renice(sh: Shell, io: Streams, args: list[str]) -> int:
    """Set the priority of processes to PRIORITY (-20 most urgent .. 19 least); print each change.

    Without privilege only this shell ($$) and its children, and only to a less urgent priority.
    Renicing $$ also sets the priority of what the shell starts next (pipelines, jobs, run).
    Example: renice 10 4242  # make process 4242 less urgent
    """
    if args[:1] == ["-n"]:
        args = args[1:]
    if len(args) < 2:
        raise Usage("missing PID" if args else "missing PRIORITY")
    priority = int_arg(args[0], "PRIORITY", -20, 19)
    pids = [pid_arg(a) for a in args[1:]]

    def renice(pid: int) -> None:
        old = sh.call("getpriority", pid=pid)
        sh.call("setpriority", pid=pid, priority=priority)
        if pid == sh.conn.pid:
            sh.priority = priority
        print(f"{pid}: priority {old} -> {priority}", file=io.stdout)
    return for_each(io, "renice", pids, renice)


def _resource(text: str) -> str:
    name = text.replace("-", "_")
    if name not in RESOURCES:
        raise Failure(f"unknown resource {text!r} (resources: {', '.join(RESOURCES)})", 2)
    return name


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


@command("[-p PID] [-a | RESOURCE [LIMIT | unlimited]]")
def cmd_ulimit(sh: Shell, io: Streams, args: list[str]) -> int:
    """Show or set the resource limits of this shell (or of process PID, with -p).

    ulimit -a (or no operand) shows every limit; ulimit RESOURCE shows one; ulimit RESOURCE N sets
    it, and `unlimited` lifts it. The resources: kv_blocks, sequences, tokens_per_minute and
    storage_bytes. Lowering is always allowed; raising or lifting a limit needs privilege. Limits
    set on this shell also bind what it starts next (pipelines, jobs, run, spawn).
    Example: ulimit tokens_per_minute 600  # allow this shell 600 tokens a minute
    """
    opts, rest = options(args, "ap:")
    pid = pid_arg(opts["-p"]) if "-p" in opts else None
    if "-a" in opts or not rest:
        if rest:
            raise Usage(f"unexpected argument {rest[0]!r} (-a shows every limit)")
        limits = sh.call("getrlimit", pid=pid)
        width = max(map(len, RESOURCES))
        for name in RESOURCES:
            print(f"{name:<{width}}  {_limit(limits.get(name)):>9}  {MEANING.get(name, '')}".rstrip(),
                  file=io.stdout)
        return 0
    if len(rest) > 2:
        raise Usage(f"unexpected argument {rest[2]!r}")
    resource = _resource(rest[0])
    if len(rest) == 1:
        print(_limit(sh.call("getrlimit", pid=pid).get(resource)), file=io.stdout)
        return 0
    limit = None if rest[1] == "unlimited" else int_arg(rest[1], resource, 0)
    sh.call("setrlimit", resource=resource, limit=limit, pid=pid)
    if pid is None or pid == sh.conn.pid:
        sh.limits[resource] = limit
    return 0
