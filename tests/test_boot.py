"""Booting, status, shutdown and logs, through the `llmos` command."""

import json
import os
import subprocess
import sys

from conftest import ROOT, process_exists, run_cli


def test_boot_status_shutdown_leaves_nothing(llmos):
    r = run_cli(llmos.home, "status")
    assert r.returncode == 0, r.stderr
    assert f"kernel  pid {llmos.kernel_pid}" in r.stdout
    assert "storage" in r.stdout and "READY" in r.stdout
    storage_pid = llmos.service("storage")["pid"]
    assert process_exists(storage_pid)
    assert oct(llmos.paths.run.stat().st_mode & 0o777) == "0o700"
    with llmos.connect() as c:
        child = c.spawn(["sleep", "60"], daemon=True)
        child_os_pid = c.ps(pid=child)[0]["os_pid"]
    r = run_cli(llmos.home, "shutdown")
    assert r.returncode == 0, r.stderr
    for pid in (llmos.kernel_pid, storage_pid, child_os_pid):
        assert not process_exists(pid)
    assert list(llmos.paths.run.iterdir()) == []
    r = run_cli(llmos.home, "status")
    assert r.returncode == 1 and "not running" in r.stdout


def test_second_boot_is_refused_and_steals_nothing(llmos):
    r = run_cli(llmos.home, "boot")
    assert r.returncode == 1
    assert f"already running in {llmos.home} (kernel pid {llmos.kernel_pid})" in r.stderr
    # a kernel started directly is refused by the pidfile lock, before touching the sockets
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    direct = subprocess.run([sys.executable, "-m", "kernel", "--home", str(llmos.home)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 3 and "already running" in direct.stderr
    with llmos.connect() as c:
        assert c.uname()["kernel_pid"] == llmos.kernel_pid


def test_logs_are_json_lines_and_readable(llmos):
    with llmos.connect() as c:
        c.put("x", 1)
    lines = llmos.paths.log_file("kernel").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert any(e["event"] == "service_ready" and e["service"] == "storage" for e in events)
    assert all({"timestamp", "level", "event"} <= e.keys() for e in events)
    r = run_cli(llmos.home, "logs", "kernel")
    assert r.returncode == 0 and "service_ready service=storage" in r.stdout
    r = run_cli(llmos.home, "logs", "nonesuch")
    assert r.returncode == 1 and "no log named 'nonesuch'" in r.stderr


def test_bad_config_is_reported(home):
    (home / "config.toml").write_text("[supervisor]\nping_timeout = 'soon'\n")
    r = run_cli(home, "boot", "--timeout", "20")
    assert r.returncode == 1
    assert "supervisor.ping_timeout must be float, got 'soon'" in r.stderr


def test_unknown_service_or_section_in_config_is_refused(home):
    (home / "config.toml").write_text("[services]\nenabled = ['storage', 'nonesuch']\n")
    r = run_cli(home, "boot", "--timeout", "20")
    assert r.returncode == 1 and "unknown service 'nonesuch'" in r.stderr
    (home / "config.toml").write_text("[kernal]\nmax_in_flight = 3\n")
    r = run_cli(home, "boot", "--timeout", "20")
    assert r.returncode == 1 and "unknown section [kernal]" in r.stderr
