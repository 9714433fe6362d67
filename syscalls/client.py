"""The client library: the only road from a program to llmos.

    import syscalls
    with syscalls.connect() as os:
        os.put("greeting", "hello")
        print(os.get("greeting")["value"], os.getpid())

``Connection`` (blocking) and ``AsyncConnection`` (asyncio) have one method per row of the syscall
table, generated from it with the table's argument names, defaults and documentation, so no stub is
written by hand. A failed call raises the exception class of its error code (``syscalls.errors``).
Streaming calls return a ``Stream``: iterate it for the chunks; ``.result`` holds the END value.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import os
import sys
from typing import Any, Iterator

import zmq
import zmq.asyncio

from . import errors, wire
from .paths import Paths
from .schema import REQUIRED, KINDS, Syscall
from .table import SYSCALLS

POLL_SLICE_MS = 1000   # while waiting, check this often that llmos is still there


def _socket(ctx: zmq.Context, paths: Paths) -> zmq.Socket:
    if not paths.programs_sock.exists():
        raise errors.ECONNREFUSED(f"llmos is not running in {paths.home} (no {paths.programs_sock}); "
                                  f"start it with `llmos boot`")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.programs_endpoint)
    return sock


def _hello_args(name: str | None, privileged: bool) -> dict:
    args = {"name": name or os.path.basename(sys.argv[0] or "python") or "python",
            "argv": [str(a) for a in sys.argv][:256], "privileged": privileged}
    token = os.environ.get("LLMOS_SPAWN_TOKEN")
    if token:
        args["spawn_token"] = token
    inherited = inherited_sched(os.environ)
    if inherited:
        args.update(inherited)
    return args


def inherited_sched(env) -> dict:
    """What a shell passed down in the environment: LLMOS_PRIORITY=N and LLMOS_LIMITS=R=N,R=N
    (set by llmsh for the programs it runs), as hello's priority and limits; malformed is ignored."""
    out: dict[str, Any] = {}
    try:
        if env.get("LLMOS_PRIORITY"):
            out["priority"] = max(-20, min(19, int(env["LLMOS_PRIORITY"])))
        if env.get("LLMOS_LIMITS"):
            out["limits"] = {r: int(n) for r, n in (kv.split("=", 1) for kv in env["LLMOS_LIMITS"].split(","))}
    except ValueError:
        return {}
    return out


class Record(dict):
    """A dict whose keys read as attributes too: ``chunk.text`` as well as ``chunk["text"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _record(value: Any) -> Any:
    return Record(value) if isinstance(value, dict) else value


def _error(msg: list) -> errors.LLMOSError:
    return errors.from_wire(str(msg[3]), str(msg[4]))


class Stream:
    """The chunks of a streaming call, as they arrive; ``result`` is the END value once done.

    Iterate it for the chunks (``for chunk in os.generate(...): print(chunk.text)``), or read
    ``.text`` to wait for the whole answer (``os.chat(messages).text``).
    """

    def __init__(self, conn: "Connection", cid: int, name: str):
        self._conn, self._cid, self.name = conn, cid, name
        self.result: Any = None
        self.done = False
        self._seen: list[Any] = []
        self._chunks: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        """The chunks not read yet: `next(stream)` and later loops go on from where reading stopped."""
        if self._chunks is None:
            self._chunks = self._read()
        return self._chunks

    def __next__(self) -> Any:
        return next(iter(self))

    @property
    def chunks(self) -> list[Any]:
        """The chunks read so far."""
        return list(self._seen)

    def _read(self) -> Iterator[Any]:
        try:
            while not self.done:
                msg = self._conn._next(self._cid, self.name)
                if msg[1] == wire.CHUNK:
                    chunk = _record(msg[3])
                    self._seen.append(chunk)
                    yield chunk
                else:
                    self.done = True
                    if msg[1] == wire.ERR:
                        raise _error(msg)
                    self.result = _record(msg[3])
        finally:
            if not self.done:
                self.close()

    @property
    def text(self) -> str:
        """Everything streamed, waiting for the end first."""
        for _ in self:
            pass
        return "".join(c.get("text", "") for c in self._seen if isinstance(c, dict))

    def close(self) -> None:
        """Give up on the rest: the kernel cancels the call and frees what it holds."""
        if not self.done:
            self.done = True
            self._conn._cancel(self._cid)


class Connection:
    """A blocking connection: one llmos process. Not for use from several threads at once."""

    def __init__(self, home: str | os.PathLike | None = None, name: str | None = None,
                 privileged: bool = False, timeout: float | None = None):
        self.paths = Paths.from_env(home)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock = _socket(self._ctx, self.paths)
        self._kernel = self.paths.kernel_pid()
        self._closed = False
        self._open: dict[int, collections.deque] = {}   # calls awaiting replies -> replies kept for them
        self.info = self.hello(**_hello_args(name, privileged))
        self.pid: int = self.info["pid"]

    # -- the generic call -----------------------------------------------------------------------
    def call(self, name: str, /, **args: Any) -> Any:
        cid = self._send(name, args)
        try:
            msg = self._next(cid, name)
        except BaseException:          # interrupted (Ctrl-C) or timed out: the kernel lets go too
            self._cancel(cid)
            raise
        if msg[1] == wire.ERR:
            raise _error(msg)
        return msg[3]

    def stream(self, name: str, /, **args: Any) -> Stream:
        cid = self._send(name, args)
        try:
            return Stream(self, cid, name)
        except BaseException:          # Ctrl-C right after sending: nobody would ever cancel it
            self._cancel(cid)
            raise

    def _send(self, name: str, args: dict) -> int:
        if self._closed:
            raise errors.EINVAL(f"{name}: the connection is closed")
        cid = next(self._ids)
        self._sock.send(wire.call(cid, name, args))
        self._open[cid] = collections.deque()
        return cid

    def _next(self, cid: int, name: str) -> list:
        """The next message for call cid. Messages for other open calls (a stream being read while
        another call is made) are kept for them; probes and late replies to cancelled calls go."""
        msg = self._take(cid, name)
        if msg[1] != wire.CHUNK:
            self._open.pop(cid, None)
        return msg

    def _take(self, cid: int, name: str) -> list:
        kept = self._open.get(cid)
        if kept:
            return kept.popleft()
        waited = 0.0
        while True:
            if not self._sock.poll(POLL_SLICE_MS):
                waited += POLL_SLICE_MS / 1000
                if self.paths.kernel_pid() != self._kernel:
                    raise errors.ECONNREFUSED(f"{name}: the kernel this connection talked to "
                                              f"stopped while the call was in flight")
                if self.timeout is not None and waited >= self.timeout:
                    raise errors.ETIMEDOUT(f"{name}: no reply within {self.timeout}s")
                continue
            msg = wire.decode(self._sock.recv())
            if msg[1] in (wire.OK, wire.ERR, wire.CHUNK, wire.END):
                if msg[2] == cid:
                    return msg
                other = self._open.get(msg[2])
                if other is not None:
                    other.append(msg)
                    continue
            if msg[2] == 0 and msg[1] == wire.ERR:      # the kernel could not read what we sent
                raise _error(msg)

    def _cancel(self, cid: int) -> None:
        self._open.pop(cid, None)
        if not self._closed:
            try:
                self._sock.send(wire.cancel(cid), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass        # nobody to tell: the kernel is gone or its queue is full

    # -- lifetime -------------------------------------------------------------------------------
    def close(self, status: int = 0) -> None:
        """End this process with exit(status) and close the socket; safe to call twice.

        A program the kernel spawned lives as long as its OS process, whose exit status the
        kernel reads itself, so for it close only closes the socket.
        """
        if self._closed:
            return
        if self.info.get("spawned"):
            return self.abort()
        try:
            self.call("exit", status=status)
        except errors.LLMOSError:
            pass
        self.abort()

    def abort(self) -> None:
        """Close the socket without telling the kernel (which then notices the departure)."""
        self._closed = True
        self._sock.close(linger=0)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(1 if exc_type is not None and exc_type is not SystemExit else 0)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._sock.close(linger=0)


class AsyncConnection:
    """An asyncio connection; many calls may be in flight at once."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.paths = Paths.from_env(home)
        self._ids = itertools.count(1)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = _socket(self._ctx, self.paths)
        self._kernel = self.paths.kernel_pid()
        self._waiting: dict[int, asyncio.Queue | asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False
        self.info: dict = {}
        self.pid = 0

    async def _open(self, name: str | None, privileged: bool) -> "AsyncConnection":
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.info = await self.hello(**_hello_args(name, privileged))
        self.pid = self.info["pid"]
        return self

    async def _read(self) -> None:
        while True:
            if not await self._sock.poll(POLL_SLICE_MS):
                if self.paths.kernel_pid() != self._kernel:
                    self._fail_all(errors.ECONNREFUSED("the kernel this connection talked to "
                                                       "stopped while calls were in flight"))
                    return
                continue
            msg = wire.decode(await self._sock.recv())
            target = self._waiting.get(msg[2])
            if target is None:
                continue
            if isinstance(target, asyncio.Queue):
                target.put_nowait(msg)
                if msg[1] != wire.CHUNK:
                    self._waiting.pop(msg[2], None)
            elif msg[1] in (wire.OK, wire.ERR) and not target.done():
                self._waiting.pop(msg[2], None)
                target.set_result(msg)

    def _fail_all(self, exc: errors.LLMOSError) -> None:
        waiting, self._waiting = self._waiting, {}
        for cid, target in waiting.items():
            if isinstance(target, asyncio.Queue):
                target.put_nowait([wire.VERSION, wire.ERR, cid, exc.code, exc.message])
            elif not target.done():
                target.set_exception(exc)

    async def call(self, name: str, /, **args: Any) -> Any:
        if self._closed:
            raise errors.EINVAL(f"{name}: the connection is closed")
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        await self._sock.send(wire.call(cid, name, args))
        try:
            msg = await fut
        except asyncio.CancelledError:
            self._waiting.pop(cid, None)
            await self._sock.send(wire.cancel(cid))
            raise
        if msg[1] == wire.ERR:
            raise _error(msg)
        return msg[3]

    async def stream(self, name: str, /, **args: Any):
        """An async iterator over the chunks; the END value is returned by ``.result`` after."""
        cid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._waiting[cid] = queue
        await self._sock.send(wire.call(cid, name, args))
        return AsyncStream(self, cid, queue)

    async def close(self, status: int = 0) -> None:
        if self._closed:
            return
        if self.info.get("spawned"):
            return await self.abort()
        try:
            await asyncio.wait_for(self.call("exit", status=status), 5)
        except (errors.LLMOSError, asyncio.TimeoutError):
            pass
        await self.abort()

    async def abort(self) -> None:
        """Close the socket without telling the kernel (which then notices the departure)."""
        self._closed = True
        if self._reader and not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._fail_all(errors.ECANCELED("the connection was closed"))
        self._sock.close(linger=0)

    async def __aenter__(self) -> "AsyncConnection":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close(1 if exc_type is not None else 0)


class AsyncStream:
    def __init__(self, conn: AsyncConnection, cid: int, queue: asyncio.Queue):
        self._conn, self._cid, self._queue = conn, cid, queue
        self.result: Any = None
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        msg = await self._queue.get()
        if msg[1] == wire.CHUNK:
            return _record(msg[3])
        self.done = True
        if msg[1] == wire.ERR:
            raise _error(msg)
        self.result = _record(msg[3])
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self._conn._waiting.pop(self._cid, None)
            await self._conn._sock.send(wire.cancel(self._cid))


# -- stubs, generated from the syscall table ------------------------------------------------------
def _signature(spec: Syscall) -> inspect.Signature:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for a in spec.args:
        params.append(inspect.Parameter(
            a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if a.default is REQUIRED else a.default,
            annotation=KINDS[a.kind][1]))
    return inspect.Signature(params)


def _doc(spec: Syscall) -> str:
    lines = [spec.doc or spec.name, "", f"Returns: {spec.result}."]
    if spec.errors:
        lines.append("Errors: " + ", ".join(spec.errors) + ".")
    return "\n".join(lines)


def _stub(spec: Syscall, asynchronous: bool):
    sig = _signature(spec)
    name = spec.name

    def args_of(self, a, kw) -> dict:
        bound = sig.bind(self, *a, **kw)
        return {k: v for k, v in bound.arguments.items() if k != "self"}

    if asynchronous:
        async def method(self, *a, **kw):
            args = args_of(self, a, kw)
            if spec.stream:
                return await self.stream(name, **args)
            result = await self.call(name, **args)
            if name == "exit":
                await self.abort()
            return result
    else:
        def method(self, *a, **kw):
            args = args_of(self, a, kw)
            if spec.stream:
                return self.stream(name, **args)
            result = self.call(name, **args)
            if name == "exit":
                self.abort()
            return result
    method.__name__ = method.__qualname__ = name
    method.__signature__ = sig
    method.__doc__ = _doc(spec)
    return method


for _spec in SYSCALLS:
    setattr(Connection, _spec.name, _stub(_spec, asynchronous=False))
    setattr(AsyncConnection, _spec.name, _stub(_spec, asynchronous=True))


def connect(home: str | os.PathLike | None = None, name: str | None = None,
            privileged: bool = False, timeout: float | None = None) -> Connection:
    """Connect to the llmos running in ``home`` (default $LLMOS_HOME or ~/.llmos)."""
    return Connection(home, name=name, privileged=privileged, timeout=timeout)


async def connect_async(home: str | os.PathLike | None = None, name: str | None = None,
                        privileged: bool = False) -> AsyncConnection:
    return await AsyncConnection(home)._open(name, privileged)
