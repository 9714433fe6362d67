"""Where llmsh keeps its own files: its history and its log (llmsh.log: its own bugs' tracebacks).

The kernel's user (whoever owns LLMOS_HOME) and root keep them beside the system they drive:
LLMOS_HOME/llmsh_history and LLMOS_HOME/logs/llmsh.log. Anyone else, such as a member of
``[kernel] users_group``, may not write there (logs/ is the kernel's user's alone:
docs/security.md), so theirs go to their own state directory, $XDG_STATE_HOME/llmos or
~/.local/state/llmos (0700), one file per LLMOS_HOME they use.

Never: fail. A directory that cannot be made leaves the history in memory and the log unwritten.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from syscalls.paths import Paths


def owns_home(paths: Paths) -> bool:
    """Does this user keep llmsh's files in LLMOS_HOME? Root and its owner do (and whoever is
    about to create it)."""
    if os.geteuid() == 0:
        return True
    try:
        return paths.home.stat().st_uid == os.geteuid()
    except FileNotFoundError:
        return True
    except OSError:
        return False


def state_dir() -> Path:
    """The user's own state directory for llmos (the XDG base directory spec's state home)."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "llmos"


def _own(paths: Paths, name: str) -> Path:
    """name in the user's state directory, told apart by the LLMOS_HOME it is for."""
    tag = hashlib.sha256(str(paths.home.resolve()).encode()).hexdigest()[:8]
    folder = state_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"{name}-{tag}"


def history_file(paths: Paths) -> Path:
    """Where the prompt's history is kept; OSError if that cannot be made."""
    if owns_home(paths):
        paths.home.mkdir(parents=True, exist_ok=True)
        return paths.home / "llmsh_history"
    return _own(paths, "llmsh_history")


def log_file(paths: Paths) -> Path:
    """Where llmsh logs; os.devnull if nowhere can be written."""
    try:
        path = paths.log_file("llmsh") if owns_home(paths) else _own(paths, "llmsh.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        return path
    except OSError:
        return Path(os.devnull)
