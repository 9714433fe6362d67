"""The OpenAI API: GET /v1/models, POST /v1/chat/completions and /v1/completions, answered whole
or streamed as server-sent events ending with ``data: [DONE]``.

chat/completions is the chat syscall (the model's own chat template), completions the generate
syscall (the prompt as it is). A request's parameters are read in params.py; here they become
OpenAI's response objects: choices, logprobs in either API's shape, usage.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from syscalls.errors import LLMOSError

from . import params
from .generation import finish_reason, start
from .responses import OPENAI, ApiError, Sender, Watched, dumps, from_llmos, read_json


def routes(gateway) -> list[Route]:
    async def list_models(request: Request) -> JSONResponse:
        await gateway.caller(request)
        return JSONResponse({"object": "list", "data": [_model(m) for m in await gateway.models()]})

    async def one_model(request: Request) -> JSONResponse:
        await gateway.caller(request)
        name = request.path_params["model"]
        for m in await gateway.models():
            if m["name"] == name:
                return JSONResponse(_model(m))
        raise ApiError(404, f"model {name!r} is not registered in llmos (llmos model add PATH "
                            f"--name NAME adds one)", param="model", code="model_not_found")

    async def chat(request: Request) -> Watched:
        conn = await gateway.caller(request)
        args, stream, usage, top = params.chat_request(await read_json(request))
        return Watched(lambda out: answer(out, conn, Completion("chat", args, usage, top), stream),
                       OPENAI, gateway.log)

    async def completions(request: Request) -> Watched:
        conn = await gateway.caller(request)
        args, stream, usage, top, echo = params.completion_request(await read_json(request))
        done = Completion("text", args, usage, top, args["prompt"] if echo else "")
        return Watched(lambda out: answer(out, conn, done, stream), OPENAI, gateway.log)

    async def answer(out: Sender, conn, c: "Completion", stream: bool) -> None:
        call, param = ("chat", "messages") if c.chat else ("generate", "prompt")
        # a chat with tools is computed afresh: a context's messages would have to hold the
        # calls exactly as the client sends them back
        held = c.chat and not params.uses_tools(c.args)
        calls, chunk = await start(conn, call, c.args, param, gateway.metrics,
                                   gateway.conversations(conn) if held else None)
        try:
            if not stream:
                while chunk is not None:
                    c.add(chunk)
                    chunk = await calls.next()
                return await out.json(c.whole(calls.result))
            await out.start(200, "text/event-stream")
            if c.chat:
                await out.write(_sse(c.chunk({"role": "assistant", "content": ""})))
            elif c.echo:
                await out.write(_sse(c.chunk(c.echo)))
            try:
                while chunk is not None:
                    if c.tools:              # a call's text is no content: held until the END says
                        c.add(chunk)
                    elif chunk["text"] or chunk.get("logprobs"):
                        await out.write(_sse(c.piece(chunk)))
                    chunk = await calls.next()
                end = calls.result
                if c.tools:
                    await out.write(_sse(c.chunk(c.called(end))))
                await out.write(_sse(c.chunk({} if c.chat else "", c.finish(end))))
                if c.include_usage:
                    await out.write(_sse(dict(c.head("chunk"), choices=[], usage=_usage(end))))
            except LLMOSError as e:          # the stream broke (shutdown, a failed driver)
                await out.write(_sse(from_llmos(e).body(OPENAI)))
            await out.end(b"data: [DONE]\n\n")
        except LLMOSError as e:
            raise from_llmos(e, param) from None
        finally:
            await calls.aclose()

    return [Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", one_model, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"])]


def _model(m: dict) -> dict:
    return {"id": m["name"], "object": "model", "created": int(m.get("added") or 0),
            "owned_by": "llmos"}


def _sse(value: dict) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


def _usage(end: dict) -> dict:
    prompt, out = int(end.get("prompt_tokens") or 0), int(end.get("generated_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": int(end.get("cached_tokens") or 0)}}


def _text(spelled: bytes) -> str:
    return spelled.decode("utf-8", errors="replace")


class Completion:
    """One OpenAI completion as it is answered: its id, the text and logprobs so far, and the
    objects of either endpoint (chat: message and delta; text: text and the legacy logprobs)."""

    def __init__(self, kind: str, args: dict, include_usage: bool, top: int | None, echo: str = ""):
        self.chat = kind == "chat"
        self.args, self.include_usage, self.top, self.echo = args, include_usage, top, echo
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.texts: list[str] = [echo] if echo else []
        self.logprobs: list[dict] = []
        self.offset = len(echo)          # where the next token's text starts (text_offset)
        self.tools = self.chat and bool(args.get("tools")) and args.get("tool_choice") != "none"

    def head(self, what: str) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + \
              (".chunk" if what == "chunk" and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.args["model"],
                "system_fingerprint": None}

    def add(self, chunk: dict) -> None:
        self.texts.append(chunk["text"])
        self.logprobs += chunk.get("logprobs") or ()

    # -- whole ----------------------------------------------------------------------------------
    def whole(self, end: dict) -> dict:
        text = "".join(self.texts)
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(self.logprobs),
                                  "finish_reason": self.finish(end)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            if end.get("tool_calls"):
                choice["message"].update(content=end.get("content"), tool_calls=end["tool_calls"])
        else:
            choice["text"] = text
        return dict(self.head("whole"), choices=[choice], usage=_usage(end))

    def finish(self, end: dict) -> str:
        return "tool_calls" if end.get("tool_calls") else finish_reason(end)

    # -- streamed -------------------------------------------------------------------------------
    def called(self, end: dict) -> dict:
        """The delta of a chat with tools, sent whole at its END: its content, and its calls."""
        if not end.get("tool_calls"):
            return {"content": "".join(self.texts)}
        return {"content": end.get("content"), "tool_calls": [
            dict(call, index=i) for i, call in enumerate(end["tool_calls"])]}

    def piece(self, chunk: dict) -> dict:
        return self.chunk({"content": chunk["text"]} if self.chat else chunk["text"],
                          logprobs=self._logprobs(chunk.get("logprobs") or ()))

    def chunk(self, delta: Any, finish: str | None = None, logprobs: dict | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        choice["delta" if self.chat else "text"] = delta
        out = dict(self.head("chunk"), choices=[choice])
        if self.include_usage:
            out["usage"] = None
        return out

    # -- logprobs -------------------------------------------------------------------------------
    def _logprobs(self, tokens) -> dict | None:
        """llmos's logprobs ({token, logprob, bytes, top}) in the endpoint's shape."""
        if self.top is None:
            return None
        if self.chat:
            return {"content": [dict(_spelled(t["bytes"], t["logprob"]), top_logprobs=[
                _spelled(b, p) for _, p, b in t["top"][:self.top]]) for t in tokens], "refusal": None}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for t in tokens:
            text = _text(t["bytes"])
            out["tokens"].append(text)
            out["token_logprobs"].append(t["logprob"])
            out["top_logprobs"].append({_text(b): p for _, p, b in t["top"][:self.top]})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def _spelled(spelled: bytes, logprob: float) -> dict:
    return {"token": _text(spelled), "logprob": logprob, "bytes": list(spelled)}

