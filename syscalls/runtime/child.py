"""A child process of an llmos process: started, watched through a pidfd, and stopped.

The kernel's supervisor (services) and launcher (programs) start their children the same way:
``Popen`` with PDEATHSIG, so a child never outlives the process that started it, even one killed
by SIGKILL; llmos's own folder first on PYTHONPATH, so the child can import llmos; a pidfd on the
event loop, so a death is seen at once; the exit status decoded once (``Exit``); and a stop that
sends TERM, waits a grace period, then sends KILL (``stop_all``).

Never: restart a child or decide what its death means; the caller's ``on_exit`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

ROOT = str(Path(__file__).resolve().parents[2])       # the folder that holds syscalls/, kernel/, ...

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # In the child before exec: if the parent dies (even by SIGKILL), the child gets SIGKILL too,
    # so a crashed kernel never leaves services holding the database or a device.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def with_llmos_path(env: dict[str, str]) -> dict[str, str]:
    """env, changed in place, with llmos's folder first on PYTHONPATH."""
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass(frozen=True)
class Exit:
    """How the child with OS pid ``pid`` ended: its exit status, or the signal that killed it
    (``"KILL"``, no SIG)."""
    pid: int
    status: int | None
    signal: str | None

    @classmethod
    def from_returncode(cls, pid: int, code: int) -> Exit:
        if code < 0:
            return cls(pid, None, signal.Signals(-code).name.removeprefix("SIG"))
        return cls(pid, code, None)

    def __str__(self) -> str:
        return f"killed by SIG{self.signal}" if self.signal else f"exited with status {self.status}"


class Child:
    """One child process. ``group``: it leads a process group of its own, and signals go to the
    whole group (as a shell's job). ``as_user``: Popen's user, group and extra_groups, to run it
    as another OS user. ``on_exit(exit)`` runs on the loop when the pidfd says it
    ended, unless ``close()`` came first. Raises OSError if it cannot be started."""

    def __init__(self, loop: asyncio.AbstractEventLoop, argv: list[str], env: dict[str, str],
                 on_exit: Callable[[Exit], None], *, group: bool = False,
                 as_user: dict | None = None, **popen_args):
        self.loop, self.group, self.on_exit = loop, group, on_exit
        # (Popen switches user before preexec_fn runs, so PDEATHSIG, which a switch clears, holds)
        self.popen = subprocess.Popen(argv, env=with_llmos_path(dict(env)), close_fds=True,
                                      start_new_session=group, preexec_fn=_die_with_parent,
                                      **popen_args, **(as_user or {}))
        self.pid = self.popen.pid
        self.pidfd: int | None = os.pidfd_open(self.pid)
        loop.add_reader(self.pidfd, self._exited)

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Signal the child (its group, with ``group``); ProcessLookupError if it is gone."""
        if self.group:
            os.killpg(self.pid, signum)
        else:
            self.popen.send_signal(signum)

    def close(self) -> None:
        """Stop watching: ``on_exit`` will not run. Idempotent."""
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def _exited(self) -> None:
        self.close()
        self.on_exit(Exit.from_returncode(self.pid, self.popen.wait()))


async def stop_all(children: Iterable[Child], grace: float) -> None:
    """TERM every child, KILL those still running ``grace`` seconds later, and stop watching all.
    A child that ends within the grace period has its ``on_exit`` run as usual."""
    children = list(children)
    for child in children:
        if child.running:
            with contextlib.suppress(ProcessLookupError):
                child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        while child.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if child.running:
            with contextlib.suppress(ProcessLookupError):
                child.signal(signal.SIGKILL)
            child.popen.wait()
        child.close()
