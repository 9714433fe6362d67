"""Chats resent whole over HTTP, answered as turns on contexts, so that a conversation's history is
not computed again at every request.

OpenAI's and Ollama's chat APIs are stateless: each request carries the whole conversation. The
process a request runs as (a key's, or the gateway's own without one) has a ``Conversations``:
the contexts (open_context) it holds, each under the digest of the conversation the context has
(its messages, then the reply), at most ``limit`` of them, the least recently used closed first.
A request whose leading messages are a held conversation is a turn on that context with only the
messages after them (chat with ctx); the inference service then reuses the KV of the longest
token prefix the context's history shares with the new prompt. Any other request opens a context
of its own, for its next turn to find.

Exact by construction: a context is used only when its conversation is, message for message
(role and content, by SHA-256), the request's beginning, so the service renders the very prompt
the request would have without it; and the service shares KV only for equal tokens (which a
recompute computes again in one prefill: equal up to how the model's products round). Bounded: at
most ``limit`` contexts per process, whose KV blocks count against the process's kv_blocks limit
and are the first the scheduler takes back when memory is short. They are opened as caches
(``cache``): a held conversation never keeps its model resident, so keep_alive and the memory
budget unload models as if the gateway held none; a turn after an unload recomputes.

Never: guess what a context holds. The service appends the reply to a context's messages when a
turn ends with stop or length; a turn that ends with the gateway unsure how (a client gone, a
stream broken) closes its context.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from typing import Any

from syscalls import errors

# Errors the inference service answers before a turn touches the context's messages: a refused
# turn leaves its context holding the conversation it held.
REFUSALS = ("EAGAIN", "EDQUOT", "EINVAL", "ENOENT")


def extend(digest: bytes, message: dict) -> bytes:
    """The digest of a conversation one message longer than the one ``digest`` stands for."""
    return hashlib.sha256(digest + json.dumps([message["role"], message["content"]]).encode()).digest()


def digests(messages: list[dict], model: str | None = None) -> list[bytes]:
    """The digest of each leading part of a conversation with a model: item k-1 stands for
    messages[:k]. The model is part of it: a conversation held on one model is not another's."""
    out, digest = [], hashlib.sha256(json.dumps(model).encode()).digest()
    for m in messages:
        digest = extend(digest, m)
        out.append(digest)
    return out


async def first_chunk(stream) -> Any:
    """A stream's first chunk, or None if it ended without one."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class Turn:
    """A request answered on a context: which, what the context held before (None: opened for
    it), and the digest of the request's messages (the reply makes the context's next one)."""

    def __init__(self, owner: "Conversations", conn, ctx: int, before: bytes | None, request: bytes):
        self.owner, self.conn, self.ctx, self.before, self.request = owner, conn, ctx, before, request

    def ended(self, reply: str, end: dict | None) -> None:
        """The answer's text and its END (None: the gateway does not know how it ended)."""
        self.owner._ended(self, reply, end)


class Conversations:
    """The contexts one process holds for HTTP chats, by the digest of the conversation in each.
    Its calls are made on that process's connection, which it is handed and never keeps (the
    gateway finds it by the connection, held weakly)."""

    def __init__(self, limit: int, log):
        self.limit, self.log = limit, log
        self.idle: OrderedDict[bytes, int] = OrderedDict()    # digest -> ctx, least recent first
        self.taken = 0                   # contexts out of idle: a turn on each, or being opened
        self._closing: set[asyncio.Task] = set()     # close_context calls under way

    def held(self) -> int:
        return len(self.idle) + self.taken

    async def chat(self, conn, args: dict) -> tuple[Any, Any, Turn | None]:
        """Start the chat call of args (the whole conversation in ``messages``), on the context
        that holds the longest leading part of it, or on a new one, or (none free) on none; its
        stream, first chunk and Turn. Raises what the call raises."""
        messages = args["messages"]
        chain = digests(messages, args.get("model"))
        for k in range(len(messages) - 1, 0, -1):
            ctx = self.idle.pop(chain[k - 1], None)
            if ctx is None:
                continue
            self.taken += 1
            started = await self._turn(conn, ctx, chain[k - 1], chain[-1],
                                       dict(args, messages=messages[k:]))
            if started is not None:
                return started
            break
        ctx = await self._open(conn, args.get("model"))
        if ctx is not None:
            started = await self._turn(conn, ctx, None, chain[-1], args)
            if started is not None:
                return started
        stream = await conn.chat(**args)
        return stream, await first_chunk(stream), None

    async def _open(self, conn, model: str | None) -> int | None:
        """A new context, taken for a turn, making room by closing the least recently used; None
        when there is no room (every one is in a turn) or llmos refuses one."""
        while self.idle and self.held() >= self.limit:
            self._close(conn, self.idle.popitem(last=False)[1])
        if self.held() >= self.limit:
            return None
        self.taken += 1
        try:
            return await conn.open_context(model=model, cache=True)    # keeps no model resident
        except errors.LLMOSError as e:      # the chat call that follows says why, if it fails too
            self.taken -= 1
            self.log.info("context_refused", error=str(e))
            return None
        except BaseException:
            self.taken -= 1
            raise

    async def _turn(self, conn, ctx: int, before: bytes | None, request: bytes, args: dict):
        """Start the call on a taken context; None if the context is gone (EBADF: the inference
        service restarted, whose handles are never used again, or closed it with its model)."""
        turn = Turn(self, conn, ctx, before, request)
        try:
            stream = await conn.chat(**args, ctx=ctx)
            first = await first_chunk(stream)
        except errors.EBADF:
            self.taken -= 1
            self.log.info("context_gone", ctx=ctx)
            return None
        except errors.LLMOSError as e:
            refused = before is not None and e.code in REFUSALS
            self._ended(turn, "", None, keep=refused)
            raise
        except BaseException:               # cancelled (the client went away), or not sent
            self._ended(turn, "", None)
            raise
        return stream, first, turn

    def _ended(self, turn: Turn, reply: str, end: dict | None, keep: bool = False) -> None:
        """A turn is over: hold its context under the conversation it has now, or (keep) under
        the one it had, or close it when that is not known."""
        self.taken -= 1
        finish = None if end is None else end.get("finish")
        if finish in ("stop", "length"):        # the service appended the reply
            reply_digest = extend(turn.request, {"role": "assistant", "content": reply})
            self._hold(turn.conn, reply_digest, turn.ctx)
        elif (keep or finish is not None) and turn.before is not None:   # its messages are as they were
            self._hold(turn.conn, turn.before, turn.ctx)
        else:
            self._close(turn.conn, turn.ctx)

    def _hold(self, conn, digest: bytes, ctx: int) -> None:
        twin = self.idle.pop(digest, None)
        if twin is not None:                    # the same conversation twice: the newer stays
            self._close(conn, twin)
        self.idle[digest] = ctx
        while self.idle and self.held() > self.limit:
            self._close(conn, self.idle.popitem(last=False)[1])

    def _close(self, conn, ctx: int) -> None:
        task = asyncio.ensure_future(self._closing_one(conn, ctx))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _closing_one(self, conn, ctx: int) -> None:
        try:
            await conn.close_context(ctx=ctx)
        except errors.LLMOSError as e:      # gone already (its process, or the service restarted)
            self.log.info("context_close_failed", ctx=ctx, error=str(e))
