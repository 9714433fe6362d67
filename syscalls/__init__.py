"""The llmos ABI and client library: ``import syscalls; os = syscalls.connect()``.

``syscalls.table`` is the one syscall table, ``syscalls.errors`` the error codes and their
exceptions, ``syscalls.wire`` the message format. Programs need only ``connect``.
"""

from .client import AsyncConnection, Connection, Stream, connect, connect_async
from .errors import LLMOSError
from .table import BY_NAME, SYSCALLS

__all__ = ["connect", "connect_async", "Connection", "AsyncConnection", "Stream", "LLMOSError",
           "SYSCALLS", "BY_NAME"]
