"""No generation lost when the inference service dies (issue 13, item 2): the kernel keeps what each
stream has delivered and resubmits it with ``resume`` to the restarted service, which goes on from
there. The program sees one unbroken stream, no token repeated or skipped, identical to an
undisturbed run, greedy or seeded; contexts, their handles and constraints outlive the death.

The tiny long-context model of tiny_system: a generation of hundreds of tokens lasts a second or
more, so a kill after the first chunks lands mid-stream."""

from __future__ import annotations

import os
import re
import signal

from conftest import wait_until
from tiny_system import tiny_system  # noqa: F401

LONG = 500


def kill_midway(system, service: str, stream, after: int = 5) -> tuple[list[int], str]:
    """Read a stream to its end, SIGKILLing the service once `after` tokens have come; its tokens
    and text, and that the service was really replaced."""
    old = system.service(service)
    tokens, text, killed = [], [], False
    for chunk in stream:
        tokens += chunk.tokens
        text.append(chunk.text)
        if len(tokens) >= after and not killed:
            os.kill(old["pid"], signal.SIGKILL)
            killed = True
    assert killed, "the stream ended before the kill"
    wait_until(lambda: system.service(service)["pid"] not in (None, old["pid"]), 20,
               f"a new {service} service")
    return tokens, "".join(text)


def resumed(system) -> int:
    with system.connect() as c:
        return c.kstat()["counters"]["resumed"]


def test_a_greedy_generation_goes_on_unbroken_across_a_kill_of_inference(tiny_system):  # noqa: F811
    args = dict(max_tokens=LONG, temperature=0.0, ignore_eos=True, repetition_penalty=3.0)
    before = resumed(tiny_system)
    with tiny_system.connect() as c:
        want = list(c.generate("the resume test", **args))
        stream = c.generate("the resume test", **args)
        tokens, text = kill_midway(tiny_system, "inference", stream)
    assert tokens == [t for ch in want for t in ch.tokens]
    assert text == "".join(ch.text for ch in want)
    assert stream.result.finish == "length" and stream.result.generated_tokens == LONG
    assert resumed(tiny_system) == before + 1


def test_a_seeded_generation_is_the_same_across_kills_of_inference_and_of_the_driver(tiny_system):  # noqa: F811
    """The sampler's random stream is a function of the seed and the position: made again on a new
    driver, or for a resubmitted call, it goes on where it stood."""
    args = dict(max_tokens=LONG, temperature=1.5, seed=11, ignore_eos=True, repetition_penalty=3.0)
    with tiny_system.connect() as c:
        want = [t for ch in c.generate("seeded", **args) for t in ch.tokens]
        assert want != [t for ch in c.generate("seeded", **{**args, "seed": 12}) for t in ch.tokens]
        for service in ("inference", "cpu"):
            tokens, _ = kill_midway(tiny_system, service, c.generate("seeded", **args), after=40)
            assert tokens == want, service


def test_a_chat_turn_on_a_context_survives_and_the_context_lives_on(tiny_system):  # noqa: F811
    """The context outlives the service under its handle (its K/V recomputed: cached_tokens 0 at
    the resumed turn), and its history holds the whole reply, the part before the kill too."""
    args = dict(max_tokens=LONG, temperature=0.0, ignore_eos=True, repetition_penalty=3.0)
    first, second = [{"role": "user", "content": "hello"}], [{"role": "user", "content": "go on"}]
    with tiny_system.connect() as c:
        ref = c.open_context(system="Be brief.")
        ref_first = "".join(ch.text for ch in c.chat(first, ctx=ref, **{**args, "max_tokens": 8}))
        want = [t for ch in c.chat(second, ctx=ref, **args) for t in ch.tokens]
        c.close_context(ref)

        ctx = c.open_context(system="Be brief.")
        assert "".join(ch.text for ch in c.chat(first, ctx=ctx, **{**args, "max_tokens": 8})) == ref_first
        stream = c.chat(second, ctx=ctx, **args)
        tokens, text = kill_midway(tiny_system, "inference", stream)
        assert tokens == want
        assert stream.result.cached_tokens == 0          # recomputed on the new service
        mine = {r["ctx"]: r for r in c.contexts()}
        assert mine[ctx]["messages"] == 5                # system, two turns, two replies
        # the next turn sees the history: the same as a fresh chat of the whole conversation
        third = [{"role": "user", "content": "and?"}]
        got = [t for ch in c.chat(third, ctx=ctx, **{**args, "max_tokens": 12}) for t in ch.tokens]
        history = [{"role": "system", "content": "Be brief."}, *first,
                   {"role": "assistant", "content": ref_first}, *second,
                   {"role": "assistant", "content": text}, *third]
        assert got == [t for ch in c.chat(history, **{**args, "max_tokens": 12}) for t in ch.tokens]
        c.close_context(ctx)
        assert ctx not in {r["ctx"] for r in c.contexts()}


def test_contexts_of_a_process_that_ended_while_inference_was_down_are_not_restored(tiny_system):  # noqa: F811
    with tiny_system.connect() as keeper, tiny_system.connect() as c:
        mine = keeper.open_context(system="kept")
        theirs = c.open_context(system="gone")
        pid = c.getpid()
        old = tiny_system.service("inference")
        os.kill(old["pid"], signal.SIGSTOP)      # down long enough for the process to end meanwhile
        try:
            c.close()
            wait_until(lambda: not any(p["pid"] == pid for p in keeper.ps()), 10, "the process to end")
        finally:
            os.kill(old["pid"], signal.SIGKILL)
        wait_until(lambda: tiny_system.service("inference")["state"] == "READY"
                   and tiny_system.service("inference")["pid"] != old["pid"], 20, "a new inference")
        assert [r["ctx"] for r in keeper.contexts()] == [mine]
        with tiny_system.connect(privileged=True) as admin:
            assert all(r["ctx"] != theirs for r in admin.contexts(pid=pid))
        keeper.close_context(mine)


def test_a_constrained_generation_keeps_its_constraint_across_a_kill(tiny_system):  # noqa: F811
    pattern = r"(ab|cd){200,400}"
    args = dict(max_tokens=600, temperature=0.7, seed=3, regex=pattern)
    with tiny_system.connect() as c:
        want = "".join(ch.text for ch in c.generate("pattern", **args))
        _, text = kill_midway(tiny_system, "inference", c.generate("pattern", **args), after=20)
    assert text == want and re.fullmatch(pattern, text), text[:80]
