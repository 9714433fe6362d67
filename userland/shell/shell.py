"""The Shell: one connection to llmos, the last status, and the execution of parsed command lists.

Every command ends with a status (0 ok, 1 error, 2 usage, 127 unknown, 130 interrupted) and at most
one line on stderr per fault, ``llmsh: CMD: message``. A Python exception that is not an llmos
error is a bug in llmsh: it is logged with its traceback to llmsh.log (LLMOS_HOME/logs/ for the
kernel's user, the user's own state directory for anyone else: userland/shell/state.py) and
reported in one line; it never ends the shell.

A pipeline, or a command list ended by &, runs in threads (``jobs``); each thread gets a shell
of its own from ``fork``, with its own connection. ``> KEY`` and ``>> KEY`` send a command's
output to storage, ``< FILE`` gives it a local file as stdin.

The connection is opened on first use and dropped when the kernel it spoke to is gone, so the
shell outlives a reboot of llmos. Calls go out as cancellable streams: Ctrl-C during ``wait`` or
``recv`` withdraws the call in the kernel too, so it cannot later swallow a message.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import sys
from typing import Any, Iterable

import syscalls
from syscalls import errors
from syscalls.paths import Paths

from . import state
from .builtin import Failure, ShellExit, Streams, Usage, error_text
from .commands import COMMANDS
from .jobs import Job, JobTable
from .parse import AndOr, Command, Incomplete, Param, ParseError, Pipeline, Word, parse

CALL_TIMEOUT = 30.0      # seconds for a call that should answer at once (not wait, recv)


class Shell:
    commands = COMMANDS         # what it runs; help lists them

    def __init__(self, paths: Paths, streams: Streams | None = None):
        self.paths = paths
        self.io = streams or Streams(sys.stdin, sys.stdout, sys.stderr)
        self.status = 0
        self.last_spawned: int | str | None = None  # $!: a spawned PID, or %N of the last & job
        self.priority: int | None = None            # set by nice or renice $$, and the limits
        self.limits: dict[str, int | None] = {}     # set by ulimit: forks and programs get them
        self._conn: syscalls.Connection | None = None
        self._kernel: int | None = None             # OS pid of the kernel _conn speaks to
        self._log = None
        self._warned_unprivileged = False
        self.privileged: bool | None = None         # None: ask for privilege when connecting
        self.jobs = JobTable()
        self.job: Job | None = None                 # the job this shell runs commands for

    def fork(self, job: Job, io: Streams) -> "Shell":
        """A shell for one thread of a job: its own connection (opened on first use), same jobs."""
        child = Shell(self.paths, io)
        child.status, child.last_spawned = self.status, self.last_spawned
        child.priority, child.limits = self.priority, dict(self.limits)
        child.jobs, child.job, child._log = self.jobs, job, self._log
        child._warned_unprivileged, child.privileged = True, self.privileged
        return child

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
        ask = self.privileged
        if ask is None:                 # a spawned llmsh has its spawner's privilege, or none
            ask = "LLMOS_SPAWN_TOKEN" not in os.environ
        try:
            conn = syscalls.connect(home, name="llmsh", privileged=ask, timeout=CALL_TIMEOUT)
        except errors.EPERM as e:       # another user's llmos: go on without privilege, but say so
            if not self._warned_unprivileged:
                self._warned_unprivileged = True
                self.io.error("warning", f"running without privilege ({error_text(e)})")
            conn = syscalls.connect(home, name="llmsh", timeout=CALL_TIMEOUT)
        self.privileged = conn.info["privileged"]   # forks ask for no more than this
        try:        # a fresh process starts at priority 0, unlimited: give it what was set here
            if self.priority is not None:
                conn.call("setpriority", pid=conn.pid, priority=self.priority)
            for resource, limit in self.limits.items():
                conn.call("setrlimit", resource=resource, limit=limit)
        except BaseException:
            conn.close(1)
            raise
        return conn

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

    def disconnect(self) -> None:
        """Forget the connection without an exit call (llmos is going away)."""
        self._drop()

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
        if item.background:
            return self.start_job(item)
        self.run_pipeline(item.first)
        for op, pipeline in item.rest:
            if (self.status == 0) == (op == "&&"):
                self.run_pipeline(pipeline)
        return self.status

    def start_job(self, item: AndOr) -> int:
        """Run a command list in the background (stdin /dev/null) and print its job number."""
        job = self.jobs.add(item.text)
        stdin = open(os.devnull, encoding="utf-8")
        child = self.fork(job, Streams(stdin, self.io.stdout, self.io.stderr))

        def body():
            try:
                job.status = child.run_and_or(AndOr(item.first, item.rest))
            except KeyboardInterrupt:
                job.status = job.interrupted()
            except ShellExit as e:
                job.status = e.status
            except BaseException:
                job.status = 1
            finally:
                stdin.close()
                _quietly(child.close, job.status or 0)

        job.start(body)
        self.last_spawned = f"%{job.number}"       # so that kill $! and wait $! reach it
        print(f"[{job.number}]", file=self.io.stderr, flush=True)
        self.status = 0
        return 0

    def run_pipeline(self, pipeline: Pipeline) -> int:
        if len(pipeline.commands) == 1:
            self.status = self.run_command(pipeline.commands[0], self.io)
            return self.status
        job = self.job or Job(0, "", background=False)
        statuses: list[int] = [1] * len(pipeline.commands)
        stdin = self.io.stdin
        stages = []
        for i, command in enumerate(pipeline.commands):
            last = i == len(pipeline.commands) - 1
            if last:
                stdout, next_stdin = self.io.stdout, None
            else:
                r, w = os.pipe()
                stdout = open(w, "w", encoding="utf-8", errors="replace")
                next_stdin = open(r, encoding="utf-8", errors="replace")
            stages.append(job.start(self._stage(job, command, Streams(stdin, stdout, self.io.stderr),
                                                statuses, i, close_in=i > 0, close_out=not last)))
            stdin = next_stdin
        if job is self.job:         # a pipeline inside a job: that job's wait is the one to use
            for ended in stages:
                ended.wait()
        else:
            job.wait()
            if job.interrupts:
                raise KeyboardInterrupt
        self.status = statuses[-1]
        return self.status

    def _stage(self, job: Job, command: Command, io: Streams, statuses: list[int], i: int,
               close_in: bool, close_out: bool):
        child = self.fork(job, io)

        def body():
            try:
                statuses[i] = child.run_command(command, io)
            except KeyboardInterrupt:
                statuses[i] = job.interrupted()
            except BrokenPipeError:
                statuses[i] = 141
            except ShellExit as e:
                statuses[i] = e.status
            finally:
                for stream, close in ((io.stdout, close_out), (io.stdin, close_in)):
                    if close:
                        _quietly(stream.close)
                _quietly(child.close, 0)
        return body

    def run_command(self, command: Command, io: Streams) -> int:
        name = self._word_text(command.words[0])       # until it is expanded
        opened: list = []
        try:
            argv = []
            for word in command.words:
                argv.append(self.expand(word))
                name = argv[0]
            cmd = self.commands.get(name)
            if cmd is None:
                io.error(name, "command not found (try help)")
                return 127
            io, to_key = self._redirect(command, io, opened)
            with self.job.running(name) if self.job is not None else contextlib.nullcontext():
                status = cmd.run(self, io, argv[1:])
            status = 0 if status is None else status
            if to_key is not None:
                self._store_output(*to_key, io.stdout.getvalue())
            return status
        except Usage as e:
            io.error(name, f"{e} (usage: {self.commands[name].synopsis})")
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
                           f"(traceback in {state.log_file(self.paths)})")
            return 1
        finally:
            for f in opened:
                f.close()

    def _redirect(self, command: Command, io: Streams, opened: list):
        """The streams after command's redirections, and (op, key) where > or >> sends stdout."""
        to_key = None
        for r in command.redirects:
            target = self.expand(r.target)
            if r.op == "<":
                try:
                    f = open(target, encoding="utf-8", errors="replace")
                except OSError as e:
                    raise Failure(f"{target}: {e.strerror}") from None
                opened.append(f)
                io = Streams(f, io.stdout, io.stderr)
            else:
                to_key = (r.op, target)
                io = Streams(io.stdin, _io.StringIO(), io.stderr)
        return io, to_key

    def _store_output(self, op: str, key: str, text: str) -> None:
        """> KEY stores the output as a string, without its final newline; >> adds a line to it."""
        text = text.removesuffix("\n")
        if op == ">>":
            try:
                old = self.call("get", key=key)["value"]
            except errors.ENOENT:
                old = ""
            if not isinstance(old, str):
                raise Failure(f"{key}: holds a {type(old).__name__}, not a string; >> appends only to strings")
            text = old + "\n" + text if old else text
        self.call("put", key=key, value=text)

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
            if not reader.pending and line.lstrip().startswith("?"):    # ? TEXT: only shown
                from .ask import ask
                self.status = ask(self, line.lstrip()[1:], interactive=False, confirm=None)
                continue
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
        """The structlog logger of llmsh, set up on first use (llmsh.log, state.log_file)."""
        if self._log is None:
            from syscalls.runtime import logs
            self._log = logs.setup("llmsh", state.log_file(self.paths))
        return self._log


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (Exception, KeyboardInterrupt):
        pass


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

