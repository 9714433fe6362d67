"""Where llmos keeps its files: everything lives under LLMOS_HOME (default ~/.llmos).

    LLMOS_HOME/run/       mode 0700: the kernel's sockets and pidfile (gone after shutdown)
    LLMOS_HOME/logs/      JSON-lines logs, one file per process
    LLMOS_HOME/data/      storage's SQLite database, model caches
"""

from __future__ import annotations

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

    def ensure(self) -> None:
        """Create the directories; the runtime directory is private to the user (0700)."""
        for d in (self.home, self.logs, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.run, 0o700)
