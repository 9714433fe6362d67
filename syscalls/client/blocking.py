"""The blocking transport: ``Connection`` and its ``Stream``, on a plain zmq socket.

What a call means (ids, replies, errors, deadlines) is ``core``'s; this module only sends,
receives and waits, polling in slices so that a kernel that went away is noticed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import zmq

from .. import errors
from . import stubs
from .core import END_OF_STREAM, Call, StreamBase, hello_args, reply_value
from .transport import Transport


class Stream(StreamBase):
    """The chunks of a streaming call, as they arrive; ``result`` is the END value once done.

    Iterate it for the chunks (``for chunk in os.generate(...): print(chunk.text)``), or read
    ``.text`` to wait for the whole answer (``os.chat(messages).text``).
    """

    def __init__(self, conn: "Connection", call: Call):
        super().__init__(call)
        self._conn = conn
        self._chunks: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        """The chunks not read yet: `next(stream)` and later loops go on from where reading stopped."""
        if self._chunks is None:
            self._chunks = self._read()
        return self._chunks

    def __next__(self) -> Any:
        return next(iter(self))

    def _read(self) -> Iterator[Any]:
        try:
            while not self.done:
                chunk = self._accept(self._conn._next(self._call))
                if chunk is not END_OF_STREAM:
                    yield chunk
        finally:
            if not self.done:           # interrupted, timed out, or dropped half-read
                self.close()

    @property
    def text(self) -> str:
        """Everything streamed, waiting for the end first."""
        for _ in self:
            pass
        return self._text()

    def close(self) -> None:
        """Give up on the rest: the kernel cancels the call and frees what it holds."""
        if not self.done:
            self.done = True
            self._conn._cancel(self._call)


class Connection(Transport):
    """A blocking connection: one llmos process. Not for use from several threads at once."""

    def __init__(self, home: str | os.PathLike | None = None, name: str | None = None,
                 privileged: bool = False, timeout: float | None = None):
        super().__init__(zmq.Context.instance(), home, timeout)
        self.info = self.hello(**hello_args(name, privileged))
        self.pid: int = self.info["pid"]

    # -- the generic call -----------------------------------------------------------------------
    def call(self, name: str, /, **args: Any) -> Any:
        call = self._send(name, args)
        try:
            msg = self._next(call)
        except BaseException:          # interrupted (Ctrl-C) or timed out: the kernel lets go too
            self._cancel(call)
            raise
        return reply_value(msg)

    def stream(self, name: str, /, **args: Any) -> Stream:
        call = self._send(name, args)
        try:
            return Stream(self, call)
        except BaseException:          # Ctrl-C right after sending: nobody would ever cancel it
            self._cancel(call)
            raise

    def _send(self, name: str, args: dict) -> Call:
        call = self._core.start(name, args)
        try:
            self._sock.send(call.frame)
        except BaseException:
            self._core.cancel(call)    # never sent: there is nothing for the kernel to cancel
            raise
        return call

    def _next(self, call: Call) -> list:
        """The next message for call; those for other open calls are kept for them."""
        deadline = self._core.deadline()
        while (msg := self._core.take(call)) is None:
            if self._sock.poll(self._core.slice(deadline) * 1000):
                self._core.receive(self._sock.recv())
            else:
                self._core.overdue(call, deadline)
        return msg

    def _cancel(self, call: Call) -> None:
        frame = self._core.cancel(call)
        if frame is not None:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass        # nobody to tell: the kernel is gone or its queue is full

    # -- lifetime -------------------------------------------------------------------------------
    def close(self, status: int = 0) -> None:
        """End this process with exit(status) and close the socket; safe to call twice.

        A program the kernel spawned lives as long as its OS process, whose exit status the
        kernel reads itself, so for it close only closes the socket.
        """
        if self._core.closed:
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
        self._core.close()
        self._sock.close(linger=0)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(1 if exc_type is not None and exc_type is not SystemExit else 0)

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed:
            self._sock.close(linger=0)


stubs.install(Connection, asynchronous=False)
