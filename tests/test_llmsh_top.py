"""llmsh's top in batch mode (-b, or output that is not a terminal), scripted: without the model's
services it still shows the processes, and with a tiny model it shows a generation at work.
The live mode is driven in a pseudo-terminal in test_llmsh_pty.py."""

from __future__ import annotations

import re

from conftest import wait_until
from test_llmsh import errors, sh, statuses, table
from tiny_system import tiny_system  # noqa: F401  (the module-scoped fixture)

HEAD = re.compile(r"top - \d\d:\d\d:\d\d up \w+, (\d+) processes: (\d+) running, (\d+) ready, "
                  r"(\d+) suspended, (\d+) blocked, (\d+) stopped, (\d+) zombie")


def frames(text: str) -> list[list[str]]:
    return [f.splitlines() for f in re.split(r"\n(?=top - )", text.strip())]


def test_top_without_the_model_shows_processes_and_says_why_no_run_queue(llmos):
    with llmos.connect(name="listener") as c:
        r = sh(llmos.home, "top -b -n 1; echo s=$?; top -n 2 -d 0; echo s=$?")
        listener = c.pid
    shown = frames(r.stdout.rsplit("s=0", 2)[0])
    assert len(shown) == 1
    lines = shown[0]
    head = HEAD.fullmatch(lines[0])
    assert head and int(head[1]) == 3 and int(head[2]) == 3       # kernel, llmsh, listener
    assert lines[1] == ("model: run queue unavailable (ESRVDOWN: service 'inference' is not "
                        "enabled in this llmos)")
    rows = table("\n".join(lines[3:]))
    assert list(rows[0]) == ["PID", "NAME", "STATE", "PRI", "TOK/S", "KV", "SEQ", "TOK-IN",
                             "TOK-OUT", "AGE"]
    assert {(row["PID"], row["NAME"]) for row in rows} >= {("1", "kernel"), (str(listener), "listener")}
    assert len(frames(r.stdout.split("s=0\n", 1)[1].rsplit("s=0", 1)[0])) == 2   # not a tty: batch
    assert statuses(r) == [0, 0]
    r = sh(llmos.home, "top -n 0; echo s=$?; top -d soon; echo s=$?; top now; echo s=$?")
    assert statuses(r) == [2, 2, 2]
    assert errors(r) == ["llmsh: top: -n must be >= 1, not 0",
                         "llmsh: top: -d must be a number of seconds >= 0, not 'soon'",
                         "llmsh: top: unexpected argument 'now' (quote a value that has spaces) "
                         "(usage: top [-b] [-n N] [-d SECONDS])"]


def test_top_shows_a_generation_at_work(tiny_system):  # noqa: F811
    with tiny_system.connect(name="generator") as g, tiny_system.connect() as c:
        stream = g.generate("hello", max_tokens=3000, ignore_eos=True, temperature=0.0)
        next(iter(stream))                          # it has started; the rest piles up unread
        wait_until(lambda: c.ps(pid=g.pid)[0].get("tok_s", 0) > 0, 20, "a generation rate")
        g.nice(3)
        r = sh(tiny_system.home, "top -b -n 1")
        stream.close()
    lines = frames(r.stdout)[0]
    head = HEAD.fullmatch(lines[0])
    assert head and int(head[2]) >= 1
    run_queue = re.fullmatch(r"model: (\d+) running, (\d+) ready, (\d+) suspended \(at most \d+ "
                             r"running, \d+ queued\); KV blocks (\d+)/(\d+) used, \d+ cached", lines[1])
    assert run_queue and run_queue[1] == "1" and int(run_queue[4]) > 0 and int(run_queue[5]) == 1024
    first = lines.index("")
    assert re.fullmatch(r"models: \S+ held of a \S+ budget", lines[2])
    assert re.fullmatch(r"  tiny: resident, \S+, 1 requests, used \d+s ago, never", lines[3])
    blank = lines.index("", first + 1)
    procs = table("\n".join(lines[first + 1:blank]))
    top_row = procs[0]                              # the busiest first
    assert (top_row["PID"], top_row["NAME"], top_row["STATE"], top_row["PRI"]) == \
        (str(g.pid), "generator", "RUNNING", "3")
    assert float(top_row["TOK/S"]) > 0 and int(top_row["KV"]) > 0 and top_row["SEQ"] == "1"
    (request,) = table("\n".join(lines[blank + 1:]))
    assert list(request) == ["PID", "REQUEST", "MODEL", "STATE", "PRI", "POS", "KV", "PROMPT",
                             "GENERATED", "WAITED"]
    assert request["MODEL"] == "tiny"
    assert (request["PID"], request["STATE"], request["PRI"], request["POS"]) == \
        (str(g.pid), "running", "3", "-")
    assert int(request["GENERATED"]) > 0 and int(request["KV"]) > 0     # ps's KV lags by < 0.2 s
