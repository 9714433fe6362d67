"""The kernel: one asyncio process that owns the process table and is the only thing programs reach.

Design principles:
1. Microkernel. The kernel routes, checks and accounts; it stores nothing and runs no model. Work
   lives in service processes it supervises and reaches only by messages.
2. Nothing a peer sends can take the kernel down. Every frame is decoded with capped sizes and
   checked against the syscall table; bad input is answered with an error or dropped and counted.
   An exception in the kernel's own code is a kernel bug: it is logged loudly with a traceback
   and the call that hit it gets EIO; the loop goes on.
3. No syscall is lost to a crashing service. Calls wait while it restarts, idempotent ones are
   retried once if it dies under them, and every call ends: with a value or a named error.
4. The fast path has no tasks: a call the kernel answers itself is decoded, checked, handled and
   answered inside the socket's read callback. Only calls that block (wait, recv) get a task.

The kernel is three modules and this one: the traps (kernel/traps.py: one function per syscall
with target "kernel", found by name), routing (kernel/routing.py: forwarding to services, their
replies, retry when one dies) and accounting (kernel/accounting.py: the caller context a row asks
for, the usage a reply reports). This one holds the sockets, the process life cycle and the loop.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import secrets
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from syscalls import errors, wire
from syscalls.errors import LLMOSError
from syscalls.paths import Paths
from syscalls.runtime.channel import SENT, Channel
from syscalls.runtime.config import Config
from syscalls.runtime.devices import is_driver
from syscalls.table import BY_NAME

from . import accounting, instances, keep, traps, users
from .launcher import Launcher
from .proctable import KERNEL_PID, Process, ProcessTable
from .routing import Forwarded, Router
from .supervisor import Service, Supervisor

HWM = 10_000

# The trap table, curio's way: every sys_<name> function of kernel/traps.py, by name.
TRAPS = {name[4:]: fn for name, fn in vars(traps).items() if name.startswith("sys_")}
BLOCKING = frozenset(name for name, fn in TRAPS.items() if inspect.iscoroutinefunction(fn))


class Kernel:
    """The kernel process: its sockets, the process table, and the loop that serves them."""

    def __init__(self, paths: Paths, cfg: Config, log):
        self.paths, self.cfg, self.log = paths, cfg, log
        self.loop = asyncio.get_running_loop()
        self.boot_time = time.time()
        self.boot_id = secrets.token_hex(4)
        self.uid = os.getuid()
        self.users = users.Users(cfg.kernel.users_group)
        self.table = ProcessTable(self.uid, cfg.kernel.zombies_per_parent)
        self.table.get(KERNEL_PID).os_pid = os.getpid()
        self.counters = dict.fromkeys((
            "messages", "calls", "bad_frames", "unknown_calls", "forged_service_messages",
            "replies_dropped", "disconnects", "retries", "resumed", "kernel_bugs"), 0)
        self.by_syscall = dict.fromkeys(BY_NAME, 0)      # calls made, by syscall name (kstat)
        self._sweeps: dict[float, asyncio.TimerHandle] = {}     # delay -> the one pending sweep
        self._sweep_again: set[float] = set()     # delays whose sweep must run once more
        self.stopping = False
        self.stopped = asyncio.Event()

        self.ctx = zmq.Context()
        self.programs = self._bind(paths.programs_endpoint, self._on_program)
        self.services_ch = self._bind(paths.services_endpoint, self._on_service)
        self.users.protect(paths)
        mon = self.programs.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor = Channel(self.loop, mon, self._on_monitor)
        self.router = Router(self.services_ch, self.table, self.counters, self.boot_id, self.uid,
                             self._reply)
        self.supervisor = Supervisor(self.loop, paths, cfg.supervisor, self.router, log,
                                     self._ping_service)
        self.router.services = self.supervisor.services
        self.launcher = Launcher(self.loop, paths, cfg.supervisor, log, self.end_process,
                                 self._detach)
        for name in cfg.services:       # a boot driver keeps a spare: its restart skips torch's import
            self.supervisor.add(name, cfg.modules[name], spare=cfg.supervisor.spare_drivers and is_driver(name))

    def _bind(self, endpoint: str, handler) -> Channel:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return Channel(self.loop, sock, handler)

    async def run(self) -> None:
        # Everything built so far lives as long as the kernel: keep it out of the collector's
        # scans, which otherwise show up as a tail on every syscall's latency.
        gc.collect()
        gc.freeze()
        self.supervisor.start_all()
        self._start_daemons()
        housekeeping = self.loop.create_task(self._housekeeping())
        self.log.info("kernel_started", pid=os.getpid(), home=str(self.paths.home),
                      services=list(self.supervisor.services))
        await self.stopped.wait()
        housekeeping.cancel()
        await self._shutdown()

    def _start_daemons(self) -> None:
        """Start the [[daemons]] of config.toml, as children of pid 1."""
        init = self.table.get(KERNEL_PID)
        for d in self.cfg.daemons:
            args = {"argv": d.argv, "env": d.env, "cwd": d.cwd, "priority": d.priority,
                    "daemon": True, "name": d.name, "restart": d.restart}
            try:
                pid = traps.sys_spawn(self, init, args)
            except LLMOSError as e:
                self.log.error("daemon_not_started", daemon=d.name, error=e.message)
                continue
            self.table.get(pid).privileged = d.privileged
            self.log.info("daemon_started", daemon=d.name, pid=pid)

    # == programs: receiving =====================================================================
    def _on_program(self, head: zmq.Frame, rest: list[bytes]) -> None:
        self.counters["messages"] += 1
        ident = head.bytes
        if len(rest) != 1:
            self._bad(ident, 0, f"expected 1 frame after the routing id, got {len(rest)}")
            return
        try:
            msg = wire.decode(rest[0])
        except wire.BadMessage as e:
            self._bad(ident, 0, str(e))
            return
        kind = msg[1]
        try:
            if kind == wire.CALL:
                self._syscall(ident, head, msg)
            elif kind == wire.CANCEL:
                proc = self.table.by_ident.get(ident)
                call = proc.in_flight.pop(msg[2], None) if proc else None
                if call is not None:
                    self._cancel(call)
                    self._reply(ident, wire.err(msg[2], "ECANCELED", "cancelled by the caller"))
            elif kind not in (wire.PING, wire.PONG):
                self._bad(ident, msg[2], f"a program may not send {wire.TYPE_NAMES[kind]} messages")
        except Exception:     # a kernel bug: loud, but the kernel lives on
            self.counters["kernel_bugs"] += 1
            self.log.exception("kernel_bug", where="program message", kind=kind)
            if kind == wire.CALL:
                self._reply(ident, wire.err(msg[2], "EIO", "internal kernel error (see kernel log)"))

    def _bad(self, ident: bytes, cid: int, why: str) -> None:
        self.counters["bad_frames"] += 1
        n = self.counters["bad_frames"]
        if n <= 10 or n & (n - 1) == 0:       # log the first few, then ever more rarely
            self.log.warning("bad_message", why=why, total=n)
        self._reply(ident, wire.err(cid, "EPROTO", why))

    def _register(self, ident: bytes, head: zmq.Frame, name: Any, args: Any) -> Process:
        """The process a new connection is: its spawned entry (by token, same user), or a new one.
        Raises EPERM for a user who may not connect, EAGAIN past the user's process quota."""
        uid, gid, os_pid = users.peer(head)
        if not self.users.admits(uid, gid):
            raise errors.EPERM(f"uid {uid} may not use this llmos: only root, the kernel's user "
                               f"(uid {self.uid})" + (f" and members of group {self.users.group!r}"
                                                      if self.users.group else ""))
        token = args.get("spawn_token") if name == "hello" and isinstance(args, dict) else None
        proc = self.table.by_token.get(token) if isinstance(token, str) else None
        if proc is None or not proc.alive or proc.ident is not None or \
                proc.uid != uid and not users.trusted(uid):
            users.check_quota(self.table, uid, self.cfg.kernel.processes_per_user, "connect")
            proc = self.table.create(ppid=KERNEL_PID, uid=uid, name="", argv=[], os_pid=os_pid)
        self.table.bind(proc, ident)
        return proc

    def _syscall(self, ident: bytes, head: zmq.Frame, msg: list) -> None:
        self.counters["calls"] += 1
        cid, name, args = msg[2], msg[3], msg[4]
        proc = self.table.by_ident.get(ident)
        if proc is None:
            try:
                proc = self._register(ident, head, name, args)
            except LLMOSError as e:
                return self._reply(ident, wire.err(cid, e.code, e.message))
        proc.syscalls += 1
        if self.stopping:
            return self._reply(ident, wire.err(cid, "ESHUTDOWN", "llmos is shutting down"))
        spec = BY_NAME.get(name) if type(name) is str else None
        if spec is None:
            self.counters["unknown_calls"] += 1
            shown = name[:wire.MAX_NAME] if type(name) is str else repr(name)[:wire.MAX_NAME]
            self.log.info("unknown_syscall", pid=proc.pid, call=shown)
            return self._reply(ident, wire.err(cid, "ENOSYS", f"no syscall named {shown!r}"))
        self.by_syscall[name] += 1
        if cid in proc.in_flight:
            return self._reply(ident, wire.err(cid, "EPROTO", f"call id {cid} is already in flight"))
        if len(proc.in_flight) >= self.cfg.kernel.max_in_flight:
            return self._reply(ident, wire.err(
                cid, "EAGAIN", f"{name}: too many calls in flight for pid {proc.pid} "
                               f"(limit {self.cfg.kernel.max_in_flight}, kernel.max_in_flight)"))
        try:
            args = spec.check_args(args)
            if spec.privilege == "admin" and not proc.privileged:
                raise errors.EPERM(f"{name} needs privilege ({spec.privilege}); pid {proc.pid} has none")
            if spec.privilege == "owner" and not users.trusted(proc.uid):
                raise errors.EPERM(f"{name} acts for every user: only root and the kernel's user "
                                   f"(uid {self.uid}) may make it; pid {proc.pid} runs as uid {proc.uid}")
            if spec.target != "kernel":
                return self.router.forward(proc, cid, spec, args)
            if name in BLOCKING:
                task = self.loop.create_task(TRAPS[name](self, proc, args))
                proc.in_flight[cid] = task
                task.add_done_callback(lambda t: self._async_done(proc, ident, cid, name, t))
                return
            value = TRAPS[name](self, proc, args)
        except LLMOSError as e:
            return self._reply(ident, wire.err(cid, e.code, e.message))
        self._reply(ident, wire.ok(cid, value))

    def _async_done(self, proc: Process, ident: bytes, cid: int, name: str, task: asyncio.Task) -> None:
        if proc.in_flight.get(cid) is task:
            del proc.in_flight[cid]
        if task.cancelled():
            return          # cancelled by the caller (already answered) or by its death
        e = task.exception()
        if e is None:
            self._reply(ident, wire.ok(cid, task.result()))
        elif isinstance(e, LLMOSError):
            self._reply(ident, wire.err(cid, e.code, e.message))
        else:
            self.counters["kernel_bugs"] += 1
            self.log.error("kernel_bug", call=name, error=repr(e), exc_info=e)
            self._reply(ident, wire.err(cid, "EIO", f"{name}: internal kernel error (see kernel log)"))

    def _reply(self, ident: bytes | None, frame: bytes) -> None:
        if ident is None or self.programs.send([ident, frame]) != SENT:
            self.counters["replies_dropped"] += 1

    # == programs: noticing departures ===========================================================
    def _on_monitor(self, head: zmq.Frame, rest: list[bytes]) -> None:
        event = parse_monitor_message([head.bytes, *rest])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.counters["disconnects"] += 1
            # The pipe of the departed peer is torn down by libzmq a moment after the event; probe
            # twice so that the departure is found even if the first probe comes too early. One
            # sweep per delay is pending at a time (a burst of departures must not queue a sweep
            # of the whole table each): an event while it waits makes it run once more after it.
            for delay in (0.05, 1.0):
                if delay in self._sweeps:
                    self._sweep_again.add(delay)
                else:
                    self._sweeps[delay] = self.loop.call_later(delay, self._sweep, delay)

    def _sweep(self, delay: float) -> None:
        """Probe every connected program; one that is no longer reachable has left."""
        del self._sweeps[delay]
        if delay in self._sweep_again:
            self._sweep_again.discard(delay)
            self._sweeps[delay] = self.loop.call_later(delay, self._sweep, delay)
        probe = wire.ping(0)
        for proc in list(self.table.by_ident.values()):
            if not self.programs.reachable(proc.ident, probe):
                self._lost(proc)

    def _lost(self, proc: Process) -> None:
        self.log.info("program_disconnected", pid=proc.pid, name=proc.name)
        if proc.spawned:
            self._detach(proc)          # a spawned program lives until its OS process ends
        else:
            self.end_process(proc, None, proc.last_signal or "HUP")

    def _detach(self, proc: Process) -> None:
        """Forget a process's connection (and the calls on it), keeping the process."""
        self._abort_calls(proc)
        self.table.unbind(proc)

    def end_process(self, proc: Process, status: int | None, signal: str | None) -> None:
        if not proc.alive:
            return
        self._abort_calls(proc)
        if proc.model:                      # what the service keeps for it (contexts) goes with it
            self.router.tell(proc.model_by, "process_exit", {"pid": proc.pid})
        keep.process_ended(self.supervisor.services.values(), proc.pid)
        self.table.end(proc, status, signal)
        self.log.info("process_ended", pid=proc.pid, name=proc.name, status=status, signal=signal)

    def _abort_calls(self, proc: Process) -> None:
        # The receiver goes at once: a message delivered to a recv that is merely being
        # cancelled would be lost.
        if proc.receiver is not None:
            if not proc.receiver.done():
                proc.receiver.cancel()
            proc.receiver = None
        calls, proc.in_flight = proc.in_flight, {}
        for call in calls.values():
            self._cancel(call)

    def _cancel(self, call: "asyncio.Task | Forwarded") -> None:
        if isinstance(call, Forwarded):
            self.router.drop(call)
        else:
            call.cancel()

    # == services ================================================================================
    def _on_service(self, head: zmq.Frame, rest: list[bytes]) -> None:
        ident = head.bytes
        svc = self.supervisor.by_ident.get(ident)
        try:
            msg = wire.decode(rest[0]) if len(rest) == 1 else None
        except wire.BadMessage:
            msg = None
        if msg is None:
            self.counters["forged_service_messages" if svc is None else "bad_frames"] += 1
            return
        kind = msg[1]
        if svc is None:
            if kind == wire.HELLO and users.trusted(users.peer(head)[0]):
                self._service_hello(ident, msg)
            else:
                self.counters["forged_service_messages"] += 1
            return
        try:
            if kind == wire.PONG:
                self.supervisor.pong(svc)
            elif kind in (wire.OK, wire.ERR, wire.CHUNK, wire.END):
                self.router.service_reply(svc, msg)
            elif kind == wire.CALL:
                if type(msg[3]) is str and msg[3].startswith(instances.KERNEL):
                    self._service_trap(svc, msg)
                else:
                    self.router.service_call(svc, msg)
            elif kind == wire.CANCEL:
                call = svc.outgoing.pop(msg[2], None)
                if call is not None:
                    self.router.drop(call)
            elif kind == wire.EVENT:
                self._service_event(svc, msg)
        except Exception:
            self.counters["kernel_bugs"] += 1
            self.log.exception("kernel_bug", where="service message", service=svc.name)

    def _service_hello(self, ident: bytes, msg: list) -> None:
        name, info = msg[3], msg[4]
        svc = self.supervisor.services.get(name) if type(name) is str else None
        token = info.get("token") if isinstance(info, dict) else None
        if svc is None or svc.state != "STARTING" or not token or \
                not secrets.compare_digest(str(token), svc.token):
            self.counters["forged_service_messages"] += 1
            self.log.warning("service_hello_refused", name=str(name)[:wire.MAX_NAME])
            return
        svc.token = ""              # one use only
        self.supervisor.hello(svc, ident)

    def _service_trap(self, svc: Service, msg: list) -> None:
        """A service's call to the kernel itself ("kernel.OP", kernel/instances.py), answered at once."""
        sid, name, args = msg[2], msg[3], msg[4]
        trap = instances.SERVICE_TRAPS.get(name[len(instances.KERNEL):])
        try:
            if trap is None or not isinstance(args, dict):
                raise errors.ENOSYS(f"the kernel has no service call {name[:wire.MAX_NAME]!r} "
                                    f"(or its args are not a map)")
            result = trap(self, svc, args)
        except LLMOSError as e:
            self.services_ch.send([svc.ident, wire.err(sid, e.code, e.message)])
            return
        if isinstance(result, asyncio.Future):       # answered when it is done (driver_stop)
            ident = svc.ident
            result.add_done_callback(lambda f: svc.ident == ident and self.services_ch.send(
                [ident, wire.ok(sid, f.result())]))
            return
        self.services_ch.send([svc.ident, wire.ok(sid, result)])

    def _service_event(self, svc: Service, msg: list) -> None:
        kind, data = msg[3], msg[4]
        if kind == "progress" and isinstance(data, dict):
            self.supervisor.progress(svc, data)
        elif kind == "ready":
            self.supervisor.ready(svc)
        elif kind == "sched" and isinstance(data, dict):      # model work, for ps
            accounting.record_work(self.table, svc.name, data.get("procs"))
        elif kind == "keep" and isinstance(data, dict):       # state to have back after a restart
            keep.keep(svc, data, self.log)

    def _ping_service(self, svc: Service, seq: int) -> None:
        if svc.ident:
            self.services_ch.send([svc.ident, wire.ping(seq)])

    async def _housekeeping(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.router.expire(now, self.cfg.kernel.call_deadline)
            accounting.rates(self.table, now - last)
            last = now

    async def _shutdown(self) -> None:
        self.stopping = True
        self.log.info("kernel_stopping")
        for proc in list(self.table):
            if proc.in_flight:
                for cid in list(proc.in_flight):
                    self._reply(proc.ident, wire.err(cid, "ESHUTDOWN", "llmos is shutting down"))
                self._abort_calls(proc)
        await asyncio.gather(self.supervisor.stop_all(grace=2.0), self.launcher.stop_all(grace=2.0))
        for h in self._sweeps.values():
            h.cancel()
        for ch in (self.monitor, self.programs, self.services_ch):
            ch.close()
        self.ctx.term()
        for path in (self.paths.programs_sock, self.paths.services_sock):
            path.unlink(missing_ok=True)
        self.log.info("kernel_stopped")

