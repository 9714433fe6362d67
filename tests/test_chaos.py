"""The chaos campaign in short (bench/chaos.py runs it with 1,000 faults): SIGKILL and SIGSTOP of
every service and of the gateway at random moments under a mixed load of puts, generations, chats
on contexts saved and loaded, tokenize, messages, spawn/wait and HTTP chat completions. Every call
is answered with its value (no error, nothing different from an undisturbed run), none hangs,
no acknowledged write is lost, the kernel lives and logs no bug, and every target comes back."""

from __future__ import annotations

import shutil

from bench.chaos import Chaos, boot, report


def test_every_call_is_answered_while_every_service_is_killed_and_stopped_at_random(capsys):
    system, url, model, home = boot(None)
    try:
        chaos = Chaos(system, url, model, seed=7, workers=1)
        tally = chaos.run(faults=10, gap=0.3)
    finally:
        system.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    report(tally, 0)
    shown = capsys.readouterr().out
    print(shown)
    assert tally.failures() == 0, shown
    assert sum(tally.faults.values()) == 10, shown
    # the load ran through the faults: every kind of call was made, and answered
    for name in ("put", "generate", "chat", "save_context", "load_context", "tokenize", "send",
                 "publish", "recv", "spawn", "wait", "http chat"):
        assert tally.calls[name] > 0, (name, shown)
    assert tally.writes_acked > 0
    assert sum(len(r) for r in tally.restarts.values()) >= 5, shown     # most faults were deaths
