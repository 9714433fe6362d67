"""What a service leaves with the kernel, to have it back when it is restarted (MINIX 3's data store).

A service that holds state for programs (the inference service: their open contexts) sends
``EVENT keep {key, pid, value}`` whenever that state changes, and asks for it all with the service
call ``kernel.kept`` as it starts again after a death. The kernel stores the values as they came,
never looking inside them; a record with a pid goes when that process ends (its owner is gone),
and every record goes when the kernel stops. value None deletes a record.

Bounded: ``MAX_RECORDS`` per service and ``MAX_BYTES`` of values; a record past either bound is
refused with a warning in the kernel's log, and the service's state for it is lost at its next
death as it would have been without this store.
"""

from __future__ import annotations

import msgpack

from .supervisor import Service

MAX_RECORDS = 65536
MAX_BYTES = 256 << 20


def keep(svc: Service, data: dict, log) -> None:
    """EVENT keep from svc: store, replace or (value None) delete one record."""
    key, pid, value = data.get("key"), data.get("pid"), data.get("value")
    if type(key) is not str or (pid is not None and type(pid) is not int):
        log.warning("keep_refused", service=svc.name, why="key must be a string and pid an int or null")
        return
    old = svc.kept.pop(key, None)
    if old is not None:
        svc.kept_bytes -= old[2]
    if value is None:
        return
    size = len(msgpack.packb(value, use_bin_type=True))
    if len(svc.kept) >= MAX_RECORDS or svc.kept_bytes + size > MAX_BYTES:
        log.warning("keep_refused", service=svc.name, key=key[:64], records=len(svc.kept),
                    bytes=svc.kept_bytes, why=f"past {MAX_RECORDS} records or {MAX_BYTES} bytes")
        return
    svc.kept[key] = (pid, value, size)
    svc.kept_bytes += size


def kept(kernel, origin: Service, args: dict) -> list[dict]:
    """The service call ``kernel.kept``: every record the calling service left, of live processes."""
    return [{"key": key, "pid": pid, "value": value} for key, (pid, value, _) in origin.kept.items()
            if pid is None or ((proc := kernel.table.get(pid)) is not None and proc.alive)]


def process_ended(services, pid: int) -> None:
    """A process has ended: what any service kept for it goes."""
    for svc in services:
        for key in [k for k, (p, _, _) in svc.kept.items() if p == pid]:
            svc.kept_bytes -= svc.kept.pop(key)[2]
