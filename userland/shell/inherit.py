"""What a program started by `run` inherits from llmsh: the priority and limits set in the shell
(nice, renice $$, ulimit).

Such a program connects to llmos on its own and so starts as a process of its own at priority 0
with no limits; the kernel passes them on only at spawn. So while the program runs, llmsh watches
the process table for llmos processes opened by it or by anything it started (by OS process
ancestry) and sets the shell's priority and limits on each, within a fraction of a second of its
first call. The scheduler reads a process's priority at every step, so a request made before then
is rescheduled at once. A program that has already chosen its own priority (batch makes itself
less urgent) keeps it, and a limit is only ever lowered.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from syscalls import errors

from .builtin import error_text

if TYPE_CHECKING:
    from .shell import Shell

FIRST_LOOK = 0.02           # seconds between looks at first, growing to LAST_LOOK
LAST_LOOK = 0.5


def descends(os_pid: int, root: int) -> bool:
    """Whether OS process os_pid is root or started by it, however indirectly."""
    for _ in range(256):
        if os_pid == root:
            return True
        if os_pid <= 1:
            return False
        try:
            with open(f"/proc/{os_pid}/stat") as f:
                os_pid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class Inheritance:
    """Gives the llmos processes of one program, as they appear, the shell's priority and limits."""

    def __init__(self, sh: Shell, os_pid: int):
        self.sh = sh.fork(sh.job, sh.io)    # a connection of its own: the shell's waits for the program
        self.root = os_pid
        self.given: set[int] = set()        # llmos PIDs already seen to
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="llmsh-inherit")

    @classmethod
    def start(cls, sh: Shell, os_pid: int) -> "Inheritance | None":
        if sh.priority is None and not sh.limits:
            return None
        heir = cls(sh, os_pid)
        heir.thread.start()
        return heir

    def stop(self) -> None:
        """One last look (the program may have connected just before it ended), then stop."""
        self.stopping.set()
        self.thread.join()
        self.sh.close(0)

    def _watch(self) -> None:
        pause = FIRST_LOOK
        while True:
            last = self.stopping.is_set()
            try:
                self._look()
            except errors.LLMOSError:
                return                  # llmos went away; the program will find out by itself
            if last:
                return
            self.stopping.wait(pause)
            pause = min(LAST_LOOK, pause * 1.5)

    def _look(self) -> None:
        for p in self.sh.call("ps"):
            pid, os_pid = p["pid"], p.get("os_pid")
            if pid in self.given or os_pid is None or p["state"] == "ZOMBIE":
                continue
            if not descends(os_pid, self.root):
                continue
            self.given.add(pid)
            try:
                if self.sh.priority not in (None, 0) and p["priority"] == 0:
                    self.sh.call("setpriority", pid=pid, priority=self.sh.priority)
                now = self.sh.call("getrlimit", pid=pid) if self.sh.limits else {}
                for resource, limit in self.sh.limits.items():
                    if limit is not None and (now.get(resource) is None or now[resource] > limit):
                        self.sh.call("setrlimit", pid=pid, resource=resource, limit=limit)
            except errors.ESRCH:
                pass                    # it has already gone
            except errors.LLMOSError as e:
                self.sh.io.error("run", f"could not give pid {pid} the shell's priority and limits: "
                                       f"{error_text(e)}")
