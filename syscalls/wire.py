"""The wire format: one msgpack frame per message, behind a versioned header.

Every message is a msgpack array whose first two items are the protocol version and the message
type; the third is the id of the call it belongs to (0 where none):

    CALL   [V, CALL,   id, name, args]            program -> kernel
    CALL   [V, CALL,   id, name, args, caller]    kernel -> service (caller: pid, uid, privileged)
    OK     [V, OK,     id, value]                 the one reply of a plain call
    ERR    [V, ERR,    id, code, message]         the one reply of a failed call, or a stream's end
    CHUNK  [V, CHUNK,  id, value]                 one piece of a streaming call ...
    END    [V, END,    id, value]                 ... and its last message
    OK, CHUNK, END  [..., value, usage]           from a service: what the call used (USAGE)
    CANCEL [V, CANCEL, id]                        the caller gives up on call id
    PING   [V, PING,   seq]  /  PONG [V, PONG, seq]   liveness, answered by the receiver's own loop
    HELLO  [V, HELLO,  0, name, info]             a service announces itself (info holds its token)
    EVENT  [V, EVENT,  0, kind, data]             a service tells the kernel something (progress)

Decoding never trusts the peer: sizes are capped, extension types are refused, and anything that
is not one of the shapes above raises ``BadMessage``.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

VERSION = 1

CALL, OK, ERR, CHUNK, END, CANCEL, PING, PONG, HELLO, EVENT = range(1, 11)
TYPE_NAMES = {CALL: "CALL", OK: "OK", ERR: "ERR", CHUNK: "CHUNK", END: "END", CANCEL: "CANCEL",
              PING: "PING", PONG: "PONG", HELLO: "HELLO", EVENT: "EVENT"}

# The largest message a socket accepts (ZMQ_MAXMSGSIZE); libzmq drops the peer's connection when a
# bigger one arrives, so an oversize frame never reaches Python.
MAX_MESSAGE = 8 << 20
MAX_ARRAY = 1 << 20        # a prompt of a million token ids is already absurd
MAX_MAP = 4096
MAX_NAME = 64              # syscall names and service names

# What a service's reply may say a call used, in its usage item: the kernel adds each to the
# calling process's counters (ps) without knowing which service answered. Programs never see it.
USAGE = {
    "tokens_in": "prompt tokens the call had the model read (ps: tokens_in)",
    "tokens_out": "tokens it generated (ps: tokens_out, and tok_s)",
    "storage_bytes": "the change in bytes it stores, negative when it freed some (ps: bytes_stored)",
}

_MIN_LEN = {CALL: 5, OK: 4, ERR: 5, CHUNK: 4, END: 4, CANCEL: 3, PING: 3, PONG: 3, HELLO: 5,
            EVENT: 5}


class BadMessage(ValueError):
    """A frame that is not a well-formed llmos message; the text says what is wrong with it."""


def _no_ext(code: int, data: bytes) -> Any:
    raise BadMessage(f"msgpack extension type {code} is not allowed")


_local = threading.local()


def pack(msg: Any) -> bytes:
    # One Packer per thread: a shared one is not thread-safe, and a new one per call (packb)
    # costs more than the encoding itself on the kernel's hot path.
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(msg)


def unpack(frame: bytes) -> Any:
    """Decode one frame with every length capped; raises BadMessage on anything malformed."""
    try:
        return msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext,
            max_str_len=MAX_MESSAGE, max_bin_len=MAX_MESSAGE, max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP)
    except BadMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise BadMessage(f"undecodable msgpack: {e.__class__.__name__}: {e}") from None


def decode(frame: bytes) -> list:
    """Decode and check the header: version, a known type, enough items, an integer id."""
    msg = unpack(frame)
    if not isinstance(msg, list) or len(msg) < 3:
        raise BadMessage("a message is a msgpack array of at least 3 items [version, type, id, ...]")
    if msg[0] != VERSION:
        raise BadMessage(f"protocol version {msg[0]!r} is not supported (this kernel speaks {VERSION})")
    kind = msg[1]
    if type(kind) is not int or kind not in _MIN_LEN:
        raise BadMessage(f"unknown message type {kind!r}")
    if len(msg) < _MIN_LEN[kind]:
        raise BadMessage(f"{TYPE_NAMES[kind]} needs {_MIN_LEN[kind]} items, got {len(msg)}")
    if type(msg[2]) is not int or not 0 <= msg[2] < 1 << 63:
        raise BadMessage(f"message id must be a non-negative 64-bit integer, got {msg[2]!r}")
    return msg


# Small constructors, so no module spells a message's layout twice.
def call(cid: int, name: str, args: dict) -> bytes:
    return pack([VERSION, CALL, cid, name, args])


def service_call(cid: int, name: str, args: dict, caller: dict) -> bytes:
    return pack([VERSION, CALL, cid, name, args, caller])


def _answer(kind: int, cid: int, value: Any, usage: dict | None) -> bytes:
    return pack([VERSION, kind, cid, value] if usage is None else [VERSION, kind, cid, value, usage])


def ok(cid: int, value: Any, usage: dict | None = None) -> bytes:
    return _answer(OK, cid, value, usage)


def err(cid: int, code: str, message: str) -> bytes:
    return pack([VERSION, ERR, cid, code, message])


def chunk(cid: int, value: Any, usage: dict | None = None) -> bytes:
    return _answer(CHUNK, cid, value, usage)


def end(cid: int, value: Any, usage: dict | None = None) -> bytes:
    return _answer(END, cid, value, usage)


def cancel(cid: int) -> bytes:
    return pack([VERSION, CANCEL, cid])


def ping(seq: int) -> bytes:
    return pack([VERSION, PING, seq])


def pong(seq: int) -> bytes:
    return pack([VERSION, PONG, seq])


def hello(name: str, info: dict) -> bytes:
    return pack([VERSION, HELLO, 0, name, info])


def event(kind: str, data: Any) -> bytes:
    return pack([VERSION, EVENT, 0, kind, data])
