"""Constrained decoding in the engine and the driver's runner, in this process on the tiny random
model: the grammar state stays exact through preemption and recompute, a restarted driver, decoding
ahead and a context's turn; a stuck constraint ends its request with EINVAL; and the constraint
machinery's own pieces (sync and rollback, masks, the tool-call fallback prompt)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from drivers.model import constraints as C
from services.inference.engine import Engine, run_in_process, step_in_process

SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "words": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["n", "words", "ok"], "additionalProperties": False}
PROMPTS = ["the first prompt, a long one that fills blocks", "second", "a third prompt here",
           "and a fourth one"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from drivers.model import Tokenizer
    from tests.model.tiny_gguf import write_tiny_gguf
    path = write_tiny_gguf(tmp_path_factory.mktemp("structured") / "tiny.gguf", context=1024)
    return path, Tokenizer.from_gguf(path)


def fresh(tiny, num_blocks=256, block_size=4, **kw):
    from drivers.runner import ModelRunner
    runner = ModelRunner.from_gguf(tiny[0], num_blocks=num_blocks, block_size=block_size)
    return Engine(runner.info(), tiny[1], **kw), runner


def grammar() -> str:
    return C.grammar_for(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})


def alone(tiny, prompt, params, **kw):
    e, r = fresh(tiny)
    sid = e.add(prompt, params, constraint=grammar(), max_tokens=150, **kw)
    return run_in_process(e, r)[sid]


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "top_k": 0,
                                                          "top_p": 1.0, "min_p": 0.0}])
def test_preemption_and_recompute_keep_the_grammar_exact(tiny, params):
    e, runner = fresh(tiny, num_blocks=40, block_size=4)        # 160 slots: four outputs cannot all fit
    ids = [e.add(p, params, constraint=grammar(), max_tokens=150) for p in PROMPTS]
    out = run_in_process(e, runner)
    assert sum(out[s]["preemptions"] for s in ids) > 0, "the pool was meant to run out"
    ref, runner = fresh(tiny)                                    # room for all: never preempted
    want = [ref.add(p, params, constraint=grammar(), max_tokens=150) for p in PROMPTS]
    ref_out = run_in_process(ref, runner)
    for sid, ref_sid in zip(ids, want):
        assert out[sid]["finish"] == "stop", out[sid]
        jsonschema.validate(json.loads(out[sid]["text"]), SCHEMA)
        assert ref_out[ref_sid]["preemptions"] == 0 and out[sid]["tokens"] == ref_out[ref_sid]["tokens"]


def test_a_restarted_driver_and_decoding_ahead_give_the_same_output(tiny):
    params = {"temperature": 0.0}
    want = alone(tiny, PROMPTS[0], params)
    e, runner = fresh(tiny, decode_steps=4)
    sid = e.add(PROMPTS[0], params, constraint=grammar(), max_tokens=150)
    out = {"text": "", "tokens": []}
    for i in range(200):
        if i == 6:              # the driver died: a new one knows nothing; the engine recomputes
            e.device_lost()
            _, runner = fresh(tiny)
        for ev in step_in_process(e, runner):
            out["text"] += ev["text"]
            out["tokens"] += ev["tokens"]
            out.update({k: v for k, v in ev.items() if k not in ("text", "tokens")})
        if not e.has_work():
            break
    assert out["finish"] == "stop" and out["preemptions"] > 0
    assert out["tokens"] == want["tokens"]
    jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_unconstrained_neighbours_are_untouched(tiny):
    e, runner = fresh(tiny)
    free = [e.add(p, {"temperature": 0.0}, max_tokens=20, ignore_eos=True) for p in PROMPTS[:2]]
    bound = [e.add(p, {"temperature": 0.0}, constraint=grammar(), max_tokens=150) for p in PROMPTS[2:]]
    out = run_in_process(e, runner)
    for sid, p in zip(free, PROMPTS):
        e2, r2 = fresh(tiny)
        s2 = e2.add(p, {"temperature": 0.0}, max_tokens=20, ignore_eos=True)
        assert out[sid]["tokens"] == run_in_process(e2, r2)[s2]["tokens"]
    for sid in bound:
        jsonschema.validate(json.loads(out[sid]["text"]), SCHEMA)
    assert runner._constrained.masks([(0, free[0], [1, 2])]) is None      # nothing for them to do
    assert sorted(runner._constrained.by_seq) == bound
    step_in_process(e, runner)                 # the next step tells the driver who has finished
    assert not runner._constrained.by_seq


def test_a_stuck_constraint_ends_with_einval(tiny):
    """The driver finds no token that can continue (here: an output the grammar refuses, as a
    driver would after a parser limit) and says so; the engine ends the request with EINVAL."""
    e, runner = fresh(tiny)
    digits = C.grammar_for(regex="[0-9]{4}")
    prompt = tiny[1].encode("count:")
    step = {"seq_id": 1, "tokens": prompt + tiny[1].encode("x"), "start": 0, "block_table": list(range(8)),
            "sample": True, "params": {"temperature": 0.0}, "constraint": {"grammar": digits,
                                                                           "prompt_len": len(prompt)}}
    (sampled,) = runner.step([step])
    assert "no token can continue the output after 'x'" in sampled["error"]
    sid = e.add("count:", {"temperature": 0.0}, constraint=digits, max_tokens=10)
    s = e.schedule()
    (ev,) = e.postprocess(s, [{"seq_id": sid, "token": 0, "logprob": 0.0, "top": [], "error": "stuck here"}])
    assert ev["finish"] == "error" and ev["error_code"] == "EINVAL" and ev["error"] == "constraint: stuck here"
    assert not e.has_work()


# -- the pieces -----------------------------------------------------------------------------------

def test_sync_rolls_back_and_masks_are_exact(tiny):
    tok = tiny[1]
    vocab = C.vocabulary(tok)
    c = C.Constraint(vocab, grammar(), prompt_len=2)
    text = '{"n": 12, "words": ["ab"], "ok": true}'
    ids = tok.encode(text, add_bos=False)
    for k in range(len(ids)):                      # each next token of a valid document is allowed
        C.Masks([(0, c, [5, 6] + ids[:k])], background=k % 2 == 0).apply(row := np.zeros((1, vocab.vocab_size), np.float32))
        assert np.isfinite(row[0, ids[k]]), (k, tok.decode(ids[:k + 1]))
        if k == 0:                                 # and only what can begin one
            assert all(tok.token_bytes(t).startswith(b"{") for t in np.flatnonzero(np.isfinite(row[0])))
    c.sync([5, 6] + ids)
    assert c.matcher.is_accepting()
    c.sync([5, 6] + ids[:3])                       # a recompute that got only this far
    assert c.fed == ids[:3] and not c.matcher.is_accepting()
    c.sync([5, 6] + tok.encode('{"n": 9', add_bos=False))     # another past: rolled back, re-fed
    assert not c.blocked()
    c.sync([5, 6] + tok.encode('{"x"', add_bos=False))
    assert c.blocked() and "no token can continue" in c.why()


def test_the_fallback_prompt_carries_tools_calls_and_results(tiny):
    from services.inference.tools import Tools, render, template_uses_tools
    tok = tiny[1]
    assert not template_uses_tools(tok)
    tools = Tools.parse([{"type": "function", "function": {"name": "lookup", "description": "Find a word",
                                                           "parameters": {"type": "object", "properties": {
                                                               "word": {"type": "string"}}}}}], None)
    prompt = render(tok, [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "define cat"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                           "function": {"name": "lookup", "arguments": "{\"word\": \"cat\"}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "a small feline"},
                          {"role": "tool", "tool_call_id": "c2", "content": "second result"}], tools)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n") and '"name": "lookup"' in system
    assert '<tool_call>\n{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call>' in prompt
    assert ("<|im_start|>user\n<tool_response>\na small feline\n</tool_response>\n<tool_response>\n"
            "second result\n</tool_response><|im_end|>") in prompt
    assert "<tools>" not in render(tok, [{"role": "user", "content": "x"}], Tools.parse(
        [{"type": "function", "function": {"name": "f"}}], "none"))
    content, calls = tools.calls('Sure. <tool_call>\n{"name": "lookup", "arguments": {"word": "dog"}}\n</tool_call>')
    assert content == "Sure." and json.loads(calls[0]["function"]["arguments"]) == {"word": "dog"}
    assert tools.calls('<tool_call>{"name": "other", "arguments": {}}</tool_call>')[1] == []   # not offered
    assert tools.calls('{"name": "lookup", "parameters": {"word": "x"}}')[1][0]["function"]["name"] == "lookup"
