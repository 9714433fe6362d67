"""The asyncio transport: ``AsyncConnection`` and its ``AsyncStream``, on zmq.asyncio.

One reader task feeds every frame to ``core``; a caller waits on a future of its own call, in
slices, so that a deadline or a kernel that went away ends the wait. Many calls may be in flight
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from .. import errors
from . import stubs
from .core import END_OF_STREAM, Call, StreamBase, hello_args, reply_value
from .transport import Transport


class AsyncStream(StreamBase):
    """The chunks of a streaming call: ``async for chunk in stream``; ``result`` is the END value.

    ``await stream.text`` waits for the whole answer; ``aclose()`` gives up on the rest.
    """

    def __init__(self, conn: "AsyncConnection", call: Call):
        super().__init__(call)
        self._conn = conn

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        try:
            msg = await self._conn._next(self._call)
        except BaseException:           # cancelled or timed out: the kernel lets go too
            await self.aclose()
            raise
        chunk = self._accept(msg)
        if chunk is END_OF_STREAM:
            raise StopAsyncIteration
        return chunk

    @property
    def text(self) -> Awaitable[str]:
        """Everything streamed, once the end has come: ``await stream.text``."""
        return _OnAwait(self._read_text)

    async def _read_text(self) -> str:
        async for _ in self:
            pass
        return self._text()

    async def aclose(self) -> None:
        """Give up on the rest: the kernel cancels the call and frees what it holds."""
        if not self.done:
            self.done = True
            await self._conn._cancel(self._call)


class _OnAwait:
    """Makes its coroutine only when awaited, so reading ``.text`` alone leaves none unawaited."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], Awaitable[Any]]):
        self._make = make

    def __await__(self):
        return self._make().__await__()


class AsyncConnection(Transport):
    """An asyncio connection: one llmos process; many calls may be in flight at once."""

    def __init__(self, home: str | os.PathLike | None = None, name: str | None = None,
                 privileged: bool = False, timeout: float | None = None):
        super().__init__(zmq.asyncio.Context.instance(), home, timeout)
        self._hello = hello_args(name, privileged)
        self._reader: asyncio.Task | None = None
        self.info: dict = {}
        self.pid = 0

    async def _open(self) -> "AsyncConnection":
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            self.info = await self.hello(**self._hello)
        except BaseException:
            await self.abort()
            raise
        self.pid = self.info["pid"]
        return self

    async def _read(self) -> None:
        while True:
            try:
                frame = await self._sock.recv()
            except zmq.ZMQError:        # the socket is gone: no reply can come any more
                _wake(self._core.close())
                return
            _wake(self._core.receive(frame))

    # -- the generic call -----------------------------------------------------------------------
    async def call(self, name: str, /, **args: Any) -> Any:
        call = await self._send(name, args)
        try:
            msg = await self._next(call)
        except BaseException:          # cancelled or timed out: the kernel lets go too
            await self._cancel(call)
            raise
        return reply_value(msg)

    async def stream(self, name: str, /, **args: Any) -> AsyncStream:
        """An async iterator over the chunks; the END value is in ``.result`` after."""
        return AsyncStream(self, await self._send(name, args))

    async def _send(self, name: str, args: dict) -> Call:
        call = self._core.start(name, args)
        try:
            await self._sock.send(call.frame)
        except BaseException:
            self._core.cancel(call)    # never sent: there is nothing for the kernel to cancel
            raise
        return call

    async def _next(self, call: Call) -> list:
        """The next message for call, which the reader task hands over."""
        deadline = self._core.deadline()
        while (msg := self._core.take(call)) is None:
            call.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(call.waiter, self._core.slice(deadline))
            except asyncio.TimeoutError:
                _wake(self._core.overdue(call, deadline))
            finally:
                call.waiter = None
        return msg

    async def _cancel(self, call: Call) -> None:
        frame = self._core.cancel(call)
        if frame is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self._sock.send(frame, zmq.NOBLOCK)

    # -- lifetime -------------------------------------------------------------------------------
    async def close(self, status: int = 0) -> None:
        """End this process with exit(status) and close the socket; safe to call twice."""
        if self._core.closed:
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
        _wake(self._core.close())
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)

    async def __aenter__(self) -> "AsyncConnection":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close(1 if exc_type is not None else 0)


def _wake(calls: list[Call]) -> None:
    for call in calls:
        if call.waiter is not None and not call.waiter.done():
            call.waiter.set_result(None)


stubs.install(AsyncConnection, asynchronous=True)
