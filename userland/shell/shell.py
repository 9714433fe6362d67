"""The Shell: one connection to llmos, the last status, and the execution of parsed command lists.

Every command ends with a status (0 ok, 1 error, 2 usage, 127 unknown, 130 interrupted) and at most
one line on stderr per fault, ``llmsh: CMD: message``. A Python exception that is not an llmos
error is a bug in llmsh: it is logged with its traceback to LLMOS_HOME/logs/llmsh.log and reported
in one line; it never ends the shell.

The connection is opened on first use and dropped when the kernel it spoke to is gone, so the
shell outlives a reboot of llmos. Calls go out as cancellable streams: Ctrl-C during ``wait`` or
``recv`` withdraws the call in the kernel too, so it cannot later swallow a message.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import syscalls
from syscalls import errors
from syscalls.paths import Paths

from .builtin import Failure, ShellExit, Streams, Usage, error_text
from .commands import COMMANDS
from .parse import AndOr, Command, Incomplete, Param, ParseError, Pipeline, Word, parse

CALL_TIMEOUT = 30.0      # seconds for a call that should answer at once (not wait, recv)


class Shell:
    def __init__(self, paths: Paths, streams: Streams | None = None):
        self.paths = paths
        self.io = streams or Streams(sys.stdin, sys.stdout, sys.stderr)
        self.status = 0
        self.last_spawned: int | None = None        # $!
        self._conn: syscalls.Connection | None = None
        self._kernel: int | None = None             # OS pid of the kernel _conn speaks to
        self._log = None
        self._warned_unprivileged = False

    # -- the connection ---------------------------------------------------------------------------
    @property
    def conn(self) -> syscalls.Connection:
        kernel = self.paths.kernel_pid()
        if self._conn is not None and kernel != self._kernel:
            self._drop()            # the kernel we spoke to has stopped (or was rebooted)
        if self._conn is None:
            if kernel is None:
                raise errors.ECONNREFUSED(f"llmos is not running in {self.paths.home} "
                                          f"(start it with `llmos boot`)")
            self._conn = self._connect()
            self._kernel = kernel
        return self._conn

    def _connect(self) -> syscalls.Connection:
        home = self.paths.home
        try:
            return syscalls.connect(home, name="llmsh", privileged=True, timeout=CALL_TIMEOUT)
        except errors.EPERM as e:       # another user's llmos: go on without privilege, but say so
            if not self._warned_unprivileged:
                self._warned_unprivileged = True
                self.io.error("warning", f"running without privilege ({error_text(e)})")
            return syscalls.connect(home, name="llmsh", timeout=CALL_TIMEOUT)

    def _drop(self) -> None:
        conn, self._conn, self._kernel = self._conn, None, None
        if conn is not None:
            conn.abort()            # no exit call: the kernel it would go to is gone

    def call(self, name: str, /, *, blocking: bool = False, reply_within: float = CALL_TIMEOUT,
             **args: Any) -> Any:
        """Make a syscall; one that is ``blocking`` (wait, recv) may take as long as the kernel lets it."""
        conn = self.conn
        saved = conn.timeout
        conn.timeout = None if blocking else reply_within
        stream = conn.stream(name, **args)      # read like a stream, so any reply shape ends it
        try:
            for _ in stream:
                pass
        except (errors.ECONNREFUSED, errors.ESHUTDOWN):
            self._drop()
            raise
        finally:
            stream.close()                      # cancels the call if we did not see its end
            conn.timeout = saved
        return stream.result

    def close(self, status: int) -> None:
        """Leave llmos with exit(status), if it is still there."""
        if self._conn is not None:
            if self.paths.kernel_pid() == self._kernel:
                self._conn.timeout = 5
                self._conn.close(status)
            else:
                self._drop()

    # -- running ----------------------------------------------------------------------------------
    def run(self, script: Iterable[AndOr]) -> int:
        """Run parsed command lists; KeyboardInterrupt and ShellExit go to the caller."""
        for item in script:
            self.run_and_or(item)
        return self.status

    def run_and_or(self, item: AndOr) -> int:
        self.run_pipeline(item.first)
        for op, pipeline in item.rest:
            if (self.status == 0) == (op == "&&"):
                self.run_pipeline(pipeline)
        return self.status

    def run_pipeline(self, pipeline: Pipeline) -> int:
        (command,) = pipeline.commands
        self.status = self.run_command(command, self.io)
        return self.status

    def run_command(self, command: Command, io: Streams) -> int:
        name = self._word_text(command.words[0])       # until it is expanded
        try:
            argv = []
            for word in command.words:
                argv.append(self.expand(word))
                name = argv[0]
            cmd = COMMANDS.get(name)
            if cmd is None:
                io.error(name, "command not found (try help)")
                return 127
            status = cmd.run(self, io, argv[1:])
            return 0 if status is None else status
        except Usage as e:
            io.error(name, f"{e} (usage: {COMMANDS[name].synopsis})")
            return 2
        except Failure as e:
            io.error(name, e.message)
            return e.status
        except errors.LLMOSError as e:
            io.error(name, error_text(e))
            return 1
        except (KeyboardInterrupt, ShellExit, BrokenPipeError):
            raise
        except Exception as e:
            self.log().exception("internal_error", argv=[self._word_text(w) for w in command.words])
            io.error(name, f"internal error: {type(e).__name__}: {e} "
                           f"(traceback in {self.paths.log_file('llmsh')})")
            return 1

    def expand(self, word: Word) -> str:
        return "".join(p if isinstance(p, str) else self._param(p) for p in word.parts)

    def _param(self, p: Param) -> str:
        if p.name == "?":
            return str(self.status)
        if p.name == "!":
            return "" if self.last_spawned is None else str(self.last_spawned)
        return str(self.conn.pid)               # $$

    @staticmethod
    def _word_text(word: Word) -> str:
        return "".join(p if isinstance(p, str) else "$" + p.name for p in word.parts)

    # -- reading input ----------------------------------------------------------------------------
    def run_lines(self, lines: Iterable[str], source: str) -> int:
        """Run commands from lines (a file, stdin, -c); a syntax error stops it with status 2."""
        reader = LineReader()
        for line in lines:
            try:
                script = reader.feed(line)
            except ParseError as e:
                return self.syntax_error(e, source, reader)
            if script is not None:
                self.run(script)
        if reader.pending:
            try:
                parse(reader.pending)
            except ParseError as e:
                return self.syntax_error(e, source, reader)
        return self.status

    def syntax_error(self, e: ParseError, source: str | None, reader: "LineReader") -> int:
        where = f"{source}:{reader.line_of(e.pos)}: " if source else ""
        self.io.stdout.flush()
        print(f"llmsh: {where}syntax error: {e.message}", file=self.io.stderr, flush=True)
        self.status = 2
        return 2

    def log(self):
        """The structlog logger of llmsh, set up on first use (logs/llmsh.log)."""
        if self._log is None:
            from kernel import logs
            self._log = logs.setup("llmsh", self.paths.log_file("llmsh"))
        return self._log


class LineReader:
    """Gathers input lines into complete command lists: a quote, && or \\ may continue a line."""

    def __init__(self):
        self.pending = ""
        self.start = 1          # line number of the first pending line
        self.lines = 0

    def feed(self, line: str):
        """The command lists completed by this line, or None if more lines are needed."""
        self.lines += 1
        if not self.pending:
            self.start = self.lines
        text = self.pending + line.rstrip("\n") + "\n"
        try:
            script = parse(text)
        except Incomplete:
            self.pending = text
            return None
        except ParseError:
            self.pending = text         # kept for line_of; the caller stops or calls reset()
            raise
        self.pending = ""
        return script

    def reset(self) -> None:
        self.pending = ""

    def line_of(self, pos: int) -> int:
        return self.start + self.pending[:pos].count("\n")

