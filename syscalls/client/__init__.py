"""The client library: the only road from a program to llmos.

    import syscalls
    with syscalls.connect() as os:
        os.put("greeting", "hello")
        print(os.get("greeting")["value"], os.getpid())

``Connection`` (blocking) and ``AsyncConnection`` (asyncio) have one method per row of the syscall
table, generated from it (``stubs``) with the table's argument names, defaults and documentation.
A failed call raises the exception class of its error code (``syscalls.errors``). Streaming calls
return a ``Stream`` (``AsyncStream``): iterate it for the chunks, read ``.text`` for the whole
answer (``await stream.text``); ``.result`` holds the END value.

Both connections are thin transports (``blocking``, ``aio``, on ``transport``) over one protocol
core without IO (``core``), so that they behave the same: the same errors, timeouts and closed state.
"""

from __future__ import annotations

import os

from .aio import AsyncConnection, AsyncStream
from .blocking import Connection, Stream
from .core import Record, inherited_sched

__all__ = ["connect", "connect_async", "Connection", "AsyncConnection", "Stream", "AsyncStream",
           "Record", "inherited_sched"]


def connect(home: str | os.PathLike | None = None, name: str | None = None,
            privileged: bool = False, timeout: float | None = None) -> Connection:
    """Connect to the llmos running in ``home`` (default $LLMOS_HOME or ~/.llmos)."""
    return Connection(home, name=name, privileged=privileged, timeout=timeout)


async def connect_async(home: str | os.PathLike | None = None, name: str | None = None,
                        privileged: bool = False, timeout: float | None = None) -> AsyncConnection:
    """``connect`` for asyncio: every call is a coroutine, and many may be in flight at once."""
    return await AsyncConnection(home, name=name, privileged=privileged, timeout=timeout)._open()
