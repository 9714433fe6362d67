"""Request bodies read into syscall arguments: the OpenAI and Ollama parameters, each checked with
an error that names it (400), unknown fields ignored as OpenAI does.

Both APIs end in the same arguments of the generate and chat syscalls (syscalls/table.py); what
the table bounds (lengths, ranges) is checked here too, so that the message names the field as
the client spelled it rather than as llmos does.
"""

from __future__ import annotations

import math
from typing import Any

from syscalls.runtime.config import parse_keep_alive
from syscalls.table import BY_NAME

from .responses import ApiError

_CHAT = BY_NAME["chat"].by_name
MAX_TOKENS = int(_CHAT["max_tokens"].max)       # no limit asked: as many as the context leaves
MAX_STOPS = int(_CHAT["stop"].max_len)
MAX_TOP = int(_CHAT["logprobs"].max)
MAX_TOP_K = int(_CHAT["top_k"].max)
MAX_KEEP_ALIVE = float(_CHAT["keep_alive"].max)
ROLES = {"system", "user", "assistant", "tool", "developer"}


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")


class Fields:
    """The fields of one JSON object, read with checks whose errors name them (``where`` first:
    "options." for Ollama's options)."""

    def __init__(self, body: dict, where: str = ""):
        self.body, self.where = body, where

    def bad(self, name: str, why: str, code: str = "invalid_value") -> ApiError:
        return ApiError(400, f"'{self.where}{name}' {why}", param=self.where + name, code=code)

    def _get(self, name: str, ok, kind: str) -> Any:
        value = self.body.get(name)
        if value is not None and not ok(value):
            raise self.bad(name, f"must be {kind}, got {_kind(value)}", "invalid_type")
        return value

    def number(self, name: str, lo: float | None = None, hi: float | None = None) -> float | None:
        value = self._get(name, lambda v: type(v) in (int, float), "a number")
        if value is None:
            return None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.bad(name, f"must be a number in {_range(lo, hi)}, got {value}")
        return float(value)

    def integer(self, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self._get(name, lambda v: type(v) is int or (type(v) is float and v.is_integer()),
                          "an integer")
        if value is None:
            return None
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.bad(name, f"must be an integer in {_range(lo, hi)}, got {value}")
        return value

    def boolean(self, name: str) -> bool | None:
        return self._get(name, lambda v: type(v) is bool, "true or false")

    def string(self, name: str, required: bool = False) -> str | None:
        value = self._get(name, lambda v: type(v) is str, "a string")
        if required and not value:
            raise self.bad(name, "is required (a non-empty string)", "missing_required_parameter")
        return value

    def mapping(self, name: str) -> dict:
        return self._get(name, lambda v: type(v) is dict, "an object") or {}

    def stops(self, name: str) -> list[str] | None:
        value = self.body.get(name)
        if value is None or value == []:
            return None
        stops = [value] if type(value) is str else value
        if type(stops) is not list or not all(type(s) is str for s in stops):
            raise self.bad(name, f"must be a string or an array of strings, got {_kind(value)}",
                           "invalid_type")
        if len(stops) > MAX_STOPS or not all(stops):
            raise self.bad(name, f"must hold 1 to {MAX_STOPS} non-empty strings")
        return stops


def _range(lo: float | None, hi: float | None) -> str:
    def show(x: float | None) -> str:
        return "" if x is None else str(int(x)) if float(x).is_integer() else str(x)
    return ("(..." if lo is None else f"[{show(lo)}") + (", ...)" if hi is None else f", {show(hi)}]")


def model_name(f: Fields, name: str = "model") -> str:
    """The model asked for; Ollama's clients add a tag (":latest"), which llmos's names lack."""
    model = f.string(name, required=True)
    if len(model) > int(_CHAT["model"].max_len):
        raise f.bad(name, f"is too long ({len(model)} characters)")
    return model.removesuffix(":latest")


def _sampling(f: Fields, args: dict, names: dict[str, str], ollama: bool = False) -> None:
    """Sampling fields spelled as the API does (names: llmos argument -> the API's field).
    OpenAI bounds temperature to 2; Ollama takes any, and a negative seed for a random one."""
    limits = {"temperature": (0, 100 if ollama else 2), "top_p": (0, 1), "min_p": (0, 1),
              "repetition_penalty": (0.01, 100)}
    for arg, field in names.items():
        if arg in limits:
            value = f.number(field, *limits[arg])
        elif arg == "top_k":
            value = f.integer(field, None, MAX_TOP_K)
            value = None if value is None else max(0, value)    # -1 (vLLM) and 0 (Ollama): off
        elif arg == "seed":
            value = f.integer(field, None if ollama else 0, 2**63 - 1)
            value = None if value is not None and value < 0 else value
        else:
            value = f.boolean(field)                            # ignore_eos
        if value is not None:
            args[arg] = value


# -- OpenAI -----------------------------------------------------------------------------------------
def openai_common(body: dict) -> tuple[dict, Fields]:
    """What chat/completions and completions share: model, sampling, limits, stop, n."""
    f = Fields(body)
    args: dict[str, Any] = {"model": model_name(f)}
    # vLLM's extra sampling fields beside OpenAI's own
    _sampling(f, args, {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
                        "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos"})
    n = f.integer("n", 1)
    if n is not None and n != 1:
        raise f.bad("n", f"must be 1: llmos answers with one choice (got {n}); make {n} requests")
    limit = f.integer("max_completion_tokens", 1, MAX_TOKENS)
    if limit is None:
        limit = f.integer("max_tokens", 1, MAX_TOKENS)
    args["max_tokens"] = MAX_TOKENS if limit is None else limit
    stop = f.stops("stop")
    if stop:
        args["stop"] = stop
    return args, f


def openai_stream(f: Fields) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(f.boolean("stream"))
    options = Fields(f.mapping("stream_options"), "stream_options.")
    return stream, bool(options.boolean("include_usage"))


def chat_request(body: dict) -> tuple[dict, bool, bool, int | None]:
    """/v1/chat/completions: the chat syscall's arguments, stream, include_usage, top_logprobs
    (None: no logprobs)."""
    args, f = openai_common(body)
    if body.get("functions"):
        raise f.bad("functions", "are OpenAI's deprecated form: give them as tools",
                    "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None:
        if type(fmt) is not dict or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise f.bad("response_format", "must be {\"type\": \"text\"}, {\"type\": \"json_object\"} "
                                           "or {\"type\": \"json_schema\", \"json_schema\": {...}}")
        if fmt["type"] != "text":
            args["response_format"] = fmt           # the inference service checks the schema
    tools(f, args)
    args["messages"] = openai_messages(body.get("messages"))
    return args, *openai_stream(f), logprobs(f, args)


def tools(f: Fields, args: dict) -> None:
    """tools and tool_choice, passed on as OpenAI spells them: the inference service checks each
    function (services/inference/tools.py) with an error naming the field."""
    offered = f.body.get("tools")
    if offered is not None and offered != []:
        if type(offered) is not list or not all(type(t) is dict for t in offered):
            raise f.bad("tools", "must be an array of {\"type\": \"function\", \"function\": {...}}",
                        "invalid_type")
        args["tools"] = offered
    choice = f.body.get("tool_choice")
    if choice is not None:
        if type(choice) not in (str, dict):
            raise f.bad("tool_choice", "must be auto, none, required or {\"type\": \"function\", "
                                       "\"function\": {\"name\": ...}}", "invalid_type")
        args["tool_choice"] = choice


def uses_tools(args: dict) -> bool:
    """A chat with tools, or with tool calls or results in its messages."""
    return bool(args.get("tools")) or any(m.get("tool_calls") or m["role"] == "tool"
                                          for m in args.get("messages") or ())


def logprobs(f: Fields, args: dict) -> int | None:
    """logprobs (true or false) and top_logprobs, as chat/completions and Ollama take them: how
    many alternatives to show per token, None for no logprobs at all. llmos's logprobs argument is
    that count, and 0 turns them off, so the token's own logprob alone is asked as 1."""
    if f.boolean("logprobs"):
        top = f.integer("top_logprobs", 0, MAX_TOP) or 0
        args["logprobs"] = max(1, top)
        return top
    if f.body.get("top_logprobs"):
        raise f.bad("top_logprobs", "needs logprobs to be true")
    return None


def openai_messages(messages: Any) -> list[dict]:
    if type(messages) is not list or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages", param="messages",
                       code="invalid_type" if type(messages) is not list else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if type(m) is not dict:
            raise ApiError(400, f"'{where}' must be an object, got {_kind(m)}", param=where,
                           code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got "
                                f"{role!r}", param=f"{where}.role")
        message = {"role": "system" if role == "developer" else role,
                   "content": _content(m.get("content"), f"{where}.content", role)}
        calls = m.get("tool_calls")
        if calls and role == "assistant":
            message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            for field in ("tool_call_id", "tool_name", "name"):
                if type(m.get(field)) is str:
                    message[field] = m[field]
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant's calls, OpenAI's ({id, type, function: {name, arguments: a JSON string}}) or
    Ollama's ({function: {name, arguments: an object}})."""
    if type(calls) is not list:
        raise ApiError(400, f"'{where}' must be an array of tool calls", param=where, code="invalid_type")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if type(c) is dict else None
        if type(fn) is not dict or type(fn.get("name")) is not str \
                or type(fn.get("arguments", "{}")) not in (str, dict):
            raise ApiError(400, f"'{where}[{j}]' must be {{\"function\": {{\"name\", \"arguments\"}}}}",
                           param=f"{where}[{j}]")
        out.append({"id": str(c.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


def _content(content: Any, where: str, role: str) -> str:
    """A message's text: a string, or an array of text parts (other parts are refused)."""
    if content is None and role in ("assistant", "tool"):
        return ""
    if type(content) is str:
        return content
    if type(content) is list:
        texts = []
        for j, part in enumerate(content):
            if type(part) is not dict or part.get("type") not in ("text", "input_text") \
                    or type(part.get("text")) is not str:
                raise ApiError(400, f"'{where}[{j}]' must be a text part ({{\"type\": \"text\", "
                                    f"\"text\": ...}}); llmos's models read text only",
                               param=f"{where}[{j}]", code="unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"'{where}' must be a string or an array of text parts, got {_kind(content)}",
                   param=where, code="invalid_type")


def completion_request(body: dict) -> tuple[dict, bool, bool, int | None, bool]:
    """/v1/completions: the generate syscall's arguments, stream, include_usage, logprobs (None:
    none), echo."""
    args, f = openai_common(body)
    prompt = body.get("prompt")
    if type(prompt) is list and len(prompt) == 1 and type(prompt[0]) is str:
        prompt = prompt[0]
    if type(prompt) is not str:
        raise f.bad("prompt", "must be a string (or an array of one string)",
                    "invalid_type" if type(prompt) is not list else "unsupported_parameter")
    if not prompt:
        raise f.bad("prompt", "is empty")
    if body.get("suffix"):
        raise f.bad("suffix", "is not supported (no fill-in-the-middle)", "unsupported_parameter")
    best_of = f.integer("best_of", 1)
    if best_of not in (None, 1):
        raise f.bad("best_of", f"must be 1, got {best_of}")
    args["prompt"] = prompt
    top = f.integer("logprobs", 0, MAX_TOP)
    if top is not None:
        args["logprobs"] = max(1, top)
    return args, *openai_stream(f), top, bool(f.boolean("echo"))


# -- Ollama -----------------------------------------------------------------------------------------
def ollama_options(body: dict, args: dict) -> None:
    """Ollama's "options": sampling, num_predict, stop; the rest (num_ctx, ...) is ignored."""
    f = Fields(Fields(body).mapping("options"), "options.")
    _sampling(f, args, {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                        "min_p": "min_p", "seed": "seed", "repetition_penalty": "repeat_penalty"},
              ollama=True)
    predict = f.integer("num_predict")
    if predict is not None and predict not in (-1, -2) and not 1 <= predict <= MAX_TOKENS:
        raise f.bad("num_predict", f"must be -1 (no limit), -2 (fill the context) or in "
                                   f"[1, {MAX_TOKENS}], got {predict}")
    args["max_tokens"] = predict if predict and predict > 0 else MAX_TOKENS
    stop = f.stops("stop")
    if stop:
        args["stop"] = stop


def _ollama_common(body: dict) -> tuple[dict, Fields, bool, int | None]:
    """(arguments, fields, stream, top_logprobs) of /api/chat and /api/generate."""
    f = Fields(body)
    args: dict[str, Any] = {"model": model_name(f)}
    ollama_options(body, args)
    if body.get("keep_alive") is not None:        # seconds or "5m"; negative: loaded for ever
        try:
            args["keep_alive"] = min(parse_keep_alive(body["keep_alive"]), MAX_KEEP_ALIVE)
        except ValueError as e:
            raise f.bad("keep_alive", str(e).removeprefix("keep_alive ")) from None
    stream = f.boolean("stream")
    fmt = body.get("format")
    if fmt == "json":
        args["response_format"] = {"type": "json_object"}
    elif type(fmt) is dict:
        args["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise f.bad("format", f"must be \"json\" or a JSON Schema object, got {_kind(fmt)}")
    return args, f, stream is not False, logprobs(f, args)


def ollama_chat(body: dict) -> tuple[dict, bool, int | None]:
    args, f, stream, top = _ollama_common(body)
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        raise f.bad("messages", "must be a non-empty array of messages")
    for i, m in enumerate(messages):
        if type(m) is dict and m.get("images"):
            raise f.bad(f"messages[{i}].images", "are not supported: llmos's models read text only")
    args["messages"] = openai_messages(messages)
    tools(f, args)
    return args, stream, top


def ollama_generate(body: dict) -> tuple[dict, bool, int | None]:
    """(arguments, stream, top_logprobs). A raw prompt goes to generate as it is, any other to
    chat as one user turn (after the system prompt), as Ollama applies the model's template; an
    empty prompt has neither (Ollama only loads the model)."""
    args, f, stream, top = _ollama_common(body)
    prompt = f.string("prompt") or ""
    system = f.string("system")
    raw = bool(f.boolean("raw"))
    if body.get("images"):
        raise f.bad("images", "are not supported: llmos's models read text only")
    if body.get("suffix"):
        raise f.bad("suffix", "is not supported (no fill-in-the-middle)")
    if raw and prompt:
        args["prompt"] = prompt
    elif prompt:
        args["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": prompt}]
    return args, stream, top
