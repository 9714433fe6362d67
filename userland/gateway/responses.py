"""The gateway's HTTP plumbing: errors in the shape each API's clients parse, bodies read within a
limit, and answers made while the client is watched, so that a client that goes away cancels the
syscall behind its request (its stream's ``aclose`` sends CANCEL; the kernel frees its KV).

Never: make a syscall (the API modules do), or answer 500 for anything a client sent.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request

from syscalls.errors import LLMOSError

MAX_BODY = 4 << 20          # bytes of a request body; a syscall frame holds 8 MiB, JSON is no smaller
OPENAI, OLLAMA = "openai", "ollama"      # the two shapes of an error body

# The error type OpenAI's clients expect for a status.
KIND_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error",
                  403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                  413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
# llmos's error codes as HTTP: status, the error's code in OpenAI's body, Retry-After seconds.
FROM_LLMOS = {
    "EINVAL": (400, "invalid_value", None),
    "E2BIG": (413, "request_too_large", None),
    "ENOENT": (404, "model_not_found", None),
    "EAGAIN": (429, "rate_limit_exceeded", 1),
    "EDQUOT": (429, "quota_exceeded", 1),
    "EPERM": (403, "permission_denied", None),
    "ESHUTDOWN": (503, "shutting_down", 5),
    "ECONNREFUSED": (503, "llmos_not_running", 5),
    "ESRVDOWN": (503, "service_unavailable", 5),
    "ETIMEDOUT": (503, "service_unavailable", 5),
}
_RETRY_IN = re.compile(r"try again in (\d+) s")


class ApiError(Exception):
    """An answer other than 200: its status, a message naming what is wrong, and for OpenAI's
    clients the parameter at fault and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self, flavor: str) -> dict:
        if flavor == OLLAMA:
            return {"error": self.message}
        return {"error": {"message": self.message,
                          "type": KIND_OF_STATUS.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"www-authenticate": 'Bearer realm="llmos"'}
        return {} if self.retry_after is None else {"retry-after": str(self.retry_after)}


def from_llmos(e: LLMOSError, param: str | None = None) -> ApiError:
    """A syscall's error as the HTTP answer a client can act on."""
    status, code, retry = FROM_LLMOS.get(e.code, (500, "internal_error", None))
    if e.code == "EDQUOT" and (m := _RETRY_IN.search(e.message)):
        retry = max(1, int(m.group(1)))
    if e.code == "EINVAL" and ("context window" in e.message or "KV cache holds" in e.message):
        code = "context_length_exceeded"
    blamed = param if status == 400 else "model" if status == 404 else None
    return ApiError(status, e.message, param=blamed, code=code, retry_after=retry)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def read_json(request: Request) -> dict:
    """The request's body as a JSON object: 413 past MAX_BODY, 400 for anything else but one."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is {length} bytes; at most {MAX_BODY} are accepted",
                       code="request_too_large")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes, the most "
                                    f"accepted", code="request_too_large")
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its request body ended") from None
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(value).__name__}",
                       code="invalid_json")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# -- answering --------------------------------------------------------------------------------------
class Sender:
    """What an answer is written with: one JSON response, or a stream started once."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], flavor: str):
        self._send, self.flavor = send, flavor
        self.started = False
        self.status = 0

    async def start(self, status: int, content_type: str) -> None:
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type.encode()), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def json(self, value: Any, status: int = 200, headers: dict | None = None) -> None:
        data = dumps(value)
        self.started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def error(self, e: ApiError) -> None:
        await self.json(e.body(self.flavor), e.status, e.headers())


class Watched:
    """An answer made by ``make(sender)`` while the client is watched. If the client goes away
    first, ``make`` is cancelled where it waits, and with it the syscall it waits on. An
    ApiError before the answer has started is answered as itself; a bug is logged and answered
    500 (or ends the stream), and the gateway goes on."""

    def __init__(self, make: Callable[[Sender], Awaitable[None]], flavor: str, log):
        self.make, self.flavor, self.log = make, flavor, log

    async def __call__(self, scope, receive, send) -> None:
        out = Sender(send, self.flavor)
        work = asyncio.ensure_future(self._answer(out))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            self.log.info("client_gone", path=scope.get("path"))
            work.cancel()
        try:
            await work
        except asyncio.CancelledError:
            pass

    async def _answer(self, out: Sender) -> None:
        try:
            await self.make(out)
        except ApiError as e:
            if not out.started:
                await out.error(e)
            else:
                await out.end()
        except asyncio.CancelledError:
            raise
        except Exception as e:          # a bug of the gateway's: loud, but it lives on
            self.log.exception("gateway_bug", error=repr(e))
            if not out.started:
                await out.error(ApiError(500, f"internal error in the gateway ({type(e).__name__}); "
                                              f"see `llmos logs gateway`", code="internal_error"))
            else:
                await out.end()


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the request's body has been read by then)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:       # noqa: BLE001 -- a server that cannot say: take the client for gone
        return
