"""The interactive llmsh: a prompt with history and Tab completion.

The history is $LLMOS_HOME/llmsh_history for the kernel's user, and in a group member's own state
directory for anyone else (userland/shell/state.py); in memory only if neither can be written.

Ctrl-C only ever cancels: the line being typed, or the command running (its call is withdrawn in
the kernel), or the job brought back by fg. Ctrl-D at an empty prompt leaves. Background jobs
that ended are reported before the next prompt. A line left open (a quote, a trailing && or \\)
continues at a "> " prompt.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.styles import Style

from syscalls.paths import Paths
from syscalls.table import RESOURCES, SIGNALS
from userland import programs

from . import state
from .commands import COMMANDS
from .parse import ParseError
from .shell import LineReader, Shell

STYLE = Style.from_dict({"status": "ansired bold", "prompt": "ansigreen bold"})
COMPLETION_TIMEOUT = 2.0        # a Tab must never hang the prompt for long
VALUED = {"--name", "--restart", "--priority"}      # run's and spawn's options that take a value


def repl(sh: Shell) -> int:
    colour = "NO_COLOR" not in os.environ           # https://no-color.org
    session = PromptSession(history=_history(sh.paths), completer=Completions(sh),
                            complete_while_typing=False, style=STYLE if colour else None)
    reader = LineReader()
    if sh.paths.kernel_pid() is None:        # say so now rather than at the first command
        print(f"llmsh: llmos is not running in {sh.paths.home} (start it with `llmos boot`)",
              file=sys.stderr)
    while True:
        for done in sh.jobs.reap():         # jobs that ended while the last command ran
            print(done, file=sys.stderr, flush=True)
        try:
            line = session.prompt("> " if reader.pending else _prompt(sh.status, colour))
        except KeyboardInterrupt:           # drop what was typed, prompt again
            reader.reset()
            continue
        except EOFError:
            return sh.status
        if not reader.pending and line.lstrip().startswith("?"):    # ? TEXT: a proposal, run on y
            from .ask import ask
            try:
                sh.status = ask(sh, line.lstrip()[1:], True, lambda question: session.prompt(
                    question).strip().lower() in ("y", "yes"))
            except (KeyboardInterrupt, EOFError):
                sh.status = 130
                print(file=sys.stderr)
            continue
        try:
            script = reader.feed(line)
        except ParseError as e:
            sh.syntax_error(e, None, reader)
            reader.reset()
            continue
        if script is None:
            continue
        try:
            sh.run(script)
        except KeyboardInterrupt:
            sh.status = 130
            print(file=sys.stderr)          # the terminal echoed ^C without ending the line


def _prompt(status: int, colour: bool) -> str | list[tuple[str, str]]:
    head = f"[{status}] " if status else ""
    if not colour:
        return head + "llmsh$ "
    return [("class:status", head), ("class:prompt", "llmsh$ ")]


def _history(paths: Paths) -> History:
    try:
        path = state.history_file(paths)
        with open(path, "a"):           # FileHistory would fail only at the first line typed
            pass
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


class Completions(Completer):
    """Command names first; then, where a command takes them, PIDs, keys, signals, services,
    models, resources and llmos programs."""

    def __init__(self, sh: Shell):
        self.sh = sh

    def get_completions(self, document, complete_event) -> Iterable[Completion]:
        # Rough on purpose: the words of the last command on the line, quotes ignored.
        segment = re.split(r"[;|&]", document.text_before_cursor)[-1]
        words = segment.split()
        current = words[-1] if words and not segment[-1].isspace() else ""
        before = words[:-1] if current else words
        try:
            candidates = list(self._candidates(before, current))
        except Exception:           # llmos not running, a slow call: no completions, no noise
            return
        for text, meta in sorted(set(candidates)):
            if text.startswith(current):
                yield Completion(text, -len(current), display_meta=meta)

    def _candidates(self, before: list[str], current: str) -> Iterable[tuple[str, str]]:
        if not before or before[0] == "help":
            return ((c.name, c.summary) for c in COMMANDS.values())
        cmd, position = before[0], len(before)
        if cmd == "nice":               # what follows nice [-n N] is a command of its own
            rest = before[3:] if before[1:2] == ["-n"] else before[1:]
            return self._candidates(rest, current)
        if cmd == "kill" and current.startswith("-"):
            return (("-" + s, "signal") for s in SIGNALS)
        if cmd in ("fg", "bg") or (cmd == "wait" and current.startswith("%")):
            return ((f"%{j.number}", j.text) for j in self.sh.jobs.jobs.values())
        if before[-1] == "--model" or (cmd == "model" and before[1:2] == ["rm"]):
            return ((m["name"], m["architecture"] or "model") for m in self._call("models"))
        if cmd in ("run", "spawn"):     # a program's name first, after the options and their values
            if not [w for i, w in enumerate(before[1:]) if w[:1] != "-" and before[i] not in VALUED]:
                return ((name, "llmos program") for name in programs.names())
        if cmd == "ulimit" and before[-1] != "-p":
            named = any(w in RESOURCES for w in before)
            return () if named else ((r, "resource") for r in RESOURCES)
        if cmd in ("kill", "wait", "ps", "renice", "ulimit") or (cmd == "send" and position == 1):
            return ((str(p["pid"]), p["name"]) for p in self._call("ps"))
        if cmd in ("get", "rm", "cat") or (cmd == "put" and position == 1):
            return ((i["key"], "key") for i in self._call("list", prefix=current, limit=200))
        if cmd == "services":
            if position == 1:
                return [("restart", "restart a service")]
            if before[1] == "restart":
                return ((s["name"], s["state"]) for s in self._call("services"))
        return ()

    def _call(self, name: str, **args):
        return self.sh.call(name, reply_within=COMPLETION_TIMEOUT, **args)
