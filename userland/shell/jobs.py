"""What llmsh runs besides a single builtin: local programs (``run``), pipelines, background jobs.

A program started by ``run`` is an OS child of llmsh with LLMOS_HOME set, so it can connect and
become an llmos process; the kernel's spawn would give it no stdio. A pipeline runs each command
in a thread of its own, joined by OS pipes, each thread with its own connection (one connection
is not for several threads). A job is such a set of threads and the programs they started;
interrupting it sends SIGINT to its programs and KeyboardInterrupt into its threads, whose
blocking calls are then withdrawn in the kernel like a foreground Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import io as _io
import os
import signal
import subprocess
import threading
from typing import Callable, TextIO

from syscalls.runtime.child import with_llmos_path

from .builtin import Failure, Shell, Streams

JOIN_SLICE = 0.1


class Job:
    """Threads running one command list, and the programs they started."""

    def __init__(self, number: int, text: str, background: bool):
        self.number, self.text, self.background = number, text, background
        self.threads: list[threading.Thread] = []
        self.ended: list[threading.Event] = []     # not Thread.join: a signal during it can mark
                                                    # a live thread stopped (CPython 3.11)
        self.procs: list[subprocess.Popen] = []
        self.status: int | None = None
        self.stopped = False
        self.interrupts = 0
        self.lock = threading.RLock()     # Ctrl-C's handler may take it again, nested
        self.pending: list[int] = []        # signals sent while it had no program running
        self.commands: dict[int, list[str]] = {}    # thread -> the builtins it runs (nice gen: 2)
        self.ended_by: int | None = None    # the signal kill %N ended its builtins with

    @property
    def done(self) -> bool:
        return all(e.is_set() for e in self.ended)

    @property
    def state(self) -> str:
        if self.done:
            return "Done" if self.status == 0 else f"Exit {self.status}"
        return "Stopped" if self.stopped else "Running"

    def start(self, body: Callable[[], None]) -> threading.Event:
        ended = threading.Event()

        def run():
            try:
                body()
            finally:
                ended.set()
        t = threading.Thread(target=run, daemon=True, name=f"llmsh-job-{self.number}")
        self.threads.append(t)
        self.ended.append(ended)
        t.start()
        return ended

    def adopt(self, proc: subprocess.Popen) -> None:
        """A program this job started; it gets the signals sent before it existed."""
        with self.lock:
            self.procs.append(proc)
            pending, self.pending = self.pending, []
        for sig in pending:
            self.signal(sig)

    def signal(self, sig: int) -> None:
        """Send sig to the job's programs; kept for its next program if none is running now (kill
        %1 may come before the job's thread has started anything)."""
        with self.lock:
            live = [p for p in self.procs if p.poll() is None]
            if not live and not self.done:
                self.pending.append(sig)
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGCONT):
            self.stopped = sig != signal.SIGCONT and not self.done
        for p in live:
            try:
                group = os.getpgid(p.pid)
                if group != os.getpgrp():
                    os.killpg(group, sig)           # a background program and what it started
                else:
                    p.send_signal(sig)
            except ProcessLookupError:
                pass

    @contextlib.contextmanager
    def running(self, name: str):
        """Note that this thread runs the builtin name (kill %N may have to interrupt it); none
        starts once kill %N has ended the job."""
        with self.lock:
            if self.ended_by is not None:
                raise KeyboardInterrupt
            names = self.commands.setdefault(threading.get_ident(), [])
            names.append(name)
        try:
            yield
        finally:
            with self.lock:
                names.pop()

    def kill(self, sig: int) -> None:
        """kill %N: sig to the job's programs; and a job busy in a builtin such as gen, which no OS
        signal reaches, is interrupted as by Ctrl-C when sig asks it to end (its status: 128 + sig)."""
        self.signal(sig)
        if sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL):
            return
        with self.lock:         # a thread in `run` is left to its program, which got sig
            if self.done:
                return
            self.ended_by = sig
            busy = [ident for ident, names in self.commands.items() if names and names[-1] != "run"]
        for ident in busy:
            _raise_interrupt(ident)

    def interrupted(self) -> int:
        """The status of a thread of this job that was interrupted."""
        return 130 if self.ended_by is None else 128 + self.ended_by

    def interrupt(self) -> None:
        """Ctrl-C for this job: SIGINT to its programs, KeyboardInterrupt into its threads; later
        ones kill its programs."""
        self.interrupts += 1
        self.signal(signal.SIGINT if self.interrupts == 1 else signal.SIGKILL)
        for t in self.threads:
            if t.is_alive() and t.ident is not None:
                _raise_interrupt(t.ident)

    def resume(self) -> None:
        self.stopped = False
        self.signal(signal.SIGCONT)

    def wait(self, announce: Callable[[], None] | None = None) -> int:
        """Wait in the foreground: Ctrl-C interrupts the job, not the shell; Ctrl-Z stops a
        numbered job's programs and gives the prompt back (status 148, the job stays)."""
        if self.stopped:
            self.resume()
        previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C interrupts the job wherever the main thread is, even between two statements
            # (a KeyboardInterrupt raised there would end the wait and leave the job running)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: self.interrupt())
            if self.number:
                previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, _suspend)
        try:
            if announce is not None:        # only now: a Ctrl-Z right after it finds the handler
                announce()
            while not self.done:
                try:
                    for e in self.ended:
                        e.wait(JOIN_SLICE)
                except KeyboardInterrupt:   # off the main thread: raised into it by its job
                    self.interrupt()
        except _Suspended:
            self.signal(signal.SIGSTOP)
            return 128 + signal.SIGTSTP
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 130 if self.status is None else self.status


class _Suspended(Exception):
    pass


def _raise_interrupt(thread: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(KeyboardInterrupt))


def _suspend(signum, frame):
    raise _Suspended


class JobTable:
    """The shell's background jobs, numbered from 1; %N names one, the newest is the current."""

    def __init__(self):
        self.jobs: dict[int, Job] = {}

    def add(self, text: str) -> Job:
        job = Job(max(self.jobs, default=0) + 1, text, background=True)
        self.jobs[job.number] = job
        return job

    def current(self) -> Job | None:
        return self.jobs[max(self.jobs)] if self.jobs else None

    def find(self, spec: str | None) -> Job:
        if spec is None:
            job = self.current()
            if job is None:
                raise Failure("no current job")
            return job
        text = spec.removeprefix("%")
        if not text.isdigit() or int(text) not in self.jobs:
            raise Failure(f"{spec}: no such job", 1 if text.isdigit() else 2)
        return self.jobs[int(text)]

    def line(self, job: Job) -> str:
        mark = "+" if job is self.current() else " "
        return f"[{job.number}]{mark} {job.state:<9} {job.text}"

    def reap(self) -> list[str]:
        """Lines for the jobs that have ended since last asked, which are then forgotten."""
        lines = [self.line(j) for j in self.jobs.values() if j.done]
        for number in [n for n, j in self.jobs.items() if j.done]:
            del self.jobs[number]
        return lines


# -- running a local program ------------------------------------------------------------------------
def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, _io.UnsupportedOperation):
        return None


def run_program(sh: Shell, io: Streams, argv: list[str]) -> int:
    """Run argv as an OS child with io as its stdio; its exit status (128 + N if killed by N)."""
    for s in (io.stdout, io.stderr):
        s.flush()
    fds = [_fd(io.stdin), _fd(io.stdout), _fd(io.stderr)]
    env = with_llmos_path(dict(os.environ, LLMOS_HOME=str(sh.paths.home)))     # so it can import syscalls
    # the shell's priority and limits (nice, renice $$, ulimit): the program's hello takes them on
    if sh.priority is not None:
        env["LLMOS_PRIORITY"] = str(sh.priority)
    limits = ",".join(f"{r}={n}" for r, n in sh.limits.items() if n is not None)
    if limits:
        env["LLMOS_LIMITS"] = limits
    job = sh.job
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if fds[0] is None else fds[0],
                                stdout=subprocess.PIPE if fds[1] is None else fds[1],
                                stderr=subprocess.PIPE if fds[2] is None else fds[2],
                                env=env, text=True, errors="replace",
                                process_group=0 if job is not None and job.background else None)
    except FileNotFoundError:
        raise Failure(f"{argv[0]}: command not found", 127) from None
    except PermissionError:
        raise Failure(f"{argv[0]}: permission denied", 126) from None
    except OSError as e:
        raise Failure(f"{argv[0]}: {e.strerror}", 126) from None
    if job is not None:
        job.adopt(proc)
    pumps = []
    if fds[0] is None:
        pumps.append(_pump(io.stdin, proc.stdin, close=True))
    if fds[1] is None:
        pumps.append(_pump(proc.stdout, io.stdout))
    if fds[2] is None:
        pumps.append(_pump(proc.stderr, io.stderr))
    try:
        proc.wait()
    except KeyboardInterrupt:       # the terminal sent it SIGINT too, unless it is in a job
        if job is not None:
            job.signal(signal.SIGINT)
        proc.wait()
        raise
    finally:
        for t in pumps:
            t.join()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _pump(src: TextIO, dst: TextIO, close: bool = False) -> threading.Thread:
    def copy():
        try:
            while chunk := src.read(65536) if close else src.readline():
                dst.write(chunk)
                dst.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass
        finally:
            if close:
                try:
                    dst.close()
                except OSError:
                    pass
    t = threading.Thread(target=copy, daemon=True)
    t.start()
    return t
