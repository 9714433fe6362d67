"""Services crash, hang and come back; calls in flight end with a value or a clear error."""

import asyncio
import os
import signal
import time

import msgpack
import pytest
import zmq

import syscalls
from conftest import process_exists, wait_until
from syscalls import errors, wire


def ready_again(llmos, name: str, old_pid: int, timeout: float) -> dict:
    def back():
        svc = llmos.service(name)
        return svc if svc["state"] == "READY" and svc["pid"] not in (None, old_pid) else None
    return wait_until(back, timeout, f"{name} to be restarted")


def test_killed_service_is_back_within_2s(llmos):
    old = llmos.service("storage")
    os.kill(old["pid"], signal.SIGKILL)
    started = time.monotonic()
    new = ready_again(llmos, "storage", old["pid"], timeout=2)
    assert time.monotonic() - started < 2
    assert new["restarts"] == old["restarts"] + 1
    assert "SIGKILL" in new["last_exit"]
    with llmos.connect() as c:
        c.put("after", 1)
        assert c.get("after")["value"] == 1


def test_calls_in_flight_survive_a_crash(llmos):
    """Writers keep many puts in flight while storage is killed: each ends, none is lost."""
    acked: dict[str, int] = {}
    failed: list[str] = []

    async def writer(conn, w: int, stop: asyncio.Event):
        i = 0
        while not stop.is_set():
            key = f"w{w}/{i}"
            try:
                await conn.put(key, i)
                acked[key] = i
            except errors.ESRVDOWN as e:
                failed.append(str(e))
            i += 1

    async def main():
        conns = [await syscalls.connect_async(llmos.home) for _ in range(4)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(conns[w % 4], w, stop)) for w in range(32)]
        while len(acked) < 200:
            await asyncio.sleep(0.01)
        pid = llmos.service("storage")["pid"]
        # Freeze it first, so that calls are surely in flight inside it when it dies.
        os.kill(pid, signal.SIGSTOP)
        await asyncio.to_thread(wait_until, lambda: llmos.service("storage")["in_flight"] > 0,
                                5, "calls to be in flight in the frozen storage")
        os.kill(pid, signal.SIGKILL)
        before = len(acked)
        while len(acked) < before + 200:          # writes go on after the restart
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)   # no call hangs
        for c in conns:
            await c.close()
        return pid

    old_pid = asyncio.run(main())
    assert not failed, failed[:3]          # put is idempotent: retried, never an error
    with llmos.connect() as c:
        assert c.kstat()["counters"]["retries"] >= 1
        for key, value in acked.items():
            assert c.get(key)["value"] == value
    assert llmos.service("storage")["pid"] != old_pid


def test_calls_wait_while_a_service_restarts(llmos):
    with llmos.connect() as c:
        c.put("k", "v")
        pid = llmos.service("storage")["pid"]
        os.kill(pid, signal.SIGKILL)
        assert c.get("k")["value"] == "v"        # waits for the new storage, then succeeds


def test_stopped_service_is_detected_by_missed_pings_and_replaced(llmos):
    old = llmos.service("storage")
    os.kill(old["pid"], signal.SIGSTOP)
    new = ready_again(llmos, "storage", old["pid"], timeout=5)
    assert not process_exists(old["pid"])
    assert "SIGKILL" in new["last_exit"]
    assert "no pong" in (llmos.paths.log_file("kernel").read_text())
    with llmos.connect() as c:
        c.put("alive", True)


def test_too_many_restarts_mark_a_service_failed_until_restarted(llmos):
    def settled():
        svc = llmos.service("storage")
        return svc if svc["state"] == "FAILED" or (svc["state"] == "READY" and svc["pid"]) else None

    for _ in range(6):                           # max_restarts = 5 in the test config
        svc = wait_until(settled, 10, "storage to be READY or FAILED")
        if svc["state"] == "FAILED":
            break
        os.kill(svc["pid"], signal.SIGKILL)
        wait_until(lambda: (s := settled()) and s["pid"] != svc["pid"], 10, "storage to settle")
    assert llmos.service("storage")["state"] == "FAILED"
    with llmos.connect() as c:
        with pytest.raises(errors.ESRVDOWN, match="FAILED"):
            c.get("anything")
        with pytest.raises(errors.EPERM):
            c.service_restart("storage")
        with pytest.raises(errors.ENOENT, match="no service named"):
            llmos.connect(privileged=True).service_restart("nonesuch")
    with llmos.connect(privileged=True) as root:
        root.service_restart("storage")
        wait_until(lambda: llmos.service("storage")["state"] == "READY", 5, "storage to restart")
        root.put("k", 1)
        assert root.get("k")["value"] == 1


def test_service_socket_accepts_only_the_services_the_kernel_started(llmos):
    with llmos.connect() as c:
        c.put("secret", "original")
        before = c.kstat()["counters"]["forged_service_messages"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(llmos.paths.services_endpoint)
    sock.send(wire.hello("storage", {"token": "0" * 32, "pid": os.getpid()}))
    sock.send(wire.ok(1, {"version": 99}))
    sock.send(msgpack.packb([wire.VERSION, wire.CALL, 1, "put", {"key": "secret", "value": "x"}]))
    sock.send(b"garbage")
    assert not sock.poll(300), "the kernel must answer an impostor nothing"
    sock.close()
    with llmos.connect() as c:
        assert c.get("secret")["value"] == "original"
        assert c.kstat()["counters"]["forged_service_messages"] >= before + 4
    assert llmos.service("storage")["state"] == "READY"
