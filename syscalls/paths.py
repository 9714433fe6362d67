"""Where llmos keeps its files: everything lives under LLMOS_HOME (default ~/.llmos).

    LLMOS_HOME/run/       mode 0700: the kernel's sockets and pidfile (gone after shutdown)
    LLMOS_HOME/logs/      JSON-lines logs, one file per process
    LLMOS_HOME/data/      storage's SQLite database
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None) -> "Paths":
        raw = home or os.environ.get("LLMOS_HOME") or "~/.llmos"
        return cls(Path(raw).expanduser().absolute())

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def pidfile(self) -> Path:
        return self.run / "kernel.pid"

    @property
    def programs_sock(self) -> Path:
        return self.run / "programs.sock"

    @property
    def services_sock(self) -> Path:
        return self.run / "services.sock"

    @property
    def programs_endpoint(self) -> str:
        return f"ipc://{self.programs_sock}"

    @property
    def services_endpoint(self) -> str:
        return f"ipc://{self.services_sock}"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def kernel_pid(self) -> int | None:
        """The pid of the kernel holding the pidfile's lock, or None when no kernel runs here.

        The kernel holds an flock on the pidfile for its whole life, so a pidfile left behind by a
        killed kernel reads as "not running", and no pid is ever trusted without its lock.
        """
        try:
            fd = os.open(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.read(fd, 32).decode().strip() or 0) or None
            except ValueError:
                return None
        finally:
            os.close(fd)
        return None

    def ensure(self) -> None:
        """Create the directories; the runtime directory is private to the user (0700)."""
        for d in (self.home, self.logs, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.run, 0o700)
