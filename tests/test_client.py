"""The client library, one suite run over both transports (blocking and asyncio) against a real
llmos with the tiny model: the two connections must behave the same, call for call."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

import syscalls
from conftest import wait_until
from syscalls import errors, wire
from tiny_system import tiny_system  # noqa: F401

PROMPT = [{"role": "user", "content": "Say something."}]


class Client:
    """A connection of one transport, and how to finish what its methods return: the blocking
    one returns values, the asyncio one awaitables, run here to completion on a loop of its own."""

    def __init__(self, transport: str, home, **kw):
        self.loop = asyncio.new_event_loop() if transport == "asyncio" else None
        self.conn = self.run(syscalls.connect_async(home, **kw) if self.loop else syscalls.connect(home, **kw))

    def run(self, value):
        return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def next(self, stream):
        return self.run(stream.__anext__()) if self.loop else next(stream)

    def close(self) -> None:
        self.run(self.conn.close())
        if self.loop:
            self.loop.close()


@pytest.fixture(params=["blocking", "asyncio"])
def client(request, tiny_system):  # noqa: F811
    c = Client(request.param, tiny_system.home, timeout=30)
    yield c
    c.close()


def test_calls_return_values_and_raise_their_errors(client):
    run, conn = client.run, client.conn
    assert run(conn.getpid()) == conn.pid > 1
    assert run(conn.put("client/k", {"n": 1}))["version"] >= 1
    assert run(conn.get("client/k"))["value"] == {"n": 1}
    with pytest.raises(errors.ENOENT):
        run(conn.get("client/missing"))
    with pytest.raises(errors.EINVAL, match="pid"):
        run(conn.call("kill", pid="one"))


def test_stream_text_and_chunks(client):
    run, conn = client.run, client.conn
    stream = run(conn.generate("Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True))
    first = client.next(stream)
    assert stream.chunks == [first] and not stream.done
    text = run(stream.text)                     # waits for the rest, the chunk read first included
    assert stream.done and text and text == "".join(c.text for c in stream.chunks)
    assert stream.result.generated_tokens == 24 == sum(len(c.tokens) for c in stream.chunks)
    assert run(stream.text) == text             # read again: the same, without another call
    again = run(conn.generate("Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True))
    assert run(again.text) == text              # greedy: the same answer
    reply = run(conn.chat(PROMPT, max_tokens=8))
    assert isinstance(run(reply.text), str) and reply.result.generated_tokens <= 8


def test_a_frame_the_kernel_cannot_decode_fails_its_own_call(client):
    """The kernel answers an undecodable frame with an ERR of id 0: its caller gets EPROTO (the
    asyncio one used to hang), and the calls in flight beside it go on as if nothing happened."""
    run, conn = client.run, client.conn
    stream = run(conn.generate("Once upon a time", max_tokens=32, ignore_eos=True))
    too_big = {str(i): i for i in range(wire.MAX_MAP + 1)}      # more entries than a frame may hold
    with pytest.raises(errors.EPROTO, match="put: undecodable .*max_map_len"):
        run(conn.put("client/big", too_big))
    assert run(stream.text) and stream.result.generated_tokens == 32
    assert run(conn.getpid()) == conn.pid       # the connection is still good


def test_a_reply_that_does_not_come_in_time_is_etimedout_and_withdrawn(client, tiny_system):  # noqa: F811
    run, conn = client.run, client.conn
    conn.timeout = 0.3
    began = time.monotonic()
    with pytest.raises(errors.ETIMEDOUT, match=r"recv: no reply within 0.3s"):
        run(conn.recv(timeout=30))              # the kernel would hold it for 30 s
    assert time.monotonic() - began < 3
    with tiny_system.connect() as other:        # withdrawn in the kernel: no recv is left to
        wait_until(lambda: other.ps(pid=conn.pid)[0]["state"] == "RUNNING", 5, "recv to be withdrawn")
        other.send(conn.pid, "kept")            # swallow this message
    conn.timeout = 30
    assert run(conn.recv(timeout=5))["data"] == "kept"


def test_a_closed_connection_refuses_calls_and_streams(client):
    run, conn = client.run, client.conn
    half_read = run(conn.generate("Once upon a time", max_tokens=2000, ignore_eos=True))
    client.next(half_read)
    run(conn.close())
    with pytest.raises(errors.EINVAL, match="generate: the connection is closed"):
        run(conn.generate("hello"))
    with pytest.raises(errors.EINVAL, match="getpid: the connection is closed"):
        run(conn.getpid())
    with pytest.raises(errors.EINVAL, match="the connection is closed"):
        run(conn.stream("chat", messages=PROMPT))
    with pytest.raises(errors.ECANCELED, match="generate: the connection was closed"):
        run(half_read.text)
    run(conn.close())                           # twice is harmless
