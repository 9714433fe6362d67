"""Structured output and tool calls through a booted llmos: syscalls, and the HTTP gateway with the
real openai and ollama packages.

The model is the tiny random one (model/tiny_gguf.py): its tokens are close to random, so every
output that parses and validates does so because the driver's masks made it, not because a model
knew JSON. (tests/test_structured_smollm.py runs the default model.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pytest

from conftest import FAST_SUPERVISION, ROOT, Booted, llmsh_terminal, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors

SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
ASK = [{"role": "user", "content": "Answer in JSON."}]

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "admin": {"type": "boolean"}}, "required": ["name", "admin"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"], "additionalProperties": False},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                     "minItems": 2, "maxItems": 4},
    "ranges": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        # a number without multipleOf may have any number of digits: a random model writes many
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25}},
        "required": ["age", "score"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000},
        "note": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["id"], "additionalProperties": False},
    "anyof_ref": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 5}, "y": {"type": "integer", "minimum": 0, "maximum": 5}},
        "required": ["x", "y"], "additionalProperties": False}},
        "anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


@pytest.fixture(scope="module")
def system():
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf", context=8192)     # room for ? TEXT's prompt (few tokens per word)
    (home / "config.toml").write_text(
        FAST_SUPERVISION + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 1024\n' + SERVICES +
        '\n[gateway]\nlisten = "127.0.0.1:0"\n')
    booted = Booted(home).boot()
    try:
        with booted.connect(privileged=True) as c:
            c.model_add(str(model), "tiny")
            entry = wait_until(lambda: next((p for p in c.ps() if p["name"] == "gateway" and
                                             p["advertised"].get("state") == "listening"), None),
                               20, "the gateway to listen")
        booted.url = entry["advertised"]["url"]
        yield booted
    finally:
        booted.shutdown()
        shutil.rmtree(home, ignore_errors=True)


def run(c, call: str, **args) -> tuple[str, dict]:
    stream = getattr(c, call)(**args)
    text = "".join(ch.text for ch in stream)
    return text, stream.result


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


# -- constrained output ---------------------------------------------------------------------------

def test_outputs_validate_against_every_schema(system):
    """Greedy and sampled, generate and chat: each output parses and validates."""
    with system.connect() as c:
        for name, schema in SCHEMAS.items():
            for seed in (1, 2):
                call, where = ("chat", {"messages": ASK}) if seed == 1 else ("generate", {"prompt": "JSON:"})
                text, end = run(c, call, **where, response_format=schema_format(schema), max_tokens=200,
                                temperature=1.0, seed=seed, top_k=0, top_p=1.0, min_p=0.0)
                assert end.finish == "stop", (name, text, end)
                jsonschema.validate(json.loads(text), schema)
            text, end = run(c, "chat", messages=ASK, response_format=schema_format(schema),
                            max_tokens=200, temperature=0.0)
            assert end.finish == "stop", (name, text)
            jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_grammar(system):
    with system.connect() as c:
        text, end = run(c, "chat", messages=ASK, response_format={"type": "json_object"}, max_tokens=120,
                        temperature=0.0)
        # any JSON object: the tiny model may run out of tokens inside it, never out of the grammar
        assert text.startswith("{")
        if end.finish == "stop":
            assert isinstance(json.loads(text), dict)
        text, end = run(c, "generate", prompt="date:", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]",
                        max_tokens=40, temperature=1.0, seed=5)
        assert end.finish == "stop" and len(text) == 10 and text[:2] == "20" and text[4] == text[7] == "-", text
        lark = 'start: greeting " " NAME "!"\ngreeting: "hello" | "goodbye"\nNAME: /[a-z]{1,6}/\n'
        text, end = run(c, "generate", prompt="say:", grammar=lark, max_tokens=40, temperature=1.0, seed=3)
        assert end.finish == "stop" and text.endswith("!") and text.split(" ")[0] in ("hello", "goodbye"), text
        text, _ = run(c, "generate", prompt="say:", response_format={"type": "text"}, max_tokens=5,
                      temperature=0.0)
        plain, _ = run(c, "generate", prompt="say:", max_tokens=5, temperature=0.0)
        assert text == plain                       # {"type": "text"} constrains nothing


def test_constrained_and_unconstrained_share_a_batch(system):
    """Eight requests at once, half constrained: each constrained one validates, and each
    unconstrained one is what it is alone (greedy)."""
    schema = SCHEMAS["ranges"]
    with system.connect() as c:
        alone, _ = run(c, "generate", prompt="free text", max_tokens=30, temperature=0.0, ignore_eos=True)
    results: dict[int, tuple[str, dict]] = {}

    def one(i: int) -> None:
        with system.connect() as c:
            if i % 2:
                results[i] = run(c, "generate", prompt=f"JSON {i}:", response_format=schema_format(schema),
                                 max_tokens=100, temperature=1.0, seed=i)
            else:
                results[i] = run(c, "generate", prompt="free text", max_tokens=30, temperature=0.0,
                                 ignore_eos=True)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    for i, (text, end) in results.items():
        if i % 2:
            jsonschema.validate(json.loads(text), schema)
        else:
            assert text == alone


def test_bad_constraints_are_einval_naming_the_part(system):
    cases = [
        ({"response_format": schema_format({"type": "array", "uniqueItems": True})}, "uniqueItems"),
        ({"response_format": schema_format({"type": "objekt"})}, "objekt"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
        ({"response_format": "json"}, "response_format must be an object"),
        ({"regex": "(ab"}, "regex: invalid regex"),
        ({"regex": "(?=a)b"}, "look-around"),
        ({"grammar": "start: nothere"}, 'unknown name: "nothere"'),
        ({"regex": r"[^\x00-\U0010FFFF]"}, "regex admits no output at all"),
        ({"regex": "a", "grammar": "start: \"a\""}, "give one constraint, not regex and grammar"),
    ]
    with system.connect() as c:
        for args, part in cases:
            with pytest.raises(errors.EINVAL) as e:
                run(c, "generate", prompt="x", max_tokens=4, **args)
            assert part in e.value.message, (args, e.value.message)
        with pytest.raises(errors.EINVAL, match="'regex' must be a string"):
            run(c, "generate", prompt="x", regex=5)


# -- tool calls -----------------------------------------------------------------------------------

def test_required_and_named_tool_calls_are_valid(system):
    with system.connect() as c:
        for choice, seed in (("required", 1), ("required", 2), ("add", 3), ({"type": "function", "function": {
                "name": "get_weather"}}, 4)):
            text, end = run(c, "chat", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                            tools=[WEATHER, ADD], tool_choice=choice, max_tokens=120, temperature=1.0, seed=seed)
            assert end.finish == "stop", (choice, text)
            calls = end["tool_calls"]
            assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
            fn = calls[0]["function"]
            want = choice if isinstance(choice, str) and choice != "required" else \
                choice["function"]["name"] if isinstance(choice, dict) else fn["name"]
            assert fn["name"] == want and isinstance(fn["arguments"], str)
            jsonschema.validate(json.loads(fn["arguments"]), PARAMS[fn["name"]])
            assert end["content"] is None


def test_auto_and_none_and_tool_results(system):
    with system.connect() as c:
        text, end = run(c, "chat", messages=ASK, tools=[WEATHER], max_tokens=20, temperature=0.0)
        assert end["tool_calls"] == [] and "content" not in end   # the random model calls nothing
        text, end = run(c, "chat", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=10,
                        temperature=0.0)
        assert end["tool_calls"] == []
        convo = [{"role": "user", "content": "Weather in Oslo?"},
                 {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"c\"}"}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}]
        prompt = c.apply_chat_template(messages=[{"role": "user", "content": "x"}])    # no tools: plain
        assert "<tools>" not in prompt
        text, end = run(c, "chat", messages=convo, tools=[WEATHER], max_tokens=5, temperature=0.0)
        assert end.prompt_tokens > len(convo) * 5
        for bad, part in [({"tools": "x"}, "tools must be a list"),
                          ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
                          ({"tools": [WEATHER], "tool_choice": "nope"}, "'nope', which is not among the tools"),
                          ({"tool_choice": "required"}, "gives no tools"),
                          ({"tools": [WEATHER], "tool_choice": "required", "regex": "a"}, "makes the reply a tool call"),
                          ({"messages": [{"role": "tool"}]}, "a tool message needs its result")]:
            with pytest.raises(errors.EINVAL) as e:
                run(c, "chat", **{"messages": ASK, "max_tokens": 4, **bad})
            assert part in e.value.message, (bad, e.value.message)


def test_a_context_keeps_the_call_in_its_conversation(system):
    with system.connect() as c:
        ctx = c.open_context(system="You call tools.")
        _, end = run(c, "chat", ctx=ctx, messages=[{"role": "user", "content": "2 + 3?"}], tools=[ADD],
                     tool_choice="required", max_tokens=100, temperature=0.0)
        call = end["tool_calls"][0]
        _, end2 = run(c, "chat", ctx=ctx, messages=[{"role": "tool", "tool_call_id": call["id"], "content": "5"}],
                      tools=[ADD], max_tokens=5, temperature=0.0)
        assert end2.cached_tokens > 0                 # the call's turn is in the context's KV
        c.close_context(ctx)


# -- the gateway ----------------------------------------------------------------------------------

def test_openai_client_response_format_and_tools(system):
    client = openai.OpenAI(base_url=system.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    schema = SCHEMAS["enums"]
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=100,
                                       response_format=schema_format(schema))
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=120,
                                       tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["add"])
    stream = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=120,
                                            tools=[WEATHER], tool_choice="required", stream=True)
    deltas = [ch.choices[0] for ch in stream if ch.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or ())]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS["get_weather"])
    assert deltas[-1].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, response_format=schema_format(
            {"type": "array", "uniqueItems": True}))
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_ollama_client_format_and_tools(system):
    client = ollama.Client(host=system.url, timeout=60)
    schema = SCHEMAS["ranges"]
    r = client.chat(model="tiny", messages=ASK, format=schema, options={"temperature": 0, "num_predict": 100})
    jsonschema.validate(json.loads(r.message.content), schema)
    r = client.generate(model="tiny", prompt="JSON please", format="json",
                        options={"temperature": 0, "num_predict": 100})
    assert r.response.startswith("{")
    r = client.chat(model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER],
                    options={"temperature": 0, "num_predict": 10})
    assert not r.message.tool_calls                 # auto, and the random model calls nothing
    chunks = list(client.chat(model="tiny", messages=ASK, format=SCHEMAS["enums"], stream=True,
                              options={"temperature": 0, "num_predict": 100}))
    jsonschema.validate(json.loads("".join(ch.message.content for ch in chunks)), SCHEMAS["enums"])
    with pytest.raises(ollama.ResponseError, match="uniqueItems"):
        client.chat(model="tiny", messages=ASK, format={"type": "array", "uniqueItems": True})
    # Ollama's API has no tool_choice; llmos takes OpenAI's there too, so a call can be asked for
    r = httpx.post(system.url + "/api/chat", timeout=60, json={
        "model": "tiny", "messages": ASK, "tools": [ADD], "tool_choice": "required", "stream": False,
        "options": {"temperature": 0, "num_predict": 100}}).json()
    (call,) = r["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and isinstance(call["function"]["arguments"], dict)
    jsonschema.validate(call["function"]["arguments"], PARAMS["add"])


# -- llmsh: ? TEXT --------------------------------------------------------------------------------

def llmsh(system: Booted, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "userland.llmsh", "--home", str(system.home), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_llmsh_proposes_a_command_line_that_parses_and_runs_nothing(system):
    """With -c the proposal is printed alone on the first line and never run; whatever the (random)
    model says, the grammar made from the command table makes it a line llmsh parses, of builtins."""
    from userland.shell.commands import COMMANDS
    from userland.shell.parse import parse
    with system.connect() as c:
        before = {p["pid"] for p in c.ps()}
    for request in ("list the running processes", "show the keys under notes", "stop job 2"):
        r = llmsh(system, "-c", f"? {request}")
        assert r.returncode == 0, r.stderr
        line, why = r.stdout.splitlines()[:2]
        (item,) = parse(line + "\n")
        for pipeline in [item.first] + [p for _, p in item.rest]:
            for command in pipeline.commands:
                assert "".join(command.words[0].parts) in COMMANDS, line
        assert why.startswith("# ") and why[2:].split(":")[0] == line.split()[0]
    r = llmsh(system, "-c", "?")
    assert r.returncode == 2 and "say what to do" in r.stderr
    with system.connect() as c:                       # nothing was started, nothing was stopped
        assert {p["pid"] for p in c.ps()} - before - {c.getpid()} == set() and c.ps(pid=1)


def test_llmsh_at_a_terminal_shows_the_proposal_and_runs_it_only_on_yes(system):
    term = llmsh_terminal(system.home, timeout=60)
    try:
        term.expect(r"llmsh\$")
        term.sendline("? show the keys under notes")
        term.expect(r"\n  # (\w+): ")
        term.expect(r"run it\? \[y/N\]")
        term.sendline("")                              # the default is no
        term.expect(r"llmsh\$")
        term.sendline("echo $?")
        term.expect(r"[^0-9]0\r\n")              # nothing ran: the status is ?'s own
    finally:
        term.close(force=True)
