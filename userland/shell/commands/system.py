"""The commands about llmos itself: services, uname, dmesg and shutdown."""

from __future__ import annotations

import collections
import time

from syscalls import errors

from ..builtin import (Failure, Shell, ShellExit, Streams, Usage, command, duration, for_each,
                       int_arg, operands, options, table)


@command("[restart NAME...]")
def cmd_services(sh: Shell, io: Streams, args: list[str]) -> int:
    """List the service processes, or restart some.

    Columns: name, OS pid, state (STARTING, READY, BACKOFF, FAILED, STOPPED), restarts so far,
    time since it became READY, and how its last process ended. `services restart NAME` kills
    and restarts a service, and clears a FAILED state.
    Example: services restart storage  # restart the storage service
    """
    if not args:
        rows = [[s["name"], str(s["pid"] or "-"), s["state"], str(s["restarts"]),
                 duration(s["uptime"]) if s["state"] == "READY" else "-", s["last_exit"] or "-"]
                for s in sh.call("services")]
        table(io.stdout, ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "LAST-EXIT"], rows,
              right={"PID", "RESTARTS", "UPTIME"})
        return 0
    if args[0] != "restart":
        raise Usage(f"unknown subcommand {args[0]!r}")
    if len(args) < 2:
        raise Usage("missing NAME")
    return for_each(io, "services", args[1:], lambda name: sh.call("service_restart", name=name))


@command()
def cmd_uname(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the system's name, version, ABI version, kernel OS pid, uptime and home.

    Example: uname  # which llmos is this
    """
    operands(args)
    u = sh.call("uname")
    print(f"{u['system']} {u['version']} abi {u['abi']} kernel-pid {u['kernel_pid']} "
          f"up {duration(time.time() - u['boot_time'])} home {u['home']}", file=io.stdout)


@command("[-n N]")
def cmd_dmesg(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the last N lines (20 unless -n) of the kernel's log, one readable line per event.

    Example: dmesg -n 50  # print the last 50 lines of the kernel's log
    """
    opts, rest = options(args, "n:")
    operands(rest)
    n = int_arg(opts["-n"], "-n", 1) if "-n" in opts else 20
    path = sh.paths.log_file("kernel")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = collections.deque(f, maxlen=n)
    except OSError as e:
        raise Failure(f"{path}: {e.strerror}") from None
    from syscalls.runtime.logs import render_lines  # structlog only when needed
    for line in render_lines(lines):
        print(line, file=io.stdout)


@command()
def cmd_shutdown(sh: Shell, io: Streams, args: list[str]) -> None:
    """Stop llmos (every program and service, then the kernel); the shell then exits with 0."""
    operands(args)
    try:
        sh.call("shutdown")
    except (errors.ECONNREFUSED, errors.ESHUTDOWN):
        pass                    # it went before it could answer
    sh.disconnect()
    raise ShellExit(0)
