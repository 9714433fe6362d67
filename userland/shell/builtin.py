"""What a builtin command is: its entry in COMMANDS, how it fails, where it writes; and the small
helpers every command uses to read its arguments and show its results.

A command is ``cmd_NAME(sh, io, args) -> status or None (0)``, marked with ``@command(SYNOPSIS)``;
its docstring is what ``help NAME`` prints. Marking registers nothing: ``commands`` builds the table
from an explicit list of modules (``command_table``). It reports a fault by raising ``Usage`` (status 2, the
synopsis is shown), ``Failure`` or an llmos error (status 1); the shell turns each into one line
on stderr. A command that works on several targets reports each failure with ``io.error`` and
goes on.
"""

from __future__ import annotations

import base64
import getopt
import inspect
import json
import math
import shutil
import signal
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Protocol, TextIO

import syscalls
from syscalls import errors
from syscalls.paths import Paths
from syscalls.table import BY_NAME, SIGNALS

from .parse import Command


class Usage(Exception):
    """The command was called wrongly (status 2); the message is followed by the synopsis."""


class Failure(Exception):
    """The command failed for a reason it explains (status 1, or 2 for a malformed argument)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.message, self.status = message, status


class ShellExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@dataclass
class Streams:
    """Where a command reads and writes: the shell's own, or those a pipe or redirection built."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def error(self, cmd: str, message: str) -> None:
        self.stdout.flush()             # keep the order when both go to one file
        print(f"llmsh: {cmd}: {message}", file=self.stderr, flush=True)


def error_text(e: errors.LLMOSError) -> str:
    """The kernel's message without its leading 'syscall: ', which llmsh replaces by the command."""
    head, sep, rest = e.message.partition(": ")
    return rest if sep and head in BY_NAME else e.message


# -- the table of commands ------------------------------------------------------------------------
class Shell(Protocol):
    """The shell as a command sees it (``shell.Shell`` is the one there is); a protocol, so that
    no command imports the module that runs it."""

    paths: Paths
    status: int
    priority: int | None
    limits: dict[str, int | None]
    last_spawned: int | str | None
    jobs: Any                   # the jobs.JobTable shared with the shell's forks
    job: Any                    # the jobs.Job this shell runs commands for, or None
    commands: dict[str, "Builtin"]

    @property
    def conn(self) -> syscalls.Connection: ...

    def call(self, name: str, /, *, blocking: bool = False, reply_within: float = ...,
             **args: Any) -> Any: ...

    def fork(self, job: Any, io: Streams) -> "Shell": ...

    def run_command(self, command: Command, io: Streams) -> int: ...

    def disconnect(self) -> None: ...

    def close(self, status: int) -> None: ...


@dataclass(frozen=True)
class Builtin:
    name: str
    args: str                   # the synopsis after the name
    run: Callable[[Shell, Streams, list[str]], "int | None"]

    @property
    def synopsis(self) -> str:
        return f"{self.name} {self.args}".rstrip()

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.run.__doc__ or "")

    @property
    def summary(self) -> str:
        return self.doc.split("\n", 1)[0]


def command(args: str = ""):
    """Mark cmd_NAME as the builtin NAME with the synopsis args (``fn.builtin``)."""
    def mark(fn):
        fn.builtin = Builtin(fn.__name__.removeprefix("cmd_"), args, fn)
        return fn
    return mark


def command_table(*sections: ModuleType) -> dict[str, Builtin]:
    """The builtins of each module, its ``cmd_`` functions in the order written (help lists them so)."""
    out: dict[str, Builtin] = {}
    for module in sections:
        for name, fn in vars(module).items():
            if name.startswith("cmd_"):
                out[fn.builtin.name] = fn.builtin
    return out


def for_each(io: "Streams", cmd: str, items, fn) -> int:
    """Apply fn to each item; an llmos error on one is reported in one line and the rest go on.
    Status 1 if any failed, as rm or kill with several operands do."""
    status = 0
    for item in items:
        try:
            fn(item)
        except errors.LLMOSError as e:
            io.error(cmd, error_text(e))
            status = 1
    return status


# -- reading arguments ----------------------------------------------------------------------------
def options(args: list[str], short: str = "", long: tuple[str, ...] = (), anywhere: bool = False,
            repeated: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """Options first, then operands (POSIX getopt: the first operand or -- ends the options);
    with anywhere, options may also follow operands (GNU getopt: only -- ends them). An option
    named in repeated maps to the list of its values; any other, to its last."""
    parse = getopt.gnu_getopt if anywhere else getopt.getopt
    try:
        pairs, rest = parse(args, short, list(long))
    except getopt.GetoptError as e:
        raise Usage(e.msg) from None
    opts: dict[str, Any] = {}
    for name, value in pairs:
        if name in repeated:
            opts.setdefault(name, []).append(value)
        else:
            opts[name] = value
    return opts, rest


def operands(rest: list[str], *names: str) -> list[str]:
    if len(rest) < len(names):
        raise Usage(f"missing {names[len(rest)]}")
    if len(rest) > len(names):
        raise Usage(f"unexpected argument {rest[len(names)]!r} (quote a value that has spaces)")
    return rest


def pid_arg(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise Failure(f"{text!r} is not a PID", 2) from None
    if pid < 1:
        raise Failure(f"{text!r} is not a PID (PIDs start at 1)", 2)
    return pid


def int_arg(text: str, what: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        n = int(text)
    except ValueError:
        raise Failure(f"{what} must be an integer, not {text!r}", 2) from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise Failure(f"{what} must be {_range(lo, hi)}, not {n}", 2)
    return n


def _range(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f">= {lo}"
    return f"<= {hi}" if lo is None else f"between {lo} and {hi}"


def seconds_arg(text: str, what: str = "--timeout") -> float:
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not math.isfinite(s) or s < 0:
        raise Failure(f"{what} must be a number of seconds >= 0, not {text!r}", 2)
    return s


def signal_name(text: str) -> str:
    """TERM from TERM, term, SIGTERM or 15."""
    name: str | None = text.upper().removeprefix("SIG")
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name.removeprefix("SIG")
        except ValueError:
            name = None
    if name not in SIGNALS:
        known = ", ".join(f"{s} ({signal.Signals['SIG' + s].value})" for s in SIGNALS)
        raise Failure(f"unknown signal {text!r} (signals: {known})", 2)
    return name


# -- showing results ------------------------------------------------------------------------------
def table(out: TextIO, header: list[str], rows: list[list[str]], right: set[str] = frozenset()) -> None:
    """Columns as wide as their widest cell; those named in right align right; the last is ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    cut = shutil.get_terminal_size().columns if out.isatty() else None    # no wrapped lines
    for row in [header, *rows]:
        cells = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, header)]
        cells[-1] = row[-1]
        print(" ".join(cells).rstrip()[:cut], file=out)


def show(value: Any) -> str:
    """A stored or sent value as text: a string as it is, anything else as JSON."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            pass
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return "base64:" + base64.b64encode(o).decode()
    return repr(o)


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 86400}d{s // 3600 % 24:02d}h"


def size(n: float) -> str:
    if n < 1024:
        return str(int(n))
    for unit in "KMGT":
        n /= 1024
        if n < 1024 or unit == "T":
            return f"{n:.1f}{unit}"
    raise AssertionError("unreachable")
