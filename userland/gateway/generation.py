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

from .responses import ApiError, from_llmos


class Generation:
    """One generate or chat call being read: ``await next()`` for each chunk (None once it has
    ended, its END then in ``result``); ``aclose()`` gives up on the rest."""

    def __init__(self, stream: AsyncStream, metrics):
        self.stream, self.metrics = stream, metrics
        self.last = time.monotonic()

    @property
    def result(self) -> dict:
        return self.stream.result

    async def next(self) -> Any:
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            return None
        now = time.monotonic()
        self.metrics.tokens_came(now - self.last, len(chunk.get("tokens") or ()))
        self.last = now
        return chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def start(conn: AsyncConnection, call: str, args: dict, param: str,
                metrics) -> tuple[Generation, Any]:
    """Start a generate or chat call and wait for its first chunk (None: it ended at once), so
    that a refusal (a bad argument, an unknown model, a full run queue) is an HTTP status rather
    than a stream that breaks. ``param`` is the field an EINVAL is blamed on."""
    began = time.monotonic()
    try:
        stream = await getattr(conn, call)(**args)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return Generation(stream, metrics), None
    except LLMOSError as e:
        raise from_llmos(e, param) from None
    except (UnicodeEncodeError, OverflowError) as e:     # JSON can say what msgpack cannot carry
        raise ApiError(400, f"the request holds a value llmos cannot carry ({e}); strings must be "
                            f"valid Unicode (no lone surrogates)", param=param) from None
    generation = Generation(stream, metrics)
    metrics.first_token(generation.last - began)
    return generation, first


def finish_reason(end: dict) -> str:
    """llmos's finish (stop, length, cancelled, error) as OpenAI's and Ollama's done reason."""
    return "length" if end.get("finish") == "length" else "stop"
