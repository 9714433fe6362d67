"""Chats resent whole through the gateway are turns on contexts it holds: each follow-up reuses
its history's KV (usage's cached_tokens), answers exactly what a recompute answers, never
reuses a history it was not sent, and holds at most contexts_per_key contexts (2 here) within
the key's kv_blocks. Every answer with reuse is checked against the same conversation computed
from scratch through syscalls, greedy, on the tiny model.
"""

from __future__ import annotations

import os
import signal

import httpx
import ollama
import openai
import pytest

from conftest import wait_until
from test_gateway import add_key, client, requests_of, start_tiny

GREEDY = {"max_tokens": 10, "temperature": 0.0}
SYSTEM = {"role": "system", "content": "You are terse."}
# the tiny model with an output matrix of its own: tied to the embedding, its greedy answer
# repeats the last token (a chat's is all newlines), and equal answers would say little
MODEL = {"tied": False}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def gw():
    system = start_tiny("contexts_per_key = 2\n", **MODEL)
    yield system
    system.discard()


@pytest.fixture
def oai(gw):
    return client(gw)


def ask(api: openai.OpenAI, messages: list[dict], **kw) -> tuple[str, int, int]:
    """The reply, its cached prompt tokens, and its prompt tokens."""
    r = api.chat.completions.create(model="tiny", messages=messages, **{**GREEDY, **kw})
    usage = r.usage
    return r.choices[0].message.content, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def recomputed(gw, messages: list[dict], **kw) -> str:
    """The same conversation through syscalls, with no context: every token computed."""
    with gw.connect() as c:
        return c.chat(messages, **{**GREEDY, **kw}).text


def held(gw, pid: int) -> dict[int, dict]:
    with gw.connect(privileged=True) as c:
        return {x["ctx"]: x for x in c.contexts(pid=pid)}


def test_each_follow_up_reuses_the_history_and_answers_as_a_recompute(gw, oai):
    messages, prompt = [SYSTEM], 0
    for turn, question in enumerate(("Hello there", "And then?", "Why so?", "Tell me more")):
        messages.append(user(question))
        text, cached, tokens = ask(oai, messages)
        assert text == recomputed(gw, messages)
        if turn == 0:
            assert cached == 0
        else:       # at least all of the last request's prompt came from the cache
            assert prompt <= cached < tokens
        messages.append(assistant(text))
        prompt = tokens
    # one context carried the whole conversation: every message is in it
    assert len(messages) in [c["messages"] for c in held(gw, gw.gateway_pid).values()]


def test_ollama_chat_extends_the_same_context(gw):
    api = ollama.Client(host=gw.url)
    options = {"num_predict": 10, "temperature": 0}
    messages = [user("Good morning")]
    first = api.chat(model="tiny", messages=messages, options=options).message.content
    ctx = max(held(gw, gw.gateway_pid))         # the newest: this conversation's
    messages += [assistant(first), user("How are you?")]
    parts = list(api.chat(model="tiny", messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == recomputed(gw, messages)
    assert held(gw, gw.gateway_pid)[ctx]["messages"] == 4


def test_a_history_that_differs_from_the_held_one_is_computed_afresh(gw, oai):
    question = [user("Tell me a story")]
    reply, _, _ = ask(oai, question)
    diverging = (
        question + [assistant(reply + " And more."), user("Go on")],    # the reply edited
        [user("Tell me a tale"), assistant(reply), user("Go on")],      # the question edited
        [assistant(reply), user("Tell me a story"), user("Go on")],     # the same messages, reordered
    )
    for messages in diverging:
        text, cached, _ = ask(oai, messages)
        assert cached == 0 and text == recomputed(gw, messages)
        reply_again, cached, _ = ask(oai, question)      # held again as the newest conversation
        assert reply_again == reply
    text, cached, _ = ask(oai, question + [assistant(reply), user("Go on")])
    assert cached > 0 and text == recomputed(gw, question + [assistant(reply), user("Go on")])


def test_tokens_that_differ_under_equal_messages_are_recomputed(gw, oai):
    """A stop string ends the reply's text before its tokens: the context's KV holds the stop's
    tokens, which the resent history lacks, so only the prefix they share is reused."""
    question = [user("Say something long")]
    long = {"max_tokens": 20, "extra_body": {"ignore_eos": True}}
    whole, _, _ = ask(oai, question, **long)
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut, _, prompt = ask(oai, question, stop=[stop], **long)
    assert stop and len(cut) < len(whole), (whole, cut)
    follow_up = question + [assistant(cut), user("Go on")]
    text, cached, tokens = ask(oai, follow_up)
    assert prompt <= cached < tokens and text == recomputed(gw, follow_up)


def test_past_contexts_per_key_the_least_recently_used_is_closed(gw, oai):
    replies = {}
    for name in ("A", "B", "C"):
        replies[name] = ask(oai, [user(f"Conversation {name}")])[0]
    wait_until(lambda: len(held(gw, gw.gateway_pid)) == 2, 5, "the gateway to close its third context")

    def follow_up(name: str) -> list[dict]:
        return [user(f"Conversation {name}"), assistant(replies[name]), user("Next")]
    text, cached, _ = ask(oai, follow_up("B"))
    assert cached > 0 and text == recomputed(gw, follow_up("B"))
    text, cached, _ = ask(oai, follow_up("A"))          # closed: computed again, the same answer
    assert cached == 0 and text == recomputed(gw, follow_up("A"))
    wait_until(lambda: len(held(gw, gw.gateway_pid)) == 2, 5, "the gateway to hold two contexts")


def test_a_keys_chats_are_its_own_and_held_within_its_kv_blocks(gw, oai):
    key = add_key(gw.home, "bob")
    bob = client(gw, key)
    long = "Please tell me about the history of computing, " * 3
    first = [user(long + "first")]
    reply, _, _ = ask(bob, first)
    with gw.connect() as c:
        pid = next(p["pid"] for p in c.ps() if p["name"] == "key:bob")
    follow = first + [assistant(reply), user("Next")]
    text, cached, _ = ask(oai, follow)                  # not bob's: nothing of his is reused
    assert cached == 0 and text == recomputed(gw, follow)
    (one,) = held(gw, pid).values()
    limit = 2 * one["kv_blocks"] - 1            # room for one such conversation, not two
    with gw.connect(privileged=True) as root:
        root.setrlimit("kv_blocks", limit, pid=pid)
    # a second conversation needs more than the blocks left: bob's idle context gives its back
    ask(bob, [user(long + "second")])
    assert held(gw, pid)[one["ctx"]]["kv_blocks"] == 0
    with gw.connect() as c:
        assert c.ps(pid=pid)[0]["kv_blocks"] <= limit
    text, cached, _ = ask(bob, follow)
    assert cached == 0 and text == recomputed(gw, follow)


def test_a_turn_given_up_by_its_client_closes_its_context(gw, oai):
    history = [user("Count slowly")]
    reply, _, _ = ask(oai, history)
    ctx = max(held(gw, gw.gateway_pid))         # the newest: this conversation's
    follow = history + [assistant(reply), user("Go on")]
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": follow, "max_tokens": 4000, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()          # kept: a dropped iterator closes the connection
        next(lines)
        now = held(gw, gw.gateway_pid)
        assert now[ctx]["messages"] == 2, (ctx, now)      # its turn runs on it
    wait_until(lambda: not requests_of(gw, gw.gateway_pid), 5, "the request to be cancelled")

    def freed():            # how the turn ended is not known: the context goes, with its KV
        now = held(gw, gw.gateway_pid)
        with gw.connect() as c:
            return ctx not in now and \
                c.ps(pid=gw.gateway_pid)[0]["kv_blocks"] == sum(x["kv_blocks"] for x in now.values())
    wait_until(freed, 5, "the cancelled turn's context and its KV blocks to be freed")
    text, cached, _ = ask(oai, follow)
    assert cached == 0 and text == recomputed(gw, follow)


def test_two_requests_on_one_history_at_once_both_answer(gw, oai):
    history = [user("Twins")]
    reply, _, _ = ask(oai, history)
    follow = history + [assistant(reply), user("Again")]
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": follow, "max_tokens": 4000, "ignore_eos": True,
            "stream": True}) as busy:
        lines = busy.iter_lines()
        next(lines)             # it holds the history's context: the next one is answered beside it
        text, cached, _ = ask(oai, follow)
        assert cached == 0 and text == recomputed(gw, follow)


def test_after_the_inference_service_restarts_held_chats_are_computed_afresh():
    """A held context outlives the service (the kernel keeps its messages) but not its K/V: the
    follow-up is computed afresh (cached_tokens 0), and never on another context the gateway
    opened since."""
    system = start_tiny("contexts_per_key = 2\n", **MODEL)
    try:
        anyone = client(system)
        first = [user("Before the crash")]
        reply, _, _ = ask(anyone, first)
        old = system.service("inference")
        os.kill(old["pid"], signal.SIGKILL)
        wait_until(lambda: (s := system.service("inference"))["state"] == "READY" and s["pid"] != old["pid"],
                   30, "the inference service to be restarted")
        other = [user("Another conversation")]
        other_reply, _, _ = ask(anyone, other)      # a new context, perhaps under the old handle
        follow = first + [assistant(reply), user("After")]
        text, cached, tokens = ask(anyone, follow)
        with system.connect() as c:                 # not a turn on the other's context
            alone = c.chat(follow, **GREEDY)
            assert (text, cached, tokens) == (alone.text, 0, alone.result.prompt_tokens)
        follow = other + [assistant(other_reply), user("And?")]
        text, cached, _ = ask(anyone, follow)       # the new one is held, and used
        assert cached > 0 and text == recomputed(system, follow)
    finally:
        system.discard()


def test_contexts_per_key_is_checked_and_passed_to_the_daemon(tmp_path):
    from syscalls.runtime.config import Config
    (tmp_path / "four.toml").write_text("[gateway]\ncontexts_per_key = 4\n")
    assert Config.load(tmp_path / "four.toml").daemons[0].argv[-2:] == ["--contexts", "4"]
    for bad in ("-1", "257", '"many"'):
        (tmp_path / "bad.toml").write_text(f"[gateway]\ncontexts_per_key = {bad}\n")
        with pytest.raises(ValueError, match="contexts_per_key"):
            Config.load(tmp_path / "bad.toml")
