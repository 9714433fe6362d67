"""llmsh at a terminal: the real llmsh in a pseudo-terminal (pexpect), against llmos on a tiny
model. What is typed, what streams back, Ctrl-C, Tab, jobs, the chat sub-mode and top's live
mode. Each test waits on what it can observe: the screen, or the kernel's run queue."""

from __future__ import annotations

import json

import pexpect
import pytest

from conftest import llmsh_terminal, wait_until
from tiny_system import tiny_system  # noqa: F401  (the module-scoped fixture)

PROMPT = r"llmsh\$"
LONG_GEN = "gen --raw --ignore-eos --max-tokens 3000 --temperature 0 hello"
# text at the start of a line below the command line (which stays on the prompt's line)
TEXT = r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*[^\x1b\s]"


@pytest.fixture
def term(tiny_system):  # noqa: F811
    """llmsh at a 40x200 terminal; it must have left by the end of the test."""
    child = llmsh_terminal(tiny_system.home, timeout=30)
    child.expect(PROMPT)
    yield child
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None


def requests(system) -> list[dict]:
    with system.connect() as c:
        return c.runqueue()["requests"]


def test_gen_streams_and_ctrl_c_cancels_only_the_generation(term, tiny_system):  # noqa: F811
    term.sendline(LONG_GEN)
    term.expect(TEXT)                                       # the answer shows while the model
    running = requests(tiny_system)                         # is still at it: streamed
    assert running and running[0]["generated"] < 3000
    term.sendintr()
    term.expect(r"\[130\] " + PROMPT)
    wait_until(lambda: not requests(tiny_system), 10, "the request to be cancelled in the kernel")
    term.sendline("echo next; tokens --ids hello")
    term.expect(r"next\r\n")
    term.expect(r"\d+( \d+)*\r\n")
    term.expect(PROMPT)


def test_a_generation_as_a_job_with_jobs_and_fg(term, tiny_system):  # noqa: F811
    term.sendline(LONG_GEN + " > bg-answer &")
    term.expect(r"\[1\]")
    term.expect(PROMPT)
    wait_until(lambda: requests(tiny_system), 10, "the background generation")
    term.sendline("jobs")
    term.expect(r"\[1\]\+ Running\s+gen --raw")
    term.sendline("fg")
    term.expect(r"gen --raw --ignore-eos .* > bg-answer\r\n")
    term.sendintr()
    term.expect(r"\[130\] " + PROMPT)
    wait_until(lambda: not requests(tiny_system), 10, "the job's request to be cancelled")
    term.sendline("jobs; echo jobs=$?")
    term.expect(r"jobs=0")
    assert "Running" not in term.before


def test_chat_sub_mode(term, tiny_system):  # noqa: F811
    term.sendline("chat")
    term.expect(">>> ")
    for line in ("/set max_tokens 2000", "/set temperature 0", "/set top_k many"):
        term.sendline(line)
        term.expect(">>> ")
    assert "top_k must be an integer" in term.before
    term.sendline("tell me everything")
    term.expect(r"tell me everything\r\n")                  # echoed by the terminal, then
    term.expect(r"\n")                                      # the answer (the tiny model's: \n\n...)
    assert requests(tiny_system)
    term.sendintr()                                          # stops the answer, not the chat
    term.expect(">>> ")
    wait_until(lambda: not requests(tiny_system), 10, "the answer to be cancelled")
    term.sendline("/set max_tokens 3")
    term.expect(">>> ")
    term.sendline("hi")
    term.expect(">>> ")
    term.sendline("/save pty-talk")
    term.expect("saved as chats/pty-talk")
    term.sendline("/bye")
    term.expect(PROMPT)
    with tiny_system.connect() as c:
        saved = c.get("chats/pty-talk")["value"]
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]     # the stopped one left no trace
    assert saved["messages"][0]["content"] == "hi"
    term.sendline("echo back in the shell")
    term.expect("back in the shell")


def test_pipes_and_tab_completion(term, tiny_system):  # noqa: F811
    term.sendline("echo one two | put piped; get piped | cat")
    term.expect(r"one two\r\n")
    term.expect(PROMPT)
    term.send("tokens --model ti\t")                        # a model's name
    term.sendline(" --ids hello")
    term.expect(r"\d+( \d+)*\r\n")
    term.expect(PROMPT)
    term.send("ulimit kv\t")                                # a resource
    term.sendline("")
    term.expect(r"unlimited\r\n")
    term.send("run summ\t")                                 # an llmos program
    term.sendline(" --help")
    term.expect("usage: summarize")
    term.expect(PROMPT)
    with tiny_system.connect() as c:
        assert json.dumps(c.get("piped")["value"]) == '"one two"'


def test_top_redraws_until_q(term, tiny_system):  # noqa: F811
    term.sendline(LONG_GEN + " > top-answer &")
    term.expect(PROMPT)
    wait_until(lambda: requests(tiny_system), 10, "a generation to watch")
    term.sendline("top -d 0.1")
    term.expect(r"\x1b\[\?1049h")                           # the alternate screen
    term.expect(r"model: 1 running")
    term.expect(r"PID REQUEST MODEL +STATE")
    term.expect(r"top - ")                                  # redrawn
    term.send("q")
    term.expect(r"\x1b\[\?1049l")                           # the screen is given back
    term.expect(PROMPT)
    term.sendline("chat")
    term.expect(">>> ")
    term.sendline("/bye")
    term.expect(r"/bye\r\n")                               # echoed: the terminal is cooked again
    term.expect(PROMPT)
    term.sendline("top -n 2 -d 0.1; echo s=$?")             # -n ends it without a key
    term.expect(r"s=0")
    term.sendline("kill %1; wait %1")
    term.expect(PROMPT)
    wait_until(lambda: not requests(tiny_system), 10, "the watched generation to be cancelled")
