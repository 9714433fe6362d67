"""Storage: versions, compare-and-set, limits, namespaces, and durability across kill -9."""

import asyncio
import os
import signal
import sqlite3

import pytest

import syscalls
from conftest import Booted, process_exists, wait_until
from services.storage import Storage
from syscalls import errors
from syscalls.paths import Paths

LIMITS = "\n[storage]\nvalue_limit = 1000\nquota_bytes = 5000\n"


@pytest.fixture
def small(home):
    with open(home / "config.toml", "a") as f:
        f.write(LIMITS)
    system = Booted(home).boot()
    yield system
    system.shutdown()


def test_put_get_versions_and_compare_and_set(llmos):
    with llmos.connect() as c:
        assert c.put("a/1", "one")["version"] == 1
        assert c.put("a/1", {"n": 1, "tags": ["x"]})["version"] == 2
        assert c.get("a/1") == {"value": {"n": 1, "tags": ["x"]}, "version": 2}
        c.put("a/2", b"\x00\xff")
        c.put("b/1", 3.5)
        with pytest.raises(errors.ECONFLICT, match="version 2, not 1"):
            c.put("a/1", "stale", if_version=1)
        with pytest.raises(errors.ECONFLICT, match="is at version 2"):
            c.put("a/1", "new", if_version=0)
        assert c.put("a/3", "fresh", if_version=0)["version"] == 1
        assert c.put("a/1", "cas", if_version=2)["version"] == 3
        assert [e["key"] for e in c.list("a/")] == ["a/1", "a/2", "a/3"]
        assert [e["key"] for e in c.list()] == ["a/1", "a/2", "a/3", "b/1"]
        assert len(c.list(limit=2)) == 2
        assert c.get("a/2")["value"] == b"\x00\xff"
        with pytest.raises(errors.ECONFLICT):
            c.delete("a/1", if_version=1)
        c.delete("a/1", if_version=3)
        with pytest.raises(errors.ENOENT, match="a/1"):
            c.get("a/1")
        with pytest.raises(errors.ENOENT):
            c.delete("a/1")
        with pytest.raises(errors.EINVAL, match="'key'"):
            c.put("x" * 600, 1)


def test_value_limit_and_quota(small):
    with small.connect() as c:
        with pytest.raises(errors.E2BIG, match="limit is 1000"):
            c.put("big", "x" * 2000)
        for i in range(5):
            c.put(f"k{i}", "x" * 900)
        usage = c.usage()
        assert usage["quota"] == 5000 and 4500 < usage["bytes"] <= 5000 and usage["keys"] == 5
        with pytest.raises(errors.EDQUOT, match="quota of 5000 bytes"):
            c.put("k5", "x" * 900)
        c.put("k0", "small")                       # shrinking a value is always allowed
        c.put("k5", "x" * 500)                     # and frees room
        assert c.usage()["keys"] == 6
        # this process made every write, so its net counter equals what its user stores
        assert c.ps(pid=c.getpid())[0]["bytes_stored"] == c.usage()["bytes"]
        assert c.delete("k5")["delta"] < 0
        assert c.usage()["keys"] == 5
        assert c.ps(pid=c.getpid())[0]["bytes_stored"] == c.usage()["bytes"]


def test_namespace_permissions(tmp_path):
    """Access rules, checked on the service itself: all test processes share one OS user."""
    paths = Paths(tmp_path)
    paths.ensure()
    store = Storage(paths, log=None)
    asyncio.run(store.start())
    alice = {"uid": 1000, "privileged": False}
    bob = {"uid": 1001, "privileged": False}
    root = {"uid": 0, "privileged": True}

    def write(fn, args, caller):
        full = {"if_version": None, "ns": None, **args}
        return fn(full, caller)

    write(store._ns_create, {"name": "team", "mode": "r"}, alice)
    with pytest.raises(errors.EEXIST):
        write(store._ns_create, {"name": "team", "mode": "r"}, bob)
    with pytest.raises(errors.EINVAL):
        write(store._ns_create, {"name": "user:5", "mode": "r"}, bob)
    write(store._put, {"key": "plan", "value": "v1", "ns": "team"}, alice)
    assert store.op_get({"key": "plan", "ns": "team"}, bob)["value"] == "v1"
    with pytest.raises(errors.EPERM, match="may not write"):
        write(store._put, {"key": "plan", "value": "bob's", "ns": "team"}, bob)
    with pytest.raises(errors.EPERM):
        write(store._ns_chmod, {"name": "team", "mode": "rw"}, bob)
    write(store._ns_chmod, {"name": "team", "mode": "rw"}, alice)
    write(store._put, {"key": "plan", "value": "bob's", "ns": "team"}, bob)
    write(store._ns_chmod, {"name": "team", "mode": ""}, alice)
    with pytest.raises(errors.EPERM, match="may not read"):
        store.op_get({"key": "plan", "ns": "team"}, bob)
    assert store.op_get({"key": "plan", "ns": "team"}, root)["value"] == "bob's"
    # private namespaces
    write(store._put, {"key": "diary", "value": "dear"}, alice)
    with pytest.raises(errors.EPERM, match="private"):
        store.op_get({"key": "diary", "ns": "user:1000"}, bob)
    with pytest.raises(errors.ENOENT):
        store.op_get({"key": "diary"}, bob)         # bob's own namespace has no diary
    with pytest.raises(errors.ENOENT, match="ns_create"):
        store.op_get({"key": "x", "ns": "nonesuch"}, bob)
    # bytes count against the namespace owner
    assert store.op_usage({}, alice)["bytes"] > 0 and store.op_usage({}, bob)["bytes"] == 0
    assert [n["name"] for n in store.op_ns_list({}, bob)] == []       # mode "" hides it
    assert [n["name"] for n in store.op_ns_list({}, alice)] == ["team"]
    store.db.close()


def _storm(llmos, kill) -> dict[str, int]:
    """Writers put as fast as they can; `kill()` strikes mid-way; returns every acknowledged put."""
    acked: dict[str, int] = {}

    async def writer(conn, w, stop):
        i = 0
        while not stop.is_set():
            try:
                await conn.put(f"s{w}/{i}", i)
                acked[f"s{w}/{i}"] = i
            except errors.LLMOSError:
                return        # the kernel is gone; unacknowledged writes may or may not be there
            i += 1

    async def main():
        conns = [await syscalls.connect_async(llmos.home) for _ in range(4)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(conns[w % 4], w, stop)) for w in range(16)]
        while len(acked) < 300:
            await asyncio.sleep(0.005)
        kill()
        await asyncio.sleep(0.3)    # let writes race the crash (this is load, not synchronisation)
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            t.cancel()
        for c in conns:
            await c.abort()

    asyncio.run(main())
    return acked


def _check(llmos, acked):
    with llmos.connect() as c:
        for key, value in acked.items():
            assert c.get(key)["value"] == value, key
    db = sqlite3.connect(llmos.paths.data / "storage.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_acknowledged_puts_survive_kill_9_of_storage(llmos):
    pid = llmos.service("storage")["pid"]
    acked = _storm(llmos, lambda: os.kill(pid, signal.SIGKILL))
    assert len(acked) > 300
    _check(llmos, acked)


def test_acknowledged_puts_survive_kill_9_of_the_kernel_and_a_reboot(llmos):
    storage = llmos.service("storage")["pid"]
    acked = _storm(llmos, lambda: os.kill(llmos.kernel_pid, signal.SIGKILL))
    wait_until(lambda: not process_exists(llmos.kernel_pid), 5, "the kernel to die")
    wait_until(lambda: not process_exists(storage), 5, "storage to die with its kernel")
    assert llmos.paths.kernel_pid() is None           # the stale pidfile holds no lock
    llmos.boot()                                     # a stale pidfile and sockets are taken over
    _check(llmos, acked)
    llmos.shutdown()
    llmos.boot()                                     # and a clean reboot
    _check(llmos, acked)
