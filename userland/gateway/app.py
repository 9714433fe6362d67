"""The gateway's ASGI application: the routes of both APIs and /metrics, the errors every route
shares, and what every request shares (``Gateway``: the connection, the keys, the metrics).

``Gateway.caller`` is the one place that decides which process a request runs as: its API key's,
or the gateway's own; ``Gateway.conversations`` gives that process's held chats. What both APIs
do with a generation is in generation.py.
"""

from __future__ import annotations

import time
import weakref

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from syscalls import AsyncConnection
from syscalls.errors import LLMOSError

from . import ollama_api, openai_api
from .conversations import Conversations
from .keys import KeyRing, bearer
from .metrics import Metrics
from .responses import OLLAMA, OPENAI, ApiError, from_llmos


class Gateway:
    """What every request shares: the connection to llmos, the keys, the chats each process
    holds, the log, and whether it is stopping."""

    def __init__(self, conn: AsyncConnection, keys: KeyRing, log, require_key: bool = False,
                 contexts_per_key: int = 0):
        self.conn, self.keys, self.log, self.require_key = conn, keys, log, require_key
        self.contexts_per_key = contexts_per_key
        # by connection: a removed key's process takes its chats with it (its contexts close too)
        self._conversations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.stopping = False
        self.started = time.time()
        self.metrics: Metrics | None = None      # once build() knows the routes

    async def caller(self, request: Request) -> AsyncConnection:
        """The llmos process a request runs as: its key's, or without one the gateway's own, which
        require_key forbids. Refuses it (ApiError) when it may not run."""
        if self.stopping:
            raise ApiError(503, "the gateway is shutting down", code="shutting_down", retry_after=5)
        conn = await self.keys.caller(bearer(request.headers.get("authorization")))
        if conn is not None:
            return conn
        if self.require_key:
            raise ApiError(401, "this gateway requires an llmos API key (Authorization: Bearer "
                                "KEY); `llmos keys add NAME` makes one", code="missing_api_key")
        return self.conn

    def conversations(self, conn: AsyncConnection) -> Conversations:
        """The contexts the process of conn (a caller) holds for chats resent whole."""
        held = self._conversations.get(conn)
        if held is None:
            held = self._conversations[conn] = Conversations(self.contexts_per_key, self.log)
        return held

    async def models(self) -> list[dict]:
        """The registered models whose file can be read (one that failed to load is still listed:
        its next request tries again); ``state`` says which are resident."""
        try:
            return [m for m in await self.conn.models() if m.get("architecture")]
        except LLMOSError as e:
            raise from_llmos(e) from None


def build(gateway: Gateway) -> Starlette:
    def flavor(request: Request) -> str:
        return OLLAMA if request.url.path.startswith("/api/") else OPENAI

    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
        e = ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail)),
                     code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(e.body(flavor(request)), e.status)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(flavor(request)), exc.status, exc.headers())

    async def bug(request: Request, exc: Exception) -> Response:
        gateway.log.error("gateway_bug", path=request.url.path, error=repr(exc), exc_info=exc)
        e = ApiError(500, f"internal error in the gateway ({type(exc).__name__}); see "
                          f"`llmos logs gateway`", code="internal_error")
        return JSONResponse(e.body(flavor(request)), 500)

    async def root(request: Request) -> Response:
        return PlainTextResponse("llmos gateway: the OpenAI API under /v1, Ollama's under /api\n")

    async def metrics(request: Request) -> Response:
        await gateway.caller(request)
        try:
            text = await gateway.metrics.render(gateway.conn)
        except LLMOSError as e:
            raise from_llmos(e) from None
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/", root, methods=["GET", "HEAD"]), Route("/metrics", metrics, methods=["GET"]),
              *openai_api.routes(gateway), *ollama_api.routes(gateway)]
    gateway.metrics = Metrics([r.path for r in routes])
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: http_error, ApiError: api_error, Exception: bug})
    return RequestLog(app, gateway.log, gateway.metrics)


class RequestLog:
    """When a request's answer ends: one log line (method, path, status, milliseconds), and the
    count of requests by endpoint and status."""

    def __init__(self, app, log, metrics: Metrics):
        self.app, self.log, self.metrics = app, log, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.monotonic(), [0]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.answered(scope["path"], status[0])
            self.log.info("request", method=scope["method"], path=scope["path"], status=status[0],
                          ms=round((time.monotonic() - began) * 1000, 1))
