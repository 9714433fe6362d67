"""The client's protocol without IO: call ids, frames, replies matched to calls, errors, deadlines.

A transport (``blocking`` or ``aio``) owns the socket. It sends the frames this core makes, feeds
it every frame that arrives, and waits for the messages of the call it serves, in slices, until
the deadline the core sets. All that a connection decides about the protocol is decided here,
once, so that the two transports cannot drift apart.

Never: a socket, a thread, an event loop or a sleep.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import time
from typing import Any, Callable

from .. import errors, wire

POLL_SLICE = 1.0       # seconds a transport waits before asking again whether llmos is still there
FINAL = frozenset({wire.OK, wire.ERR, wire.END})
REPLIES = FINAL | {wire.CHUNK}


class Record(dict):
    """A dict whose keys read as attributes too: ``chunk.text`` as well as ``chunk["text"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def record(value: Any) -> Any:
    return Record(value) if isinstance(value, dict) else value


def reply_value(msg: list) -> Any:
    """The value of an OK, CHUNK or END; an ERR raises the exception class of its code."""
    if msg[1] == wire.ERR:
        raise errors.from_wire(str(msg[3]), str(msg[4]))
    return msg[3]


class Call:
    """One call: the messages that came for it and were not read yet."""

    __slots__ = ("cid", "name", "frame", "replies", "waiter")

    def __init__(self, cid: int, name: str, frame: bytes):
        self.cid, self.name = cid, name
        self.frame: bytes | None = frame    # kept until the first reply: see ClientCore._undecodable
        self.replies: collections.deque[list] = collections.deque()
        self.waiter: Any = None             # the transport's own: what wakes the caller waiting here


class ClientCore:
    """The state of one connection: its open calls, whether it is closed or has lost the kernel."""

    def __init__(self, timeout: float | None, kernel_alive: Callable[[], bool]):
        self.timeout = timeout              # for each reply awaited; None waits as long as it takes
        self.closed = False
        self._kernel_alive = kernel_alive
        self._lost: str | None = None       # why every call fails from now on
        self._ids = itertools.count(1)
        self._open: dict[int, Call] = {}    # calls the kernel has not finished

    # -- going out ------------------------------------------------------------------------------
    def start(self, name: str, args: dict) -> Call:
        """A new call, whose ``frame`` the transport sends."""
        if self.closed:
            raise errors.EINVAL(f"{name}: the connection is closed")
        if self._lost is not None:
            raise errors.ECONNREFUSED(f"{name}: {self._lost}")
        cid = next(self._ids)
        frame = wire.call(cid, name, args)
        if len(frame) > wire.MAX_MESSAGE:
            # libzmq would drop the whole connection (every call on it) rather than this frame
            raise errors.E2BIG(f"{name}: the call is {len(frame)} bytes, more than one message "
                               f"holds ({wire.MAX_MESSAGE})")
        call = Call(cid, name, frame)
        self._open[cid] = call
        return call

    def cancel(self, call: Call) -> bytes | None:
        """Give up on call; the CANCEL frame to send, or None where the kernel is done with it."""
        call.replies.clear()
        if self._open.pop(call.cid, None) is None or self.closed or self._lost is not None:
            return None
        return wire.cancel(call.cid)

    # -- coming in ------------------------------------------------------------------------------
    def receive(self, frame: bytes) -> list[Call]:
        """Take one frame from the kernel; returns the calls it gave something to read."""
        try:
            msg = wire.decode(frame)
        except wire.BadMessage as e:        # a kernel bug: whose reply it was cannot be told
            return self._fail(list(self._open.values()), "EPROTO",
                              f"the kernel sent a malformed message ({e})")
        kind, cid = msg[1], msg[2]
        if cid == 0 and kind == wire.ERR:
            return self._undecodable(msg)
        call = self._open.get(cid)
        if call is None or kind not in REPLIES:
            return []                       # a late reply to a call given up on, or a probe
        call.frame = None
        call.replies.append(msg)
        if kind in FINAL:
            del self._open[cid]
        return [call]

    def take(self, call: Call) -> list | None:
        """The next message for call, or None while none has come."""
        return call.replies.popleft() if call.replies else None

    def _undecodable(self, msg: list) -> list[Call]:
        """An ERR with id 0: the kernel could not decode a frame, so it could not say whose. The
        calls still waiting for a first reply whose frames fail the kernel's own check are the
        ones; where none does (a kernel that checks otherwise), every one of them fails, so that
        none waits for a reply that will never come."""
        unanswered = [c for c in self._open.values() if c.frame is not None]
        culprits = [c for c in unanswered if not _decodes(c.frame)] or unanswered
        return self._fail(culprits, str(msg[3]), str(msg[4]))

    def _fail(self, calls: list[Call], code: str, why: str) -> list[Call]:
        for call in calls:
            self._open.pop(call.cid, None)
            call.frame = None
            call.replies.append([wire.VERSION, wire.ERR, call.cid, code, f"{call.name}: {why}"])
        return calls

    # -- waiting --------------------------------------------------------------------------------
    def deadline(self) -> float | None:
        """When a wait that starts now for the next reply gives up."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def slice(self, deadline: float | None) -> float:
        """How long a transport may wait before calling ``overdue``."""
        if deadline is None:
            return POLL_SLICE
        return max(0.0, min(POLL_SLICE, deadline - time.monotonic()))

    def overdue(self, call: Call, deadline: float | None) -> list[Call]:
        """After a slice that brought call nothing. If the kernel is gone, every open call fails
        (the calls returned, for the transport to wake); past the deadline, ETIMEDOUT is raised."""
        if not self._kernel_alive():
            self._lost = "the kernel this connection talked to has stopped"
            return self._fail(list(self._open.values()), "ECONNREFUSED",
                              "the kernel this connection talked to stopped while the call was in flight")
        if deadline is not None and time.monotonic() >= deadline:
            raise errors.ETIMEDOUT(f"{call.name}: no reply within {self.timeout}s")
        return []

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> list[Call]:
        """Closed by this side: the calls still open fail with ECANCELED."""
        self.closed = True
        return self._fail(list(self._open.values()), "ECANCELED", "the connection was closed")


def _decodes(frame: bytes) -> bool:
    try:
        wire.decode(frame)
    except wire.BadMessage:
        return False
    return True


class StreamBase:
    """What both transports' streams share: the chunks read so far, the END value, the end."""

    def __init__(self, call: Call):
        self._call, self.name = call, call.name
        self.result: Any = None
        self.done = False
        self._seen: list[Any] = []

    @property
    def chunks(self) -> list[Any]:
        """The chunks read so far."""
        return list(self._seen)

    def _accept(self, msg: list) -> Any:
        """A chunk to hand out, or END_OF_STREAM once the stream is done; its ERR raises."""
        if msg[1] == wire.CHUNK:
            chunk = record(msg[3])
            self._seen.append(chunk)
            return chunk
        self.done = True
        self.result = record(reply_value(msg))
        return END_OF_STREAM

    def _text(self) -> str:
        return "".join(c.get("text", "") for c in self._seen if isinstance(c, dict))


END_OF_STREAM = object()


# -- saying hello -------------------------------------------------------------------------------
def hello_args(name: str | None, privileged: bool) -> dict:
    """The first call's arguments: this program's name and argv, and what its environment passes on."""
    args = {"name": name or os.path.basename(sys.argv[0] or "python") or "python",
            "argv": [str(a) for a in sys.argv][:256], "privileged": privileged}
    token = os.environ.get("LLMOS_SPAWN_TOKEN")
    if token:
        args["spawn_token"] = token
    args.update(inherited_sched(os.environ))
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
