"""The launcher: starts programs as OS processes, watches them, and restarts daemons by policy.

A spawned program keeps its llmos PID for as long as the kernel keeps it going: a daemon whose
restart policy asks for it is started again (new OS process, same PID, same spawn token so its new
connection binds to the same entry), paced by the same backoff as services. A program stops for
good when its policy says so (``never``; ``on-failure`` after a clean exit), when someone ends it
with llmos's ``kill`` (TERM, INT, HUP or KILL: that is a request, not a crash), or when it keeps
failing (more than ``max_restarts`` in ``restart_window``).

Output goes to LLMOS_HOME/logs/proc-PID.log, appended across restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from syscalls.paths import Paths

from syscalls.runtime.backoff import Backoff
from syscalls.runtime.config import SupervisorConfig
from .proctable import RESTARTING, RUNNING, Process
from .supervisor import _die_with_kernel

ENDING_SIGNALS = {"TERM", "INT", "HUP", "KILL"}
ROOT = str(Path(__file__).resolve().parent.parent)


class Launcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, paths: Paths, cfg: SupervisorConfig, log,
                 on_end: Callable[[Process, int | None, str | None], None],
                 on_detach: Callable[[Process], None]):
        self.loop, self.paths, self.cfg, self.log = loop, paths, cfg, log
        self.on_end = on_end
        self.on_detach = on_detach
        self.running: dict[int, tuple[Process, subprocess.Popen, int]] = {}   # OS pid -> ...
        self.stopping = False

    def launch(self, proc: Process) -> None:
        """Start proc's OS process from its launch spec; raises OSError if exec fails."""
        env = dict(proc.env)
        env.update(LLMOS_HOME=str(self.paths.home), LLMOS_SPAWN_TOKEN=proc.spawn_token,
                   LLMOS_PID=str(proc.pid))
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.paths.log_file(f"proc-{proc.pid}"), "ab") as out:
            popen = subprocess.Popen(proc.command, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, env=env, cwd=proc.cwd,
                                     close_fds=True, start_new_session=True,
                                     preexec_fn=_die_with_kernel)
        proc.os_pid = popen.pid
        proc.state = RUNNING
        pidfd = os.pidfd_open(popen.pid)
        self.running[popen.pid] = (proc, popen, pidfd)
        self.loop.add_reader(pidfd, self._exited, popen.pid)
        self.log.info("launched", pid=proc.pid, argv=proc.argv, os_pid=popen.pid,
                      restarts=proc.restarts)

    def _exited(self, os_pid: int) -> None:
        proc, popen, pidfd = self.running.pop(os_pid)
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        code = popen.wait()
        status, sig = (None, signal.Signals(-code).name.removeprefix("SIG")) if code < 0 \
            else (code, None)
        if not proc.alive:              # it said exit() first; the entry is already gone
            return
        delay = self._restart_delay(proc, status)
        if delay is None:
            self.on_end(proc, status, sig)
            return
        proc.restarts += 1
        proc.state = RESTARTING
        proc.os_pid = None
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
            os.killpg(proc.os_pid, signum)
        else:
            os.kill(proc.os_pid, signum)

    async def stop_all(self, grace: float) -> None:
        """TERM every program the kernel started, then KILL what is left after ``grace``."""
        self.stopping = True
        for _, popen, _ in self.running.values():
            try:
                os.killpg(popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for os_pid, (proc, popen, pidfd) in list(self.running.items()):
            while popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
            if self.running.pop(os_pid, None) is not None:   # _exited may have taken it already
                self.loop.remove_reader(pidfd)
                os.close(pidfd)
