"""Programs that use nothing but syscalls. llmsh's `run NAME` (and `spawn NAME`) finds them by
name before the PATH, as ``python -m userland.programs.MODULE``: `run summarize`, `run batch`,
`run echo-daemon` (a - in the name is a _ in the module's)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The programs' names, as llmsh's run knows them."""
    return sorted(p.stem.replace("_", "-") for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def command(argv: list[str]) -> list[str]:
    """argv with a program's name replaced by the command that runs it; any other argv as it is."""
    if argv and argv[0] in names():
        return [sys.executable, "-m", f"{__name__}.{argv[0].replace('-', '_')}", *argv[1:]]
    return argv
