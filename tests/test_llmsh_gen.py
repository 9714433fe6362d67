"""llmsh's gen and chat against a booted llmos running a tiny model, in scripted mode."""

from __future__ import annotations

from test_generate import tiny_llmos  # noqa: F401  (the module-scoped fixture)
from test_llmsh import errors, llmsh, sh, statuses


def test_gen_streams_the_answer_and_reports_counts(tiny_llmos):  # noqa: F811
    with tiny_llmos.connect() as c:
        want = c.generate("hello world", max_tokens=8, temperature=0.0).text
        chat = c.chat([{"role": "user", "content": "hello world"}], max_tokens=8,
                      temperature=0.0).text
    r = sh(tiny_llmos.home, "gen --raw --max-tokens 8 --temperature 0 --stats 'hello world'; "
                            "echo s=$?")
    assert r.stdout.rsplit("s=", 1)[0].rstrip("\n") == want.rstrip("\n")
    assert statuses(r) == [0]
    assert "prompt tokens" in r.stderr and "tok/s" in r.stderr
    r = sh(tiny_llmos.home, "gen --max-tokens 8 --temperature 0 'hello world'; echo s=$?")
    assert r.stdout.rsplit("s=", 1)[0].rstrip("\n") == chat.rstrip("\n")
    assert statuses(r) == [0]


def test_gen_reads_the_prompt_from_stdin_and_names_bad_options(tiny_llmos):  # noqa: F811
    r = llmsh(tiny_llmos.home, "-c", "gen --max-tokens 4 --temperature 0; echo s=$?",
              input="hello world")
    assert statuses(r) == [0] and r.stdout.strip()
    r = sh(tiny_llmos.home, "gen --temperature hot x; echo s=$?; gen --top-p 2 x; echo s=$?")
    assert statuses(r) == [2, 1]
    assert errors(r) == ["llmsh: gen: --temperature must be a number, not 'hot'",
                         "llmsh: gen: argument 'top_p' must be <= 1, got 2.0"]


def test_chat_one_shot_and_conversation(tiny_llmos):  # noqa: F811
    r = sh(tiny_llmos.home, "chat --system 'be brief' Hi; echo s=$?")
    assert statuses(r) == [0]
    script = ("/set max_tokens 4\nhello\n/set temperature 0\n/set bogus 1\nagain\n/save talk\n"
              "/clear\n/load talk\n/bye\nnever asked\n")
    r = llmsh(tiny_llmos.home, "-c", "chat; echo s=$?", input=script)
    assert statuses(r) == [0]
    assert "saved as chats/talk" in r.stdout and "loaded chats/talk (4 messages)" in r.stdout
    assert "/set takes one of temperature" in r.stderr
