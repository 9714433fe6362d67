"""The launcher: starts programs as OS processes, watches them, and restarts daemons by policy.

A spawned program keeps its llmos PID for as long as the kernel keeps it going: a daemon whose
restart policy asks for it is started again (new OS process, same PID, same spawn token so its new
connection binds to the same entry), paced by the same backoff as services. A program stops for
good when its policy says so (``never``; ``on-failure`` after a clean exit), when someone ends it
with llmos's ``kill`` (TERM, INT, HUP or KILL: that is a request, not a crash), or when it keeps
failing (more than ``max_restarts`` in ``restart_window``).

Output goes to LLMOS_HOME/logs/proc-PID.log, appended across restarts; a program that ends for
good having written nothing leaves no file (a busy machine spawns thousands of short programs).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from typing import Callable

from syscalls.paths import Paths
from syscalls.runtime import child
from syscalls.runtime.backoff import Backoff
from syscalls.runtime.config import SupervisorConfig

from . import users
from .proctable import RESTARTING, RUNNING, Process

ENDING_SIGNALS = {"TERM", "INT", "HUP", "KILL"}


class Launcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, paths: Paths, cfg: SupervisorConfig, log,
                 on_end: Callable[[Process, int | None, str | None], None],
                 on_detach: Callable[[Process], None]):
        self.loop, self.paths, self.cfg, self.log = loop, paths, cfg, log
        self.on_end = on_end
        self.on_detach = on_detach
        self.running: dict[int, tuple[Process, child.Child]] = {}   # by OS pid
        self.stopping = False

    def launch(self, proc: Process) -> None:
        """Start proc's OS process from its launch spec; raises OSError if exec fails."""
        env = dict(proc.env)
        env.update(LLMOS_HOME=str(self.paths.home), LLMOS_SPAWN_TOKEN=proc.spawn_token,
                   LLMOS_PID=str(proc.pid))
        with open(self.paths.log_file(f"proc-{proc.pid}"), "ab") as out:
            # a group of its own, so that a signal reaches what it started too (like a shell's job)
            as_user, _ = users.spawn_as(proc.uid)      # its caller's user, never the kernel's
            program = child.Child(self.loop, proc.command, env, self._exited,
                                  group=True, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=proc.cwd, as_user=as_user)
        proc.os_pid = program.pid
        proc.state = RUNNING
        self.running[program.pid] = (proc, program)
        self.log.info("launched", pid=proc.pid, argv=proc.argv, os_pid=program.pid,
                      restarts=proc.restarts)

    def _exited(self, how: child.Exit) -> None:
        proc, _ = self.running.pop(how.pid)
        status, sig = how.status, how.signal
        if not proc.alive:              # it said exit() first; the entry is already gone
            return
        delay = self._restart_delay(proc, status)
        if delay is None:
            log = self.paths.log_file(f"proc-{proc.pid}")
            with contextlib.suppress(OSError):
                if log.stat().st_size == 0:
                    log.unlink()
            self.on_end(proc, status, sig)
            return
        proc.restarts += 1
        proc.state = RESTARTING
        proc.os_pid = None
        proc.advertised = {}            # what the last run served went with it
        # Its connection died with it, whether or not the kernel has noticed yet: let go of it,
        # so that the next run's connection binds to this entry (mailbox and subscriptions kept).
        self.on_detach(proc)
        self.log.warning("daemon_exited", pid=proc.pid, status=status, signal=sig,
                         restart_in_s=delay, policy=proc.restart)
        self.loop.call_later(delay, self._relaunch, proc)

    def _restart_delay(self, proc: Process, status: int | None) -> float | None:
        if self.stopping or proc.restart == "never" or proc.last_signal in ENDING_SIGNALS:
            return None
        if proc.restart == "on-failure" and status == 0:
            return None
        if proc.backoff is None:
            c = self.cfg
            proc.backoff = Backoff(c.backoff_base, c.backoff_max, c.max_restarts, c.restart_window)
        delay = proc.backoff.next_delay(time.monotonic())
        if delay is None:
            self.log.error("daemon_gave_up", pid=proc.pid, restarts=proc.restarts)
        return delay

    def _relaunch(self, proc: Process) -> None:
        if not proc.alive or self.stopping or proc.state != RESTARTING:
            return
        try:
            self.launch(proc)
        except OSError as e:
            self.log.error("relaunch_failed", pid=proc.pid, error=str(e))
            self.on_end(proc, 127, None)

    def signal(self, proc: Process, signum: int) -> None:
        """Signal a program: its whole process group if the kernel started it (like a shell's job),
        the process alone if it merely connected."""
        if proc.os_pid in self.running:
            self.running[proc.os_pid][1].signal(signum)
        else:
            users.signal_peer(proc.os_pid, proc.uid, signum)

    async def stop_all(self, grace: float) -> None:
        """TERM every program the kernel started, then KILL what is left after ``grace``."""
        self.stopping = True
        programs = [program for _, program in self.running.values()]
        await child.stop_all(programs, grace)
        self.running.clear()
