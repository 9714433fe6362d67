"""Error codes of the llmos ABI and the exception raised for each.

A reply that is an error carries a code (one of ``CODES``) and a message that names the argument or
limit at fault. Clients turn it into the exception class of that code; every class derives from
``LLMOSError`` and, where one fits, from the Python built-in of the same meaning, so ``except
TimeoutError`` works as a reader expects.
"""

from __future__ import annotations

CODES: dict[str, str] = {
    "ENOSYS": "no such syscall",
    "EINVAL": "invalid argument",
    "EPERM": "operation not permitted",
    "ESRCH": "no such process",
    "ECHILD": "not a child of the caller",
    "ENOENT": "no such key, namespace, model or service",
    "EEXIST": "already exists",
    "ECONFLICT": "version does not match (compare-and-set failed)",
    "EAGAIN": "resource temporarily unavailable (queue full, too many calls in flight)",
    "EBUSY": "in use (a model with requests or contexts on it)",
    "EDQUOT": "quota exceeded",
    "ENOSPC": "no space left for storage (the disk, or storage.max_db_bytes, is full)",
    "EBADF": "no such context handle (never opened, closed, or another process's)",
    "E2BIG": "argument or message too large",
    "EIO": "input/output error inside a service",
    "ESRVDOWN": "service is down (failed, or gone while handling a call that cannot be retried)",
    "ETIMEDOUT": "timed out",
    "ECANCELED": "call cancelled",
    "EPROTO": "protocol error (malformed message, wrong version)",
    "ESHUTDOWN": "llmos is shutting down",
    "ECONNREFUSED": "llmos is not running",
}


class LLMOSError(Exception):
    """A syscall failed; ``code`` names why, ``message`` says what to fix."""

    code = "EIO"

    def __init__(self, message: str = "", code: str | None = None):
        if code is not None:
            self.code = code
        self.message = message or CODES.get(self.code, "")
        super().__init__(f"{self.code}: {self.message}")


def _make(code: str, *bases: type) -> type[LLMOSError]:
    return type(code, (LLMOSError, *bases), {"code": code, "__doc__": CODES[code]})


ENOSYS = _make("ENOSYS", NotImplementedError)
EINVAL = _make("EINVAL", ValueError)
EPERM = _make("EPERM", PermissionError)
ESRCH = _make("ESRCH", ProcessLookupError)
ECHILD = _make("ECHILD", ChildProcessError)
ENOENT = _make("ENOENT", LookupError)
EEXIST = _make("EEXIST")
ECONFLICT = _make("ECONFLICT")
EAGAIN = _make("EAGAIN", BlockingIOError)
EBUSY = _make("EBUSY")
EDQUOT = _make("EDQUOT")
ENOSPC = _make("ENOSPC", OSError)
EBADF = _make("EBADF")
E2BIG = _make("E2BIG", ValueError)
EIO = _make("EIO", OSError)
ESRVDOWN = _make("ESRVDOWN", ConnectionError)
ETIMEDOUT = _make("ETIMEDOUT", TimeoutError)
ECANCELED = _make("ECANCELED")
EPROTO = _make("EPROTO")
ESHUTDOWN = _make("ESHUTDOWN", ConnectionError)
ECONNREFUSED = _make("ECONNREFUSED", ConnectionRefusedError)

BY_CODE: dict[str, type[LLMOSError]] = {c: globals()[c] for c in CODES}


def from_wire(code: str, message: str) -> LLMOSError:
    """The exception for an error reply; an unknown code still raises, as a plain LLMOSError."""
    cls = BY_CODE.get(code)
    return cls(message) if cls else LLMOSError(message, code=code)
