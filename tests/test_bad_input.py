"""Whatever a peer sends, the kernel answers with an error or drops and counts it, and lives on."""

import os
import random
import threading

import msgpack
import pytest
import zmq

from conftest import wait_until
from syscalls import errors, wire


class Raw:
    """A bare DEALER socket: what a buggy or hostile program could send."""

    def __init__(self, llmos):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(llmos.paths.programs_endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def reply(self, timeout_ms: int = 5000) -> list:
        while True:
            assert self.sock.poll(timeout_ms), "no reply from the kernel"
            msg = msgpack.unpackb(self.sock.recv(), raw=False)
            if msg[1] != wire.PING:      # the kernel's liveness probes are not replies
                return msg

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(llmos):
    r = Raw(llmos)
    yield r
    r.close()


def kernel_counters(llmos) -> dict:
    with llmos.connect() as c:
        return c.kstat()["counters"]


def assert_proto_error(msg: list, fragment: str = "") -> None:
    assert msg[:2] == [wire.VERSION, wire.ERR], msg
    assert msg[3] == "EPROTO", msg
    assert fragment in msg[4], msg


def test_garbage_is_answered_with_eproto_and_counted(llmos, raw):
    before = kernel_counters(llmos)["bad_frames"]
    raw.send(b"\xc1\xff\x00 not msgpack")
    assert_proto_error(raw.reply(), "undecodable")
    raw.send(b"a", b"b")
    assert_proto_error(raw.reply(), "expected 1 frame")
    raw.send(wire.call(7, "getpid", {})[:-3])
    assert_proto_error(raw.reply())
    raw.send(msgpack.packb({"not": "an array"}))
    assert_proto_error(raw.reply(), "array")
    raw.send(msgpack.packb([2, wire.CALL, 1, "getpid", {}]))
    assert_proto_error(raw.reply(), "version 2")
    raw.send(msgpack.packb([wire.VERSION, 99, 1]))
    assert_proto_error(raw.reply(), "unknown message type")
    raw.send(msgpack.packb([wire.VERSION, wire.CALL, "id", "getpid", {}]))
    assert_proto_error(raw.reply(), "id")
    raw.send(msgpack.packb([wire.VERSION, wire.CALL, 1, "getpid"]))
    assert_proto_error(raw.reply(), "needs 5 items")
    raw.send(msgpack.packb([wire.VERSION, wire.CALL, 1, "getpid", msgpack.ExtType(5, b"x")]))
    assert_proto_error(raw.reply(), "extension type")
    raw.send(msgpack.packb([wire.VERSION, wire.OK, 1, None]))
    assert_proto_error(raw.reply(), "may not send OK")
    deep = b"\x91" * 100_000 + b"\xc0"           # an array nested 100k deep
    raw.send(deep)
    assert_proto_error(raw.reply())
    raw.send(b"\xdd\xff\xff\xff\xff")            # claims 4 billion items, has none
    assert_proto_error(raw.reply())
    assert kernel_counters(llmos)["bad_frames"] >= before + 12


def test_wrong_calls_get_specific_errors(llmos, raw):
    raw.send(wire.call(1, "no_such_call", {}))
    assert raw.reply()[3:] == ["ENOSYS", "no syscall named 'no_such_call'"]
    raw.send(msgpack.packb([wire.VERSION, wire.CALL, 2, 12345, {}]))
    assert raw.reply()[3] == "ENOSYS"
    raw.send(msgpack.packb([wire.VERSION, wire.CALL, 3, "kill", [1, 2]]))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "map" in message
    raw.send(wire.call(4, "kill", {"pid": "seven"}))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "'pid'" in message and "integer" in message
    raw.send(wire.call(5, "kill", {}))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "missing required argument 'pid'" in message
    raw.send(wire.call(6, "kill", {"pid": 5, "sig": "TERM"}))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "unknown argument 'sig'" in message
    raw.send(wire.call(7, "kill", {"pid": 5, "signal": "BOOM"}))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "TERM" in message and "'BOOM'" in message
    raw.send(wire.call(8, "wait", {"pid": 2, "timeout": -1.0}))
    code, message = raw.reply()[3:]
    assert code == "EINVAL" and "'timeout' must be >= 0" in message
    raw.send(wire.call(9, "kill", {"pid": True}))
    assert raw.reply()[3] == "EINVAL"        # a boolean is not a pid
    raw.send(wire.call(10, "shutdown", {}))
    code, message = raw.reply()[3:]
    assert code == "EPERM" and "privilege" in message
    raw.send(wire.call(11, "getpid", {}))
    reply = raw.reply()
    assert reply[1] == wire.OK and reply[2] == 11 and reply[3] > 1


def test_oversize_frame_is_refused_and_others_are_served(llmos, raw):
    raw.send(wire.call(1, "put", {"key": "big", "value": b"x" * (wire.MAX_MESSAGE + 1)}))
    assert not raw.sock.poll(300), "an oversize frame must never be processed"
    with llmos.connect() as c:
        assert c.getpid() > 1
        with pytest.raises(errors.ENOENT):
            c.get("big")


def test_random_mutations_never_hurt_the_kernel(llmos, raw):
    rng = random.Random(1234)
    valid = [wire.call(i, name, args) for i, (name, args) in enumerate([
        # (no kill: a mutated pid could name the test's own process)
        ("getpid", {}), ("ps", {}), ("put", {"key": "k", "value": 1}),
        ("recv", {"timeout": 0.0}), ("wait", {"pid": 3, "timeout": 0.0}), ("uname", {})], 1)]
    sent = 0
    for _ in range(3000):
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(frame))
            if op < 0.5:
                frame[pos] = rng.randrange(256)
            elif op < 0.75:
                del frame[pos:pos + rng.randint(1, 4)]
            else:
                frame[pos:pos] = os.urandom(rng.randint(1, 4))
        raw.send(bytes(frame))
        sent += 1
    with llmos.connect() as c:
        stats = wait_until(lambda: (s := c.kstat())["counters"]["messages"] >= sent and s,
                           timeout=30, what="the kernel to read every mutated frame")
        assert c.getpid() > 1
    assert stats["counters"]["kernel_bugs"] == 0


def test_flood_from_one_client_does_not_starve_others_or_grow_memory(llmos):
    flooder = Raw(llmos)          # sends as fast as it can and never reads its replies
    total = 30_000
    junk = wire.call(1, "no_such_call", {"padding": "x" * 200})

    def flood():
        for _ in range(total):
            flooder.sock.send(junk)    # blocks at the high-water mark until the kernel reads

    with llmos.connect() as c:
        before = c.kstat()
        thread = threading.Thread(target=flood)
        thread.start()
        served = 0
        while thread.is_alive():
            assert c.getpid() > 1      # the well-behaved program is served throughout
            served += 1
        thread.join()
        stats = wait_until(
            lambda: (s := c.kstat())["counters"]["unknown_calls"] >=
            before["counters"]["unknown_calls"] + total and s,
            timeout=60, what="the kernel to answer the whole flood")
    flooder.close()
    assert served > 10
    # The flooder's unread replies pile up only to the socket's high-water mark, then are dropped.
    assert stats["counters"]["replies_dropped"] > 0
    assert stats["rss"] - before["rss"] < 64 << 20, f"kernel grew by {stats['rss'] - before['rss']}"


def test_too_many_calls_in_flight_get_eagain(llmos, raw):
    # recv with a long timeout keeps each call open in the kernel
    for i in range(1, 258):
        raw.send(wire.call(i, "recv", {"timeout": 30.0}))
    # all but the first may be refused: only one recv may wait at once; then the in-flight cap
    codes = set()
    for _ in range(256):
        msg = raw.reply()
        codes.add(msg[3] if msg[1] == wire.ERR else "OK")
    assert "EAGAIN" in codes
    raw.send(wire.call(1, "getpid", {}))
    reply = raw.reply()
    assert reply[3] == "EPROTO" and "already in flight" in reply[4]
