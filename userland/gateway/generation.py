"""A generation as both APIs make it: start a generate or chat call, learn at once whether llmos
took it, then read its chunks until its END, timing them for /metrics as the client sees them.

Never: shape an answer; openai_api.py and ollama_api.py do, each as its clients expect.
"""

from __future__ import annotations

import time
from typing import Any

from syscalls import AsyncConnection
from syscalls.client import AsyncStream
from syscalls.errors import LLMOSError

from .conversations import Conversations, Turn, first_chunk
from .responses import ApiError, from_llmos


class Generation:
    """One generate or chat call being read: ``await next()`` for each chunk (None once it has
    ended, its END then in ``result``); ``aclose()`` gives up on the rest. A chat answered on a
    context (``turn``) tells it, once, the answer's text and how it ended."""

    def __init__(self, stream: AsyncStream, metrics, turn: Turn | None = None):
        self.stream, self.metrics, self.turn = stream, metrics, turn
        self.last = time.monotonic()
        self.texts: list[str] = []

    @property
    def result(self) -> dict:
        return self.stream.result

    def saw(self, chunk: Any) -> Any:
        """Note a chunk read (None: the stream has ended) and hand it on."""
        if chunk is None:
            self._ended(self.stream.result)
        elif self.turn is not None:             # the reply, for the context's conversation
            self.texts.append(chunk["text"])
        return chunk

    async def next(self) -> Any:
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            return self.saw(None)
        now = time.monotonic()
        self.metrics.tokens_came(now - self.last, len(chunk.get("tokens") or ()))
        self.last = now
        return self.saw(chunk)

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self._ended(None)           # before its END: how it ended is not known

    def _ended(self, end: dict | None) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.ended("".join(self.texts), end)


async def start(conn: AsyncConnection, call: str, args: dict, param: str, metrics,
                conversations: Conversations | None = None) -> tuple[Generation, Any]:
    """Start a generate or chat call and wait for its first chunk (None: it ended at once), so
    that a refusal (a bad argument, an unknown model, a full run queue) is an HTTP status rather
    than a stream that breaks. ``param`` is the field an EINVAL is blamed on. A chat with
    ``conversations`` (the caller's) is a turn on the context holding its history, if one does."""
    began = time.monotonic()
    try:
        if conversations is not None:
            stream, first, turn = await conversations.chat(conn, args)
        else:
            stream = await getattr(conn, call)(**args)
            first, turn = await first_chunk(stream), None
    except LLMOSError as e:
        raise from_llmos(e, param) from None
    except (UnicodeEncodeError, OverflowError) as e:     # JSON can say what msgpack cannot carry
        raise ApiError(400, f"the request holds a value llmos cannot carry ({e}); strings must be "
                            f"valid Unicode (no lone surrogates)", param=param) from None
    generation = Generation(stream, metrics, turn)
    if first is not None:
        metrics.first_token(generation.last - began)
    return generation, generation.saw(first)


def finish_reason(end: dict) -> str:
    """llmos's finish (stop, length, cancelled, error) as OpenAI's and Ollama's done reason."""
    return "length" if end.get("finish") == "length" else "stop"
