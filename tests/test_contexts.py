"""Contexts: conversations the kernel keeps, whose KV prefix is reused across turns, saved to
storage, restored after a reboot, evicted under memory pressure and freed with their process.
The tiny random model keeps it fast; every reuse is checked against recomputing from scratch."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, Booted, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors

MODEL_SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
GREEDY = dict(max_tokens=12, temperature=0.0)


def make_home(kv_blocks: int = 128) -> Path:
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = {kv_blocks}\n'
                                      'block_size = 16\n' + MODEL_SERVICES)
    return home


@pytest.fixture(scope="module")
def system():
    s = Booted(make_home()).boot()
    yield s
    s.discard()


def turn(c, ctx: int, text: str, **kw):
    stream = c.chat([{"role": "user", "content": text}], ctx=ctx, **{**GREEDY, **kw})
    return [t for ch in stream for t in ch.tokens], stream.result


def plain(c, messages: list[dict]) -> list[int]:
    """The same conversation without a context: everything computed from scratch."""
    return [t for ch in c.chat(messages, **GREEDY) for t in ch.tokens]


def test_a_follow_up_turn_reuses_the_history_and_answers_the_same(system):
    with system.connect() as c:
        ctx = c.open_context(system="You are terse.")
        first, end1 = turn(c, ctx, "hello there")
        assert end1.cached_tokens == 0 and end1.generated_tokens == len(first)
        second, end2 = turn(c, ctx, "and then?")
        # all of turn one (its prompt and its reply) came from the cache
        assert end2.cached_tokens >= end1.prompt_tokens + len(first) - 2
        reply1 = c.detokenize(first)
        history = [{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "hello there"},
                   {"role": "assistant", "content": reply1},
                   {"role": "user", "content": "and then?"}]
        assert second == plain(c, history)
        (info,) = c.contexts()
        assert info["ctx"] == ctx and info["messages"] == 5 and info["kv_blocks"] >= 1
        wait_until(lambda: c.ps(pid=c.pid)[0]["contexts"] == 1, 10, "ps to count the context")
        assert c.ps(pid=c.pid)[0]["kv_blocks"] == info["kv_blocks"]
        c.close_context(ctx)
        with pytest.raises(errors.EBADF, match=f"context {ctx} is not open in pid {c.pid}"):
            turn(c, ctx, "again")
        assert c.runqueue()["blocks_used"] == 0


def test_handles_are_private_and_one_turn_runs_at_a_time(system):
    with system.connect() as a, system.connect() as b:
        ctx = a.open_context()
        with pytest.raises(errors.EBADF):
            turn(b, ctx, "not yours")
        with pytest.raises(errors.EPERM):
            b.contexts(pid=a.pid)
        long = a.chat([{"role": "user", "content": "hi"}], ctx=ctx, max_tokens=150, ignore_eos=True)
        next(long)
        with pytest.raises(errors.EAGAIN, match="has a turn in flight"):
            turn(a, ctx, "me too")
        long.close()
        wait_until(lambda: a.contexts()[0]["tokens"] > 0, 10, "the cancelled turn to hand its blocks back")
        after, _ = turn(a, ctx, "hi")                     # the context still works after a cancel
        assert after


def test_contexts_close_when_their_process_exits(system):
    with system.connect(privileged=True) as admin:
        gone = system.connect()
        ctx = gone.open_context(system="x")
        turn(gone, ctx, "hello")
        pid = gone.pid
        assert admin.contexts(pid=pid)[0]["kv_blocks"] > 0
        gone.close()
        wait_until(lambda: admin.runqueue()["blocks_used"] == 0, 10, "its blocks to be freed")
        with pytest.raises(errors.ESRCH):
            admin.ps(pid=pid)


def test_idle_contexts_are_evicted_least_recently_used_and_recomputed_transparently():
    s = Booted(make_home(kv_blocks=16)).boot()      # 16 blocks of 16 tokens: room for little
    try:
        with s.connect() as c:
            old, new = c.open_context(system="first"), c.open_context(system="second")
            turn(c, old, "hello")
            turn(c, new, "hello")
            held = {x["ctx"]: x["kv_blocks"] for x in c.contexts()}
            assert held[old] > 0 and held[new] > 0
            assert c.runqueue()["blocks_cached"] == held[old] + held[new]
            # a long generation needs nearly all the pool: the least recently used context goes first
            big = [t for ch in c.generate("word " * 20, max_tokens=150, ignore_eos=True, temperature=0.0)
                   for t in ch.tokens]
            assert len(big) == 150
            held = {x["ctx"]: x["kv_blocks"] for x in c.contexts()}
            assert held[old] == 0
            again, end = turn(c, old, "more")
            assert end.cached_tokens == 0                # recomputed, and the answer is the same
            msgs = [{"role": "system", "content": "first"}, {"role": "user", "content": "hello"}]
            reply = c.detokenize(turn_tokens := plain(c, msgs))
            assert turn_tokens
            assert again == plain(c, msgs + [{"role": "assistant", "content": reply},
                                             {"role": "user", "content": "more"}])
    finally:
        s.discard()


def test_context_blocks_count_against_the_kv_blocks_limit(system):
    with system.connect() as c:
        ctx = c.open_context(system="You are terse.")
        turn(c, ctx, "hello there")
        mine = c.contexts()[0]["kv_blocks"]
        c.setrlimit("kv_blocks", mine + 1)
        # a request needing more than the one block left first takes the context's blocks back
        out = [t for ch in c.generate("hello", max_tokens=25, ignore_eos=True, temperature=0.0)
               for t in ch.tokens]
        assert len(out) == 25 and c.contexts()[0]["kv_blocks"] == 0
        c.close_context(ctx)


def test_a_context_outlives_a_restart_of_the_service_under_its_handle():
    """The kernel keeps each context's messages (kernel/keep.py): a restarted inference service
    opens them again under their handles, their K/V recomputed at the next turn; handles it opens
    itself are numbered past the last start's, so an old and a new one never collide."""
    s = Booted(make_home()).boot()
    try:
        with s.connect() as c:
            old = c.open_context(system="first")
            reply, _ = turn(c, old, "hello")
            before = s.service("inference")
            os.kill(before["pid"], signal.SIGKILL)
            wait_until(lambda: (x := s.service("inference"))["state"] == "READY" and x["pid"] != before["pid"],
                       30, "the inference service to be restarted")
            new = c.open_context(system="second")
            assert new > old
            again, end = turn(c, old, "again")
            assert end.cached_tokens == 0
            history = [{"role": "system", "content": "first"}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": c.detokenize(reply)},
                       {"role": "user", "content": "again"}]
            assert again == plain(c, history)
            msgs = [{"role": "system", "content": "second"}, {"role": "user", "content": "hi"}]
            assert turn(c, new, "hi")[0] == plain(c, msgs)
    finally:
        s.discard()


def test_saved_context_is_restored_after_a_reboot():
    home = make_home()
    s = Booted(home).boot()
    try:
        with s.connect() as c:
            ctx = c.open_context(system="You are terse.")
            first, _ = turn(c, ctx, "hello there")
            saved = c.save_context(ctx, "chats/one")
            assert saved["version"] == 1 and saved["size"] > 0
            # the put the inference service made on its behalf is counted as the caller's
            assert c.ps(pid=c.pid)[0]["bytes_stored"] == saved["size"]
            with pytest.raises(errors.EINVAL, match="does not hold a saved context"):
                c.put("not-a-context", [1, 2, 3])
                c.load_context("not-a-context")
        s.shutdown()
        s = Booted(home).boot()
        with s.connect() as c:
            ctx = c.load_context("chats/one")
            second, end = turn(c, ctx, "and then?")
            assert end.cached_tokens == 0             # a new boot: recomputed once...
            history = [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "hello there"},
                       {"role": "assistant", "content": c.detokenize(first)},
                       {"role": "user", "content": "and then?"}]
            assert second == plain(c, history)
            third, end3 = turn(c, ctx, "ok")
            assert end3.cached_tokens > end.prompt_tokens - 2   # ...then cached again
            with pytest.raises(errors.ENOENT):
                c.load_context("chats/none")
    finally:
        s.discard()
