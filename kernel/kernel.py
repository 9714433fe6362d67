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

Every syscall with target "kernel" is a ``sys_<name>`` method below, found by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import secrets
import shutil
import signal as signals
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from syscalls import errors, wire
from syscalls.errors import LLMOSError
from syscalls.schema import Syscall
from syscalls.table import BY_NAME, MODEL_LIMITS, RESOURCES

from . import __version__
from syscalls.runtime.channel import FULL, SENT, Channel
from syscalls.runtime.config import Config
from syscalls.paths import Paths
from .launcher import ENDING_SIGNALS, Launcher
from .proctable import BLOCKED, KERNEL_PID, RESTARTING, RUNNING, STOPPED, Process, ProcessTable
from .supervisor import FAILED, READY, STOPPED as SVC_STOPPED, Service, Supervisor

HWM = 10_000
SCHEDULER = "inference"                 # the service that runs the kernel's model scheduling policy
GENERATING = ("generate", "chat")       # calls whose chunks carry generated tokens


@dataclass(eq=False)
class Forwarded:
    """A syscall handed to a service, from the moment it is routed until its last reply."""

    proc: Process
    cid: int
    spec: Syscall
    args: dict
    kid: int
    txid: str
    queued_at: float
    attempts: int = 1
    chunks: int = 0
    tokens: int = 0                     # generated tokens streamed so far (generate, chat)
    service: Service | None = None      # the service handling it
    origin: Service | None = None       # the service that made it, for a service-to-service call

    @property
    def waiting_map(self) -> dict:
        """Where the caller's side keeps it: the program's or the calling service's calls."""
        return self.origin.outgoing if self.origin else self.proc.in_flight


def _peer(head: zmq.Frame) -> tuple[int | None, int | None]:
    """(uid, OS pid) of the peer behind a message; libzmq reads them with SO_PEERCRED on ipc://."""
    try:
        parts = head.get("Peer-Address").split(":")
        return int(parts[-3]), int(parts[-1])
    except (zmq.ZMQError, ValueError, IndexError, AttributeError):
        return None, None


class Kernel:
    def __init__(self, paths: Paths, cfg: Config, log):
        self.paths, self.cfg, self.log = paths, cfg, log
        self.loop = asyncio.get_running_loop()
        self.boot_time = time.time()
        self.boot_id = secrets.token_hex(4)
        self.uid = os.getuid()
        self.table = ProcessTable(self.uid, cfg.kernel.zombies_per_parent)
        self.table.get(KERNEL_PID).os_pid = os.getpid()
        self.counters = dict.fromkeys((
            "messages", "calls", "bad_frames", "unknown_calls", "forged_service_messages",
            "replies_dropped", "disconnects", "retries", "kernel_bugs"), 0)
        self._kids = itertools.count(1)
        self._handlers = {n[4:]: getattr(self, n) for n in dir(self) if n.startswith("sys_")}
        self._async = {n for n, h in self._handlers.items() if asyncio.iscoroutinefunction(h)}
        self._sweeps: list[asyncio.TimerHandle] = []
        self.stopping = False
        self.stopped = asyncio.Event()

        self.ctx = zmq.Context()
        self.programs = self._bind(paths.programs_endpoint, self._on_program)
        self.services_ch = self._bind(paths.services_endpoint, self._on_service)
        mon = self.programs.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor = Channel(self.loop, mon, self._on_monitor)
        self.supervisor = Supervisor(self.loop, paths, cfg.supervisor, self, log, self._ping_service)
        self.launcher = Launcher(self.loop, paths, cfg.supervisor, log, self.end_process,
                                 self._detach)
        for name in cfg.services:
            self.supervisor.add(name, cfg.modules[name])

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
                pid = self.sys_spawn(init, args)
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
        uid, os_pid = _peer(head)
        token = args.get("spawn_token") if name == "hello" and isinstance(args, dict) else None
        proc = self.table.by_token.get(token) if isinstance(token, str) else None
        if proc is None or not proc.alive or proc.ident is not None:
            proc = self.table.create(ppid=KERNEL_PID, uid=uid, name="", argv=[], os_pid=os_pid)
        self.table.bind(proc, ident)
        return proc

    def _syscall(self, ident: bytes, head: zmq.Frame, msg: list) -> None:
        self.counters["calls"] += 1
        cid, name, args = msg[2], msg[3], msg[4]
        proc = self.table.by_ident.get(ident) or self._register(ident, head, name, args)
        proc.syscalls += 1
        if self.stopping:
            return self._reply(ident, wire.err(cid, "ESHUTDOWN", "llmos is shutting down"))
        spec = BY_NAME.get(name) if type(name) is str else None
        if spec is None:
            self.counters["unknown_calls"] += 1
            shown = name[:wire.MAX_NAME] if type(name) is str else repr(name)[:wire.MAX_NAME]
            self.log.info("unknown_syscall", pid=proc.pid, call=shown)
            return self._reply(ident, wire.err(cid, "ENOSYS", f"no syscall named {shown!r}"))
        if cid in proc.in_flight:
            return self._reply(ident, wire.err(cid, "EPROTO", f"call id {cid} is already in flight"))
        if len(proc.in_flight) >= self.cfg.kernel.max_in_flight:
            return self._reply(ident, wire.err(
                cid, "EAGAIN", f"{name}: too many calls in flight for pid {proc.pid} "
                               f"(limit {self.cfg.kernel.max_in_flight})"))
        try:
            args = spec.check_args(args)
            if spec.privilege and not proc.privileged:
                raise errors.EPERM(f"{name} needs privilege ({spec.privilege}); pid {proc.pid} has none")
            if spec.target != "kernel":
                return self._forward(proc, cid, spec, args)
            if name in self._async:
                task = self.loop.create_task(self._handlers[name](proc, args))
                proc.in_flight[cid] = task
                task.add_done_callback(lambda t: self._async_done(proc, ident, cid, name, t))
                return
            value = self._handlers[name](proc, args)
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
            # twice so that the departure is found even if the first probe comes too early.
            for delay in (0.05, 1.0):
                self._sweeps.append(self.loop.call_later(delay, self._sweep))

    def _sweep(self) -> None:
        """Probe every connected program; one that is no longer reachable has left."""
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
        if proc.model:                      # its contexts go with it
            self._tell_scheduler("process_exit", {"pid": proc.pid})
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
            self._drop_forwarded(call)
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
            if kind == wire.HELLO:
                self._service_hello(ident, msg)
            else:
                self.counters["forged_service_messages"] += 1
            return
        try:
            if kind == wire.PONG:
                self.supervisor.pong(svc)
            elif kind in (wire.OK, wire.ERR, wire.CHUNK, wire.END):
                self._service_reply(svc, msg)
            elif kind == wire.CALL:
                self._service_call(svc, msg)
            elif kind == wire.CANCEL:
                call = svc.outgoing.pop(msg[2], None)
                if call is not None:
                    self._drop_forwarded(call)
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

    def _service_event(self, svc: Service, msg: list) -> None:
        kind, data = msg[3], msg[4]
        if kind == "progress" and isinstance(data, dict):
            self.supervisor.progress(svc, data)
        elif kind == "ready":
            self.supervisor.ready(svc)
        elif kind == "sched" and svc.name == SCHEDULER and isinstance(data, dict):
            self._model_work(data.get("procs"))

    def _model_work(self, procs: Any) -> None:
        """The inference scheduler's report: each process's model work now (absent: none)."""
        if not isinstance(procs, list):
            return
        seen = set()
        for entry in procs:
            if isinstance(entry, dict) and type(entry.get("pid")) is int:
                proc = self.table.get(entry["pid"])
                if proc is not None:
                    proc.model = {k: entry.get(k) for k in ("state", "kv_blocks", "sequences", "contexts")}
                    seen.add(proc.pid)
        for proc in self.table:
            if proc.model and proc.pid not in seen:
                proc.model = {}

    def _sched_changed(self, proc: Process) -> None:
        """The scheduler's inputs for a process changed: tell the inference service now (if it is
        not up, it learns them with the process's next request)."""
        self._tell_scheduler("sched_update", {
            "pid": proc.pid, "priority": proc.priority, "stopped": proc.state == STOPPED,
            "limits": self._model_limits(proc)})

    def _tell_scheduler(self, op: str, args: dict) -> None:
        svc = self.supervisor.services.get(SCHEDULER)
        if svc is not None and svc.state == READY and svc.ident:
            self.services_ch.send([svc.ident, wire.service_call(
                next(self._kids), op, args, {"pid": KERNEL_PID, "uid": self.uid, "privileged": True,
                                             "txid": ""})])

    @staticmethod
    def _model_limits(proc: Process) -> dict:
        return {r: v for r, v in proc.limits.items() if r in MODEL_LIMITS}

    def _service_reply(self, svc: Service, msg: list) -> None:
        kind, kid = msg[1], msg[2]
        call = svc.in_flight.get(kid)
        if call is None:
            return                          # the caller cancelled, or died, meanwhile
        if kind == wire.CHUNK:
            call.chunks += 1
            value = msg[3]
            if call.spec.name in GENERATING and isinstance(value, dict):
                tokens = value.get("tokens")
                n = len(tokens) if isinstance(tokens, list) else 0
                call.tokens += n
                call.proc.tokens_out += n          # accounted as it happens, for ps and top
            return self._answer(call, wire.chunk(call.cid, value))
        del svc.in_flight[kid]
        call.waiting_map.pop(call.cid, None)
        if kind == wire.ERR:
            frame = wire.err(call.cid, str(msg[3]), str(msg[4]))
        else:
            value = msg[3]
            if isinstance(value, dict):
                if call.spec.name in ("put", "delete"):
                    call.proc.bytes_stored += int(value.get("delta") or 0)
                elif kind == wire.END:          # a generation's counts: the chunks had most
                    call.proc.tokens_in += int(value.get("prompt_tokens") or 0)
                    call.proc.tokens_out += max(0, int(value.get("generated_tokens") or 0) - call.tokens)
            frame = (wire.ok if kind == wire.OK else wire.end)(call.cid, value)
        self._answer(call, frame)

    def _answer(self, call: Forwarded, frame: bytes) -> None:
        if call.origin is None:
            self._reply(call.proc.ident, frame)
        elif call.origin.ident is not None:
            self.services_ch.send([call.origin.ident, frame])

    def _service_call(self, origin: Service, msg: list) -> None:
        """A service asks another for something ("target.op"), through the kernel like all else.

        Internal ops have no row in the syscall table: services are trusted, and the callee
        checks its own arguments. The kernel never retries these; the caller decides.
        """
        sid, name, args = msg[2], msg[3], msg[4]
        target, _, op = name.partition(".") if type(name) is str else ("", "", "")
        svc = self.supervisor.services.get(target)
        if svc is None or not op or not isinstance(args, dict):
            self.services_ch.send([origin.ident, wire.err(
                sid, "ENOENT", f"no service {target!r} to call {name!r} on (or no op, or args "
                               f"that are not a map)")])
            return
        # A service working for a program may call on its behalf (as_pid): the callee then sees
        # that program as the caller, with its user and its quotas.
        on_behalf = msg[5].get("as_pid") if len(msg) > 5 and isinstance(msg[5], dict) else None
        proc = self.table.get(on_behalf) if type(on_behalf) is int else None
        if proc is None or not proc.alive:
            proc = self.table.get(KERNEL_PID)
        kid = next(self._kids)
        call = Forwarded(proc, sid, Syscall(op, target), args, kid,
                         f"{self.boot_id}-{kid}", time.monotonic(), origin=origin)
        origin.outgoing[sid] = call
        self._dispatch(svc, call)

    def _forward(self, proc: Process, cid: int, spec: Syscall, args: dict) -> None:
        svc = self.supervisor.services.get(spec.target)
        if svc is None:
            raise errors.ESRVDOWN(f"{spec.name}: service '{spec.target}' is not enabled in this llmos")
        kid = next(self._kids)
        call = Forwarded(proc, cid, spec, args, kid, f"{self.boot_id}-{kid}", time.monotonic())
        proc.in_flight[cid] = call
        self._dispatch(svc, call)

    def _dispatch(self, svc: Service, call: Forwarded) -> None:
        if svc.state == READY:
            call.service = svc
            svc.in_flight[call.kid] = call
            caller = {"pid": call.proc.pid, "uid": call.proc.uid, "privileged": call.proc.privileged,
                      "txid": call.txid}
            if svc.name == SCHEDULER:      # the scheduler's inputs, as of this call
                caller.update(priority=call.proc.priority, stopped=call.proc.state == STOPPED,
                              limits=self._model_limits(call.proc))
            if call.origin is not None:
                caller["service"] = call.origin.name
            limit = call.proc.limits.get("storage_bytes")
            if limit is not None:      # storage enforces it inside the write's transaction
                caller["storage_allowance"] = {"pid": call.proc.pid, "limit": limit,
                                               "left": limit - call.proc.bytes_stored}
            # GONE: the service died and its pidfd has not told us yet; service_down will
            # retry or fail the call like any other call in flight.
            if self.services_ch.send([svc.ident, wire.service_call(
                    call.kid, call.spec.name, call.args, caller)]) == FULL:
                del svc.in_flight[call.kid]
                self._fail(call, "EAGAIN", f"{call.spec.name}: service '{svc.name}' is overloaded "
                                           f"(its queue is full); try again")
        elif svc.state in (FAILED, SVC_STOPPED):
            self._fail(call, "ESRVDOWN", f"{call.spec.name}: service '{svc.name}' is {svc.state}"
                                         f" ({svc.last_exit}); an admin can run service_restart")
        else:
            call.service = svc
            svc.waiting.append(call)

    def _fail(self, call: Forwarded, code: str, message: str) -> None:
        call.waiting_map.pop(call.cid, None)
        self._answer(call, wire.err(call.cid, code, message))

    def _drop_forwarded(self, call: Forwarded) -> None:
        """Forget a forwarded call; a service already working on it is told to stop."""
        svc = call.service
        if svc is None:
            return
        if svc.in_flight.pop(call.kid, None) is not None:
            if svc.ident:
                self.services_ch.send([svc.ident, wire.cancel(call.kid)])
        else:
            try:
                svc.waiting.remove(call)
            except ValueError:
                pass

    def _ping_service(self, svc: Service, seq: int) -> None:
        if svc.ident:
            self.services_ch.send([svc.ident, wire.ping(seq)])

    # Supervisor events
    def service_ready(self, svc: Service) -> None:
        waiting, svc.waiting = svc.waiting, type(svc.waiting)()
        for call in waiting:
            self._dispatch(svc, call)

    def service_down(self, svc: Service) -> None:
        if svc.name == SCHEDULER:
            self._model_work([])            # its requests are gone with it
        outgoing, svc.outgoing = svc.outgoing, {}      # its own calls to others: nobody to answer
        for call in outgoing.values():
            self._drop_forwarded(call)
        lost, svc.in_flight = svc.in_flight, {}
        retry = []
        for call in lost.values():
            if call.spec.idempotent and call.attempts < 2 and call.chunks == 0 \
                    and call.origin is None and svc.state not in (FAILED, SVC_STOPPED):
                call.attempts += 1
                self.counters["retries"] += 1
                retry.append(call)
            else:
                why = "it is not idempotent" if not call.spec.idempotent else "it was tried twice"
                if svc.state == FAILED:
                    why = "the service has FAILED"
                self._fail(call, "ESRVDOWN", f"{call.spec.name}: service '{svc.name}' died while "
                                             f"handling the call ({svc.last_exit}); not retried: {why}")
        svc.waiting.extendleft(reversed(retry))
        if svc.state in (FAILED, SVC_STOPPED):
            waiting, svc.waiting = svc.waiting, type(svc.waiting)()
            for call in waiting:
                self._dispatch(svc, call)

    async def _housekeeping(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            deadline = self.cfg.kernel.call_deadline
            for svc in self.supervisor.services.values():
                while svc.waiting and now - svc.waiting[0].queued_at > deadline:
                    call = svc.waiting.popleft()
                    self._fail(call, "ETIMEDOUT", f"{call.spec.name}: service '{svc.name}' did not "
                                                  f"come back within {deadline:.0f}s ({svc.state})")
            self._sweeps = [h for h in self._sweeps if not h.cancelled() and h.when() > self.loop.time()]
            self._rates(now - last)
            last = now

    def _rates(self, dt: float) -> None:
        """Each process's generated tokens per second, smoothed (half of it is the last second)."""
        for proc in self.table:
            if proc.tokens_out != proc.rate_mark or proc.tok_s:
                rate = (proc.tokens_out - proc.rate_mark) / max(dt, 1e-3)
                proc.tok_s = round(0.5 * proc.tok_s + 0.5 * rate, 1) if rate or proc.tok_s >= 0.1 else 0.0
                proc.rate_mark = proc.tokens_out

    # == syscalls: processes =====================================================================
    def sys_hello(self, proc: Process, a: dict) -> dict:
        if a["name"]:
            proc.name = a["name"]
        if a["argv"] is not None:
            proc.argv = a["argv"]
        if a["privileged"] and not proc.privileged:
            if proc.spawned:
                raise errors.EPERM("hello: a program spawned without privilege cannot gain it")
            if proc.uid not in (0, self.uid):
                raise errors.EPERM(f"hello: privilege is only for the kernel's user (uid {self.uid}) "
                                   f"or root; this program runs as uid {proc.uid}")
            spawner = self._unprivileged_spawner(proc.os_pid)
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
                "kernel": {"version": __version__, "abi": wire.VERSION, "boot_id": self.boot_id}}

    def _unprivileged_spawner(self, os_pid: int | None) -> Process | None:
        """The spawned, unprivileged process whose OS process is os_pid or one of its ancestors:
        a second connection from inside it must not get the privilege its spawn withheld."""
        spawned = {p.os_pid: p for p in self.table if p.spawned and not p.privileged and p.alive and p.os_pid}
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

    def sys_getpid(self, proc: Process, a: dict) -> int:
        return proc.pid

    def sys_ps(self, proc: Process, a: dict) -> list[dict]:
        if a["pid"] is not None:
            target = self.table.get(a["pid"])
            if target is None:
                raise errors.ESRCH(f"ps: no process with pid {a['pid']}")
            return [target.info()]
        return [p.info() for p in self.table]

    def sys_spawn(self, proc: Process, a: dict) -> int:
        argv = a["argv"]
        if not argv or not argv[0]:
            raise errors.EINVAL("spawn: argument 'argv' must name a program (it is empty)")
        # exec refuses these (Popen raises ValueError): say which argument, not "kernel bug"
        for name, texts in (("argv", argv), ("env", [t for kv in (a["env"] or {}).items() for t in kv])):
            if any("\0" in t for t in texts):
                raise errors.EINVAL(f"spawn: argument '{name}' holds a NUL character")
        if any("=" in k for k in a["env"] or {}):
            raise errors.EINVAL("spawn: argument 'env': a variable's name may not hold '='")
        env = dict(os.environ)
        env.update(a["env"] or {})
        cwd = a["cwd"]
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
        child = self.table.create(
            ppid=KERNEL_PID if a["daemon"] else proc.pid, uid=proc.uid,
            name=a["name"] or os.path.basename(argv[0]), argv=argv, priority=priority,
            privileged=proc.privileged, daemon=a["daemon"], spawned=True, limits=dict(proc.limits),
            spawn_token=secrets.token_hex(16), command=[exe, *argv[1:]], env=env, cwd=cwd,
            restart=a["restart"])
        try:
            self.launcher.launch(child)
        except OSError as e:
            self.table.end(child, 127, None)
            raise errors.ENOENT(f"spawn: cannot run {argv[0]!r}: {e.strerror}") from None
        return child.pid

    def sys_kill(self, proc: Process, a: dict) -> None:
        target, sig = self.table.get(a["pid"]), a["signal"]
        if target is None or not target.alive:
            raise errors.ESRCH(f"kill: no process with pid {a['pid']}")
        if target.pid == KERNEL_PID:
            raise errors.EPERM("kill: pid 1 is the kernel; use shutdown to stop llmos")
        if not (proc.privileged or self.table.is_descendant(target.pid, proc.pid)):
            raise errors.EPERM(f"kill: pid {target.pid} is neither the caller (pid {proc.pid}) nor "
                               f"one of its descendants; signalling it needs privilege")
        self.log.info("signal", sender=proc.pid, target=target.pid, signal=sig)
        target.last_signal = sig
        if target.state == RESTARTING:     # between two runs: nothing to signal
            if sig in ENDING_SIGNALS:
                self.end_process(target, None, sig)
            return None
        if target.os_pid is not None:
            try:
                self.launcher.signal(target, getattr(signals, "SIG" + sig))
            except ProcessLookupError:
                self.end_process(target, None, sig)
                return None
            except PermissionError:
                raise errors.EPERM(f"kill: the OS refused to signal pid {target.pid} "
                                   f"(OS pid {target.os_pid})") from None
        if sig == "STOP":
            target.state = STOPPED
            self._sched_changed(target)     # its model work is suspended too
        elif sig == "CONT":
            target.state = BLOCKED if target.blocked else RUNNING
            self._sched_changed(target)
        elif target.os_pid is None:     # nothing to deliver it to: the kernel ends the process
            self.end_process(target, None, sig)
        return None

    async def sys_wait(self, proc: Process, a: dict) -> dict:
        target = self.table.get(a["pid"])
        if target is None:
            raise errors.ESRCH(f"wait: no process with pid {a['pid']} (never existed, or reaped)")
        mine = target.ppid == proc.pid
        if not mine and not proc.privileged:
            raise errors.ECHILD(f"wait: pid {target.pid} is not a child of pid {proc.pid}")
        if target.alive:
            fut = self.loop.create_future()
            target.exit_waiters.append(fut)
            with self._blocked(proc):
                try:
                    await asyncio.wait_for(fut, a["timeout"])
                except asyncio.TimeoutError:
                    raise errors.ETIMEDOUT(f"wait: pid {target.pid} still running after "
                                           f"{a['timeout']}s") from None
        result = {"pid": target.pid, "status": target.exit_status, "signal": target.exit_signal}
        if target.ppid == proc.pid:
            self.table.reap(target)
        return result

    def sys_exit(self, proc: Process, a: dict) -> None:
        # The reply still reaches the connection that asked: _syscall holds its routing id.
        self.end_process(proc, a["status"], None)

    # == syscalls: priorities and limits =========================================================
    def _may_change(self, proc: Process, pid: int | None, call: str) -> Process:
        target = proc if pid is None else self.table.get(pid)
        if target is None or not target.alive:
            raise errors.ESRCH(f"{call}: no process with pid {pid}")
        if not (proc.privileged or self.table.is_descendant(target.pid, proc.pid)):
            raise errors.EPERM(f"{call}: pid {target.pid} is neither the caller nor one of its "
                               f"descendants; that needs privilege")
        if target.pid == KERNEL_PID:
            raise errors.EPERM(f"{call}: pid 1 is the kernel")
        return target

    def sys_nice(self, proc: Process, a: dict) -> int:
        new = max(-20, min(19, proc.priority + a["increment"]))
        if new < proc.priority and not proc.privileged:
            raise errors.EPERM(f"nice: making pid {proc.pid} more urgent ({proc.priority} -> {new}) "
                               f"needs privilege")
        proc.priority = new
        self._sched_changed(proc)
        return new

    def sys_setpriority(self, proc: Process, a: dict) -> None:
        target = self._may_change(proc, a["pid"], "setpriority")
        if a["priority"] < target.priority and not proc.privileged:
            raise errors.EPERM(f"setpriority: making pid {target.pid} more urgent "
                               f"({target.priority} -> {a['priority']}) needs privilege")
        target.priority = a["priority"]
        self._sched_changed(target)

    def sys_getpriority(self, proc: Process, a: dict) -> int:
        target = proc if a["pid"] is None else self.table.get(a["pid"])
        if target is None:
            raise errors.ESRCH(f"getpriority: no process with pid {a['pid']}")
        return target.priority

    def sys_getrlimit(self, proc: Process, a: dict) -> dict:
        target = proc if a["pid"] is None else self.table.get(a["pid"])
        if target is None:
            raise errors.ESRCH(f"getrlimit: no process with pid {a['pid']}")
        return {r: target.limits.get(r) for r in RESOURCES}

    def sys_setrlimit(self, proc: Process, a: dict) -> None:
        target = self._may_change(proc, a["pid"], "setrlimit")
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
            self._sched_changed(target)

    # == syscalls: messages ======================================================================
    def sys_send(self, proc: Process, a: dict) -> None:
        size = len(wire.pack(a["data"]))
        target = self.table.get(a["pid"])
        if target is None or not target.alive or target.pid == KERNEL_PID:
            raise errors.ESRCH(f"send: no process with pid {a['pid']}")
        if not self._deliver(target, {"from": proc.pid, "topic": None, "data": a["data"]}, size):
            k = self.cfg.kernel
            raise errors.EAGAIN(f"send: mailbox of pid {target.pid} is full ({len(target.mailbox)} "
                                f"messages, {target.mailbox_bytes} bytes; limits {k.mailbox_messages} "
                                f"messages, {k.mailbox_bytes} bytes)")

    def _deliver(self, target: Process, message: dict, size: int) -> bool:
        r = target.receiver
        if r is not None and not r.done():
            target.receiver = None
            r.set_result(message)
            return True
        k = self.cfg.kernel
        if len(target.mailbox) >= k.mailbox_messages or target.mailbox_bytes + size > k.mailbox_bytes:
            return False
        target.mailbox.append((message, size))
        target.mailbox_bytes += size
        return True

    async def sys_recv(self, proc: Process, a: dict) -> dict:
        if proc.mailbox:
            message, size = proc.mailbox.popleft()
            proc.mailbox_bytes -= size
            return message
        if proc.receiver is not None and not proc.receiver.done():
            raise errors.EAGAIN("recv: this process is already waiting in another recv")
        proc.receiver = self.loop.create_future()
        with self._blocked(proc):
            try:
                return await asyncio.wait_for(proc.receiver, a["timeout"])
            except asyncio.TimeoutError:
                raise errors.ETIMEDOUT(f"recv: no message within {a['timeout']}s") from None
            finally:
                proc.receiver = None

    def sys_publish(self, proc: Process, a: dict) -> int:
        topic, reached, size = a["topic"], 0, len(wire.pack(a["data"]))
        message = {"from": proc.pid, "topic": topic, "data": a["data"]}
        for p in list(self.table):
            if p.alive and p.subscriptions and any(topic.startswith(s) for s in p.subscriptions):
                if self._deliver(p, message, size):
                    reached += 1
                else:
                    p.dropped += 1
        return reached

    def sys_subscribe(self, proc: Process, a: dict) -> None:
        if len(proc.subscriptions) >= 256 and a["topic"] not in proc.subscriptions:
            raise errors.EAGAIN("subscribe: at most 256 subscriptions per process")
        proc.subscriptions.add(a["topic"])

    def sys_unsubscribe(self, proc: Process, a: dict) -> None:
        if a["topic"] not in proc.subscriptions:
            raise errors.ENOENT(f"unsubscribe: not subscribed to {a['topic']!r}")
        proc.subscriptions.discard(a["topic"])

    # == syscalls: the system ====================================================================
    def sys_services(self, proc: Process, a: dict) -> list[dict]:
        now = time.monotonic()
        return [svc.info(now) for svc in self.supervisor.services.values()]

    def sys_service_restart(self, proc: Process, a: dict) -> None:
        svc = self.supervisor.services.get(a["name"])
        if svc is None:
            known = ", ".join(self.supervisor.services)
            raise errors.ENOENT(f"service_restart: no service named {a['name']!r} (services: {known})")
        self.log.info("service_restart_requested", service=svc.name, by=proc.pid)
        self.supervisor.restart(svc)

    def sys_uname(self, proc: Process, a: dict) -> dict:
        return {"system": "llmos", "version": __version__, "abi": wire.VERSION,
                "home": str(self.paths.home), "kernel_pid": os.getpid(), "boot_time": self.boot_time}

    def sys_kstat(self, proc: Process, a: dict) -> dict:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"counters": dict(self.counters, program_socket_wakeups=self.programs.wakeups),
                "rss": rss, "processes": len(self.table.procs),
                "in_flight": sum(len(p.in_flight) for p in self.table)}

    def sys_shutdown(self, proc: Process, a: dict) -> None:
        self.log.info("shutdown_requested", by=proc.pid)
        self.loop.call_soon(self.stopped.set)

    # == helpers =================================================================================
    @contextlib.contextmanager
    def _blocked(self, proc: Process):
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

    async def _shutdown(self) -> None:
        self.stopping = True
        self.log.info("kernel_stopping")
        for proc in list(self.table):
            if proc.in_flight:
                for cid in list(proc.in_flight):
                    self._reply(proc.ident, wire.err(cid, "ESHUTDOWN", "llmos is shutting down"))
                self._abort_calls(proc)
        await asyncio.gather(self.supervisor.stop_all(grace=2.0), self.launcher.stop_all(grace=2.0))
        for h in self._sweeps:
            h.cancel()
        for ch in (self.monitor, self.programs, self.services_ch):
            ch.close()
        self.ctx.term()
        for path in (self.paths.programs_sock, self.paths.services_sock):
            path.unlink(missing_ok=True)
        self.log.info("kernel_stopped")

