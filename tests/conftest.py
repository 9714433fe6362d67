"""Shared fixtures: a real llmos booted in a temporary LLMOS_HOME, torn down after each test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import syscalls  # noqa: E402
from syscalls.paths import Paths  # noqa: E402

# Fast supervision so that failure tests finish in seconds; the defaults are in syscalls/runtime/config.py.
FAST_SUPERVISION = """
[supervisor]
ping_interval = 0.2
ping_timeout = 1.0
backoff_base = 0.2
backoff_max = 1.0
max_restarts = 5
restart_window = 30.0
"""
# The HTTP gateway is on by default (on 127.0.0.1:8790); tests that want it turn it on themselves
# (tests/test_gateway.py), on a port of their own, so that test boots never fight over one.
FAST_CONFIG = FAST_SUPERVISION + "\n[gateway]\nenabled = false\n"
# Most tests need no model: they run without the driver and inference services, which load one.
LIGHT_SERVICES = '[services]\nenabled = ["storage", "tokenizer"]\n'


def run_cli(home: Path, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMOS_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "userland.llmos", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=check)


def llmsh_terminal(home: Path, timeout: float = 20):
    """The real llmsh in a 40x200 pseudo-terminal (pexpect), plain: no colours, no cursor queries."""
    import pexpect
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm", NO_COLOR="1", PROMPT_TOOLKIT_NO_CPR="1")
    return pexpect.spawn(sys.executable, ["-m", "userland.llmsh", "--home", str(home)],
                         env=env, cwd=str(ROOT), timeout=timeout, encoding="utf-8", dimensions=(40, 200))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll an observable condition (not a sleep standing in for synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is not a live process
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Booted:
    """A running llmos: its home, kernel pid, and helpers to reach it."""

    def __init__(self, home: Path):
        self.home = home
        self.paths = Paths(home)

    def boot(self, timeout: float = 60) -> "Booted":
        r = run_cli(self.home, "boot", "--timeout", str(timeout), timeout=timeout + 10)
        if r.returncode != 0:
            logs = self.logs()
            self.shutdown()          # a half-booted kernel must not outlive the test
            raise AssertionError(f"boot failed: {r.stdout}{r.stderr}\n{logs}")
        self.kernel_pid = self.paths.kernel_pid()
        assert self.kernel_pid
        return self

    def connect(self, **kw) -> syscalls.Connection:
        kw.setdefault("timeout", 30)
        return syscalls.connect(self.home, **kw)

    def service(self, name: str) -> dict:
        with self.connect() as c:
            return next(s for s in c.services() if s["name"] == name)

    def logs(self) -> str:
        out = []
        for p in sorted(self.paths.logs.glob("*")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def shutdown(self) -> None:
        pid = self.paths.kernel_pid()
        if pid:
            run_cli(self.home, "shutdown", timeout=30)
        pid = self.paths.kernel_pid()
        if pid:      # a test left it unable to stop: make sure nothing outlives the test
            os.kill(pid, signal.SIGKILL)

    def discard(self) -> None:
        """Shut it down and remove its LLMOS_HOME (a model's weight cache can be large)."""
        self.shutdown()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def home():
    # ipc:// paths must stay under ~100 bytes, so not pytest's long tmp_path
    path = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    (path / "config.toml").write_text(FAST_CONFIG + LIGHT_SERVICES)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def llmos(home):
    system = Booted(home).boot()
    yield system
    system.shutdown()
