"""The process commands: ps, kill, spawn, run and wait."""

from __future__ import annotations

import os
import shlex
import signal
import time
from typing import Any

from syscalls import errors
from syscalls.table import SIGNALS
from userland import programs

from ..builtin import (Failure, Shell, Streams, Usage, command, duration, error_text, for_each,
                       int_arg, options, pid_arg, seconds_arg, signal_name, size, table)
from ..jobs import run_program


def tree(procs: list[dict]) -> list[tuple[dict, int]]:
    """Processes in depth-first order under their parents, each with its depth."""
    pids = {p["pid"] for p in procs}
    children: dict[int, list[dict]] = {}
    for p in procs:
        children.setdefault(p["ppid"], []).append(p)
    roots = [p for p in procs if p["ppid"] not in pids or p["ppid"] == p["pid"]]
    stack, out, seen = [(p, 0) for p in reversed(roots)], [], set()
    while stack:
        p, depth = stack.pop()
        if p["pid"] in seen:
            continue
        seen.add(p["pid"])
        out.append((p, depth))
        kids = sorted(children.get(p["pid"], []), key=lambda c: c["pid"])
        stack.extend((c, depth + 1) for c in reversed(kids))
    return out + [(p, 0) for p in procs if p["pid"] not in seen]


@command("[-t] [PID...]")
def cmd_ps(sh: Shell, io: Streams, args: list[str]) -> int:
    """List the processes (or those named); -t draws them as a tree under their parents.

    Columns: PID, parent PID, OS user, state (RUNNING, or with model work waiting READY or
    SUSPENDED; BLOCKED in wait or recv; STOPPED; ZOMBIE), priority (a nice value), name, age, KV
    cache blocks held, tokens in (prompts) and out (generated), generated tokens per second,
    syscalls made, bytes stored, and the command line.
    Example: ps -t  # show the processes as a tree
    """
    opts, rest = options(args, "t")
    pids = [pid_arg(a) for a in rest]
    status = 0
    if pids:
        procs = []
        for pid in pids:
            try:
                procs += sh.call("ps", pid=pid)
            except errors.ESRCH as e:
                io.error("ps", error_text(e))
                status = 1
    else:
        procs = sh.call("ps")
    rows = []
    now = time.time()
    for p, depth in tree(procs) if "-t" in opts else [(p, 0) for p in procs]:
        name = ("   " * (depth - 1) + " \\_ " if depth else "") + (p["name"] or "-")
        rows.append([str(p["pid"]), str(p["ppid"]), "-" if p["uid"] is None else str(p["uid"]),
                     p["state"], str(p["priority"]), name, duration(now - p["started"]),
                     str(p.get("kv_blocks", 0)), str(p["tokens_in"]), str(p["tokens_out"]),
                     f"{p.get('tok_s', 0.0):.1f}", str(p["syscalls"]), size(p["bytes_stored"]),
                     shlex.join(p["argv"] or [])])
    if rows:
        numeric = ["PID", "PPID", "UID", "PRI", "AGE", "KV", "TOK-IN", "TOK-OUT", "TOK/S", "CALLS", "STORED"]
        table(io.stdout, numeric[:3] + ["STATE", "PRI", "NAME", "AGE", "KV", "TOK-IN", "TOK-OUT", "TOK/S",
                                        "CALLS", "STORED", "ARGV"], rows, right=set(numeric))
    return status


@command("[-SIGNAL | -s SIGNAL] (PID | %JOB)...  |  kill -l")
def cmd_kill(sh: Shell, io: Streams, args: list[str]) -> int:
    """Send a signal (TERM unless named) to processes; kill -l lists the signals.

    TERM, INT and HUP ask a program to end, KILL ends it, STOP and CONT suspend and resume it.
    A signal is named with or without SIG, in any case, or by number: kill -9 PID.
    %N signals the programs that background job N started with run; TERM, INT, HUP or KILL
    also stop a builtin it runs (gen, recv, wait), as Ctrl-C would.
    Example: kill -KILL 1234  # end process 1234 at once
    Example: kill -CONT %1  # let job 1 go on
    """
    sig = "TERM"
    if args[:1] == ["-l"]:
        if len(args) > 1:
            raise Usage("-l takes no arguments")
        for name in SIGNALS:
            print(f"{signal.Signals['SIG' + name].value:>2} {name}", file=io.stdout)
        return 0
    if args[:1] == ["-s"]:
        if len(args) < 2:
            raise Usage("-s needs a signal")
        sig, args = signal_name(args[1]), args[2:]
    elif args and args[0].startswith("-") and args[0] not in ("-", "--"):
        sig, args = signal_name(args[0][1:]), args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise Usage("missing PID")

    def send(pid: int | str) -> None:
        if isinstance(pid, str):        # a job: its programs, by OS signal; or its builtins
            sh.jobs.find(pid).kill(signal.Signals["SIG" + sig])
        else:
            sh.call("kill", pid=pid, signal=sig)
    return for_each(io, "kill", [a if a.startswith("%") else pid_arg(a) for a in args], send)


@command("[--daemon] [--name NAME] [--priority N] [--] PROGRAM [ARG...]")
def cmd_spawn(sh: Shell, io: Streams, args: list[str]) -> None:
    """Start a program under llmos and print its PID (also kept in $!).

    PROGRAM is an llmos program (summarize, batch, echo-daemon: see run), a path, or a name
    looked up in the kernel's PATH; it runs in the shell's current directory. It is a child of
    this shell unless --daemon, which parents it to pid 1 so it outlives the shell. --priority
    sets its nice value (-20..19); by default it has the shell's priority and limits. Its output
    goes to $LLMOS_HOME/logs/proc-PID.log.
    Example: spawn --name indexer python3 index.py  # start index.py under llmos
    """
    opts, argv = options(args, "", ("daemon", "name=", "priority="))
    if not argv:
        raise Usage("missing PROGRAM")
    kw: dict[str, Any] = {"daemon": "--daemon" in opts, "name": opts.get("--name")}
    if "--priority" in opts:
        kw["priority"] = int_arg(opts["--priority"], "--priority", -20, 19)
    _spawn(sh, io, argv, kw)


def _spawn(sh: Shell, io: Streams, argv: list[str], kw: dict[str, Any]) -> None:
    """spawn argv (an llmos program by its name) in the shell's directory; print its PID, keep it in $!."""
    if argv[0] in programs.names():
        kw["name"] = kw.get("name") or argv[0]
        argv = programs.command(argv)
    try:
        kw["cwd"] = os.getcwd()
    except OSError:
        pass                    # our directory was removed: the kernel's will do
    if "/" in argv[0]:          # the kernel resolves a relative path against its own directory
        argv = [os.path.abspath(argv[0]), *argv[1:]]
    pid = sh.call("spawn", argv=argv, **kw)
    sh.last_spawned = pid
    print(pid, file=io.stdout)


@command("[--daemon [--restart POLICY] [--name NAME]] [--] PROGRAM [ARG...]")
def cmd_run(sh: Shell, io: Streams, args: list[str]) -> int | None:
    """Run a program in the foreground, with the shell's stdin, stdout and stderr; take its status.

    PROGRAM is one of llmos's own programs, found first (summarize: stdin to a summary; batch:
    a resumable bulk job over storage keys; echo-daemon; `run NAME --help` says more), or a
    program on the PATH, or a path. It runs as a child of llmsh with LLMOS_HOME set, so a
    program that connects becomes an llmos process, with the priority and limits set in the
    shell (nice, ulimit) once it connects; it works in pipes
    (cat notes | run summarize | put notes/summary). A status of 127 means not found; 128 + N,
    killed by signal N. --daemon instead has the kernel start it detached, as
    spawn --daemon does, and prints its PID (also $!): its output goes to
    $LLMOS_HOME/logs/proc-PID.log, and --restart never|on-failure|always says when the kernel
    starts it again.
    Example: run chat  # run the chat program
    """
    opts, argv = options(args, "", ("daemon", "restart=", "name="))
    if not argv:
        raise Usage("missing PROGRAM")
    if "--daemon" not in opts:
        if "--restart" in opts or "--name" in opts:
            raise Usage("--restart and --name go with --daemon")
        return run_program(sh, io, programs.command(argv))
    restart = opts.get("--restart", "never")
    if restart not in ("never", "on-failure", "always"):
        raise Failure(f"--restart must be never, on-failure or always, not {restart!r}", 2)
    _spawn(sh, io, argv, {"daemon": True, "restart": restart, "name": opts.get("--name")})
    return 0


@command("[--timeout S] (PID | %JOB)...")
def cmd_wait(sh: Shell, io: Streams, args: list[str]) -> int:
    """Wait until processes or jobs end, print how each process ended, take the last status.

    A program that exited gives its exit status; one killed by a signal gives 128 + the signal's
    number (143 for TERM), as in sh. Waiting for a child of this shell reaps it. %N waits for
    job N (as fg does, but quietly). --timeout S gives up on a process after S seconds
    (status 1); Ctrl-C stops waiting.
    Example: wait %1  # wait for job 1 to finish
    """
    opts, rest = options(args, "", ("timeout=",))
    if not rest:
        raise Usage("missing PID")
    targets = [a if a.startswith("%") else pid_arg(a) for a in rest]
    timeout = seconds_arg(opts["--timeout"]) if "--timeout" in opts else None
    status = 0
    for pid in targets:
        if isinstance(pid, str):
            job = sh.jobs.find(pid)
            status = job.wait()
            if job.stopped:
                print(sh.jobs.line(job), file=io.stdout)
            else:
                sh.jobs.jobs.pop(job.number, None)
            continue
        r = sh.call("wait", blocking=True, pid=pid, timeout=timeout)
        if r["status"] is not None:
            status = r["status"]
            print(f"pid {r['pid']} exited with status {status}", file=io.stdout)
        else:
            number = getattr(signal.Signals, "SIG" + str(r["signal"]), None)
            status = 128 + number.value if number else 255
            print(f"pid {r['pid']} killed by signal {r['signal']}", file=io.stdout)
    return status
