"""Daemons: restart policies, giving up, llmos's kill meaning stop, and daemons started at boot."""

import os
import signal

import pytest

from conftest import Booted, process_exists, wait_until
from syscalls import errors


def entry(conn, pid):
    try:
        return conn.ps(pid=pid)[0]
    except errors.ESRCH:
        return None


def relaunched(conn, pid, old_os_pid):
    e = entry(conn, pid)
    return e if e and e["state"] == "RUNNING" and e["os_pid"] not in (None, old_os_pid) else None


def test_on_failure_daemon_comes_back_after_kill_9_and_stops_on_llmos_kill(llmos):
    with llmos.connect() as c:
        pid = c.spawn(["sleep", "60"], daemon=True, restart="on-failure")
        first = entry(c, pid)
        assert first["restart"] == "on-failure" and first["ppid"] == 1
        os.kill(first["os_pid"], signal.SIGKILL)               # a crash, from outside llmos
        again = wait_until(lambda: relaunched(c, pid, first["os_pid"]), 5, "the daemon to return")
        assert again["restarts"] == 1 and again["pid"] == pid
        assert not process_exists(first["os_pid"])
    with llmos.connect(privileged=True) as root:
        root.kill(pid)                                         # a request to stop: no restart
        wait_until(lambda: entry(root, pid) is None, 5, "the daemon to end for good")
        assert not process_exists(again["os_pid"])
        assert "daemon_exited" in llmos.paths.log_file("kernel").read_text()


def test_policies_decide_on_exit_status(llmos):
    with llmos.connect() as c:
        clean = c.spawn(["true"], restart="on-failure")
        assert c.wait(clean, timeout=10) == {"pid": clean, "status": 0, "signal": None}
        never = c.spawn(["false"])
        assert c.wait(never, timeout=10)["status"] == 1
        always = c.spawn(["true"], restart="always")
        wait_until(lambda: (entry(c, always) or {}).get("restarts", 0) >= 2, 10,
                   "a clean exit to be restarted under 'always'")
        c.kill(always, "KILL")
        assert c.wait(always, timeout=10)["pid"] == always


def test_a_daemon_that_keeps_failing_is_given_up(llmos):
    with llmos.connect() as c:
        pid = c.spawn(["false"], restart="on-failure")
        # max_restarts = 5 in the test config: 1 run + 5 restarts, then the kernel gives up
        assert c.wait(pid, timeout=30) == {"pid": pid, "status": 1, "signal": None}
    assert "daemon_gave_up" in llmos.paths.log_file("kernel").read_text()


def test_daemons_from_config_start_at_boot(home):
    with open(home / "config.toml", "a") as f:
        f.write('\n[[daemons]]\nname = "sleeper"\nargv = ["sleep", "60"]\nrestart = "always"\n'
                'priority = 5\n')
    system = Booted(home).boot()
    try:
        with system.connect() as c:
            d = next(p for p in c.ps() if p["name"] == "sleeper")
            assert d["ppid"] == 1 and d["daemon"] and d["priority"] == 5 and d["state"] == "RUNNING"
            os.kill(d["os_pid"], signal.SIGKILL)
            wait_until(lambda: relaunched(c, d["pid"], d["os_pid"]), 5, "the boot daemon to return")
    finally:
        system.shutdown()


def test_bad_daemon_config_is_refused(home):
    from conftest import run_cli
    with open(home / "config.toml", "a") as f:
        f.write('\n[[daemons]]\nname = "x"\nargv = []\n')
    r = run_cli(home, "boot", "--timeout", "20")
    assert r.returncode == 1 and "daemon 'x': argv must be a non-empty list" in r.stderr


def test_echo_daemon_answers_and_survives_a_crash(llmos):
    import sys
    with llmos.connect() as c:
        pid = c.spawn([sys.executable, "-m", "userland.programs.echo_daemon"], daemon=True,
                      restart="on-failure", name="echo-daemon")

        def subscribed():
            # published messages only reach it once it has subscribed: retry until one is answered
            return c.publish("echo", "ping") == 1
        wait_until(subscribed, 20, "the echo daemon to subscribe")
        assert c.recv(timeout=10) == {"from": pid, "topic": None, "data": {"echo": "ping", "by": pid}}
        os_pid = entry(c, pid)["os_pid"]
        os.kill(os_pid, signal.SIGKILL)
        wait_until(lambda: relaunched(c, pid, os_pid), 5, "the echo daemon to return")
        wait_until(subscribed, 20, "the restarted echo daemon to subscribe again")
        assert c.recv(timeout=10)["data"] == {"echo": "ping", "by": pid}
