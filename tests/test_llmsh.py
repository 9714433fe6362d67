"""llmsh, the llmos shell: its language, every command's output and status, its modes, its errors.

Most tests run ``python -m userland.llmsh --home H -c '...'`` against a real kernel; commands are
chained with ``; echo "s=$?"`` so one run checks many statuses. Tests of the language alone need
no kernel.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys

import pexpect
import pytest

from conftest import ROOT, Booted, llmsh_terminal, wait_until
from syscalls.paths import Paths
from userland.shell.builtin import Streams, command
from userland.shell.commands import COMMANDS
from userland.shell.parse import Incomplete, Param, ParseError, parse
from userland.shell.shell import Shell

PY = shlex.quote(sys.executable)
SLEEPER = f"{PY} -c 'import time; time.sleep(60)'"


def llmsh(home, *args: str, input: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LLMOS_HOME", None)         # --home must be enough
    r = subprocess.run([sys.executable, "-m", "userland.llmsh", "--home", str(home), *args],
                       input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    return r


def sh(home, commands: str) -> subprocess.CompletedProcess:
    return llmsh(home, "-c", commands)


def statuses(r: subprocess.CompletedProcess) -> list[int]:
    return [int(s) for s in re.findall(r"^s=(\d+)$", r.stdout, re.M)]


def errors(r: subprocess.CompletedProcess) -> list[str]:
    lines = r.stderr.splitlines()
    assert all(line.startswith("llmsh: ") for line in lines), r.stderr
    return lines


# == the language, without a kernel ===============================================================
def words(text: str) -> list[list]:
    return [[list(w.parts) for w in item.first.commands[0].words] for item in parse(text)]


def test_parse_quotes_comments_and_parameters():
    assert words("put k 'a b' \"c d\" e\\ f") == [[["put"], ["k"], ["a b"], ["c d"], ["e f"]]]
    assert words("echo '$?' \"$?\" $? x$!y $$ a#b # a comment") == [
        [["echo"], ["$?"], [Param("?"), ""], [Param("?")], ["x", Param("!"), "y"], [Param("$")],
         ["a#b"]]]
    assert words("echo '' \"\" $5") == [[["echo"], [""], [""], ["$5"]]]
    assert words("a 'x;y' \"p&&q\" 'r|s'") == [[["a"], ["x;y"], ["p&&q"], ["r|s"]]]


def test_parse_lists_and_conditionals():
    script = parse("a; b && c || d\n\ne&&f")
    assert len(script) == 3
    assert [op for op, _ in script[1].rest] == ["&&", "||"]
    assert [op for op, _ in script[2].rest] == ["&&"]
    assert len(parse("a &&\n\n b")) == 1          # a command list may continue after && or ||


@pytest.mark.parametrize("text, message", [
    ("put 'a", "unterminated ' quote"),
    ('put "a', 'unterminated " quote'),
    ("a &&", "a command must follow &&"),
    ("a ||\n", "a command must follow ||"),
    ("echo a \\\n", "the line ends with \\"),
    ("echo a |", "a command must follow |"),
    ("echo a |\n", "a command must follow |"),
])
def test_parse_incomplete_input_asks_for_more(text, message):
    with pytest.raises(Incomplete) as e:
        parse(text)
    assert message in e.value.message


@pytest.mark.parametrize("text, message, pos", [
    ("; a", "unexpected ';'", 0),
    ("a ;; b", "unexpected ';'", 3),
    ("&& a", "unexpected '&&'", 0),
    ("| b", "unexpected '|'", 0),
    ("a | | b", "unexpected '|'", 4),
    ("a > ; b", "> needs a key after it", 4),
    ("a >> | b", ">> needs a key after it", 5),
    ("a <", "< needs a file after it", 3),
    ("> k", "unexpected end of input", 3),
    ("& a", "unexpected '&'", 0),
    ("a & & b", "unexpected '&'", 4),
])
def test_parse_errors_name_the_fault(text, message, pos):
    with pytest.raises(ParseError) as e:
        parse(text)
    assert not isinstance(e.value, Incomplete)
    assert (e.value.message, e.value.pos) == (message, pos)


def test_operators_status_and_exit_need_no_kernel(home):
    r = sh(home, 'false && echo no; true && echo yes; false || echo alt; echo "s=$?"; '
                 'false; echo "s=$?" \'$?\'; foo; echo "s=$?"; true || echo never; echo "s=$?"')
    assert r.stdout.splitlines() == ["yes", "alt", "s=0", "s=1 $?", "s=127", "s=0"]
    assert errors(r) == ["llmsh: foo: command not found (try help)"]
    assert r.returncode == 0
    assert sh(home, "true; false").returncode == 1             # the status of the last command
    r = sh(home, "echo before; exit 7; echo after")
    assert (r.returncode, r.stdout) == (7, "before\n")
    assert sh(home, "false; exit").returncode == 1
    r = sh(home, "exit 300")
    assert r.returncode == 2 and errors(r) == ["llmsh: exit: STATUS must be between 0 and 255, not 300"]
    r = sh(home, "echo a |")
    assert (r.returncode, r.stdout) == (2, "")
    assert errors(r) == ["llmsh: syntax error: a command must follow |"]


def test_help_lists_and_explains_every_command(home):
    r = sh(home, "help")
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ") and
              line.split()[0].isalpha()}
    required = {"ps", "kill", "services", "spawn", "wait", "put", "get", "ls", "rm", "send", "recv",
                "pub", "sub", "uname", "help", "exit"}
    assert required <= listed
    for name in COMMANDS:
        out = io.StringIO()
        assert Shell(Paths(home), Streams(io.StringIO(), out, io.StringIO())).run(parse(f"help {name}")) == 0
        text = out.getvalue().splitlines()
        assert text[0].startswith(f"usage: {name}") and text[1] == "" and text[2], (name, text)
    r = sh(home, "help kill")
    assert "kill [-SIGNAL | -s SIGNAL] (PID | %JOB)..." in r.stdout and "STOP" in r.stdout
    r = sh(home, "help nope")
    assert r.returncode == 1 and errors(r) == ["llmsh: help: no command named 'nope' (help lists them)"]


def test_not_running_is_one_clear_line(home):
    r = sh(home, "ps")
    assert r.returncode == 1 and r.stdout == ""
    assert errors(r) == [f"llmsh: ps: llmos is not running in {home} (start it with `llmos boot`)"]


def test_an_llmsh_bug_is_logged_not_shown(home):
    @command()
    def cmd_boom(sh, io, args):
        """Fail like a bug."""
        raise RuntimeError("kaboom")

    COMMANDS["boom"] = cmd_boom.builtin
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(Paths(home), Streams(io.StringIO(), out, err))
    try:
        assert shell.run(parse("boom; echo still here")) == 0
    finally:
        del COMMANDS["boom"]
    assert out.getvalue() == "still here\n"
    log = Paths(home).log_file("llmsh")
    assert err.getvalue() == (f"llmsh: boom: internal error: RuntimeError: kaboom "
                              f"(traceback in {log})\n")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event"] == "internal_error" and events[-1]["argv"] == ["boom"]
    assert "Traceback" in events[-1]["exception"] and "kaboom" in events[-1]["exception"]


# == commands, against a running llmos ============================================================
def table(text: str) -> list[dict]:
    """Rows of a table printed by llmsh, keyed by its header (the last column may hold spaces)."""
    lines = text.splitlines()
    header = lines[0].split()
    return [dict(zip(header, line.split(None, len(header) - 1))) for line in lines[1:]]


def test_uname_and_ps(llmos):
    r = sh(llmos.home, "uname")
    assert r.returncode == 0
    assert re.fullmatch(rf"llmos \S+ abi \d+ kernel-pid {llmos.kernel_pid} up \d+s home "
                        rf"{re.escape(str(llmos.home))}\n", r.stdout), r.stdout
    r = sh(llmos.home, f"echo $$; spawn --name sleeper -- {SLEEPER}; ps; ps -t")
    assert r.returncode == 0, r.stderr
    me, child = map(int, r.stdout.splitlines()[:2])
    flat, tree = r.stdout.split("PID PPID", 2)[1:]
    rows = {int(row["PID"]): row for row in table("PID PPID" + flat)}
    assert list(table("PID PPID" + flat)[0]) == ["PID", "PPID", "UID", "STATE", "PRI", "NAME", "AGE",
                                                  "KV", "TOK-IN", "TOK-OUT", "TOK/S", "CALLS", "STORED",
                                                  "ARGV"]
    assert rows[1]["NAME"] == "kernel" and rows[1]["PPID"] == "0"
    assert rows[me]["NAME"] == "llmsh" and rows[me]["STATE"] == "RUNNING"
    assert rows[me]["UID"] == str(os.getuid())
    assert (rows[child]["NAME"], rows[child]["PPID"]) == ("sleeper", str(me))
    assert rows[child]["ARGV"] == f"{sys.executable} -c 'import time; time.sleep(60)'"
    tree_lines = ("PID PPID" + tree).splitlines()
    col = tree_lines[0].index("NAME")
    assert [re.match(r"( *\\_ )?\S+", line[col:]).group() for line in tree_lines[1:]] == [
        "kernel", " \\_ llmsh", "    \\_ sleeper"]
    r = sh(llmos.home, "ps 99999")
    assert r.returncode == 1 and errors(r) == ["llmsh: ps: no process with pid 99999"]


def test_spawn_and_wait_give_the_childs_status(llmos):
    r = sh(llmos.home, f"spawn {PY} -c 'import sys; sys.exit(3)'; wait $!")
    pid = int(r.stdout.splitlines()[0])
    assert r.stdout.splitlines()[1] == f"pid {pid} exited with status 3"
    assert r.returncode == 3
    r = sh(llmos.home, f'spawn {PY} -c "pass" && wait $! && echo "s=$?"')
    assert statuses(r) == [0] and r.returncode == 0
    r = sh(llmos.home, f"spawn --daemon --name worker -- {SLEEPER}")
    pid = int(r.stdout)
    with llmos.connect() as c:
        (info,) = c.ps(pid=pid)
    assert (info["name"], info["ppid"], info["daemon"]) == ("worker", 1, True)
    r = sh(llmos.home, "spawn no-such-program-here; echo s=$?; spawn; echo s=$?; "
                       "spawn --bogus x; echo s=$?; wait nope; echo s=$?")
    assert statuses(r) == [1, 2, 2, 2]
    assert errors(r) == [
        "llmsh: spawn: program 'no-such-program-here' not found (not a path to an executable, "
        "nor in PATH)",
        "llmsh: spawn: missing PROGRAM (usage: spawn [--daemon] [--name NAME] [--priority N] [--] "
        "PROGRAM [ARG...])",
        "llmsh: spawn: option --bogus not recognized (usage: spawn [--daemon] [--name NAME] "
        "[--priority N] [--] PROGRAM [ARG...])",
        "llmsh: wait: 'nope' is not a PID"]


def test_kill_stop_cont_and_signal_statuses(llmos):
    r = sh(llmos.home, f"spawn {SLEEPER}; kill -STOP $!; ps $!; kill -sigcont $!; ps $!; "
                       f"kill -9 $!; wait $!")
    lines = r.stdout.splitlines()
    pid = int(lines[0])
    assert table("\n".join(lines[1:3]))[0]["STATE"] == "STOPPED"
    assert table("\n".join(lines[3:5]))[0]["STATE"] == "RUNNING"
    assert lines[5] == f"pid {pid} killed by signal KILL"
    assert r.returncode == 128 + 9
    r = sh(llmos.home, f"spawn {SLEEPER}; kill $!; wait $!")
    assert r.stdout.splitlines()[1].endswith("killed by signal TERM") and r.returncode == 128 + 15
    r = sh(llmos.home, "kill -l")
    assert r.stdout.split() == ["15", "TERM", "9", "KILL", "2", "INT", "1", "HUP", "19", "STOP",
                                "18", "CONT"]


def test_kill_errors_say_what_was_wrong(llmos):
    r = sh(llmos.home, 'kill 99999; echo s=$?; kill -FOO 5; echo s=$?; kill -3 5; echo s=$?; '
                       'kill; echo s=$?; kill abc; echo s=$?; kill 1; echo s=$?; kill 0; echo s=$?')
    assert statuses(r) == [1, 2, 2, 2, 2, 1, 2]
    known = "signals: TERM (15), KILL (9), INT (2), HUP (1), STOP (19), CONT (18)"
    assert errors(r) == [
        "llmsh: kill: no process with pid 99999",
        f"llmsh: kill: unknown signal 'FOO' ({known})",
        f"llmsh: kill: unknown signal '3' ({known})",
        "llmsh: kill: missing PID (usage: kill [-SIGNAL | -s SIGNAL] (PID | %JOB)...  |  kill -l)",
        "llmsh: kill: 'abc' is not a PID",
        "llmsh: kill: pid 1 is the kernel; use shutdown to stop llmos",
        "llmsh: kill: '0' is not a PID (PIDs start at 1)"]


def test_storage_commands(llmos):
    with llmos.connect() as c:
        c.put("obj", {"a": [1, 2], "b": None})
    r = sh(llmos.home, "put greeting 'hello world'; get greeting; get obj; ls; ls -l gr; ls zzz; "
                       "rm greeting; get greeting; echo s=$?")
    lines = r.stdout.splitlines()
    assert lines[:5] == ["hello world", '{"a": [1, 2], "b": null}', "greeting", "obj",
                         "VERSION SIZE KEY"]
    assert lines[5].split()[::2] == ["1", "greeting"]
    assert statuses(r) == [1]
    uid = os.getuid()
    assert errors(r) == [f"llmsh: get: no key 'greeting' in namespace 'user:{uid}'"]
    with llmos.connect() as c:
        assert [k["key"] for k in c.list()] == ["obj"]
        c.ns_create("team", mode="rw")
    r = sh(llmos.home, "put --ns team k v && get --ns team k; put --if-version 0 obj x; echo s=$?; "
                       "put; echo s=$?; put k v w; echo s=$?; rm nope obj; echo s=$?; ls")
    assert r.stdout.splitlines()[0] == "v"
    assert statuses(r) == [1, 2, 2, 1]
    usage = "(usage: put [--ns NS] [--if-version V] KEY [VALUE])"
    assert errors(r) == [
        "llmsh: put: key 'obj' is at version 1, not 0 as if_version asked",
        f"llmsh: put: missing KEY {usage}",
        f"llmsh: put: unexpected argument 'w' (quote a value that has spaces) {usage}",
        f"llmsh: rm: no key 'nope' in namespace 'user:{uid}'"]
    with llmos.connect() as c:         # rm went on past the missing key
        assert c.get("k", ns="team")["value"] == "v"
        assert c.list() == []


def test_messages_send_recv_pub_sub(llmos):
    r = sh(llmos.home, "echo $$; send $$ 'hi there'; recv; sub news; pub news.today 'big news'; "
                       "recv; recv --timeout 0.1; echo s=$?; send 99999 x; echo s=$?")
    lines = r.stdout.splitlines()
    me = lines[0]
    assert lines[1:4] == [f"from {me}: hi there", "delivered to 1 process",
                          f"from {me} [news.today]: big news"]
    assert statuses(r) == [1, 1]
    assert errors(r) == ["llmsh: recv: no message within 0.1s",
                         "llmsh: send: no process with pid 99999"]
    with llmos.connect(name="listener") as c:
        c.subscribe("alerts")
        r = sh(llmos.home, "echo $$; pub alerts.disk full; unsub nothing; echo s=$?")
        assert r.stdout.splitlines()[1] == "delivered to 1 process"
        assert statuses(r) == [1]
        message = c.recv(timeout=5)
        assert message == {"from": int(r.stdout.splitlines()[0]), "topic": "alerts.disk",
                           "data": "full"}


def test_tab_completion(llmos):
    from prompt_toolkit.document import Document
    from userland.shell.repl import Completions

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), None)]

    shell = Shell(Paths(llmos.home), Streams(io.StringIO(), io.StringIO(), io.StringIO()))
    completer = Completions(shell)
    assert complete("pu") == ["pub", "put"] and complete("put k; he") == ["help"]
    assert set(complete("")) == set(COMMANDS)
    assert complete("help ki") == ["kill"]
    assert complete("kill -S") == ["-STOP"]
    with llmos.connect() as c:
        c.put("greeting", "hi")
        c.put("green", "x")
        c.put("other", "y")
        assert complete("get gr") == ["green", "greeting"]
        assert complete("rm o") == ["other"]
        pids = {str(p["pid"]) for p in c.ps()}          # includes the shell's own connection
        assert pids <= set(complete("kill ")) and c.pid and str(c.pid) in complete("wait ")
    assert complete("services restart ") == ["storage", "tokenizer"]
    assert complete("services ") == ["restart"]
    assert complete("put k ") == []                     # a value: nothing to offer
    assert complete("nice -n 5 ge") == ["gen", "get"] and complete("nice ki") == ["kill"]
    assert complete("ulimit kv") == ["kv_blocks"] and complete("ulimit -p 1 s") == [
        "sequences", "storage_bytes"]
    assert str(shell.conn.pid) in complete("renice 5 ") and "1" in complete("ulimit -p ")
    assert complete("run su") == ["summarize"] and complete("spawn --name x ba") == ["batch"]
    assert complete("run batch ") == [] and complete("run --daemon e") == ["echo-daemon"]
    assert complete("gen --model sm") == ["smollm2-135m-instruct"]
    assert complete("model rm sm") == ["smollm2-135m-instruct"]
    shell.close(0)
    llmos.shutdown()
    assert complete("kill ") == [] and complete("ki") == ["kill"]    # no llmos: no noise


def test_services_and_restart(llmos):
    before = llmos.service("storage")
    r = sh(llmos.home, "services")
    row, _tokenizer = table(r.stdout)
    assert list(row) == ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "LAST-EXIT"]
    assert (row["NAME"], row["PID"], row["STATE"], row["RESTARTS"], row["LAST-EXIT"]) == \
        ("storage", str(before["pid"]), "READY", "0", "-")
    r = sh(llmos.home, "services restart storage")
    assert r.returncode == 0 and r.stderr == ""
    wait_until(lambda: (s := llmos.service("storage"))["state"] == "READY" and s["pid"] != before["pid"],
               30, "storage to come back")
    row, _tokenizer = table(sh(llmos.home, "services").stdout)
    assert (row["STATE"], row["RESTARTS"]) == ("READY", "1") and row["LAST-EXIT"] != "-"
    r = sh(llmos.home, "services restart nope; echo s=$?; services bogus; echo s=$?")
    assert statuses(r) == [1, 2]
    assert errors(r) == ["llmsh: services: no service named 'nope' (services: storage, tokenizer)",
                         "llmsh: services: unknown subcommand 'bogus' (usage: services [restart NAME...])"]


# == modes ========================================================================================
def test_script_file(llmos, tmp_path):
    script = tmp_path / "setup.llsh"
    script.write_text("# set things up\n"
                      "put motd 'line one\n"
                      "line two'   # a value over two lines\n"
                      "get motd &&\n"
                      "  echo stored\n"
                      "get missing\n")
    r = llmsh(llmos.home, str(script))
    assert r.stdout == "line one\nline two\nstored\n"
    assert r.returncode == 1                # the last command failed
    script.write_text("put a 1\nput b 2; ;\nput c 3\n")
    r = llmsh(llmos.home, str(script))
    assert r.returncode == 2
    assert errors(r) == [f"llmsh: {script}:2: syntax error: unexpected ';'"]
    with llmos.connect() as c:
        assert [k["key"] for k in c.list()] == ["a", "motd"]      # line 1 ran, the rest did not
    r = llmsh(llmos.home, str(tmp_path / "missing.llsh"))
    assert r.returncode == 127 and errors(r) == [f"llmsh: {tmp_path}/missing.llsh: No such file or directory"]


def test_stdin_not_a_tty_reads_lines_without_prompt(llmos):
    r = llmsh(llmos.home, input="put a 1\nget a\n\n# nothing\nput b 'x\ny'\nget b\nget nokey\n")
    assert r.stdout == "1\nx\ny\n"
    assert "\x1b" not in r.stdout + r.stderr and "llmsh$" not in r.stdout + r.stderr
    assert r.returncode == 1
    assert errors(r)[0].startswith("llmsh: get: no key 'nokey'")
    r = llmsh(llmos.home, input="echo a\nexit 5\necho b\n")
    assert (r.stdout, r.returncode) == ("a\n", 5)


def test_the_shell_survives_a_reboot_of_llmos(home):
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(Paths(home), Streams(io.StringIO(), out, err))
    first = Booted(home).boot()
    try:
        assert shell.run(parse("put k v; uname")) == 0
        first.shutdown()
        assert shell.run(parse("get k")) == 1
        assert err.getvalue() == f"llmsh: get: llmos is not running in {home} (start it with `llmos boot`)\n"
        second = Booted(home).boot()
        assert shell.run(parse("get k; uname")) == 0
        lines = out.getvalue().splitlines()
        assert f"kernel-pid {first.kernel_pid} " in lines[0]
        assert lines[1] == "v"              # storage keeps it across the reboot
        assert f"kernel-pid {second.kernel_pid} " in lines[2]
        with second.connect() as c:
            assert [p["name"] for p in c.ps()].count("llmsh") == 1
            assert next(p for p in c.ps() if p["name"] == "llmsh")["privileged"]
        shell.close(0)
    finally:
        Booted(home).shutdown()


def interrupt_a_blocked_recv(child, c) -> int:
    """Send recv, wait until llmsh blocks in it, Ctrl-C, and see the [130] prompt; llmsh's pid."""
    me = next(p["pid"] for p in c.ps() if p["name"] == "llmsh")
    child.sendline("recv")
    wait_until(lambda: c.ps(pid=me)[0]["state"] == "BLOCKED", 10, "llmsh to block in recv")
    child.sendintr()
    child.expect(r"\[130\] llmsh\$")
    return me


def test_interactive_repl(llmos):
    child = llmsh_terminal(llmos.home, timeout=20)
    try:
        child.expect(r"llmsh\$")
        child.sendline("uname")
        child.expect(rf"llmos \S+ abi \d+ kernel-pid {llmos.kernel_pid}")
        child.expect(r"llmsh\$")
        # Ctrl-C at the prompt drops the line typed so far and prompts again
        child.send("exit 9")
        child.sendcontrol("c")
        child.expect(r"llmsh\$")
        # Ctrl-C during a command cancels it, and its call in the kernel: recv does not linger
        with llmos.connect() as c:
            me = interrupt_a_blocked_recv(child, c)
            wait_until(lambda: c.ps(pid=me)[0]["state"] == "RUNNING", 10, "the recv to be cancelled")
            child.sendline("send $$ ping; recv --timeout 10")
            child.expect(rf"from {me}: ping")
        # Tab completes a command name
        child.send("unam\t")
        child.sendline("")
        child.expect(rf"kernel-pid {llmos.kernel_pid}")
        child.expect(r"llmsh\$")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0            # the last command (uname) succeeded; not 9
    history = (llmos.home / "llmsh_history").read_text()
    assert "+uname" in history and "+recv" in history


def test_ctrl_c_works_when_started_with_sigint_ignored(llmos):
    """Python keeps SIGINT ignored when it starts ignored; an interactive llmsh resets it, so a
    parent that ignores Ctrl-C (as CI's once did) still leaves the shell interruptible."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)      # inherited by the child spawned now
    try:
        child = llmsh_terminal(llmos.home, timeout=20)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        child.expect(r"llmsh\$")
        child.sendline("uname")                       # connected: it shows in ps
        child.expect(rf"kernel-pid {llmos.kernel_pid}")
        child.expect(r"llmsh\$")
        with llmos.connect() as c:
            interrupt_a_blocked_recv(child, c)
    finally:
        child.close(force=True)
