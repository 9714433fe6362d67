"""Ollama's API: /api/chat and /api/generate (NDJSON records, or one with ``"stream": false``, the
last ``done`` with its counts and durations in nanoseconds, as Ollama gives them), /api/tags,
/api/ps, /api/show and /api/version.

/api/chat is the chat syscall; /api/generate too (one user turn, after ``system``), as Ollama
applies the model's template, unless ``raw`` asks for the prompt as it is: the generate syscall.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from syscalls.errors import LLMOSError

from . import params
from .generation import finish_reason, start
from .responses import OLLAMA, ApiError, Sender, Watched, dumps, from_llmos, read_json

# The Ollama API this gateway follows (clients check the version for the features they use).
OLLAMA_VERSION = "0.6.0"


def routes(gateway) -> list[Route]:
    async def version(request: Request) -> JSONResponse:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def tags(request: Request) -> JSONResponse:
        await gateway.caller(request)
        return JSONResponse({"models": [_entry(m, gateway.started) for m in await gateway.models()]})

    async def ps(request: Request) -> JSONResponse:
        await gateway.caller(request)
        return JSONResponse({"models": [_loaded(m, gateway.started)
                                        for m in await gateway.models() if m.get("state") == "resident"]})

    async def show(request: Request) -> JSONResponse:
        await gateway.caller(request)
        body = await read_json(request)
        f = params.Fields(body)
        name = params.model_name(f, "model" if "model" in body else "name")
        for m in await gateway.models():
            if m["name"] == name:
                arch = m["architecture"] or "llama"
                return JSONResponse({
                    "modelfile": "", "parameters": "", "template": "", "license": "",
                    "modified_at": _iso(m["added"] or gateway.started), "details": _details(m),
                    "model_info": {"general.architecture": arch,
                                   "general.parameter_count": m["parameters"],
                                   f"{arch}.context_length": m["context_length"]},
                    "capabilities": ["completion", "tools"]})
        raise ApiError(404, f"model '{name}' not found")

    async def chat(request: Request) -> Watched:
        conn = await gateway.caller(request)
        args, stream, top = params.ollama_chat(await read_json(request))
        return Watched(lambda out: answer(out, conn, Reply("chat", args, top), stream), OLLAMA,
                       gateway.log)

    async def generate(request: Request) -> Watched:
        conn = await gateway.caller(request)
        args, stream, top = params.ollama_generate(await read_json(request))
        return Watched(lambda out: answer(out, conn, Reply("generate", args, top), stream), OLLAMA,
                       gateway.log)

    async def answer(out: Sender, conn, r: "Reply", stream: bool) -> None:
        if "prompt" not in r.args and "messages" not in r.args:     # no prompt: load, or unload
            keep = r.args.get("keep_alive")
            try:
                await conn.model_load(r.args["model"], keep_alive=keep)
            except LLMOSError as e:
                raise from_llmos(e, "model") from None
            return await out.json(dict(r.record(""), done=True, done_reason="unload" if keep == 0 else "load"))
        call, param = ("generate", "prompt") if "prompt" in r.args else ("chat", "messages")
        # /api/chat resends its history; /api/generate's one turn is never followed up
        held = r.chat and not params.uses_tools(r.args)     # as openai_api's: computed afresh
        calls, chunk = await start(conn, call, r.args, param, gateway.metrics,
                                   gateway.conversations(conn) if held else None)
        try:
            if not stream:
                texts, logprobs = [], []
                while chunk is not None:
                    texts.append(chunk["text"])
                    logprobs += chunk.get("logprobs") or ()
                    chunk = await calls.next()
                return await out.json(r.last(calls.result, "".join(texts), logprobs))
            await out.start(200, "application/x-ndjson")
            try:
                texts = []
                while chunk is not None:
                    if r.tools:              # a call's text is no content: held until the END says
                        texts.append(chunk["text"])
                    elif chunk["text"] or chunk.get("logprobs"):
                        await out.write(dumps(r.record(chunk["text"], chunk.get("logprobs"))) + b"\n")
                    chunk = await calls.next()
                await out.write(dumps(r.last(calls.result, "".join(texts))) + b"\n")
            except LLMOSError as e:          # the stream broke (shutdown, a failed driver)
                await out.write(dumps(from_llmos(e).body(OLLAMA)) + b"\n")
            await out.end()
        except LLMOSError as e:
            raise from_llmos(e, param) from None
        finally:
            await calls.aclose()

    return [Route("/api/version", version, methods=["GET", "HEAD"]),
            Route("/api/tags", tags, methods=["GET", "HEAD"]),
            Route("/api/ps", ps, methods=["GET"]),
            Route("/api/show", show, methods=["POST"]),
            Route("/api/chat", chat, methods=["POST"]),
            Route("/api/generate", generate, methods=["POST"])]


class Reply:
    """One /api/chat or /api/generate answer: its records, and the counts of the last."""

    def __init__(self, kind: str, args: dict, top: int | None):
        self.chat, self.args, self.top = kind == "chat", args, top
        self.tools = self.chat and bool(args.get("tools")) and args.get("tool_choice") != "none"
        self.began = time.monotonic_ns()

    def record(self, text: str, logprobs: Any = None) -> dict:
        r: dict[str, Any] = {"model": self.args["model"], "created_at": _iso(time.time())}
        if self.chat:
            r["message"] = {"role": "assistant", "content": text}
        else:
            r["response"] = text
        r["done"] = False
        if self.top is not None and logprobs:
            r["logprobs"] = [{"token": _text(t["bytes"]), "logprob": t["logprob"],
                              "bytes": list(t["bytes"]), "top_logprobs": [
                                  {"token": _text(b), "logprob": p} for _, p, b in t["top"][:self.top]]}
                             for t in logprobs]
        return r

    def last(self, end: dict, text: str = "", logprobs: Any = None) -> dict:
        record = self.record(text, logprobs)
        if self.chat and end.get("tool_calls"):     # Ollama's calls: arguments as an object
            record["message"].update(content=end.get("content") or "", tool_calls=[
                {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in end["tool_calls"]])
        return dict(record, done=True, done_reason=finish_reason(end),
                    total_duration=time.monotonic_ns() - self.began, load_duration=0,
                    prompt_eval_count=int(end.get("prompt_tokens") or 0),
                    prompt_eval_duration=int(float(end.get("ttft_s") or 0) * 1e9),
                    eval_count=int(end.get("generated_tokens") or 0),
                    eval_duration=int(float(end.get("decode_s") or 0) * 1e9))


def _text(spelled: bytes) -> str:
    return spelled.decode("utf-8", errors="replace")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _entry(m: dict, started: float) -> dict:
    """A model as /api/tags lists it. Its digest names the registered file (path, size, when it
    was added), not its contents, which would take reading the whole file."""
    digest = hashlib.sha256(f"{m['path']}:{m['file_size']}:{m['added']}".encode()).hexdigest()
    return {"name": m["name"], "model": m["name"], "modified_at": _iso(m["added"] or started),
            "size": m["file_size"] or 0, "digest": digest, "details": _details(m)}


FOREVER = "2318-08-25T00:00:00Z"      # Ollama's expires_at of a model kept loaded (keep_alive -1)


def _loaded(m: dict, started: float) -> dict:
    """A loaded model as /api/ps lists it: what its weights and KV cache take, on which device,
    and when keep_alive unloads it (in use: its keep_alive from now, as Ollama shows it)."""
    size = int(m.get("memory_bytes") or 0)
    if m.get("expires_at") is not None:
        expires = _iso(m["expires_at"])
    elif m.get("default") or m.get("keep_alive") is None or m["keep_alive"] < 0:
        expires = FOREVER                 # the boot driver's model, or keep_alive -1
    else:
        expires = _iso(time.time() + m["keep_alive"])
    return dict(_entry(m, started), size=size, size_vram=0 if m.get("device") == "cpu" else size,
                context_length=m["context_length"], expires_at=expires)


def _details(m: dict) -> dict:
    arch = m["architecture"] or ""
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
            "parameter_size": _count(m["parameters"]), "quantization_level": m["quantization"] or ""}


def _count(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)

