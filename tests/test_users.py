"""Several OS users on one llmos ([kernel] users_group): real users and a group made here with
groupadd/useradd (so the test needs root, as CI runs), real programs run as them with runuser.

Holds: the modes of LLMOS_HOME (the group reaches programs.sock only); a non-member is refused by
the files and, if the files were opened to all, by the kernel itself; a connection's uid is the one
SO_PEERCRED gives (ps shows it, privilege is refused to it); across users kill, setpriority, send,
storage namespaces and contexts are EPERM (a context handle of another process EBADF), publish
skips them; a user's spawned program runs as that user, in an environment without the kernel's;
and kernel.processes_per_user caps a user's processes with EAGAIN.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, ROOT, Booted, run_cli, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls.paths import Paths
from tiny_system import MODEL_SERVICES

SECRET = "LLMOS_TEST_KERNEL_SECRET"
QUOTA = 6


def _python_for(user: str) -> tuple[str, dict] | None:
    """An interpreter `user` can run that imports llmos's client (the venv's may sit under a
    private home): the same Python version, with the venv's packages on PYTHONPATH."""
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{sysconfig.get_paths()['purelib']}",
           "PATH": "/usr/bin:/bin"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{version}",
                      f"/usr/local/bin/{version}"):
        r = subprocess.run([shutil.which("runuser"), "-u", user, "--", candidate, "-c", "import zmq, msgpack, syscalls"],
                           env=env, capture_output=True, cwd="/")
        if r.returncode == 0:
            return candidate, env
    return None


@pytest.fixture(scope="module")
def machine():
    """A group with two members (a, b), one user outside it (c), and llmos booted as root with
    users_group set; all removed afterwards."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "groupadd", "runuser")):
        print("test_users: skipped: needs root and useradd, groupadd, runuser (CI runs as root)")
        pytest.skip("needs root and useradd/groupadd/runuser to create real OS users")
    tag = secrets.token_hex(3)
    group, names = f"llmt{tag}", {k: f"llmt{tag}{k}" for k in "abc"}
    made = []
    try:
        subprocess.run(["groupadd", group], check=True)
        for k, name in names.items():
            extra = ["-G", group] if k in "ab" else []
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, name], check=True)
            made.append(name)
        found = _python_for(names["a"])
        if found is None:
            print("test_users: skipped: no Python interpreter the test users may run")
            pytest.skip("no Python interpreter the test users may run")
        home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
        model = write_tiny_gguf(home / "tiny.gguf", context=512)
        os.chmod(model, 0o644)
        (home / "config.toml").write_text(
            FAST_CONFIG + f'\n[kernel]\nusers_group = "{group}"\nprocesses_per_user = {QUOTA}\n'
            f'[driver]\nmodel = "{model}"\nkv_blocks = 64\n' + MODEL_SERVICES)
        os.environ[SECRET] = "kernel-only"
        try:
            system = Booted(home).boot()
        finally:
            del os.environ[SECRET]
        system.users = {k: {"name": n, "uid": int(subprocess.check_output(["id", "-u", n]))}
                        for k, n in names.items()}
        system.group, (system.python, system.env) = group, found
        yield system
        system.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False, stderr=subprocess.DEVNULL)


# Runs as a test user: connect, do what the test says, print one JSON line per result.
PRELUDE = textwrap.dedent("""
    import json, os, sys
    import syscalls
    from syscalls import errors
    def out(**kw):
        print(json.dumps(kw), flush=True)
    def code(fn, *a, **kw):
        try:
            fn(*a, **kw)
            return "OK"
        except errors.LLMOSError as e:
            return e.code + ": " + e.message
""")


def run_as(system, who: str, body: str, stdin=None, timeout: float = 60) -> subprocess.Popen | dict:
    env = dict(system.env, LLMOS_HOME=str(system.home))
    argv = [shutil.which("runuser"), "-u", system.users[who]["name"], "--", system.python, "-c",
            PRELUDE + textwrap.dedent(body)]
    if stdin is not None:       # a program that stays connected until its stdin closes
        return subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    r = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return {k: v for line in r.stdout.splitlines() for k, v in json.loads(line).items()}


def test_the_group_reaches_the_programs_socket_only(machine):
    p, gid = machine.paths, int(subprocess.check_output(["getent", "group", machine.group]).split(b":")[2])
    modes = {path: (stat.S_IMODE(os.stat(path).st_mode), os.stat(path).st_gid) for path in
             (p.run, p.programs_sock, p.pidfile)}
    assert modes == {p.run: (0o750, gid), p.programs_sock: (0o660, gid), p.pidfile: (0o640, gid)}
    for private in (p.services_sock, p.data, p.logs):
        assert stat.S_IMODE(os.stat(private).st_mode) & 0o077 == 0, private
    assert os.stat(p.home).st_mode & stat.S_IXGRP and not os.stat(p.home).st_mode & stat.S_IROTH

    # c is no member: the files keep it out, and the kernel would refuse it on its own
    got = run_as(machine, "c", "out(c=code(syscalls.connect, timeout=3))")
    assert got["c"].startswith("EPERM") and "not open to this user" in got["c"], got
    opened = {path: stat.S_IMODE(os.stat(path).st_mode) for path in (p.home, p.run, p.programs_sock, p.pidfile)}
    for path, mode in opened.items():
        os.chmod(path, mode | 0o006 | (mode & 0o010) >> 3)
    try:
        got = run_as(machine, "c", "out(c=code(syscalls.connect, timeout=10))")
    finally:
        for path, mode in opened.items():
            os.chmod(path, mode)
    assert got["c"].startswith("EPERM") and f"uid {machine.users['c']['uid']} may not use" in got["c"], got
    # reading the private files as a member fails
    got = run_as(machine, "a", f"""
        out(db=os.access({str(p.data)!r}, os.R_OK), logs=os.access({str(p.logs)!r}, os.R_OK),
            services=os.access({str(p.services_sock)!r}, os.W_OK))""")
    assert got == {"db": False, "logs": False, "services": False}


def test_users_are_apart(machine):
    a = run_as(machine, "a", """
        c = syscalls.connect(name="holder", timeout=30)
        c.subscribe("news")
        c.put("secret", "a's")
        ctx = c.open_context("you are a's")
        c.ns_create("a-shared", "r")
        c.put("note", "readable", ns="a-shared")
        me = c.ps(c.getpid())[0]
        out(pid=me["pid"], uid=me["uid"], ctx=ctx, priv=code(syscalls.connect, privileged=True, timeout=30))
        sys.stdin.read()                 # stay connected until the test is done
        out(mailbox=code(c.recv, timeout=0.0))
    """, stdin=True)
    try:
        info = json.loads(a.stdout.readline() or "{}")
        assert info, a.stderr.read()
        uid_a = machine.users["a"]["uid"]
        assert info["uid"] == uid_a                           # SO_PEERCRED's, not the program's word
        assert info["priv"].startswith("EPERM") and f"uid {uid_a}" in info["priv"]
        got = run_as(machine, "b", f"""
            c = syscalls.connect(timeout=30)
            pid, ctx = {info['pid']}, {info['ctx']}
            out(kill=code(c.kill, pid, "TERM"), renice=code(c.setpriority, pid, 19),
                limit=code(c.setrlimit, "sequences", 0, pid=pid), send=code(c.send, pid, "hi"),
                publish=c.publish("news", "hi"),
                get=code(c.get, "secret", ns="user:{uid_a}"), mine=code(c.get, "secret"),
                put=code(c.put, "x", 1, ns="user:{uid_a}"),
                shared_read=c.get("note", ns="a-shared")["value"],
                shared_write=code(c.put, "note", "b's", ns="a-shared"),
                chmod=code(c.ns_chmod, "a-shared", "rw"),
                contexts=code(c.contexts, pid), chat=code(lambda: c.chat(
                    [{{"role": "user", "content": "hi"}}], ctx=ctx, max_tokens=1).text),
                save=code(c.save_context, ctx, "stolen"),
                load=code(c.load_context, "secret", ns="user:{uid_a}"),
                model_add=code(c.model_add, "/root/model.gguf"), model_rm=code(c.model_remove, "tiny"))
        """)
        for call in ("kill", "renice", "limit", "send", "get", "put", "shared_write", "chmod", "contexts",
                     "load", "model_add", "model_rm"):
            assert got[call].startswith("EPERM"), (call, got[call])
        assert f"uid {uid_a}" in got["kill"] and f"uid {uid_a}" in got["send"]
        assert got["publish"] == 0 and got["mine"].startswith("ENOENT")
        assert "acts for every user" in got["model_add"]
        assert got["shared_read"] == "readable"
        assert got["chat"].startswith("EBADF") and got["save"].startswith("EBADF")
        with machine.connect() as root:                     # root may cross: privilege
            assert root.ps(info["pid"])[0]["state"] != "ZOMBIE"
        a.stdin.close()
        assert json.loads(a.stdout.readline())["mailbox"].startswith("ETIMEDOUT")  # b's send never landed
        assert a.wait(30) == 0
    finally:
        a.kill()


def test_a_spawned_program_runs_as_its_user(machine):
    uid_b = machine.users["b"]["uid"]
    got = run_as(machine, "b", """
        c = syscalls.connect(timeout=30)
        ids = c.spawn(["/usr/bin/id", "-u"]); env = c.spawn(["/usr/bin/env"])
        out(ids=ids, env=env, waited=[c.wait(ids, timeout=20)["status"], c.wait(env, timeout=20)["status"]])
    """)
    assert got["waited"] == [0, 0]
    log = machine.paths.logs
    assert (log / f"proc-{got['ids']}.log").read_text().split() == [str(uid_b)]
    env = (log / f"proc-{got['env']}.log").read_text()
    assert SECRET not in env and f"USER={machine.users['b']['name']}" in env, env


def _none_left(machine, who: str) -> None:
    uid = machine.users[who]["uid"]
    with machine.connect() as root:
        wait_until(lambda: not [p for p in root.ps() if p["uid"] == uid and p["state"] != "ZOMBIE"],
                   timeout=10, what=f"{who}'s processes to end")


def test_processes_per_user_is_a_quota(machine):
    _none_left(machine, "b")
    got = run_as(machine, "b", f"""
        conns, refused = [], None
        for _ in range({QUOTA} + 2):
            try:
                conns.append(syscalls.connect(timeout=30))
            except errors.EAGAIN as e:
                refused = e.message
                break
        out(opened=len(conns), refused=refused)
    """)
    assert got["opened"] == QUOTA and "processes_per_user" in got["refused"], got
    _none_left(machine, "b")            # and they end with their connections


def test_an_unknown_users_group_stops_the_boot(home):
    (home / "config.toml").write_text(FAST_CONFIG + '[kernel]\nusers_group = "no-such-group-llmos"\n')
    r = run_cli(home, "boot", "--timeout", "20", timeout=40)
    assert r.returncode != 0 and "users_group names no OS group: 'no-such-group-llmos'" in r.stdout + r.stderr
    assert Paths(home).kernel_pid() is None


def _llmsh_as(machine, who: str, env: dict):
    """The real llmsh, interactive in a pseudo-terminal, run as a test user with runuser."""
    import pexpect
    base = dict(machine.env, LLMOS_HOME=str(machine.home), TERM="xterm", NO_COLOR="1",
                PROMPT_TOOLKIT_NO_CPR="1")
    # through env(1): runuser sets HOME to the user's passwd entry, as su does
    return pexpect.spawn(shutil.which("runuser"), ["-u", machine.users[who]["name"], "--",
                         shutil.which("env"), *(f"{k}={v}" for k, v in env.items()),
                         machine.python, "-m", "userland.llmsh", "--home", str(machine.home)],
                         env=base, cwd="/", timeout=30, encoding="utf-8", dimensions=(40, 200))


def _session(child, line: str) -> None:
    """Type one line at the prompt, see its output, leave with Ctrl-D: status 0."""
    import pexpect
    try:
        child.expect(r"llmsh\$")
        child.sendline(line)
        child.expect(r"hello-from-member")         # the output: the line typed has quotes in it
        child.expect(r"llmsh\$")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_llmsh_of_a_member_keeps_its_history_and_log_in_its_own_state_directory(machine):
    user = machine.users["a"]
    own = Path(tempfile.mkdtemp(prefix="llmos-state-", dir="/tmp"))
    try:
        os.chown(own, user["uid"], -1)
        # XDG_STATE_HOME: the history goes there, 0700 and the member's; LLMOS_HOME gets nothing
        _session(_llmsh_as(machine, "a", {"XDG_STATE_HOME": str(own / "xdg"), "HOME": "/nonexistent"}),
                 "echo hello-from-''member")
        folder = own / "xdg" / "llmos"
        history = list(folder.glob("llmsh_history-*"))
        assert len(history) == 1 and "echo hello-from-''member" in history[0].read_text(), history
        st = folder.stat()
        assert st.st_uid == user["uid"] and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
        assert history[0].stat().st_uid == user["uid"]
        assert not (machine.home / "llmsh_history").exists()
        # without XDG_STATE_HOME: ~/.local/state/llmos, and the log of an llmsh bug goes there too
        home = own / "home"
        _session(_llmsh_as(machine, "a", {"HOME": str(home), "XDG_STATE_HOME": ""}),
                 "echo hello-from-''member again")
        run_as(machine, "a", f"""
            os.environ["HOME"] = {str(home)!r}
            from syscalls.paths import Paths
            from userland.shell.shell import Shell
            Shell(Paths.from_env({str(machine.home)!r})).log().error("member_log_line")
        """)
        folder = home / ".local" / "state" / "llmos"
        assert "again" in next(folder.glob("llmsh_history-*")).read_text()
        assert "member_log_line" in next(folder.glob("llmsh.log-*")).read_text()
        assert "member_log_line" not in (machine.paths.logs / "llmsh.log").read_text() \
            if (machine.paths.logs / "llmsh.log").exists() else True
        # nowhere to write at all: llmsh still starts and runs, its history in memory
        _session(_llmsh_as(machine, "a", {"HOME": "/nonexistent", "XDG_STATE_HOME": ""}),
                 "echo hello-from-''member nowhere")
    finally:
        shutil.rmtree(own, ignore_errors=True)
