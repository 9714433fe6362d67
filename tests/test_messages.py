"""Mailboxes and topics between programs; the asyncio client."""

import asyncio

import pytest

import syscalls
from conftest import wait_until
from syscalls import errors


def test_send_recv_in_order_and_errors(llmos):
    with llmos.connect() as a, llmos.connect() as b:
        a.send(b.getpid(), {"n": 1})
        a.send(b.getpid(), "two")
        assert b.recv(timeout=5) == {"from": a.getpid(), "topic": None, "data": {"n": 1}}
        assert b.recv(timeout=5)["data"] == "two"
        with pytest.raises(errors.ETIMEDOUT, match="no message within"):
            b.recv(timeout=0.1)
        with pytest.raises(errors.ESRCH):
            a.send(999_999, "x")
        with pytest.raises(errors.ESRCH):
            a.send(1, "the kernel has no mailbox")


def test_recv_blocks_until_a_message_arrives(llmos):
    async def main():
        a = await syscalls.connect_async(llmos.home)
        b = await syscalls.connect_async(llmos.home)
        waiting = asyncio.create_task(b.recv(timeout=10))

        def blocked():      # observed from a thread, so this loop keeps serving b's call
            with syscalls.connect(llmos.home) as observer:
                wait_until(lambda: observer.ps(pid=b.pid)[0]["state"] == "BLOCKED", 5,
                           "b to block in recv")
        await asyncio.to_thread(blocked)
        await a.send(b.pid, "wake up")
        message = await waiting
        with syscalls.connect(llmos.home) as observer:
            assert observer.ps(pid=b.pid)[0]["state"] == "RUNNING"
        await a.close()
        await b.close()
        return message

    assert asyncio.run(main())["data"] == "wake up"


def test_mailbox_is_bounded(home):
    with open(home / "config.toml", "a") as f:
        f.write("\n[kernel]\nmailbox_messages = 3\n")
    from conftest import Booted
    system = Booted(home).boot()
    try:
        with system.connect() as a, system.connect() as b:
            for i in range(3):
                a.send(b.getpid(), i)
            with pytest.raises(errors.EAGAIN, match="mailbox of pid .* is full .*limits 3 messages"):
                a.send(b.getpid(), 3)
            assert b.recv(timeout=1)["data"] == 0
            a.send(b.getpid(), 3)                     # room again
    finally:
        system.shutdown()


def test_publish_reaches_prefix_subscribers_only(llmos):
    with llmos.connect() as pub, llmos.connect() as s1, llmos.connect() as s2, \
            llmos.connect() as other:
        s1.subscribe("news.")
        s2.subscribe("news.sport")
        other.subscribe("weather")
        assert pub.publish("news.sport.football", "goal") == 2
        assert pub.publish("news.politics", "vote") == 1
        assert s1.recv(timeout=5) == {"from": pub.getpid(), "topic": "news.sport.football",
                                      "data": "goal"}
        assert s1.recv(timeout=5)["topic"] == "news.politics"
        assert s2.recv(timeout=5)["data"] == "goal"
        with pytest.raises(errors.ETIMEDOUT):
            other.recv(timeout=0.1)
        s1.unsubscribe("news.")
        assert pub.publish("news.x", 1) == 0
        with pytest.raises(errors.ENOENT):
            s1.unsubscribe("news.")


def test_async_client_runs_many_calls_at_once(llmos):
    async def main():
        async with await syscalls.connect_async(llmos.home) as c:
            results = await asyncio.gather(*(c.put(f"k{i}", i) for i in range(50)))
            values = await asyncio.gather(*(c.get(f"k{i}") for i in range(50)))
            with pytest.raises(errors.ENOENT):
                await c.get("missing")
            return results, values

    results, values = asyncio.run(main())
    assert all(r["version"] == 1 for r in results)
    assert [v["value"] for v in values] == list(range(50))
