"""What every service process runs: the link to the kernel, pings, and dispatch to ``op_*`` methods.

A service connects to the kernel (never the other way round), so it listens on no socket a program
could reach. It proves it is the process the kernel started by saying HELLO with the one-time token
the kernel wrote on its stdin (with, on the next line, a map of environment variables that differ
from one start to the next), runs ``start()`` (loading what it needs; the kernel hears it
already), then says it is ready. From then on it answers PINGs from its own event loop (so a hung
loop is noticed) and hands each CALL to ``op_<name>(args, caller)``:

- a plain method returns the value (or raises an LLMOSError);
- a coroutine method runs as a task, so a slow call does not hold up pings or other calls, and a
  CANCEL from the kernel cancels it;
- a streaming op is a coroutine taking ``emit`` as a keyword: each ``emit(value)`` is a CHUNK, and
  its return value is the END;
- what a call used (tokens read or generated, bytes stored) is said with the value it belongs to:
  ``return Reply(value, usage)`` or ``emit(value, usage)``, ``usage`` a map of ``wire.USAGE``
  keys. The kernel adds it to the calling process's counters; the program gets the value alone.

A service reaches another only through the kernel: ``await self.runtime.call("storage", "get",
{...})``. The kernel routes it like a syscall (waiting while the target restarts) and retries
it only where the op is an idempotent syscall of the target: the caller knows best what any
other failure means.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import signal
import sys
import time
from typing import Any, NamedTuple

import uvloop
import zmq

from syscalls.runtime.channel import Channel
from syscalls.runtime.logs import setup
from syscalls.paths import Paths
from syscalls import errors, wire
from syscalls.errors import LLMOSError

KERNEL_SILENCE = 15.0   # no ping from the kernel for this long: it is gone, and so is this service


class Reply(NamedTuple):
    """An op's value together with what the call used (keys of ``wire.USAGE``)."""

    value: Any
    usage: dict


class Service:
    """Base class: subclasses set ``name`` and define ``op_*`` methods; ``main()`` runs one."""

    name = "service"
    internal: tuple[str, ...] = ()     # ops for the kernel and other services only: no syscall names them
    # Set by start() to be READY before it can serve (what it needs is still coming, e.g. a
    # restarted inference service's driver): calls wait here, in order, until it is done; if it
    # fails, the service exits with the error (a crash, for the supervisor).
    gate: "asyncio.Future | None" = None

    def __init__(self, paths: Paths, log):
        self.paths = paths
        self.log = log

    @classmethod
    def preload(cls, paths: Paths) -> None:
        """What can be done before the kernel's token: imports. A spare process (the supervisor's
        rule 4) does it long before it is needed; a service that starts cold, at once."""

    async def start(self) -> None:
        """Open what the service needs before it is READY (databases, models); it may already
        call other services."""

    async def stop(self) -> None:
        """Release it on the way out."""

    def progress(self, **data: Any) -> None:
        """Report progress of a long start (shown by `services`; keeps the start deadline away)."""
        self.runtime.send(wire.event("progress", data))

    # set by Runtime
    runtime: "Runtime"


class Runtime:
    def __init__(self, service: Service, token: str):
        self.service = service
        self.token = token
        self.loop = asyncio.get_running_loop()
        self.ops = {n[3:]: getattr(service, n) for n in dir(service) if n.startswith("op_")}
        self.tasks: dict[int, asyncio.Task] = {}
        self.calls: dict[int, asyncio.Future] = {}    # our calls to other services, by our id
        self._ids = itertools.count(1)
        self.last_ping = time.monotonic()
        self.stopped = asyncio.Event()
        self.held: list[tuple] = []         # calls that came before service.gate was done
        self.failure: BaseException | None = None
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.connect(service.paths.services_endpoint)
        self.ch = Channel(self.loop, sock, self._on_message)
        service.runtime = self

    def send(self, frame: bytes) -> None:
        self.ch.send([frame])

    async def call(self, service: str, op: str, args: dict, as_pid: int | None = None) -> Any:
        """Call another service's op through the kernel; raises the LLMOSError it answers.
        With as_pid, the call is made for that process: the callee sees it as the caller (its
        user's namespace, its quotas), as when a syscall does storage work for a program."""
        sid = next(self._ids)
        fut = self.loop.create_future()
        self.calls[sid] = fut
        name = f"{service}.{op}"
        self.send(wire.call(sid, name, args) if as_pid is None else
                  wire.service_call(sid, name, args, {"as_pid": as_pid}))
        try:
            msg = await fut
        except asyncio.CancelledError:
            if self.calls.pop(sid, None) is not None:
                self.send(wire.cancel(sid))
            raise
        if msg[1] == wire.ERR:
            raise errors.from_wire(str(msg[3]), str(msg[4]))
        return msg[3]

    async def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopped.set)
        self.send(wire.hello(self.service.name, {"token": self.token, "pid": os.getpid()}))
        await self.service.start()
        if self.service.gate is not None:
            self.service.gate.add_done_callback(self._opened)
        self.last_ping = time.monotonic()
        self.send(wire.event("ready", {}))
        watchdog = self.loop.create_task(self._watchdog())
        await self.stopped.wait()
        watchdog.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        await self.service.stop()
        self.ch.close()
        self.ctx.term()
        if self.failure is not None:
            raise self.failure

    def _opened(self, gate: asyncio.Future) -> None:
        """The service's gate is done: the calls held meanwhile run, in the order they came."""
        if gate.cancelled() or gate.exception() is not None:
            self.failure = gate.exception() or RuntimeError("start cancelled")
            self.service.log.error("start_failed", error=repr(self.failure))
            self.stopped.set()
            return
        held, self.held = self.held, []
        for kid, name, args, caller in held:
            self._call(kid, name, args, caller)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - self.last_ping > KERNEL_SILENCE:
                self.service.log.error("kernel_silent", seconds=KERNEL_SILENCE)
                self.stopped.set()
                return

    def _on_message(self, head: zmq.Frame, rest: list[bytes]) -> None:
        try:
            msg = wire.decode(head.bytes)
        except wire.BadMessage as e:
            self.service.log.error("bad_message_from_kernel", error=str(e))
            return
        kind = msg[1]
        if kind == wire.PING:
            self.last_ping = time.monotonic()
            self.send(wire.pong(msg[2]))
        elif kind == wire.CALL and len(msg) >= 6:
            gate = self.service.gate
            if gate is not None and not gate.done():
                self.held.append((msg[2], msg[3], msg[4], msg[5]))
            else:
                self._call(msg[2], msg[3], msg[4], msg[5])
        elif kind == wire.CANCEL:
            self.held = [h for h in self.held if h[0] != msg[2]]
            task = self.tasks.pop(msg[2], None)
            if task:
                task.cancel()
        elif kind in (wire.OK, wire.ERR):
            fut = self.calls.pop(msg[2], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _call(self, kid: int, name: str, args: dict, caller: dict) -> None:
        op = self.ops.get(name)
        if op is None:
            self.send(wire.err(kid, "ENOSYS", f"service {self.service.name} has no op {name!r}"))
            return
        if not inspect.iscoroutinefunction(op):
            try:
                self.send(_answer(wire.ok, kid, op(args, caller)))
            except LLMOSError as e:
                self.send(wire.err(kid, e.code, e.message))
            except Exception as e:
                self.service.log.exception("op_failed", op=name)
                self.send(wire.err(kid, "EIO", f"{name}: {self.service.name} failed: {e!r}"))
            return
        streaming = "emit" in inspect.signature(op).parameters
        if streaming:
            coro = op(args, caller, emit=lambda value, usage=None: self.send(wire.chunk(kid, value, usage)))
        else:
            coro = op(args, caller)
        task = self.loop.create_task(coro)
        self.tasks[kid] = task
        task.add_done_callback(lambda t: self._done(kid, name, streaming, t))

    def _done(self, kid: int, name: str, streaming: bool, task: asyncio.Task) -> None:
        self.tasks.pop(kid, None)
        if task.cancelled():
            return
        e = task.exception()
        if e is None:
            self.send(_answer(wire.end if streaming else wire.ok, kid, task.result()))
        elif isinstance(e, LLMOSError):
            self.send(wire.err(kid, e.code, e.message))
        else:
            self.service.log.error("op_failed", op=name, error=repr(e), exc_info=e)
            self.send(wire.err(kid, "EIO", f"{name}: {self.service.name} failed: {e!r}"))


def _answer(make, kid: int, result: Any) -> bytes:
    """The OK or END frame of an op's result, with its usage when it reported one."""
    if isinstance(result, Reply):
        return make(kid, result.value, result.usage)
    return make(kid, result)


def main(cls: type[Service]) -> None:
    """Entry point of a service process: ``python -m services.NAME`` ends up here."""
    paths = Paths.from_env()
    log = setup(cls.name, paths.log_file(cls.name))
    cls.preload(paths)
    token = sys.stdin.readline().strip()
    if not token:
        print(f"{cls.name}: services are started by the llmos kernel, not by hand", file=sys.stderr)
        sys.exit(2)
    starting = sys.stdin.read().strip()         # the kernel closes stdin after writing it
    if starting:
        os.environ.update(json.loads(starting))

    async def run() -> None:
        await Runtime(cls(paths, log), token).run()

    try:
        uvloop.run(run())
    except Exception:
        log.exception("service_crashed")
        raise
