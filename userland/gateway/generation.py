"""A generation as both APIs make it: start a generate or chat call, learn at once whether llmos
took it, then read its chunks until its END.

Never: shape an answer; openai_api.py and ollama_api.py do, each as its clients expect.
"""

from __future__ import annotations

from typing import Any

from syscalls import AsyncConnection
from syscalls.client import AsyncStream
from syscalls.errors import LLMOSError

from .responses import from_llmos


async def start(conn: AsyncConnection, call: str, args: dict, param: str) -> tuple[AsyncStream, Any]:
    """Start a generate or chat call and wait for its first chunk (None: it ended at once), so
    that a refusal (a bad argument, an unknown model, a full run queue) is an HTTP status rather
    than a stream that breaks. ``param`` is the field an EINVAL is blamed on."""
    try:
        stream = await getattr(conn, call)(**args)
        try:
            return stream, await stream.__anext__()
        except StopAsyncIteration:
            return stream, None
    except LLMOSError as e:
        raise from_llmos(e, param) from None


async def following(stream: AsyncStream) -> Any:
    """The stream's next chunk, or None once it has ended (its END is in ``stream.result``)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def finish_reason(end: dict) -> str:
    """llmos's finish (stop, length, cancelled, error) as OpenAI's and Ollama's done reason."""
    return "length" if end.get("finish") == "length" else "stop"
