"""A ZeroMQ socket served by the asyncio loop directly, without zmq.asyncio's per-call futures.

libzmq's FD is edge-triggered: it signals "something changed", after which the socket must be
drained until EVENTS shows no more input, and any send may consume a pending edge. So ``drain``
reads until empty (in batches, yielding to the loop between them), and every send from outside a
drain schedules one more drain. This is the whole trick; it keeps a syscall's path free of tasks.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import zmq

BATCH = 64   # messages read before yielding to other sockets and timers
SENT, FULL, GONE = 0, 1, 2   # what Channel.send reports
_NOBLOCK, _SNDMORE, _POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN)
_poll = zmq.zmq_poll


class Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 on_message: Callable[[zmq.Frame, list[bytes]], None]):
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.dropped_sends = 0
        self.wakeups = 0
        self._scheduled = False
        self._draining = False
        self._closed = False
        self._poll_set = [(sock, _POLLIN)]
        loop.add_reader(sock.FD, self._drain)
        self.kick()     # the FD may have fired before we listened: look once regardless

    def kick(self) -> None:
        """Drain soon: after a send from outside a drain, which may have eaten the FD's edge."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed or self._draining:
            return
        sock = self.sock
        poll_set = self._poll_set
        self.wakeups += 1
        self._draining = True
        try:
            for _ in range(BATCH):
                # A zero-timeout zmq_poll both tells whether a message waits and processes the
                # socket's pending commands; cheaper than getsockopt(EVENTS), far cheaper than
                # running into zmq.Again.
                if not _poll(poll_set, 0):
                    return
                # Frames, not bytes: Frame.more is free where getsockopt(RCVMORE) is not, and for
                # a ROUTER the first frame's metadata (Peer-Address) tells the peer's uid and pid.
                head = frame = sock.recv(_NOBLOCK, copy=False)
                rest = []
                while frame.more:
                    frame = sock.recv(_NOBLOCK, copy=False)
                    rest.append(frame.bytes)
                self.on_message(head, rest)
            self.kick()     # more may be waiting: let timers and the other socket run first
        finally:
            self._draining = False

    def send(self, frames: list[bytes]) -> int:
        """Send without blocking: SENT, FULL (the peer's queue is full) or GONE (disconnected)."""
        try:
            # frame by frame with plain int flags: send_multipart's enum arithmetic costs more
            # than the sends themselves
            for f in frames[:-1]:
                self.sock.send(f, _NOBLOCK | _SNDMORE)
            self.sock.send(frames[-1], _NOBLOCK)
            result = SENT
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                raise
            self.dropped_sends += 1
            result = FULL if e.errno == zmq.EAGAIN else GONE
        if not self._draining:
            self.kick()
        return result

    def reachable(self, ident: bytes, probe: bytes) -> bool:
        """Send a probe to one peer of a ROUTER socket: False once that peer has disconnected."""
        try:
            self.sock.send(ident, _NOBLOCK | _SNDMORE)
            self.sock.send(probe, _NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            if e.errno != zmq.EAGAIN:    # a full queue means a live but slow peer
                raise
        finally:
            # A failed send eats an edge as a good one does: without this drain, a message that
            # came in while the departed peers were probed waited for the next one to wake it.
            if not self._draining:
                self.kick()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self.sock.FD)
        except (ValueError, OSError, zmq.ZMQError):
            pass
        self.sock.close(linger=0)
