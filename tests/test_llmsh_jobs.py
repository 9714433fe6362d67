"""llmsh's pipes, redirections, `run`, background jobs, dmesg and shutdown (issue 5).

Scripted runs go through ``llmsh -c`` as in test_llmsh; the job control at the prompt through
pexpect. Nothing here sleeps to synchronise: each test polls what it can observe.
"""

from __future__ import annotations

import os

import pexpect
from conftest import llmsh_terminal, wait_until
from test_llmsh import PY, errors, sh, statuses

PROG = """\
import os, sys
import syscalls
text = sys.stdin.read()
sys.stdout.write(text.upper())
print("to stderr", file=sys.stderr)
with syscalls.connect() as c:       # LLMOS_HOME comes from llmsh
    c.put("from-prog", f"{os.environ['LLMOS_HOME']} {c.pid}")
sys.exit(int(sys.argv[1]))
"""


def test_help_names_the_new_commands_and_syntax(home):
    r = sh(home, "help")
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")}
    assert {"run", "cat", "jobs", "fg", "bg", "dmesg", "shutdown"} <= listed
    assert "a | b" in r.stdout and "a > KEY" in r.stdout and "a &" in r.stdout
    r = sh(home, "help run fg")
    assert "--daemon" in r.stdout and "Ctrl-C" in r.stdout


def test_pipes_and_redirection_to_and_from_storage(llmos, tmp_path):
    with llmos.connect() as c:
        c.put("obj", {"a": 1})
    r = sh(llmos.home, "echo 'hello world' | put notes/a; cat notes/a | put notes/b; get notes/b; "
                       "echo one > log; echo two >> log; echo three >> log; cat log notes/a; "
                       "echo a | cat | cat; echo s=$?; false | true; echo s=$?; true | false; "
                       "echo s=$?; cat nope | put empty; echo s=$?; echo x >> obj; echo s=$?; "
                       "ls notes/ > listing; echo more >> fresh; get fresh")
    assert r.stdout.splitlines() == ["hello world", "one", "two", "three", "hello world", "a",
                                     "s=0", "s=0", "s=1", "s=0", "s=1", "more"]
    uid = os.getuid()
    assert errors(r) == [f"llmsh: cat: no key 'nope' in namespace 'user:{uid}'",
                         "llmsh: echo: obj: holds a dict, not a string; >> appends only to strings"]
    with llmos.connect() as c:
        assert c.get("notes/b")["value"] == "hello world"       # the final newline is not kept
        assert c.get("log")["value"] == "one\ntwo\nthree"
        assert c.get("empty")["value"] == ""
        assert c.get("obj")["value"] == {"a": 1}
        assert c.get("listing")["value"] == "notes/a\nnotes/b"
    f = tmp_path / "in.txt"
    f.write_text("line one\nline two\n")
    r = sh(llmos.home, f"put fromfile < {f}; get fromfile; cat < {f} | cat; "
                       f"put x < {tmp_path}/missing; echo s=$?; echo s=$? > {f}.key")
    assert r.stdout.splitlines() == ["line one", "line two", "line one", "line two", "s=1"]
    assert errors(r) == [f"llmsh: put: {tmp_path}/missing: No such file or directory"]
    assert not (tmp_path / "in.txt.key").exists()            # > names a key, not a file
    with llmos.connect() as c:
        assert c.get("fromfile")["value"] == "line one\nline two"
        assert c.get(f"{f}.key")["value"] == "s=0"


def test_run_connects_stdio_and_gives_the_programs_status(llmos, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    with llmos.connect() as c:
        c.put("in", "some text")
    r = sh(llmos.home, f"cat in | run {PY} {prog} 3 | put out; echo s=$?; "
                       f"cat in | run {PY} {prog} 5; echo s=$?; "
                       f"echo piped | run {PY} {prog} 0 > out2; echo s=$?; "
                       "run sh -c 'kill -TERM $$'; echo s=$?; run no-such-program-x; echo s=$?; "
                       "run; echo s=$?; run --restart always true; echo s=$?")
    assert r.stdout.splitlines() == ["s=0", "SOME TEXT", "s=5", "s=0", "s=143", "s=127", "s=2",
                                     "s=2"]
    assert statuses(r) == [0, 5, 0, 143, 127, 2, 2]
    lines = r.stderr.splitlines()
    assert lines.count("to stderr") == 3
    assert [line for line in lines if line != "to stderr"] == [
        "llmsh: run: no-such-program-x: command not found",
        "llmsh: run: missing PROGRAM (usage: run [--daemon [--restart POLICY] [--name NAME]] "
        "[--] PROGRAM [ARG...])",
        "llmsh: run: --restart and --name go with --daemon (usage: run [--daemon [--restart POLICY] "
        "[--name NAME]] [--] PROGRAM [ARG...])"]
    with llmos.connect() as c:
        assert c.get("out")["value"] == "SOME TEXT"
        assert c.get("out2")["value"] == "PIPED"
        home, pid = c.get("from-prog")["value"].split()
        assert home == str(llmos.home) and int(pid) > 1          # it was an llmos process


def test_run_daemon_is_spawned_by_the_kernel(llmos):
    r = sh(llmos.home, f"run --daemon --restart on-failure --name d1 {PY} -c "
                       "'print(\"daemon says hi\", flush=True); import time; time.sleep(60)'; echo s=$?; "
                       "echo last=$!; run --daemon --restart sometimes true; echo s=$?")
    pid = int(r.stdout.splitlines()[0])
    assert r.stdout.splitlines()[1:] == ["s=0", f"last={pid}", "s=2"]
    assert errors(r) == ["llmsh: run: --restart must be never, on-failure or always, not 'sometimes'"]
    with llmos.connect(privileged=True) as c:
        (p,) = c.ps(pid=pid)
        assert (p["name"], p["ppid"], p["daemon"], p["restart"]) == ("d1", 1, True, "on-failure")
        log = llmos.paths.logs / f"proc-{pid}.log"
        wait_until(lambda: log.exists() and "daemon says hi" in log.read_text(), 20, "its output")
        c.kill(pid, "KILL")


def test_background_jobs_in_a_script(llmos):
    r = sh(llmos.home, f"run {PY} -c 'import sys; sys.exit(4)' & wait %1; echo s=$?; "
                       "echo bg > k & wait %1; get k; false & true & wait %1 %2; echo s=$?; "
                       "wait %1; echo s=$?; fg; echo s=$?; "
                       "run sleep 30 & jobs > joblist; kill -STOP %1; jobs > stopped; bg; jobs > resumed; "
                       "kill %1; wait %1; echo s=$?; kill %1")
    assert [line for line in r.stdout.splitlines() if line.startswith(("s=", "bg"))] == [
        "s=4", "bg", "s=0", "s=1", "s=1", "s=143"]
    assert r.stderr.splitlines() == ["[1]", "[1]", "[1]", "[2]",      # each job's number
                                     "llmsh: wait: %1: no such job", "llmsh: fg: no current job",
                                     "[1]", "llmsh: kill: %1: no such job"]
    with llmos.connect() as c:
        assert c.get("joblist")["value"].split() == ["[1]+", "Running", "run", "sleep", "30"]
        assert c.get("stopped")["value"].split() == ["[1]+", "Stopped", "run", "sleep", "30"]
        assert c.get("resumed")["value"].split() == ["[1]+", "Running", "run", "sleep", "30"]
    assert "[1]+ Running   run sleep 30" in r.stdout          # bg says what it resumed


def test_dollar_bang_is_the_last_background_job(llmos):
    r = sh(llmos.home, "echo none=$!; run sleep 30 & echo last=$!; jobs; kill $!; wait $!; "
                       "echo s=$?; run sh -c 'exit 6' & echo last=$!; wait $!; echo s=$?; "
                       "spawn sleep 60; echo pid=$!; recv & kill $!; wait $!; echo s=$?; "
                       "recv & jobs > recv-job; kill -INT %1; wait %1; echo s=$?")
    lines = r.stdout.splitlines()
    assert lines[:3] == ["none=", "last=%1", "[1]+ Running   run sleep 30"]
    assert lines[3:6] == ["s=143", "last=%1", "s=6"]                 # kill $! and wait $! reach it
    assert lines[7] == f"pid={lines[6]}"                                 # spawn sets it too
    assert lines[8:] == ["s=143", "s=130"]          # kill ends a job busy in a builtin too
    assert r.stderr.splitlines() == ["[1]", "[1]", "[1]", "[1]"]
    with llmos.connect() as c:
        assert c.get("recv-job")["value"].split() == ["[1]+", "Running", "recv"]
        assert not [p for p in c.ps() if p["state"] == "BLOCKED"]        # no recv left behind


def test_dmesg_and_shutdown(llmos):
    r = sh(llmos.home, "dmesg -n 4; echo s=$?; dmesg -n 0; echo s=$?; dmesg -n 4 | cat > kmsg")
    lines = r.stdout.splitlines()
    assert lines[4:] == ["s=0", "s=2"] and len(lines) == 6
    assert all(" INFO " in line or " WARN" in line or " ERROR" in line for line in lines[:4])
    assert not any(line.lstrip().startswith("{") for line in lines[:4])       # rendered, not JSON
    assert errors(r) == ["llmsh: dmesg: -n must be >= 1, not 0"]
    with llmos.connect() as c:
        assert len(c.get("kmsg")["value"].splitlines()) == 4
    r = sh(llmos.home, "shutdown; echo not reached")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    wait_until(lambda: llmos.paths.kernel_pid() is None, 30, "the kernel to stop")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except OSError:
        return ""


def _child_pid(parent: int, cmdline: str) -> int | None:
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                if ppid == parent and f.read().replace("\0", " ").strip() == cmdline:
                    return int(entry)
        except (OSError, ValueError, IndexError):
            pass
    return None


def _children(pid: int) -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(") ", 1)[1].split()[1]) == pid and stat.rsplit(") ", 1)[1][0] != "Z":
                out.append(open(f"/proc/{entry}/cmdline").read().replace("\0", " ").strip())
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_jobs_fg_and_ctrl_c_at_the_prompt(llmos):
    child = llmsh_terminal(llmos.home, timeout=20)
    try:
        child.expect(r"llmsh\$")
        child.sendline("run sleep 30 &")
        child.expect(r"\[1\]")
        child.expect(r"llmsh\$")
        wait_until(lambda: "sleep 30" in _children(child.pid), 10, "the job's sleep")
        child.sendline("echo still here; jobs")
        child.expect(r"still here")
        child.expect(r"\[1\]\+ Running\s+run sleep 30")
        child.expect(r"llmsh\$")
        child.sendline("fg %1")
        child.expect(r"run sleep 30\r\n")           # fg names the job, then waits for it
        child.sendintr()
        child.expect(r"\[130\] llmsh\$")                # the job was interrupted, not the shell
        wait_until(lambda: "sleep 30" not in _children(child.pid), 10, "the sleep to end")
        # Ctrl-C in a pipeline of builtins withdraws their blocking calls too
        with llmos.connect() as c:
            def blocked_shells():
                return [p for p in c.ps() if p["name"] == "llmsh" and p["state"] == "BLOCKED"]
            child.sendline("recv | cat")
            wait_until(blocked_shells, 10, "the pipeline's recv to block")
            child.sendintr()
            child.expect(r"\[130\] llmsh\$")
            wait_until(lambda: not blocked_shells(), 20, "the recv to be withdrawn")
        child.sendline("jobs; echo jobs=$?")
        child.expect(r"jobs=0")
        assert "Running" not in child.before
        # Ctrl-Z stops a job brought to the foreground; bg resumes it
        child.sendline("run sleep 30 &")
        child.expect(r"\[1\]")
        child.expect(r"llmsh\$")
        sleeper = wait_until(lambda: _child_pid(child.pid, "sleep 30"), 10, "the job's sleep")
        child.sendline("fg")
        child.expect(r"run sleep 30\r\n")
        child.sendcontrol("z")
        child.expect(r"\[1\]\+ Stopped\s+run sleep 30")
        child.expect(r"\[148\] llmsh\$")
        wait_until(lambda: _state(sleeper) == "T", 10, "the sleep to stop")
        child.sendline("bg %1")
        child.expect(r"\[1\]\+ Running\s+run sleep 30")
        wait_until(lambda: _state(sleeper) == "S", 10, "the sleep to run again")
        child.sendline("kill %1; wait %1; echo s=$?")
        child.expect(r"s=143")
        # a job that ends in the background is reported before a later prompt
        child.sendline("run sh -c 'exit 3' &")
        child.expect(r"\[1\]")
        for _ in range(500):
            child.sendline("")
            if child.expect([r"\[1\]\+ Exit 3\s+run sh -c 'exit 3'", r"llmsh\$"]) == 0:
                break
        else:
            raise AssertionError("the ended job was never reported")
        child.sendline("echo alive")
        child.expect("alive")
        child.sendline("exit")          # typed ahead safely, unlike ^D between two prompts
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
