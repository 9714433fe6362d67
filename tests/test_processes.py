"""The process table: spawn, wait, kill, exit, permissions, orphans and departures."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, process_exists, wait_until
from syscalls import errors


def program(llmos, name: str, body: str) -> str:
    """Write a Python program that talks to llmos; returns its path."""
    path = llmos.home / f"{name}.py"
    path.write_text("import sys, time, syscalls\n" + textwrap.dedent(body))
    return str(path)


def pids(conn) -> dict[int, dict]:
    return {p["pid"]: p for p in conn.ps()}


def test_connection_is_a_process_with_peer_credentials(llmos):
    with llmos.connect(name="tester") as c:
        me = pids(c)[c.getpid()]
        assert me["name"] == "tester" and me["ppid"] == 1
        assert me["uid"] == os.getuid() and me["os_pid"] == os.getpid()
        assert me["state"] == "RUNNING" and not me["privileged"]
        kernel = pids(c)[1]
        assert kernel["name"] == "kernel" and kernel["os_pid"] == llmos.kernel_pid
        with pytest.raises(errors.ESRCH):
            c.ps(pid=999_999)


def test_spawn_wait_exit_status_and_binding(llmos):
    prog = program(llmos, "child", """
        with syscalls.connect() as os_:
            os_.put("child/pid", os_.getpid())
            os_.put("child/ppid", os_.ps(pid=os_.getpid())[0]["ppid"])
        sys.exit(3)
    """)
    with llmos.connect() as c:
        pid = c.spawn([sys.executable, prog], name="child")
        assert pids(c)[pid]["ppid"] == c.getpid()
        result = c.wait(pid, timeout=30)
        assert result == {"pid": pid, "status": 3, "signal": None}
        # the program's own connection was bound to the entry spawn created
        assert c.get("child/pid")["value"] == pid
        assert c.get("child/ppid")["value"] == c.getpid()
        assert pid not in pids(c)                      # reaped by wait
        with pytest.raises(errors.ESRCH):
            c.wait(pid)


def test_exit_syscall_sets_the_status(llmos):
    prog = program(llmos, "exiter", """
        c = syscalls.connect()
        c.exit(5)
        time.sleep(0.2)
    """)
    with llmos.connect() as c:
        pid = c.spawn([sys.executable, prog])
        assert c.wait(pid, timeout=30)["status"] == 5


def test_a_program_that_wrote_nothing_leaves_no_log_file(llmos):
    """Thousands of short programs must not leave thousands of empty files in logs/."""
    with llmos.connect() as c:
        quiet, loud = c.spawn(["true"]), c.spawn(["echo", "something"])
        assert c.wait(quiet, timeout=30)["status"] == 0 and c.wait(loud, timeout=30)["status"] == 0
    assert not (llmos.paths.logs / f"proc-{quiet}.log").exists()
    assert (llmos.paths.logs / f"proc-{loud}.log").read_text() == "something\n"


def test_spawn_errors_name_the_problem(llmos):
    with llmos.connect() as c:
        with pytest.raises(errors.ENOENT, match="no-such-program"):
            c.spawn(["no-such-program"])
        with pytest.raises(errors.ENOENT, match="cwd"):
            c.spawn(["true"], cwd="/no/such/dir")
        with pytest.raises(errors.EINVAL, match="argv"):
            c.spawn([])
        with pytest.raises(errors.EINVAL, match="priority"):
            c.spawn(["true"], priority=40)


def test_kill_term_stop_cont(llmos):
    with llmos.connect() as c:
        pid = c.spawn(["sleep", "60"])
        os_pid = pids(c)[pid]["os_pid"]
        c.kill(pid, "STOP")
        assert pids(c)[pid]["state"] == "STOPPED"
        wait_until(lambda: Path(f"/proc/{os_pid}/stat").read_text().split(") ")[1][0] == "T",
                   5, "the OS process to stop")
        c.kill(pid, "CONT")
        assert pids(c)[pid]["state"] == "RUNNING"
        c.kill(pid)                                    # TERM by default
        assert c.wait(pid, timeout=10) == {"pid": pid, "status": None, "signal": "TERM"}
        assert not process_exists(os_pid)
        with pytest.raises(errors.ESRCH):
            c.kill(pid)
        with pytest.raises(errors.EPERM, match="kernel"):
            c.kill(1)


def test_signals_only_to_own_tree_without_privilege(llmos):
    with llmos.connect(name="a") as a, llmos.connect(name="b") as b, \
            llmos.connect(name="root", privileged=True) as root:
        child = a.spawn(["sleep", "60"])
        with pytest.raises(errors.EPERM, match="descendants"):
            b.kill(child)
        with pytest.raises(errors.EPERM):
            b.kill(a.getpid())
        with pytest.raises(errors.ECHILD):
            b.wait(child, timeout=0)
        assert pids(a)[child]["state"] == "RUNNING"    # nothing happened to it
        root.kill(child, "KILL")                       # privilege may signal anyone
        assert a.wait(child, timeout=10)["signal"] == "KILL"
        with pytest.raises(errors.EPERM, match="privilege"):
            b.shutdown()


def test_wait_times_out_and_blocks(llmos):
    with llmos.connect() as c:
        pid = c.spawn(["sleep", "60"])
        with pytest.raises(errors.ETIMEDOUT, match="still running"):
            c.wait(pid, timeout=0.2)
        c.kill(pid, "KILL")
        assert c.wait(pid, timeout=10)["signal"] == "KILL"


def test_dead_program_is_reaped_within_3s(llmos):
    code = "import syscalls, sys, time\nc = syscalls.connect()\nprint(c.getpid(), flush=True)\ntime.sleep(60)\n"
    env = dict(os.environ, LLMOS_HOME=str(llmos.home), PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    pid = int(p.stdout.readline())
    with llmos.connect() as c:
        assert pid in pids(c)
        p.send_signal(signal.SIGKILL)
        p.wait()
        wait_until(lambda: pid not in pids(c), 3, "the killed program to be reaped")


def test_closing_the_socket_without_exit_is_noticed(llmos):
    with llmos.connect() as watcher:
        leaver = llmos.connect()
        pid = leaver.getpid()
        leaver._sock.close(linger=0)                  # vanish without saying exit
        wait_until(lambda: pid not in pids(watcher), 3, "the departed connection to be reaped")


def test_orphans_are_reparented_and_zombies_reaped(llmos):
    prog = program(llmos, "parent", """
        with syscalls.connect() as os_:
            long = os_.spawn(["sleep", "60"], name="orphan")
            short = os_.spawn(["true"], name="zombie")
            os_.put("parent/children", [long, short])
            print("ready", flush=True)
            time.sleep(60)
    """)
    with llmos.connect(privileged=True) as c:
        parent = c.spawn([sys.executable, prog], name="parent")
        orphan, zombie = wait_until(lambda: _get(c, "parent/children"), 20, "the parent's children")
        wait_until(lambda: pids(c).get(zombie, {}).get("state") == "ZOMBIE", 10,
                   "the short child to become a zombie (its parent does not wait)")
        c.kill(parent, "KILL")
        assert c.wait(parent, timeout=10)["signal"] == "KILL"
        table = pids(c)
        assert table[orphan]["ppid"] == 1                # re-parented to the kernel
        assert zombie not in table                       # the kernel reaped the zombie
        c.kill(orphan, "KILL")
        wait_until(lambda: orphan not in pids(c), 5, "the orphan to be reaped by pid 1")


def _get(c, key):
    try:
        return c.get(key)["value"]
    except errors.ENOENT:
        return None


def test_daemon_is_parented_to_init(llmos):
    with llmos.connect() as c:
        pid = c.spawn(["sleep", "60"], daemon=True)
        assert pids(c)[pid]["ppid"] == 1 and pids(c)[pid]["daemon"]
        with pytest.raises(errors.EPERM):          # no longer in the spawner's tree
            c.kill(pid)
    with llmos.connect(privileged=True) as root:
        root.kill(pid, "KILL")
        wait_until(lambda: pid not in pids(root), 5, "the daemon to be reaped by pid 1")


def test_cont_restores_blocked_state_and_priority_needs_privilege(llmos):
    prog = program(llmos, "receiver", """
        with syscalls.connect() as os_:
            sys.exit(7 if os_.recv(timeout=30)["data"] == "done" else 1)
    """)
    with llmos.connect() as c:
        pid = c.spawn([sys.executable, prog])
        wait_until(lambda: pids(c)[pid]["state"] == "BLOCKED", 20, "the receiver to block in recv")
        c.kill(pid, "STOP")
        assert pids(c)[pid]["state"] == "STOPPED"
        c.kill(pid, "CONT")
        assert pids(c)[pid]["state"] == "BLOCKED"        # still inside recv
        c.send(pid, "done")
        assert c.wait(pid, timeout=30)["status"] == 7
        with pytest.raises(errors.EPERM, match="more urgent"):
            c.spawn(["true"], priority=-5)
        pid = c.spawn(["sleep", "5"], priority=5)
        assert pids(c)[pid]["priority"] == 5
        c.kill(pid, "KILL")


def test_nice_setpriority_and_inheritance(llmos):
    with llmos.connect() as c, llmos.connect(privileged=True) as root:
        assert c.getpriority() == 0
        assert c.nice(5) == 5 and c.getpriority() == 5
        assert c.nice(100 - 95) == 10                       # increments add up
        with pytest.raises(errors.EPERM, match="more urgent"):
            c.nice(-1)
        child = c.spawn(["sleep", "30"])
        assert c.getpriority(child) == 10                   # inherited
        c.setpriority(child, 15)
        with pytest.raises(errors.EPERM, match="more urgent"):
            c.setpriority(child, 12)
        with pytest.raises(errors.EPERM, match="descendants"):
            c.setpriority(root.getpid(), 19)
        root.setpriority(child, -5)                         # privilege may raise it
        assert pids(c)[child]["priority"] == -5
        assert root.nice(-30) == -20                        # clamped
        with pytest.raises(errors.EINVAL, match="'priority' must be <= 19"):
            root.setpriority(child, 20)
        c.kill(child, "KILL")


def test_rlimits_are_inherited_and_only_privilege_raises_them(llmos):
    with llmos.connect() as c, llmos.connect(privileged=True) as root:
        assert c.getrlimit() == {"kv_blocks": None, "sequences": None,
                                 "tokens_per_minute": None, "storage_bytes": None}
        c.setrlimit("sequences", 4)
        c.setrlimit("sequences", 2)                         # lowering is always allowed
        with pytest.raises(errors.EPERM, match="raising sequences of pid .* from 2 to 3"):
            c.setrlimit("sequences", 3)
        with pytest.raises(errors.EPERM, match="unlimited"):
            c.setrlimit("sequences", None)
        child = c.spawn(["sleep", "30"])
        assert c.getrlimit(child)["sequences"] == 2         # inherited at spawn
        root.setrlimit("sequences", 8, pid=child)
        assert c.getrlimit(child)["sequences"] == 8
        with pytest.raises(errors.EINVAL, match="resource"):
            c.setrlimit("cpu", 1)
        c.kill(child, "KILL")


def test_a_program_takes_on_the_priority_and_limits_its_shell_passed_down(llmos, monkeypatch):
    monkeypatch.setenv("LLMOS_PRIORITY", "5")
    monkeypatch.setenv("LLMOS_LIMITS", "sequences=2,kv_blocks=9")
    with llmos.connect() as c:
        assert c.getpriority() == 5 and c.getrlimit()["sequences"] == 2 and c.getrlimit()["kv_blocks"] == 9
    monkeypatch.setenv("LLMOS_PRIORITY", "-5")
    with pytest.raises(errors.EPERM, match="priority -5 is more urgent than pid .*'s \\(0\\); that needs privilege"):
        llmos.connect()
    with llmos.connect(privileged=True) as root:
        assert root.getpriority() == -5
    monkeypatch.setenv("LLMOS_PRIORITY", "0")
    monkeypatch.setenv("LLMOS_LIMITS", "cpu=1")
    with pytest.raises(errors.EINVAL, match="no resource 'cpu'"):
        llmos.connect()


ESCAPE = """\
import os, syscalls
from syscalls import errors
os.environ.pop("LLMOS_SPAWN_TOKEN")         # a second connection, not bound to the spawned entry
try:
    syscalls.connect(privileged=True)
    result = "granted"
except errors.EPERM as e:
    result = e.message
with syscalls.connect() as c:
    c.put("escape", result)
"""


def test_what_is_spawned_without_privilege_cannot_gain_it_by_reconnecting(llmos, tmp_path):
    prog = tmp_path / "escape.py"
    prog.write_text(ESCAPE)
    with llmos.connect() as c:
        pid = c.spawn([sys.executable, str(prog)], env={"PYTHONPATH": str(ROOT)})
        assert c.wait(pid, timeout=30)["status"] == 0
        assert c.get("escape")["value"] == (f"hello: this program runs under pid {pid}, which was spawned "
                                            f"without privilege; nothing it starts may gain it")


def test_storage_bytes_limit_is_enforced_per_process(llmos):
    with llmos.connect() as c, llmos.connect() as other:
        c.setrlimit("storage_bytes", 1000)
        c.put("a", "x" * 600)
        with pytest.raises(errors.EDQUOT, match="storage_bytes limit is 1000; this value adds"):
            c.put("b", "x" * 600)
        with pytest.raises(errors.ENOENT):
            c.get("b")                                      # nothing of it was stored
        c.put("a", "x" * 100)                               # shrinking frees allowance
        c.put("b", "x" * 600)
        other.put("c", "x" * 5000)                          # another process is not affected
        assert c.getrlimit()["storage_bytes"] == 1000
