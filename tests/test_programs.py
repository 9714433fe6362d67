"""The userland programs (summarize, batch), run from llmsh against llmos on a tiny model, end to
end: pipes in and out of `run`, progress, errors, and batch resuming after kill -9."""

from __future__ import annotations

import math

from conftest import wait_until
from syscalls import errors
from test_llmsh import sh, statuses
from tiny_system import tiny_system  # noqa: F401  (the module-scoped fixture)
from userland.programs.summarize import WHOLE

DOC = ("The quick brown fox jumps over the lazy dog. Hello world! Hello there, how are you today? "
       "Numbers like 12345 and 3.14159 appear in text. ")


def test_summarize_short_text_in_one_answer(tiny_system):  # noqa: F811
    with tiny_system.connect() as c:
        want = c.chat([{"role": "user", "content": WHOLE.format(text="hello world\n")}],
                      max_tokens=8, temperature=0.0).text
    r = sh(tiny_system.home, "echo 'hello world' | run summarize --max-tokens 8 --temperature 0 | "
                             "put short; echo s=$?")
    assert statuses(r) == [0] and r.stderr == ""            # no progress for a short text
    with tiny_system.connect() as c:
        assert c.get("short")["value"] == want.removesuffix("\n")


def test_summarize_long_text_in_parts_with_progress(tiny_system):  # noqa: F811
    text = DOC * 12
    with tiny_system.connect() as c:
        c.put("notes", text)
        tokens = len(c.tokenize(text + "\n", model="tiny", add_bos=False, special=False))
    parts = math.ceil(tokens / 100)
    r = sh(tiny_system.home, "cat notes | run summarize --chunk-tokens 100 --max-tokens 16 | "
                             "put notes/summary; echo s=$?")
    assert statuses(r) == [0]
    progress = r.stderr.splitlines()
    assert progress[0] == f"summarize: {tokens} tokens, in {parts} parts of up to 100"
    assert progress[1:parts + 1] == [f"summarize: part {n}/{parts} done" for n in range(1, parts + 1)]
    assert progress[-1].startswith("summarize: combining ") and len(progress) >= parts + 2
    with tiny_system.connect() as c:
        assert c.get("notes/summary")["version"] == 1


def test_summarize_errors_are_one_line(tiny_system, tmp_path):  # noqa: F811
    empty = tmp_path / "empty"
    empty.write_text("")
    r = sh(tiny_system.home, f"run summarize < {empty}; echo s=$?; "
                             "echo x | run summarize --model nope; echo s=$?; "
                             "echo x | run summarize --max-tokens 4090; echo s=$?")
    assert statuses(r) == [1, 1, 1]
    assert r.stderr.splitlines() == [
        "summarize: nothing to summarize: standard input is empty",
        "summarize: no model named 'nope' (models: smollm2-135m-instruct, tiny)",
        "summarize: the model's context (4096 tokens) leaves no room for a text beside 4090 "
        "tokens of summary; lower --max-tokens"]


def test_batch_answers_each_key_once_at_low_priority(tiny_system):  # noqa: F811
    with tiny_system.connect() as c:
        for name in "abc":
            c.put(f"in/{name}", f"text {name}")
    r = sh(tiny_system.home, "run batch --max-tokens 4 in/ out/; echo s=$?; "
                             "run batch --max-tokens 4 in/ out/; echo s=$?")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("batch: pid ") and lines[0].endswith(" at priority 10")
    assert [line.split(" (")[0] for line in lines[1:4]] == [
        "batch: in/a -> out/a", "batch: in/b -> out/b", "batch: in/c -> out/c"]
    assert lines[4:6] == ["batch: finished: 3 keys, 3 answered in this run", "s=0"]
    assert lines[7:] == ["batch: resuming after 'in/c': 3 of 3 keys were done",
                         "batch: finished: 3 keys, 0 answered in this run", "s=0"]
    with tiny_system.connect() as c:
        c.put("in/d", "text d")
        assert [(k["key"], k["version"]) for k in c.list("out/")] == [
            ("out/a", 1), ("out/b", 1), ("out/c", 1)]
    r = sh(tiny_system.home, "run batch --max-tokens 4 --nice 0 in/ out/; echo s=$?; "
                             "run batch other/ out/; echo s=$?; run batch in/ in/x; echo s=$?")
    assert r.stdout.splitlines()[1].startswith("batch: in/d -> out/d (")
    assert statuses(r) == [0, 1, 2]
    assert r.stderr.splitlines()[0] == ("batch: 'out/' is the output of a batch over 'in/'; choose "
                                        "another OUT_PREFIX, or rm .batch/out/ to start over")
    assert r.stderr.splitlines()[-1] == "batch: error: IN_PREFIX and OUT_PREFIX must not contain one another"


def gone(c, pid: int) -> bool:
    try:
        return c.ps(pid=pid)[0]["state"] == "ZOMBIE"
    except errors.ESRCH:
        return True


def test_batch_killed_midway_resumes_without_redoing_a_key(tiny_system):  # noqa: F811
    keys = [f"docs/{i:02d}" for i in range(16)]
    with tiny_system.connect(privileged=True) as c:
        for i, key in enumerate(keys):
            c.put(key, DOC[i:] + DOC[:i])

        def progress():
            try:
                return c.get(".batch/sums/")["value"]
            except Exception:
                return None
        r = sh(tiny_system.home, "spawn batch --max-tokens 24 docs/ sums/")
        pid = int(r.stdout)
        wait_until(lambda: (progress() or {}).get("done", 0) >= 3, 60, "batch to finish 3 keys")
        c.kill(pid, "STOP")                 # hold it mid-way while llmsh starts, then kill it
        assert c.ps(pid=pid)[0]["priority"] == 10               # it made itself less urgent
        r = sh(tiny_system.home, f"kill -9 {pid}; echo s=$?")
        assert statuses(r) == [0], r.stderr
        wait_until(lambda: gone(c, pid), 10, "batch to end")   # reaped at once: its parent left
        state = progress()
        assert 3 <= state["done"] < len(keys) and not state["finished"]       # killed mid-way
        before = {k["key"] for k in c.list("sums/")}
    r = sh(tiny_system.home, "run batch --max-tokens 24 docs/ sums/; echo s=$?")
    lines = r.stdout.splitlines()
    assert lines[1] == (f"batch: resuming after {state['last']!r}: {state['done']} of "
                        f"{len(keys)} keys were done")
    answered = [line.split(" -> ")[0].removeprefix("batch: ") for line in lines if " tokens)" in line]
    assert answered and not {key.replace("docs/", "sums/") for key in answered} & before
    assert all(key > state["last"] for key in answered)
    assert lines[-2:] == [f"batch: finished: {len(keys)} keys, {len(answered)} answered in this run",
                          "s=0"]
    with tiny_system.connect() as c:
        stored = c.list("sums/")
        assert [k["key"] for k in stored] == [key.replace("docs/", "sums/") for key in keys]
        assert {k["version"] for k in stored} == {1}                    # none written twice
        assert c.get(".batch/sums/")["value"]["finished"]


def test_chat_program_keeps_the_conversation_in_a_kernel_context(tiny_system, tmp_path):  # noqa: F811
    script = tmp_path / "talk"
    script.write_text("/set max_tokens 6\n/set temperature 0\nhello\nand then?\n/save prog-talk\n"
                      "/set warmth 3\n/bye\nnever asked\n")
    r = sh(tiny_system.home, f"run chat --system 'be brief' < {script}; echo s=$?")
    assert statuses(r) == [0] and "saved as chats/prog-talk" in r.stdout
    assert r.stderr.splitlines() == ["chat: /set takes one of temperature, top_p, top_k, max_tokens, "
                                     "seed, min_p, repetition_penalty"]
    with tiny_system.connect() as c:
        saved = c.get("chats/prog-talk")["value"]
        assert saved["format"] == "llmos-context/1"
        assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert saved["messages"][3]["content"] == "and then?"
        assert c.runqueue()["blocks_cached"] == 0           # the context went with the program
