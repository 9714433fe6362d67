"""Programs that use nothing but syscalls. llmsh's `run NAME` (and `spawn NAME`) finds them by
name before the PATH, as ``python -m userland.programs.MODULE``: `run chat`, `run summarize`,
`run batch`, `run echo-daemon` (a - in the name is a _ in the module's)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import syscalls
from syscalls import errors

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The programs' names, as llmsh's run knows them."""
    return sorted(p.stem.replace("_", "-") for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def command(argv: list[str]) -> list[str]:
    """argv with a program's name replaced by the command that runs it; any other argv as it is."""
    if argv and argv[0] in names():
        return [sys.executable, "-m", f"{__name__}.{argv[0].replace('-', '_')}", *argv[1:]]
    return argv


def connected(name: str, body: Callable[[syscalls.Connection], int | None]) -> int:
    """A program's main: body(connection named name) gives the exit status; an llmos error is one
    line on standard error (status 1), Ctrl-C is 130."""
    try:
        with syscalls.connect(name=name) as conn:
            return body(conn) or 0
    except errors.LLMOSError as e:
        print(f"{name}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
