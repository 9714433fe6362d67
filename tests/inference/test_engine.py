"""The inference engine on the tiny random model: continuous batching, chunked prefill, preemption,
cancel, stops and limits, determinism and refusals. Greedy runs use a repetition penalty so that the
random model does not repeat one token forever (which would hide ordering bugs)."""

from __future__ import annotations

import msgpack
import pytest

from drivers.runner import ModelRunner
from services.inference import Engine, RequestError, step_in_process

GREEDY = {"temperature": 0, "repetition_penalty": 3.0}
PROMPTS = ["Hello world! Hello there", "The quick brown fox jumps", "def main():\n    return 42",
           "Numbers like 12345 and 3.14159", "café, naïve, résumé", "the the the and and of of to",
           "I'm fine, thanks.", "emoji 😀🎉 and Ελληνικά"]


def drain(engine: Engine, runner: ModelRunner, out: dict | None = None) -> dict:
    out = out if out is not None else {}
    while engine.has_work():
        collect(step_in_process(engine, runner), out)
    return out


def collect(events: list[dict], out: dict) -> dict:
    for ev in events:
        r = out.setdefault(ev["seq_id"], {"text": "", "tokens": []})
        r["text"] += ev["text"]
        r["tokens"] += ev["tokens"]
        r.setdefault("all_logprobs", []).extend(ev.get("logprobs", ()))
        if "finish" in ev:
            r.update({k: v for k, v in ev.items() if k not in ("text", "tokens")})
    return out


def alone(make_engine, prompt, params=GREEDY, max_tokens=24, **kw) -> dict:
    e, runner = make_engine(num_blocks=256)
    sid = e.add(prompt, params, max_tokens=max_tokens, ignore_eos=True, **kw)
    return drain(e, runner)[sid]


def assert_idle(engine: Engine):
    u = engine.usage()
    assert (u["blocks_used"], u["sequences"], u["running"], u["waiting"]) == (0, 0, 0, 0), u
    assert u["blocks_free"] == u["blocks_total"]


def test_basic_request_finishes_with_counts(make_engine):
    e, runner = make_engine()
    sid = e.add(PROMPTS[0], GREEDY, max_tokens=7, ignore_eos=True)
    r = drain(e, runner)[sid]
    assert r["finish"] == "length" and r["generated_tokens"] == 7 == len(r["tokens"])
    assert r["prompt_tokens"] == len(e.tokenizer.encode(PROMPTS[0]))
    assert r["ttft_s"] > 0 and r["decode_s"] >= 0 and r["error"] is None
    assert len(set(r["tokens"])) > 3, "the repetition penalty should vary the greedy tokens"
    assert_idle(e)


def test_continuous_batching_join_and_leave(make_engine):
    e, runner = make_engine(num_blocks=128)
    long = [e.add(p, GREEDY, max_tokens=24, ignore_eos=True) for p in PROMPTS[:2]]
    out: dict = {}
    for _ in range(5):
        collect(step_in_process(e, runner), out)
    short = e.add(PROMPTS[2], GREEDY, max_tokens=3, ignore_eos=True)
    steps = 0
    while "finish" not in out.get(short, {}):
        events = step_in_process(e, runner)
        collect(events, out)
        assert {ev["seq_id"] for ev in events} >= set(long), "running decodes go on while one joins"
        steps += 1
    assert steps == 3 and all("finish" not in out[s] for s in long)
    drain(e, runner, out)
    for sid, prompt in zip(long, PROMPTS):
        assert out[sid]["tokens"] == alone(make_engine, prompt)["tokens"]
    assert out[short]["tokens"] == alone(make_engine, PROMPTS[2], max_tokens=3)["tokens"]
    assert_idle(e)


def test_batch_invariance_16(make_engine):
    e, runner = make_engine(num_blocks=256)
    ids = [e.add(PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)), GREEDY, max_tokens=16, ignore_eos=True)
           for i in range(16)]
    out = drain(e, runner)
    for i in (0, 5, 11):
        prompt = PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS))
        assert out[ids[i]]["tokens"] == alone(make_engine, prompt, max_tokens=16)["tokens"]
    assert_idle(e)


def test_chunked_prefill_does_not_stall_decodes(make_engine):
    e, runner = make_engine(num_blocks=128, token_budget=8)
    decoders = [e.add(p, GREEDY, max_tokens=80, ignore_eos=True) for p in PROMPTS[:3]]
    out: dict = {}
    while any(len(out.get(s, {}).get("tokens", [])) == 0 for s in decoders):
        collect(step_in_process(e, runner), out)
    long_prompt = " ".join(PROMPTS) * 2
    n = len(e.tokenizer.encode(long_prompt))
    assert n > 40
    big = e.add(long_prompt, GREEDY, max_tokens=5, ignore_eos=True)
    prefill_steps = 0
    while big not in out:
        events = step_in_process(e, runner)
        collect(events, out)
        assert {ev["seq_id"] for ev in events if ev["tokens"]} >= set(decoders), "a decoder was stalled"
        assert not any("finish" in out[s] for s in decoders)
        prefill_steps += 1
    assert prefill_steps >= n // 8 - 1, "the long prompt should have been fed in several chunks"
    drain(e, runner, out)
    assert out[big]["tokens"] == alone(make_engine, long_prompt, max_tokens=5)["tokens"]
    for sid, prompt in zip(decoders, PROMPTS):
        assert out[sid]["tokens"] == alone(make_engine, prompt, max_tokens=80)["tokens"]
    assert_idle(e)


@pytest.mark.parametrize("params", [GREEDY, {"temperature": 0.8, "seed": 3, "repetition_penalty": 3.0}])
def test_preemption_recompute_gives_same_tokens(make_engine, params):
    e, runner = make_engine(num_blocks=16, block_size=4)          # 64 slots; 4 x (prompt + 30) cannot all fit
    ids = [e.add(p, params, max_tokens=30, ignore_eos=True) for p in PROMPTS[:4]]
    out = drain(e, runner)
    assert sum(out[s]["preemptions"] for s in ids) > 0, "the pool was meant to run out"
    for sid, prompt in zip(ids, PROMPTS):
        assert out[sid]["finish"] == "length"
        assert out[sid]["tokens"] == alone(make_engine, prompt, params, max_tokens=30)["tokens"]
    assert_idle(e)


@pytest.mark.parametrize("params", [GREEDY, {"temperature": 0.8, "seed": 3, "repetition_penalty": 3.0}])
def test_an_aborted_step_changes_nothing(make_engine, params):
    from drivers.model.batch import StepAborted
    e, runner = make_engine()
    ids = [e.add(p, params, max_tokens=12, ignore_eos=True) for p in PROMPTS[:3]]
    out, aborted = {}, 0
    while e.has_work():
        step = e.schedule()
        if aborted < 3 and step.seqs:                       # the first steps are given up half-way
            layers = iter(range(1, 10))
            with pytest.raises(StepAborted):
                runner.step(step.seqs, lambda: next(layers) == 2)
            aborted += 1
            continue
        for ev in e.postprocess(step, runner.step(step.seqs)):
            out.setdefault(ev["seq_id"], []).extend(ev["tokens"])
    for sid, prompt in zip(ids, PROMPTS):
        assert out[sid] == alone(make_engine, prompt, params, max_tokens=12)["tokens"]
    assert_idle(e)


@pytest.mark.parametrize("params", [GREEDY, {"temperature": 0.8, "seed": 3, "repetition_penalty": 3.0,
                                     "logprobs": 2}])
def test_decoding_ahead_gives_the_tokens_of_one_at_a_time(make_engine, tiny_tokenizer, params):
    one, ahead = make_engine(num_blocks=256), make_engine(num_blocks=256, decode_steps=5)
    results = []
    for e, runner in (one, ahead):
        ids = [e.add(p, params, max_tokens=23, ignore_eos=True) for p in PROMPTS[:3]]
        stop_text = e.add(PROMPTS[3], params, max_tokens=40, stop=["e"])     # ends inside a run ahead
        steps, out = 0, {}
        while e.has_work():
            collect(step_in_process(e, runner), out)
            steps += 1
        results.append(([out[i]["tokens"] for i in ids] + [out[stop_text]["tokens"]],
                        [lp["logprob"] for i in ids for lp in out[i]["all_logprobs"]],
                        out[stop_text]["text"], steps))
        assert_idle(e)
    (tokens1, lp1, text1, steps1), (tokens5, lp5, text5, steps5) = results
    assert tokens5 == tokens1 and text5 == text1
    assert lp5 == pytest.approx(lp1, abs=1e-3)    # batches of other sizes: float sums in other orders
    assert steps5 < steps1 / 2                    # most steps decoded several tokens


def test_a_driver_that_hands_back_early_loses_nothing(make_engine):
    e, runner = make_engine(num_blocks=256, decode_steps=6)
    sid = e.add(PROMPTS[0], GREEDY, max_tokens=30, ignore_eos=True)
    out = []
    while e.has_work():
        step = e.schedule()
        calls = iter(range(100))
        sampled = runner.step(step.seqs, should_yield=lambda: next(calls) == 2)   # after 3 tokens
        for ev in e.postprocess(step, sampled):
            out += ev["tokens"]
    assert out == alone(make_engine, PROMPTS[0], max_tokens=30)["tokens"]
    assert_idle(e)


def test_sequence_larger_than_pool_finishes_with_length(make_engine):
    e, runner = make_engine(num_blocks=4, block_size=4)
    sid = e.add(PROMPTS[0], GREEDY, max_tokens=100, ignore_eos=True)
    r = drain(e, runner)[sid]
    assert r["finish"] == "length" and "KV cache" in r["error"] and len(r["tokens"]) == 16 - r["prompt_tokens"] + 1
    assert_idle(e)


def test_cancel_frees_blocks_at_once(make_engine):
    e, runner = make_engine()
    a = e.add(PROMPTS[0], GREEDY, max_tokens=30, ignore_eos=True)
    b = e.add(PROMPTS[1], GREEDY, max_tokens=10, ignore_eos=True)
    out: dict = {}
    for _ in range(4):
        collect(step_in_process(e, runner), out)
    used = e.usage()["blocks_used"]
    ev = e.cancel(a)
    assert ev["finish"] == "cancelled" and ev["generated_tokens"] == 4
    assert e.usage()["blocks_used"] < used and e.usage()["sequences"] == 1
    assert e.cancel(a) is None
    events = step_in_process(e, runner)
    assert {x["seq_id"] for x in events} == {b}
    drain(e, runner, out)
    assert out[b]["finish"] == "length"
    assert_idle(e)


def test_cancel_while_step_in_flight_ignores_its_result(make_engine):
    e, runner = make_engine()
    a = e.add(PROMPTS[0], GREEDY, max_tokens=5, ignore_eos=True)
    step = e.schedule()
    sampled = runner.step(step.seqs)
    assert e.cancel(a)["finish"] == "cancelled"
    assert e.postprocess(step, sampled) == []
    assert not e.has_work()
    assert_idle(e)


def test_stop_string_spanning_tokens(make_engine, tiny_tokenizer):
    full = alone(make_engine, PROMPTS[1], max_tokens=20)
    texts = [tiny_tokenizer.decode([t]) for t in full["tokens"]]
    i = next(i for i in range(1, len(texts) - 1) if texts[i] and texts[i + 1])
    stop = texts[i][-1] + texts[i + 1][0]
    expected = full["text"][:full["text"].find(stop)]
    e, runner = make_engine()
    sid = e.add(PROMPTS[1], GREEDY, max_tokens=20, ignore_eos=True, stop=[stop])
    r = drain(e, runner)[sid]
    assert r["finish"] == "stop" and r["stop_reason"] == stop and r["text"] == expected
    assert stop not in r["text"]
    assert_idle(e)


def test_stop_id_and_eos(make_engine):
    full = alone(make_engine, PROMPTS[3], max_tokens=12)
    target = full["tokens"][5]
    first = full["tokens"].index(target)
    e, runner = make_engine()
    sid = e.add(PROMPTS[3], GREEDY, max_tokens=12, ignore_eos=True, stop_ids=[target])
    r = drain(e, runner)[sid]
    assert r["finish"] == "stop" and r["stop_reason"] == target and r["tokens"] == full["tokens"][:first + 1]
    assert_idle(e)


def test_max_tokens_and_context_cap(make_engine):
    e, runner = make_engine(num_blocks=256)
    a = e.add(PROMPTS[0], GREEDY, max_tokens=3, ignore_eos=True)
    long_ids = e.tokenizer.encode(" ".join(PROMPTS) * 3)[:250]
    b = e.add(long_ids, GREEDY, max_tokens=50, ignore_eos=True)
    out = drain(e, runner)
    assert out[a]["finish"] == "length" and len(out[a]["tokens"]) == 3
    assert out[b]["finish"] == "length" and len(out[b]["tokens"]) == e.context_length - 250
    assert_idle(e)


def test_seed_determinism(make_engine):
    params = {"temperature": 20.0, "seed": 1234}
    solo = alone(make_engine, PROMPTS[4], params, max_tokens=16)
    e, runner = make_engine(num_blocks=128)
    others = [e.add(p, {"temperature": 1.0}, max_tokens=16, ignore_eos=True) for p in PROMPTS[:3]]
    sid = e.add(PROMPTS[4], params, max_tokens=16, ignore_eos=True)
    other_seed = e.add(PROMPTS[4], {"temperature": 20.0, "seed": 99}, max_tokens=16, ignore_eos=True)
    out = drain(e, runner)
    assert out[sid]["tokens"] == solo["tokens"]
    assert out[other_seed]["tokens"] != solo["tokens"]
    assert len(others) == 3
    assert_idle(e)


def test_refusals_name_the_problem(make_engine):
    e, runner = make_engine()
    with pytest.raises(RequestError, match=r"300 tokens.*context window is 256"):
        e.add(list(range(3, 303)), GREEDY)
    with pytest.raises(RequestError, match="temperature"):
        e.add(PROMPTS[0], {"temperature": -1})
    with pytest.raises(RequestError, match="unknown sampling parameter.*tempreature"):
        e.add(PROMPTS[0], {"tempreature": 0.5})
    with pytest.raises(RequestError, match="max_tokens"):
        e.add(PROMPTS[0], GREEDY, max_tokens=0)
    with pytest.raises(RequestError, match="stop strings"):
        e.add(PROMPTS[0], GREEDY, stop=[""])
    with pytest.raises(RequestError, match="token ids"):
        e.add([1, 10 ** 6], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        e.add([], GREEDY)
    assert not e.has_work()
    assert_idle(e)


def test_driver_failure_finishes_batch_with_error(make_engine):
    e, runner = make_engine()
    sid = e.add(PROMPTS[0], GREEDY, max_tokens=5, ignore_eos=True)

    def broken(batch):
        raise RuntimeError("device lost")
    runner.step = broken
    events = step_in_process(e, runner)
    assert events[0]["finish"] == "error" and "device lost" in events[0]["error"] and events[0]["seq_id"] == sid
    assert_idle(e)


def test_driver_messages_are_plain_msgpack(make_engine):
    e, runner = make_engine()
    e.add(PROMPTS[0], {"temperature": 0, "logprobs": 2}, max_tokens=2, ignore_eos=True)
    step = e.schedule()
    assert msgpack.unpackb(msgpack.packb(step.seqs)) == step.seqs
    sampled = runner.step(step.seqs)
    assert msgpack.unpackb(msgpack.packb(sampled)) == sampled
    events = e.postprocess(step, sampled)
    assert len(events[0]["logprobs"][0]["top"]) == 2
    assert msgpack.unpackb(msgpack.packb(events)) == events
    assert msgpack.unpackb(msgpack.packb(runner.info())) == runner.info()
    drain(e, runner)
    assert_idle(e)
