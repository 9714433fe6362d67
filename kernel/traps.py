"""The traps: one function per syscall the kernel answers itself, ``sys_<name>(kernel, proc, a)``.

The kernel's dispatch table is built from these names (kernel.py, ``TRAPS``): adding a trap is
adding a row to syscalls/table.py and one function here. A trap gets the calling process and its
arguments already checked against the row; it returns the value of the OK, or raises the
LLMOSError its row lists. A coroutine trap blocks (wait, recv) and runs as a task of its own.
Never: a socket. A trap changes the process table and asks the kernel (``kernel.router``,
``kernel.launcher``) for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal as signals
import time

from syscalls import errors, wire
from syscalls.table import MAX_ADVERTISED_VALUE, MODEL_LIMITS, RESOURCES

from . import __version__, users
from .launcher import ENDING_SIGNALS
from .proctable import BLOCKED, KERNEL_PID, RESTARTING, RUNNING, STOPPED, Process, ProcessTable


# == processes =====================================================================================
def sys_hello(kernel, proc: Process, a: dict) -> dict:
    if a["name"]:
        proc.name = a["name"]
    if a["argv"] is not None:
        proc.argv = a["argv"]
    if a["privileged"] and not proc.privileged:
        if proc.spawned:
            raise errors.EPERM("hello: a program spawned without privilege cannot gain it")
        if proc.uid not in (0, kernel.uid):
            raise errors.EPERM(f"hello: privilege is only for the kernel's user (uid {kernel.uid}) "
                               f"or root; this program runs as uid {proc.uid}")
        spawner = _unprivileged_spawner(kernel.table, proc.os_pid)
        if spawner is not None:
            raise errors.EPERM(f"hello: this program runs under pid {spawner.pid}, which was "
                               f"spawned without privilege; nothing it starts may gain it")
        proc.privileged = True
    if a["priority"] is not None and a["priority"] != proc.priority:
        if a["priority"] < proc.priority and not proc.privileged:
            raise errors.EPERM(f"hello: priority {a['priority']} is more urgent than pid {proc.pid}'s "
                               f"({proc.priority}); that needs privilege")
        proc.priority = a["priority"]
    for resource, limit in (a["limits"] or {}).items():
        if resource not in RESOURCES:
            raise errors.EINVAL(f"hello: argument 'limits': no resource {resource!r} (resources: "
                                f"{', '.join(RESOURCES)})")
        if limit is not None and limit < 0:
            raise errors.EINVAL(f"hello: argument 'limits': {resource} must be >= 0, got {limit}")
        old = proc.limits.get(resource)
        if limit is not None and (old is None or limit < old):
            proc.limits[resource] = limit
    return {"pid": proc.pid, "ppid": proc.ppid, "privileged": proc.privileged,
            "spawned": proc.spawned,
            "kernel": {"version": __version__, "abi": wire.VERSION, "boot_id": kernel.boot_id}}


def _unprivileged_spawner(table: ProcessTable, os_pid: int | None) -> Process | None:
    """The spawned, unprivileged process whose OS process is os_pid or one of its ancestors:
    a second connection from inside it must not get the privilege its spawn withheld."""
    spawned = {p.os_pid: p for p in table if p.spawned and not p.privileged and p.alive and p.os_pid}
    for _ in range(64):
        if not spawned or os_pid is None or os_pid <= 1:
            return None
        if os_pid in spawned:
            return spawned[os_pid]
        try:
            with open(f"/proc/{os_pid}/stat") as f:
                os_pid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


def sys_getpid(kernel, proc: Process, a: dict) -> int:
    return proc.pid


def sys_ps(kernel, proc: Process, a: dict) -> list[dict]:
    if a["pid"] is not None:
        target = kernel.table.get(a["pid"])
        if target is None:
            raise errors.ESRCH(f"ps: no process with pid {a['pid']}")
        return [target.info()]
    return [p.info() for p in kernel.table]


def sys_spawn(kernel, proc: Process, a: dict) -> int:
    argv = a["argv"]
    if not argv or not argv[0]:
        raise errors.EINVAL("spawn: argument 'argv' must name a program (it is empty)")
    # exec refuses these (Popen raises ValueError): say which argument, not "kernel bug"
    for name, texts in (("argv", argv), ("env", [t for kv in (a["env"] or {}).items() for t in kv])):
        if any("\0" in t for t in texts):
            raise errors.EINVAL(f"spawn: argument '{name}' holds a NUL character")
    if any("=" in k for k in a["env"] or {}):
        raise errors.EINVAL("spawn: argument 'env': a variable's name may not hold '='")
    users.check_quota(kernel.table, proc.uid, kernel.cfg.kernel.processes_per_user, "spawn")
    try:    # a program runs as its caller's user, in an environment of that user's
        _, base = users.spawn_as(proc.uid)
    except PermissionError as e:
        raise errors.EPERM(f"spawn: {e}") from None
    env = dict(os.environ) if base is None else base
    env.update(a["env"] or {})
    cwd = a["cwd"]
    if cwd is None and base is not None:
        cwd = base["HOME"] if os.path.isdir(base["HOME"]) else "/"
    if cwd is not None and not os.path.isdir(cwd):
        raise errors.ENOENT(f"spawn: argument 'cwd': no such directory {cwd!r}")
    program = argv[0]
    if os.sep in program and cwd is not None:      # ./prog is relative to the child's cwd
        program = os.path.join(cwd, program)
    exe = shutil.which(program, path=env.get("PATH"))
    if exe is None:
        raise errors.ENOENT(f"spawn: program {argv[0]!r} not found (not a path to an executable, "
                            f"nor in PATH)")
    priority = proc.priority if a["priority"] is None else a["priority"]
    if priority < proc.priority and not proc.privileged:
        raise errors.EPERM(f"spawn: priority {priority} is more urgent than the caller's "
                           f"({proc.priority}); that needs privilege")
    child = kernel.table.create(
        ppid=KERNEL_PID if a["daemon"] else proc.pid, uid=proc.uid,
        name=a["name"] or os.path.basename(argv[0]), argv=argv, priority=priority,
        privileged=proc.privileged, daemon=a["daemon"], spawned=True, limits=dict(proc.limits),
        spawn_token=secrets.token_hex(16), command=[exe, *argv[1:]], env=env, cwd=cwd,
        restart=a["restart"])
    try:
        kernel.launcher.launch(child)
    except OSError as e:
        kernel.table.end(child, 127, None)
        raise errors.ENOENT(f"spawn: cannot run {argv[0]!r}: {e.strerror}") from None
    return child.pid


def sys_kill(kernel, proc: Process, a: dict) -> None:
    target, sig = kernel.table.get(a["pid"]), a["signal"]
    if target is None or not target.alive:
        raise errors.ESRCH(f"kill: no process with pid {a['pid']}")
    if target.pid == KERNEL_PID:
        raise errors.EPERM("kill: pid 1 is the kernel; use shutdown to stop llmos")
    _same_user(proc, target, "kill")
    if not (proc.privileged or kernel.table.is_descendant(target.pid, proc.pid)):
        raise errors.EPERM(f"kill: pid {target.pid} is neither the caller (pid {proc.pid}) nor "
                           f"one of its descendants; signalling it needs privilege")
    kernel.log.info("signal", sender=proc.pid, target=target.pid, signal=sig)
    target.last_signal = sig
    if target.state == RESTARTING:     # between two runs: nothing to signal
        if sig in ENDING_SIGNALS:
            kernel.end_process(target, None, sig)
        return None
    if target.os_pid is not None:
        try:
            kernel.launcher.signal(target, getattr(signals, "SIG" + sig))
        except ProcessLookupError:
            kernel.end_process(target, None, sig)
            return None
        except PermissionError:
            raise errors.EPERM(f"kill: the OS refused to signal pid {target.pid} "
                               f"(OS pid {target.os_pid})") from None
    if sig == "STOP":
        target.state = STOPPED
        kernel.router.caller_changed(target)     # its model work is suspended too
    elif sig == "CONT":
        target.state = BLOCKED if target.blocked else RUNNING
        kernel.router.caller_changed(target)
    elif target.os_pid is None:     # nothing to deliver it to: the kernel ends the process
        kernel.end_process(target, None, sig)
    return None


async def sys_wait(kernel, proc: Process, a: dict) -> dict:
    target = kernel.table.get(a["pid"])
    if target is None:
        raise errors.ESRCH(f"wait: no process with pid {a['pid']} (never existed, or reaped)")
    mine = target.ppid == proc.pid
    if not mine and not proc.privileged:
        raise errors.ECHILD(f"wait: pid {target.pid} is not a child of pid {proc.pid}")
    if target.alive:
        fut = kernel.loop.create_future()
        target.exit_waiters.append(fut)
        with _blocked(proc):
            try:
                await asyncio.wait_for(fut, a["timeout"])
            except asyncio.TimeoutError:
                raise errors.ETIMEDOUT(f"wait: pid {target.pid} still running after "
                                       f"{a['timeout']}s") from None
            finally:    # timed out or cancelled: a long-lived target must not gather them
                if fut in target.exit_waiters:
                    target.exit_waiters.remove(fut)
    result = {"pid": target.pid, "status": target.exit_status, "signal": target.exit_signal}
    if target.ppid == proc.pid:
        kernel.table.reap(target)
    return result


def sys_exit(kernel, proc: Process, a: dict) -> None:
    # The reply still reaches the connection that asked: _syscall holds its routing id.
    kernel.end_process(proc, a["status"], None)


def sys_advertise(kernel, proc: Process, a: dict) -> None:
    for key, value in a["info"].items():
        if len(key) > MAX_ADVERTISED_VALUE or len(value) > MAX_ADVERTISED_VALUE:
            raise errors.EINVAL(f"advertise: argument 'info': entry {key[:64]!r} is longer than "
                                f"{MAX_ADVERTISED_VALUE} characters")
    proc.advertised = dict(a["info"])


# == priorities and limits =========================================================================
def _may_change(kernel, proc: Process, pid: int | None, call: str) -> Process:
    target = proc if pid is None else kernel.table.get(pid)
    if target is None or not target.alive:
        raise errors.ESRCH(f"{call}: no process with pid {pid}")
    _same_user(proc, target, call)
    if not (proc.privileged or kernel.table.is_descendant(target.pid, proc.pid)):
        raise errors.EPERM(f"{call}: pid {target.pid} is neither the caller nor one of its "
                           f"descendants; that needs privilege")
    if target.pid == KERNEL_PID:
        raise errors.EPERM(f"{call}: pid 1 is the kernel")
    return target


def sys_nice(kernel, proc: Process, a: dict) -> int:
    new = max(-20, min(19, proc.priority + a["increment"]))
    if new < proc.priority and not proc.privileged:
        raise errors.EPERM(f"nice: making pid {proc.pid} more urgent ({proc.priority} -> {new}) "
                           f"needs privilege")
    proc.priority = new
    kernel.router.caller_changed(proc)
    return new


def sys_setpriority(kernel, proc: Process, a: dict) -> None:
    target = _may_change(kernel, proc, a["pid"], "setpriority")
    if a["priority"] < target.priority and not proc.privileged:
        raise errors.EPERM(f"setpriority: making pid {target.pid} more urgent "
                           f"({target.priority} -> {a['priority']}) needs privilege")
    target.priority = a["priority"]
    kernel.router.caller_changed(target)


def sys_getpriority(kernel, proc: Process, a: dict) -> int:
    target = proc if a["pid"] is None else kernel.table.get(a["pid"])
    if target is None:
        raise errors.ESRCH(f"getpriority: no process with pid {a['pid']}")
    return target.priority


def sys_getrlimit(kernel, proc: Process, a: dict) -> dict:
    target = proc if a["pid"] is None else kernel.table.get(a["pid"])
    if target is None:
        raise errors.ESRCH(f"getrlimit: no process with pid {a['pid']}")
    return {r: target.limits.get(r) for r in RESOURCES}


def sys_setrlimit(kernel, proc: Process, a: dict) -> None:
    target = _may_change(kernel, proc, a["pid"], "setrlimit")
    resource, new = a["resource"], a["limit"]
    old = target.limits.get(resource)
    raising = old is not None and (new is None or new > old)
    if raising and not proc.privileged:
        raise errors.EPERM(f"setrlimit: raising {resource} of pid {target.pid} from {old} to "
                           f"{'unlimited' if new is None else new} needs privilege")
    if new is None:
        target.limits.pop(resource, None)
    else:
        target.limits[resource] = new
    if resource in MODEL_LIMITS:
        kernel.router.caller_changed(target)


# == messages ======================================================================================
def sys_send(kernel, proc: Process, a: dict) -> None:
    size = len(wire.pack(a["data"]))
    target = kernel.table.get(a["pid"])
    if target is None or not target.alive or target.pid == KERNEL_PID:
        raise errors.ESRCH(f"send: no process with pid {a['pid']}")
    _same_user(proc, target, "send")
    if not _deliver(kernel, target, {"from": proc.pid, "topic": None, "data": a["data"]}, size):
        cfg = kernel.cfg.kernel
        raise errors.EAGAIN(f"send: mailbox of pid {target.pid} is full ({len(target.mailbox)} "
                            f"messages, {target.mailbox_bytes} bytes; limits {cfg.mailbox_messages} "
                            f"messages (kernel.mailbox_messages), {cfg.mailbox_bytes} bytes "
                            f"(kernel.mailbox_bytes)); this message is {size} bytes")


def _deliver(kernel, target: Process, message: dict, size: int) -> bool:
    r = target.receiver
    if r is not None and not r.done():
        target.receiver = None
        r.set_result(message)
        return True
    cfg = kernel.cfg.kernel
    if len(target.mailbox) >= cfg.mailbox_messages or target.mailbox_bytes + size > cfg.mailbox_bytes:
        return False
    target.mailbox.append((message, size))
    target.mailbox_bytes += size
    return True


async def sys_recv(kernel, proc: Process, a: dict) -> dict:
    if proc.mailbox:
        message, size = proc.mailbox.popleft()
        proc.mailbox_bytes -= size
        return message
    if proc.receiver is not None and not proc.receiver.done():
        raise errors.EAGAIN("recv: this process is already waiting in another recv")
    proc.receiver = kernel.loop.create_future()
    with _blocked(proc):
        try:
            return await asyncio.wait_for(proc.receiver, a["timeout"])
        except asyncio.TimeoutError:
            raise errors.ETIMEDOUT(f"recv: no message within {a['timeout']}s") from None
        finally:
            proc.receiver = None


def sys_publish(kernel, proc: Process, a: dict) -> int:
    topic, reached, size = a["topic"], 0, len(wire.pack(a["data"]))
    message = {"from": proc.pid, "topic": topic, "data": a["data"]}
    for p in list(kernel.table):
        if p.alive and p.subscriptions and (p.uid == proc.uid or proc.privileged) and \
                any(topic.startswith(s) for s in p.subscriptions):     # never to another user's
            if _deliver(kernel, p, message, size):
                reached += 1
            else:
                p.dropped += 1
    return reached


def sys_subscribe(kernel, proc: Process, a: dict) -> None:
    limit = kernel.cfg.kernel.max_subscriptions
    if len(proc.subscriptions) >= limit and a["topic"] not in proc.subscriptions:
        raise errors.EAGAIN(f"subscribe: pid {proc.pid} holds {len(proc.subscriptions)} "
                            f"subscriptions, the limit (kernel.max_subscriptions = {limit})")
    proc.subscriptions.add(a["topic"])


def sys_unsubscribe(kernel, proc: Process, a: dict) -> None:
    if a["topic"] not in proc.subscriptions:
        raise errors.ENOENT(f"unsubscribe: not subscribed to {a['topic']!r}")
    proc.subscriptions.discard(a["topic"])


# == the system ====================================================================================
def sys_services(kernel, proc: Process, a: dict) -> list[dict]:
    now = time.monotonic()
    return [svc.info(now) for svc in kernel.supervisor.services.values()]


def sys_service_restart(kernel, proc: Process, a: dict) -> None:
    svc = kernel.supervisor.services.get(a["name"])
    if svc is None:
        known = ", ".join(kernel.supervisor.services)
        raise errors.ENOENT(f"service_restart: no service named {a['name']!r} (services: {known})")
    kernel.log.info("service_restart_requested", service=svc.name, by=proc.pid)
    kernel.supervisor.restart(svc)


def sys_uname(kernel, proc: Process, a: dict) -> dict:
    return {"system": "llmos", "version": __version__, "abi": wire.VERSION,
            "home": str(kernel.paths.home), "kernel_pid": os.getpid(), "boot_time": kernel.boot_time}


def sys_kstat(kernel, proc: Process, a: dict) -> dict:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"counters": dict(kernel.counters, program_socket_wakeups=kernel.programs.wakeups),
            "rss": rss, "processes": len(kernel.table.procs),
            "in_flight": sum(len(p.in_flight) for p in kernel.table),
            "syscalls": {name: n for name, n in kernel.by_syscall.items() if n},
            "ended_tokens": {name: list(t) for name, t in kernel.table.ended_tokens.items()},
            "tables": _table_sizes(kernel)}


def _table_sizes(kernel) -> dict:
    """How much the kernel holds, entry by entry: each is bounded (docs/reliability.md,
    "Resource exhaustion"), and back to its baseline once the programs that filled it are gone."""
    table = kernel.table
    return {"processes": len(table.procs), "connections": len(table.by_ident),
            "spawn_tokens": len(table.by_token), "ended_names": len(table.ended_tokens),
            "mailbox_messages": sum(len(p.mailbox) for p in table),
            "mailbox_bytes": sum(p.mailbox_bytes for p in table),
            "subscriptions": sum(len(p.subscriptions) for p in table),
            "exit_waiters": sum(len(p.exit_waiters) for p in table),
            "sweeps": len(kernel._sweeps),
            "service_calls": sum(len(svc.in_flight) + len(svc.waiting) + len(svc.outgoing)
                                 for svc in kernel.supervisor.services.values())}


def sys_shutdown(kernel, proc: Process, a: dict) -> None:
    kernel.log.info("shutdown_requested", by=proc.pid)
    kernel.loop.call_soon(kernel.stopped.set)


# == helpers =======================================================================================
def _same_user(proc: Process, target: Process, call: str) -> None:
    """Processes of different OS users are apart: only privilege crosses (kernel/users.py)."""
    if target.uid != proc.uid and not proc.privileged:
        raise errors.EPERM(f"{call}: pid {target.pid} belongs to uid {target.uid}, not to the "
                           f"caller's uid {proc.uid}")


@contextlib.contextmanager
def _blocked(proc: Process):
    """The process is BLOCKED while the kernel holds one of its calls waiting."""
    proc.blocked += 1
    if proc.state == RUNNING:
        proc.state = BLOCKED
    try:
        yield
    finally:
        proc.blocked -= 1
        if proc.state == BLOCKED and not proc.blocked:
            proc.state = RUNNING
