"""Tool calls in chat: the tools a request offers, how they reach the prompt, and the calls read back.

A chat's ``tools`` are OpenAI's function schema ({type: function, function: {name, description,
parameters}}) and ``tool_choice`` says what the model may do with them: ``auto`` (answer or call,
as it likes; the default with tools), ``none`` (answer; the tools are not shown), ``required`` (call
one of them) or one function by name (OpenAI's {type: function, function: {name}} too). A required
or named call is grammar-constrained (``Tools.grammar``), so its arguments always validate against
the function's parameters.

The call format is the one Hermes-style templates (Qwen2.5, SmolLM3, ...) use and most small models
have seen: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A chat template that
uses ``tools`` renders them itself; for one that does not (SmolLM2's), ``render`` writes the
fallback: a system message listing the functions and the format, assistant calls as that text, and
each ``tool`` message as a user turn ``<tool_response>\\n...\\n</tool_response>``.

Never: run a tool, or trust the model's text: a call is reported only when it names a function
offered and its arguments are a JSON object.
"""

from __future__ import annotations

import json
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.meta

from drivers.model.constraints import JSON_OPTIONS, MAX_GRAMMAR, ConstraintError, json_grammar, lark_grammar

MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
CHOICES = ("auto", "none", "required")

FALLBACK_SYSTEM = (
    "You may call one or more functions to help with the user's request. The functions, as JSON "
    "Schema:\n<tools>\n{tools}\n</tools>\n\nTo call a function, answer with its name and arguments as "
    "a JSON object inside <tool_call></tool_call> tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


class ToolError(ValueError):
    """tools, tool_choice or a message about tools that does not fit; the message names the field."""


@dataclass(frozen=True)
class Tools:
    functions: dict[str, dict]      # name -> {name, description, parameters}
    choice: str                     # auto | none | required | a function's name

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any) -> "Tools | None":
        """Check a request's tools and tool_choice; None when it offers no tools."""
        if tools is None or tools == []:
            if tool_choice not in (None, "auto", "none"):
                raise ToolError("tool_choice names a tool, but the request gives no tools")
            return None
        if not isinstance(tools, list):
            raise ToolError(f"tools must be a list of {{type: function, function: {{name, parameters}}}}, "
                            f"got {type(tools).__name__}")
        if len(tools) > MAX_TOOLS:
            raise ToolError(f"tools has {len(tools)} entries; at most {MAX_TOOLS}")
        functions: dict[str, dict] = {}
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" \
                    or not isinstance(tool.get("function"), Mapping):
                raise ToolError(f"{where} must be {{type: function, function: {{name, description, parameters}}}}")
            fn = tool["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
            if name in functions:
                raise ToolError(f"{where}.function.name {name!r} is given twice")
            desc = fn.get("description", "")
            if not isinstance(desc, str):
                raise ToolError(f"{where}.function.description must be a string")
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, Mapping) or params.get("type", "object") != "object":
                raise ToolError(f"{where}.function.parameters must be a JSON Schema of type object")
            try:
                json_grammar(params, f"{where}.function.parameters")
            except ConstraintError as e:
                raise ToolError(str(e)) from None
            functions[name] = {"name": name, "description": desc, "parameters": dict(params)}
        choice = _choice(tool_choice, functions)
        return cls(functions, choice)

    def offered(self) -> list[dict]:
        """The tools as OpenAI's list (what a template's ``tools`` gets); none with tool_choice none."""
        if self.choice == "none":
            return []
        return [{"type": "function", "function": f} for f in self.functions.values()]

    def grammar(self) -> str | None:
        """llguidance's grammar of one call, for required or a named function; None otherwise."""
        if self.choice in ("auto", "none"):
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": n}, "arguments": self.functions[n]["parameters"]}}
                   for n in names]
        schema = {**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": JSON_OPTIONS}
        lark = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {json.dumps(schema)}\n'
        if len(lark) > MAX_GRAMMAR:
            raise ToolError(f"the tools' schemas are too long together ({len(lark)} characters)")
        try:
            return lark_grammar(lark, "tools")
        except ConstraintError as e:
            raise ToolError(str(e)) from None

    def calls(self, text: str) -> tuple[str | None, list[dict]]:
        """The calls in a reply, OpenAI-shaped, and the text outside them (None if there is none)."""
        found, rest = [], text
        for m in CALL.finditer(text):
            call = self._call(m.group(1))
            if call is not None:
                found.append(call)
                rest = rest.replace(m.group(0), "", 1)
        if not found and text.strip().startswith("{"):      # a bare call, as some models write it
            call = self._call(text.strip())
            if call is not None:
                found, rest = [call], ""
        return (rest.strip() or None), found

    def _call(self, body: str) -> dict | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.functions:
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _choice(tool_choice: Any, functions: dict) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice must be auto, none, required, a function's name or "
                            "{type: function, function: {name}}")
    elif isinstance(tool_choice, str):
        name = tool_choice
        if name in CHOICES:
            return name
    else:
        raise ToolError(f"tool_choice must be auto, none, required or a function's name, got "
                        f"{type(tool_choice).__name__}")
    if name not in functions:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools "
                        f"({', '.join(functions)})")
    return name


# ------------------------------------------------------------------------------------- the prompt

_USES_TOOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_uses_tools(tokenizer) -> bool:
    """Whether the model's chat template renders ``tools`` itself."""
    uses = _USES_TOOLS.get(tokenizer)
    if uses is None:
        env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols])
        try:
            uses = "tools" in jinja2.meta.find_undeclared_variables(env.parse(tokenizer.chat_template or ""))
        except jinja2.TemplateError:
            uses = False
        _USES_TOOLS[tokenizer] = uses
    return uses


def check_messages(messages: list) -> None:
    """The tool parts of chat messages: a tool message's content, an assistant's tool_calls."""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.get("role") == "tool":
            if not isinstance(m.get("content"), str):
                raise ToolError(f"{where}: a tool message needs its result as a string 'content'")
            if not isinstance(m.get("tool_call_id", ""), str):
                raise ToolError(f"{where}.tool_call_id must be a string")
        calls = m.get("tool_calls")
        if m.get("role") != "tool" and calls is None and not isinstance(m.get("content"), str):
            raise ToolError(f"{where} needs its text as a string 'content'")
        if calls is None:
            continue
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise ToolError(f"{where}.tool_calls must be a list, on an assistant message")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments", "{}"), (str, Mapping)):
                raise ToolError(f"{where}.tool_calls[{j}] must be {{id, type: function, function: "
                                f"{{name, arguments}}}}")


def render(tokenizer, messages: list, tools: Tools | None) -> str:
    """The prompt of a chat: with the template's own tools support, or the fallback format."""
    check_messages(messages)
    offered = tools.offered() if tools else []
    if template_uses_tools(tokenizer):
        messages = [_arguments_as_objects(m) for m in messages]
        extra = {"tools": offered} if offered else {}
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    return tokenizer.apply_chat_template(fallback(messages, offered), add_generation_prompt=True)


def fallback(messages: list, offered: list[dict]) -> list[dict]:
    """Messages a template without tools support renders: tools in the system message, calls and
    results as text."""
    out: list[dict] = []
    if offered:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in offered)
        system = FALLBACK_SYSTEM.format(tools=listing)
        if messages and messages[0].get("role") == "system":
            system = f"{messages[0].get('content') or ''}\n\n{system}"
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m.get("role") == "tool":
            text = f"<tool_response>\n{m.get('content')}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_responses"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_responses": True})
            continue
        m = dict(m)
        if m.get("tool_calls"):
            parts = [m.get("content") or ""] + [
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                              "arguments": _arguments(c["function"].get("arguments", {}))},
                                             ensure_ascii=False) + "\n</tool_call>"
                for c in m.pop("tool_calls")]
            m["content"] = "\n".join(p for p in parts if p)
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    for m in out:
        m.pop("_responses", None)
    return out


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _arguments_as_objects(m: Mapping) -> dict:
    """OpenAI sends arguments as a JSON string; Hugging Face templates expect the object."""
    m = dict(m)
    if m.get("tool_calls"):
        m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments", {}))}}
                           for c in m["tool_calls"]]
    return m
