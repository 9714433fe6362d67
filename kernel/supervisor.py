"""The supervisor: starts each service process, watches it, and restarts it when it dies or hangs.

Rules, stated once:
1. A service is alive while its OS process runs (watched through a pidfd, so a death is seen at
   once) and it answers the kernel's pings from its own event loop within ``ping_timeout``. A
   service that stops answering (hung, or SIGSTOPped) is killed with SIGKILL and treated as dead.
2. A dead service is restarted: the first time at once, then after ``backoff_base`` seconds,
   doubling up to ``backoff_max``. More than ``max_restarts`` restarts within ``restart_window``
   marks it FAILED: its calls get ESRVDOWN until ``service_restart`` clears it.
3. A new service process is trusted only after it says HELLO with the one-time token the kernel
   gave it on its stdin; anything else arriving on the service socket is dropped and counted.
4. A service may keep a spare (``spare``: the boot drivers, unless ``spare_drivers`` is false): a
   process of its program started once the service is READY, that does what it can before its
   token (``Service.preload``: a driver imports torch and its engine, ~2 s) and then waits on its
   stdin. The next start of the service is that process, given its token, not a new one. A spare
   is not the service: it holds no calls and gets no pings; one that dies is replaced at the
   service's next READY.
The supervisor decides; the kernel (through the ``Events`` it is given) deals with the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Protocol

from syscalls.paths import Paths
from syscalls.runtime import child
from syscalls.runtime.backoff import Backoff
from syscalls.runtime.config import SupervisorConfig

STARTING, READY, BACKOFF, FAILED, STOPPED = "STARTING", "READY", "BACKOFF", "FAILED", "STOPPED"


class Events(Protocol):
    def service_ready(self, svc: "Service") -> None: ...
    def service_down(self, svc: "Service") -> None: ...


class Service:
    def __init__(self, name: str, argv: list[str], backoff: Backoff, env: dict[str, str] | None = None,
                 spare: bool = False):
        self.name = name
        self.argv = argv
        self.env = env or {}         # added to the kernel's environment (a driver instance's model)
        self.backoff = backoff
        self.state = STOPPED
        self.process: child.Child | None = None
        self.ident: bytes | None = None
        self.token: str = ""
        self.restarts = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.deadline = 0.0          # STARTING: must say hello (or report progress) before this
        self.last_pong = 0.0
        self.ping_seq = 0
        self.last_exit: str | None = None
        self.progress: dict | None = None
        self.restart_handle: asyncio.TimerHandle | None = None
        self.waiting: deque = deque()     # calls held while the service is not READY
        self.in_flight: dict[int, object] = {}   # calls it is handling, by kernel call id
        self.outgoing: dict[int, object] = {}    # calls it made to other services, by its own id
        self.removed: asyncio.Future | None = None   # set by Supervisor.remove: gone for good once done
        self.fail_unready = False    # dying before it was ever READY makes it FAILED at once
        self.killed_for: str | None = None   # why the supervisor itself killed it, until it is restarted
        self.crashed = False         # its last death was a crash or an exit, not a kill (ours, or from outside)
        self.kept: dict[str, tuple] = {}     # what it left to have back after a restart (kernel/keep.py)
        self.kept_bytes = 0
        self.spare = spare           # keep a spare process for its next start (rule 4)
        self.spare_process: child.Child | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.running else None

    def info(self, now: float) -> dict:
        return {
            "name": self.name, "pid": self.pid, "state": self.state, "restarts": self.restarts,
            "uptime": round(now - self.ready_at, 3) if self.state == READY else 0.0,
            "last_exit": self.last_exit, "in_flight": len(self.in_flight),
            "waiting": len(self.waiting), "progress": self.progress,
            "spare": self.spare_process.pid if self.spare_process and self.spare_process.running else None,
        }


class Supervisor:
    def __init__(self, loop: asyncio.AbstractEventLoop, paths: Paths, cfg: SupervisorConfig,
                 events: Events, log, send_ping):
        self.loop = loop
        self.paths = paths
        self.cfg = cfg
        self.events = events
        self.log = log
        self.send_ping = send_ping          # (service, seq) -> None
        self.services: dict[str, Service] = {}
        self.by_ident: dict[bytes, Service] = {}
        self.stopping = False
        self._tick: asyncio.Task | None = None

    def add(self, name: str, module: str, env: dict[str, str] | None = None, spare: bool = False) -> Service:
        c = self.cfg
        svc = self.services[name] = Service(name, [sys.executable, "-m", module], Backoff(
            c.backoff_base, c.backoff_max, c.max_restarts, c.restart_window), env, spare)
        return svc

    def start_all(self) -> None:
        for svc in self.services.values():
            self.start(svc)
        self._tick = self.loop.create_task(self._watch())

    # -- starting ------------------------------------------------------------------------------
    def _spawn(self, svc: Service, on_exit) -> child.Child:
        """A process of svc's program, waiting for its token on stdin; OSError if none starts."""
        env = dict(os.environ, **svc.env, LLMOS_HOME=str(self.paths.home), LLMOS_SERVICE=svc.name)
        out = open(self.paths.log_file(f"{svc.name}.out"), "ab")
        try:
            return child.Child(self.loop, svc.argv, env, on_exit, stdin=subprocess.PIPE, stdout=out,
                               stderr=subprocess.STDOUT)
        finally:
            out.close()

    def start(self, svc: Service) -> None:
        svc.restart_handle = None
        svc.token = secrets.token_hex(16)
        on_exit = lambda how: self._exited(svc, how)        # noqa: E731
        spare, svc.spare_process = svc.spare_process, None
        if spare is not None and spare.running:
            spare.on_exit = on_exit                         # the spare is the service from now on
            svc.process = spare
        else:
            if spare is not None:
                spare.close()                               # dead, its pidfd not yet read
            try:
                svc.process = self._spawn(svc, on_exit)
            except OSError as e:
                self.log.error("service_start_failed", service=svc.name, error=str(e))
                svc.last_exit = f"could not start: {e}"
                self._died(svc)
                return
        try:
            # the token, then what differs between starts: which start this is, so that what
            # it hands out (context handles) is never handed out again by a later start
            svc.process.popen.stdin.write(svc.token.encode() + b"\n" + json.dumps(
                {"LLMOS_SERVICE_RESTARTS": str(svc.restarts)}).encode() + b"\n")
            svc.process.popen.stdin.close()
        except OSError:
            pass        # it died at once; the pidfd reports it
        svc.state = STARTING
        svc.started_at = time.monotonic()
        svc.deadline = svc.started_at + self.cfg.start_timeout
        svc.progress = None
        self.log.info("service_started", service=svc.name, pid=svc.process.pid, spare=spare is svc.process)

    def _keep_spare(self, svc: Service) -> None:
        """Start svc's spare, if it keeps one and has none (rule 4)."""
        if not svc.spare or self.stopping or svc.removed is not None or (
                svc.spare_process is not None and svc.spare_process.running):
            return

        def exited(how: child.Exit) -> None:
            if svc.spare_process is proc:
                svc.spare_process = None
                getattr(self.log, "info" if self.stopping else "warning")(
                    "spare_exited", service=svc.name, pid=proc.pid, how=str(how))
        try:
            proc = svc.spare_process = self._spawn(svc, exited)
        except OSError as e:
            self.log.error("spare_start_failed", service=svc.name, error=str(e))
            return
        self.log.info("spare_started", service=svc.name, pid=proc.pid)

    def _drop_spare(self, svc: Service) -> None:
        spare, svc.spare_process = svc.spare_process, None
        if spare is not None and spare.running:
            with contextlib.suppress(ProcessLookupError):
                spare.signal(signal.SIGKILL)

    def hello(self, svc: Service, ident: bytes) -> None:
        """The service proved it is the process we started (token checked by the kernel).

        From now on the kernel hears it (it may call other services while it starts); it is
        READY, and gets calls and pings, once it says so.
        """
        if svc.ident is not None:
            self.by_ident.pop(svc.ident, None)
        svc.ident = ident
        self.by_ident[ident] = svc

    def ready(self, svc: Service) -> None:
        if svc.state != STARTING:
            return
        svc.state = READY
        svc.ready_at = svc.last_pong = time.monotonic()
        self.log.info("service_ready", service=svc.name, pid=svc.pid,
                      startup_s=round(svc.ready_at - svc.started_at, 3))
        self.events.service_ready(svc)
        self._keep_spare(svc)       # now, not at the start: it would slow the start it follows

    def progress(self, svc: Service, data: dict) -> None:
        svc.progress = data
        svc.deadline = time.monotonic() + self.cfg.start_timeout

    def pong(self, svc: Service) -> None:
        svc.last_pong = time.monotonic()

    # -- dying ---------------------------------------------------------------------------------
    def _exited(self, svc: Service, how: child.Exit) -> None:
        svc.last_exit = str(how) + (f" (by the supervisor: {svc.killed_for})" if svc.killed_for else "")
        # A kill (SIGKILL, SIGTERM, SIGINT, SIGHUP: from outside, or ours of a hung service) may
        # have nothing to do with the calls it held; a crash (SIGSEGV, an exit) may be one's doing.
        svc.crashed = how.signal not in ("KILL", "TERM", "INT", "HUP")
        svc.killed_for = None
        level = "info" if self.stopping else "warning"
        getattr(self.log, level)("service_exited", service=svc.name, how=svc.last_exit)
        self._died(svc)

    def kill(self, svc: Service, why: str) -> None:
        """SIGKILL a service; its pidfd then reports the death and the usual path follows."""
        if svc.process and svc.process.popen.returncode is None:
            self.log.warning("service_killed", service=svc.name, why=why)
            svc.killed_for = why
            with contextlib.suppress(ProcessLookupError):
                svc.process.signal(signal.SIGKILL)

    def _died(self, svc: Service) -> None:
        if svc.ident is not None:
            self.by_ident.pop(svc.ident, None)
            svc.ident = None
        if svc.removed is not None:
            self._gone(svc)
            return
        if self.stopping:
            svc.state = STOPPED
            self.events.service_down(svc)
            return
        delay = svc.backoff.next_delay(time.monotonic())
        if svc.fail_unready and not svc.ready_at:
            delay = None            # it could not start once: another try would fail the same way
        if delay is None:
            svc.state = FAILED
            self.log.error("service_failed", service=svc.name, restarts=len(svc.backoff),
                           window_s=self.cfg.restart_window)
            self.events.service_down(svc)
            return
        svc.restarts += 1
        svc.state = BACKOFF
        self.events.service_down(svc)
        self.log.info("service_restart_scheduled", service=svc.name, delay_s=delay)
        svc.restart_handle = self.loop.call_later(delay, self.start, svc)

    def remove(self, svc: Service, grace: float = 2.0) -> asyncio.Future:
        """Stop a service for good (a driver instance whose model is unloaded): SIGTERM, SIGKILL
        after grace; once its process has exited it is STOPPED, its calls end as for any death,
        and it leaves the table. The future is done then."""
        if svc.removed is not None:
            return svc.removed
        svc.removed = self.loop.create_future()
        self._drop_spare(svc)
        if svc.restart_handle:
            svc.restart_handle.cancel()
            svc.restart_handle = None
        if svc.process and svc.process.popen.returncode is None:
            self.log.info("service_removing", service=svc.name, pid=svc.pid)
            with contextlib.suppress(ProcessLookupError):
                svc.process.signal(signal.SIGTERM)
            self.loop.call_later(grace, self.kill, svc, f"still running {grace:.0f}s after SIGTERM")
        else:
            self._gone(svc)
        return svc.removed

    def _gone(self, svc: Service) -> None:
        svc.state = STOPPED
        self.events.service_down(svc)
        if self.services.get(svc.name) is svc:
            del self.services[svc.name]
        self.log.info("service_removed", service=svc.name)
        if not svc.removed.done():
            svc.removed.set_result(None)

    def restart(self, svc: Service) -> None:
        """Operator's restart: clears FAILED and the backoff history, then kills or starts."""
        svc.backoff.reset()
        if svc.restart_handle:
            svc.restart_handle.cancel()
            svc.restart_handle = None
        if svc.state in (READY, STARTING) and svc.pid:
            self.kill(svc, "restart requested")
        else:
            svc.restarts += 1
            self.start(svc)

    # -- watching ------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.cfg.ping_interval)
            now = time.monotonic()
            for svc in self.services.values():
                if svc.state == READY:
                    if now - svc.last_pong > self.cfg.ping_timeout:
                        self.kill(svc, f"no pong for {now - svc.last_pong:.1f}s")
                        continue
                    svc.ping_seq += 1
                    self.send_ping(svc, svc.ping_seq)
                elif svc.state == STARTING and now > svc.deadline:
                    self.kill(svc, f"no hello within {self.cfg.start_timeout}s of starting")

    async def stop_all(self, grace: float = 2.0) -> None:
        self.stopping = True
        if self._tick:
            self._tick.cancel()
        for svc in self.services.values():
            if svc.restart_handle:
                svc.restart_handle.cancel()
        await child.stop_all([p for svc in self.services.values() for p in (svc.process, svc.spare_process)
                              if p is not None], grace)
        for svc in self.services.values():
            svc.state = STOPPED
