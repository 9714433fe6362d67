"""Routing: calls forwarded to services, their replies, and what becomes of them when a service dies.

A call to a service is a ``Forwarded`` record, held by its caller (``proc.in_flight``, or the
calling service's ``outgoing``) and by the service: in ``svc.in_flight`` once sent, in
``svc.waiting`` while the service is not READY. Every call ends, with the service's answer or a
named error (principle 3 of kernel.py):

- a service that is not READY holds its calls; ``service_ready`` sends them;
- one that dies under a call retries it at the head of its queue if the row is idempotent, nothing
  of it was streamed and it has not crashed its service twice (a service's call of an idempotent
  syscall too: the inference service's storage.put of save_context); a resumable stream (generate, chat) goes
  back too, its args carrying ``resume``: the tokens its program has had, so the restarted
  service goes on from there and the program sees one unbroken stream; any other call ends with
  ESRVDOWN;
- a FAILED (or STOPPED) service ends its calls with ESRVDOWN at once; a call queued longer than
  ``kernel.call_deadline`` ends with ETIMEDOUT (``expire``).

Never: a branch on a service's name. What a call's caller map holds and what a reply's usage
counts for are the accounting module's, read from the table and the reply.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from syscalls import errors, wire
from syscalls.runtime.channel import FULL, Channel
from syscalls.schema import Syscall
from syscalls.table import BY_NAME

from . import accounting
from .proctable import KERNEL_PID, Process, ProcessTable
from .supervisor import FAILED, READY, STOPPED, Service

# Kills (from outside, or the supervisor's of a hung service) never end a call: only crashes of
# its service count against it, so that a call that crashes its service is not sent for ever.
MAX_CRASHES = 2         # an idempotent call is given up after crashing this many services
MAX_STALLS = 2          # a resumable stream, after this many crashes with no token between

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
    attempts: int = 1                   # times sent to a service
    crashes: int = 0                    # services that crashed (not were killed) holding it
    chunks: int = 0
    delivered: list = field(default_factory=list)   # a resumable stream's tokens, as its CHUNKs had them
    resumed_at: int = 0                 # len(delivered) when it was last resubmitted
    stalls: int = 0                     # deaths in a row under it with no token delivered between
    service: Service | None = None      # the service handling it
    origin: Service | None = None       # the service that made it, for a service-to-service call

    @property
    def waiting_map(self) -> dict:
        """Where the caller's side keeps it: the program's or the calling service's calls."""
        return self.origin.outgoing if self.origin else self.proc.in_flight


class Router:
    """Forwards calls to services and their answers back; the supervisor's ``Events``."""

    def __init__(self, channel: Channel, table: ProcessTable, counters: dict, boot_id: str, uid: int,
                 reply: Callable[[bytes | None, bytes], None]):
        self.channel, self.table = channel, table
        self.counters, self.boot_id, self.uid = counters, boot_id, uid
        self.reply = reply                  # (routing id, frame): to a program
        self.kids = itertools.count(1)      # the kernel's own call ids, unique across programs
        # by name; the supervisor's own map, bound once the supervisor (whose events these are) exists
        self.services: dict[str, Service] = {}

    # == sending =================================================================================
    def forward(self, proc: Process, cid: int, spec: Syscall, args: dict) -> None:
        svc = self.services.get(spec.target)
        if svc is None:
            raise errors.ESRVDOWN(f"{spec.name}: service '{spec.target}' is not enabled in this llmos")
        kid = next(self.kids)
        call = Forwarded(proc, cid, spec, args, kid, f"{self.boot_id}-{kid}", time.monotonic())
        proc.in_flight[cid] = call
        self.dispatch(svc, call)

    def service_call(self, origin: Service, msg: list) -> None:
        """A service asks another for something ("target.op"), through the kernel like all else.

        Ops no syscall names have no row: services are trusted, and the callee checks its own
        arguments. An op that is a syscall of the callee gets its row's caller context. The
        kernel retries these only where the op is an idempotent syscall (service_down); for the
        others the caller decides.
        """
        sid, name, args = msg[2], msg[3], msg[4]
        # the last dot: an op's name has none, a driver instance's may (cpu@qwen2.5)
        target, _, op = name.rpartition(".") if type(name) is str else ("", "", "")
        svc = self.services.get(target)
        if svc is None or not op or not isinstance(args, dict):
            self.channel.send([origin.ident, wire.err(
                sid, "ENOENT", f"no service {target!r} to call {name!r} on (or no op, or args "
                               f"that are not a map)")])
            return
        # A service working for a program may call on its behalf (as_pid): the callee then sees
        # that program as the caller, with its user and its quotas.
        on_behalf = msg[5].get("as_pid") if len(msg) > 5 and isinstance(msg[5], dict) else None
        proc = self.table.get(on_behalf) if type(on_behalf) is int else None
        if proc is None or not proc.alive:
            proc = self.table.get(KERNEL_PID)
        spec = BY_NAME.get(op)
        if spec is None or spec.target != target:
            spec = Syscall(op, target)
        kid = next(self.kids)
        call = Forwarded(proc, sid, spec, args, kid, f"{self.boot_id}-{kid}", time.monotonic(),
                         origin=origin)
        origin.outgoing[sid] = call
        self.dispatch(svc, call)

    def dispatch(self, svc: Service, call: Forwarded) -> None:
        if svc.state == READY:
            call.service = svc
            svc.in_flight[call.kid] = call
            caller = {"pid": call.proc.pid, "uid": call.proc.uid, "privileged": call.proc.privileged,
                      "txid": call.txid}
            if call.origin is not None:
                caller["service"] = call.origin.name
            caller.update(accounting.caller_context(call.proc, call.spec.caller))
            # GONE: the service died and its pidfd has not told us yet; service_down will
            # retry or fail the call like any other call in flight.
            if self.channel.send([svc.ident, wire.service_call(
                    call.kid, call.spec.name, call.args, caller)]) == FULL:
                del svc.in_flight[call.kid]
                self.fail(call, "EAGAIN", f"{call.spec.name}: service '{svc.name}' is overloaded "
                                          f"(its queue is full); try again")
        elif svc.state in (FAILED, STOPPED):
            self.fail(call, "ESRVDOWN", f"{call.spec.name}: service '{svc.name}' is {svc.state}"
                                        f" ({svc.last_exit}); an admin can run service_restart")
        else:
            call.service = svc
            svc.waiting.append(call)

    def tell(self, service: str | None, op: str, args: dict) -> None:
        """The kernel's own call to a service's internal op; nobody waits for its answer, and a
        service that is not up learns the same with its next call."""
        svc = self.services.get(service) if service else None
        if svc is not None and svc.state == READY and svc.ident:
            self.channel.send([svc.ident, wire.service_call(
                next(self.kids), op, args, {"pid": KERNEL_PID, "uid": self.uid, "privileged": True,
                                            "txid": ""})])

    def caller_changed(self, proc: Process) -> None:
        """A process's priority, stopped state or model limits changed: the services that keep
        them between calls hear it now."""
        for service in accounting.PUSHED_TO:
            self.tell(service, "sched_update", accounting.pushed(proc))

    # == answers =================================================================================
    def service_reply(self, svc: Service, msg: list) -> None:
        kind, kid = msg[1], msg[2]
        call = svc.in_flight.get(kid)
        if call is None:
            return                          # the caller cancelled, or died, meanwhile
        if kind != wire.ERR and len(msg) > 4:
            accounting.charge(call.proc, msg[4])     # as it happens: ps and top see a stream grow
        if kind == wire.CHUNK:
            call.chunks += 1
            if call.spec.resumable:
                tokens = msg[3].get("tokens") if isinstance(msg[3], dict) else None
                if isinstance(tokens, list):
                    call.delivered += tokens
            return self.answer(call, wire.chunk(call.cid, msg[3]))
        del svc.in_flight[kid]
        call.waiting_map.pop(call.cid, None)
        if kind == wire.ERR:
            frame = wire.err(call.cid, str(msg[3]), str(msg[4]))
        else:
            frame = (wire.ok if kind == wire.OK else wire.end)(call.cid, msg[3])
        self.answer(call, frame)

    def answer(self, call: Forwarded, frame: bytes) -> None:
        if call.origin is None:
            self.reply(call.proc.ident, frame)
        elif call.origin.ident is not None:
            self.channel.send([call.origin.ident, frame])

    def fail(self, call: Forwarded, code: str, message: str) -> None:
        call.waiting_map.pop(call.cid, None)
        self.answer(call, wire.err(call.cid, code, message))

    def drop(self, call: Forwarded) -> None:
        """Forget a forwarded call; a service already working on it is told to stop."""
        svc = call.service
        if svc is None:
            return
        if svc.in_flight.pop(call.kid, None) is not None:
            if svc.ident:
                self.channel.send([svc.ident, wire.cancel(call.kid)])
        else:
            try:
                svc.waiting.remove(call)
            except ValueError:
                pass

    # == the supervisor's events =================================================================
    def service_ready(self, svc: Service) -> None:
        waiting, svc.waiting = svc.waiting, type(svc.waiting)()
        for call in waiting:
            self.dispatch(svc, call)

    def service_down(self, svc: Service) -> None:
        accounting.record_work(self.table, svc.name, [])     # its model work is gone with it
        outgoing, svc.outgoing = svc.outgoing, {}      # its own calls to others: nobody to answer
        for call in outgoing.values():
            self.drop(call)
        lost, svc.in_flight = svc.in_flight, {}
        retry = []
        back = svc.state not in (FAILED, STOPPED)
        for call in lost.values():
            why = None
            if not back:
                why = "the service has FAILED" if svc.state == FAILED else f"the service is {svc.state}"
            elif call.origin is not None and (call.spec.resumable or not call.spec.idempotent):
                why = "a service's own call (the calling service decides)"
            elif call.spec.resumable:
                why = self._resume(call, svc.crashed)
            elif not call.spec.idempotent:
                why = "it is not idempotent"
            elif call.chunks:
                why = "part of its stream was delivered"
            elif (crashes := call.crashes + svc.crashed) >= MAX_CRASHES:
                why = f"its service crashed {crashes} times under it"
            else:
                call.crashes = crashes
                call.attempts += 1
                self.counters["retries"] += 1
            if why is None:
                retry.append(call)
            else:
                self.fail(call, "ESRVDOWN", f"{call.spec.name}: service '{svc.name}' died while "
                                            f"handling the call ({svc.last_exit}); not retried: {why}")
        svc.waiting.extendleft(reversed(retry))
        if svc.state in (FAILED, STOPPED):
            waiting, svc.waiting = svc.waiting, type(svc.waiting)()
            for call in waiting:
                self.dispatch(svc, call)

    def _resume(self, call: Forwarded, crashed: bool) -> str | None:
        """Send a stream again, to go on after the tokens its program has had; why not, if not.
        A crash of its service with no token since the last one counts as a stall, so that a
        call that crashes its service is not sent again for ever. Kills do not count (a chaos
        run's, an admin's, the supervisor's of a hung service): a call that hangs its service
        is bounded by the supervisor's max_restarts instead."""
        if len(call.delivered) != call.resumed_at:
            call.stalls = 0
        if crashed:
            call.stalls += 1
        if call.stalls >= MAX_STALLS:
            return f"its service failed {call.stalls} times under it without a token between"
        call.args = {**call.args, "resume": {"tokens": list(call.delivered)}}
        call.resumed_at, call.queued_at = len(call.delivered), time.monotonic()
        self.counters["resumed"] += 1
        return None

    def expire(self, now: float, deadline: float) -> None:
        """End every call queued for longer than the deadline (counted from its first forward)."""
        for svc in self.services.values():
            while svc.waiting and now - svc.waiting[0].queued_at > deadline:
                call = svc.waiting.popleft()
                self.fail(call, "ETIMEDOUT", f"{call.spec.name}: service '{svc.name}' did not "
                                             f"come back within {deadline:.0f}s ({svc.state})")
