"""The builtin commands of llmsh, one ``cmd_NAME`` function each; ``help NAME`` shows its docstring.

Each reaches llmos only through ``sh.call`` and writes to ``io.stdout`` (see ``builtin`` for the
rules a command follows).
"""

from __future__ import annotations

import collections
import getopt
import json
import os
import shlex
import signal
import time
from typing import TYPE_CHECKING, Any

from syscalls import errors
from syscalls.table import SIGNALS
from userland import programs

from .builtin import (COMMANDS, Failure, ShellExit, Streams, Usage, command, duration,
                      error_text, for_each, int_arg, operands, options, pid_arg, seconds_arg, show,
                      signal_name, size, table)
from .jobs import run_program

if TYPE_CHECKING:
    from .shell import Shell

LS_LIMIT = 1000


def tree(procs: list[dict]) -> list[tuple[dict, int]]:
    """Processes in depth-first order under their parents, each with its depth."""
    pids = {p["pid"] for p in procs}
    children: dict[int, list[dict]] = {}
    for p in procs:
        children.setdefault(p["ppid"], []).append(p)
    roots = [p for p in procs if p["ppid"] not in pids or p["ppid"] == p["pid"]]
    stack, out, seen = [(p, 0) for p in reversed(roots)], [], set()
    while stack:
        p, depth = stack.pop()
        if p["pid"] in seen:
            continue
        seen.add(p["pid"])
        out.append((p, depth))
        kids = sorted(children.get(p["pid"], []), key=lambda c: c["pid"])
        stack.extend((c, depth + 1) for c in reversed(kids))
    return out + [(p, 0) for p in procs if p["pid"] not in seen]


# == processes ====================================================================================
@command("[-t] [PID...]")
def cmd_ps(sh: Shell, io: Streams, args: list[str]) -> int:
    """List the processes (or those named); -t draws them as a tree under their parents.

    Columns: PID, parent PID, OS user, state (RUNNING, or with model work waiting READY or
    SUSPENDED; BLOCKED in wait or recv; STOPPED; ZOMBIE), priority (a nice value), name, age, KV
    cache blocks held, tokens in (prompts) and out (generated), generated tokens per second,
    syscalls made, bytes stored, and the command line.
    """
    opts, rest = options(args, "t")
    pids = [pid_arg(a) for a in rest]
    status = 0
    if pids:
        procs = []
        for pid in pids:
            try:
                procs += sh.call("ps", pid=pid)
            except errors.ESRCH as e:
                io.error("ps", error_text(e))
                status = 1
    else:
        procs = sh.call("ps")
    rows = []
    now = time.time()
    for p, depth in tree(procs) if "-t" in opts else [(p, 0) for p in procs]:
        name = ("   " * (depth - 1) + " \\_ " if depth else "") + (p["name"] or "-")
        rows.append([str(p["pid"]), str(p["ppid"]), "-" if p["uid"] is None else str(p["uid"]),
                     p["state"], str(p["priority"]), name, duration(now - p["started"]),
                     str(p.get("kv_blocks", 0)), str(p["tokens_in"]), str(p["tokens_out"]),
                     f"{p.get('tok_s', 0.0):.1f}", str(p["syscalls"]), size(p["bytes_stored"]),
                     shlex.join(p["argv"] or [])])
    if rows:
        numeric = ["PID", "PPID", "UID", "PRI", "AGE", "KV", "TOK-IN", "TOK-OUT", "TOK/S", "CALLS", "STORED"]
        table(io.stdout, numeric[:3] + ["STATE", "PRI", "NAME", "AGE", "KV", "TOK-IN", "TOK-OUT", "TOK/S",
                                        "CALLS", "STORED", "ARGV"], rows, right=set(numeric))
    return status


@command("[-SIGNAL | -s SIGNAL] (PID | %JOB)...  |  kill -l")
def cmd_kill(sh: Shell, io: Streams, args: list[str]) -> int:
    """Send a signal (TERM unless named) to processes; kill -l lists the signals.

    TERM, INT and HUP ask a program to end, KILL ends it, STOP and CONT suspend and resume it.
    A signal is named with or without SIG, in any case, or by number: kill -9 PID.
    %N signals the programs that background job N started with run; TERM, INT, HUP or KILL
    also stop a builtin it runs (gen, recv, wait), as Ctrl-C would.
    """
    sig = "TERM"
    if args[:1] == ["-l"]:
        if len(args) > 1:
            raise Usage("-l takes no arguments")
        for name in SIGNALS:
            print(f"{signal.Signals['SIG' + name].value:>2} {name}", file=io.stdout)
        return 0
    if args[:1] == ["-s"]:
        if len(args) < 2:
            raise Usage("-s needs a signal")
        sig, args = signal_name(args[1]), args[2:]
    elif args and args[0].startswith("-") and args[0] not in ("-", "--"):
        sig, args = signal_name(args[0][1:]), args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise Usage("missing PID")
    status = 0
    for pid in [a if a.startswith("%") else pid_arg(a) for a in args]:
        try:
            if isinstance(pid, str):        # a job: its programs, by OS signal; or its builtins
                sh.jobs.find(pid).kill(signal.Signals["SIG" + sig])
                continue
            sh.call("kill", pid=pid, signal=sig)
        except errors.LLMOSError as e:
            io.error("kill", error_text(e))
            status = 1
    return status


@command("[--daemon] [--name NAME] [--priority N] [--] PROGRAM [ARG...]")
def cmd_spawn(sh: Shell, io: Streams, args: list[str]) -> None:
    """Start a program under llmos and print its PID (also kept in $!).

    PROGRAM is an llmos program (summarize, batch, echo-daemon: see run), a path, or a name
    looked up in the kernel's PATH; it runs in the shell's current directory. It is a child of
    this shell unless --daemon, which parents it to pid 1 so it outlives the shell. --priority
    sets its nice value (-20..19); by default it has the shell's priority and limits. Its output
    goes to $LLMOS_HOME/logs/proc-PID.log.
    """
    opts, argv = options(args, "", ("daemon", "name=", "priority="))
    if not argv:
        raise Usage("missing PROGRAM")
    kw: dict[str, Any] = {"daemon": "--daemon" in opts, "name": opts.get("--name")}
    if "--priority" in opts:
        kw["priority"] = int_arg(opts["--priority"], "--priority", -20, 19)
    _spawn(sh, io, argv, kw)


def _spawn(sh: Shell, io: Streams, argv: list[str], kw: dict[str, Any]) -> None:
    """spawn argv (an llmos program by its name) in the shell's directory; print its PID, keep it in $!."""
    if argv[0] in programs.names():
        kw["name"] = kw.get("name") or argv[0]
        argv = programs.command(argv)
    try:
        kw["cwd"] = os.getcwd()
    except OSError:
        pass                    # our directory was removed: the kernel's will do
    if "/" in argv[0]:          # the kernel resolves a relative path against its own directory
        argv = [os.path.abspath(argv[0]), *argv[1:]]
    pid = sh.call("spawn", argv=argv, **kw)
    sh.last_spawned = pid
    print(pid, file=io.stdout)


@command("[--daemon [--restart POLICY] [--name NAME]] [--] PROGRAM [ARG...]")
def cmd_run(sh: Shell, io: Streams, args: list[str]) -> int | None:
    """Run a program in the foreground, with the shell's stdin, stdout and stderr; take its status.

    PROGRAM is one of llmos's own programs, found first (summarize: stdin to a summary; batch:
    a resumable bulk job over storage keys; echo-daemon; `run NAME --help` says more), or a
    program on the PATH, or a path. It runs as a child of llmsh with LLMOS_HOME set, so a
    program that connects becomes an llmos process, with the priority and limits set in the
    shell (nice, ulimit) once it connects; it works in pipes
    (cat notes | run summarize | put notes/summary). A status of 127 means not found; 128 + N,
    killed by signal N. --daemon instead has the kernel start it detached, as
    spawn --daemon does, and prints its PID (also $!): its output goes to
    $LLMOS_HOME/logs/proc-PID.log, and --restart never|on-failure|always says when the kernel
    starts it again.
    """
    opts, argv = options(args, "", ("daemon", "restart=", "name="))
    if not argv:
        raise Usage("missing PROGRAM")
    if "--daemon" not in opts:
        if "--restart" in opts or "--name" in opts:
            raise Usage("--restart and --name go with --daemon")
        return run_program(sh, io, programs.command(argv))
    restart = opts.get("--restart", "never")
    if restart not in ("never", "on-failure", "always"):
        raise Failure(f"--restart must be never, on-failure or always, not {restart!r}", 2)
    _spawn(sh, io, argv, {"daemon": True, "restart": restart, "name": opts.get("--name")})
    return 0


@command("[--timeout S] (PID | %JOB)...")
def cmd_wait(sh: Shell, io: Streams, args: list[str]) -> int:
    """Wait until processes or jobs end, print how each process ended, take the last status.

    A program that exited gives its exit status; one killed by a signal gives 128 + the signal's
    number (143 for TERM), as in sh. Waiting for a child of this shell reaps it. %N waits for
    job N (as fg does, but quietly). --timeout S gives up on a process after S seconds
    (status 1); Ctrl-C stops waiting.
    """
    opts, rest = options(args, "", ("timeout=",))
    if not rest:
        raise Usage("missing PID")
    targets = [a if a.startswith("%") else pid_arg(a) for a in rest]
    timeout = seconds_arg(opts["--timeout"]) if "--timeout" in opts else None
    status = 0
    for pid in targets:
        if isinstance(pid, str):
            job = sh.jobs.find(pid)
            status = job.wait()
            if job.stopped:
                print(sh.jobs.line(job), file=io.stdout)
            else:
                sh.jobs.jobs.pop(job.number, None)
            continue
        r = sh.call("wait", blocking=True, pid=pid, timeout=timeout)
        if r["status"] is not None:
            status = r["status"]
            print(f"pid {r['pid']} exited with status {status}", file=io.stdout)
        else:
            number = getattr(signal.Signals, "SIG" + str(r["signal"]), None)
            status = 128 + number.value if number else 255
            print(f"pid {r['pid']} killed by signal {r['signal']}", file=io.stdout)
    return status


# == the system ===================================================================================
@command("[restart NAME...]")
def cmd_services(sh: Shell, io: Streams, args: list[str]) -> int:
    """List the service processes, or restart some.

    Columns: name, OS pid, state (STARTING, READY, BACKOFF, FAILED, STOPPED), restarts so far,
    time since it became READY, and how its last process ended. `services restart NAME` kills
    and restarts a service, and clears a FAILED state.
    """
    if not args:
        rows = [[s["name"], str(s["pid"] or "-"), s["state"], str(s["restarts"]),
                 duration(s["uptime"]) if s["state"] == "READY" else "-", s["last_exit"] or "-"]
                for s in sh.call("services")]
        table(io.stdout, ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "LAST-EXIT"], rows,
              right={"PID", "RESTARTS", "UPTIME"})
        return 0
    if args[0] != "restart":
        raise Usage(f"unknown subcommand {args[0]!r}")
    if len(args) < 2:
        raise Usage("missing NAME")
    return for_each(io, "services", args[1:], lambda name: sh.call("service_restart", name=name))


@command()
def cmd_uname(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the system's name, version, ABI version, kernel OS pid, uptime and home."""
    operands(args)
    u = sh.call("uname")
    print(f"{u['system']} {u['version']} abi {u['abi']} kernel-pid {u['kernel_pid']} "
          f"up {duration(time.time() - u['boot_time'])} home {u['home']}", file=io.stdout)


# == storage ======================================================================================
@command("[--ns NS] [--if-version V] KEY [VALUE]")
def cmd_put(sh: Shell, io: Streams, args: list[str]) -> None:
    """Store VALUE, a string, under KEY (in your own namespace unless --ns NS).

    Without VALUE, stores what it reads from stdin, less its final newline (cat k | put k2).
    --if-version V stores only if the key is at version V; 0 means only if it does not exist.
    """
    opts, rest = options(args, "", ("ns=", "if-version="))
    if len(rest) == 1:
        key, value = rest[0], io.stdin.read().removesuffix("\n")
    else:
        key, value = operands(rest, "KEY", "VALUE")
    kw = {}
    if "--if-version" in opts:
        kw["if_version"] = int_arg(opts["--if-version"], "--if-version", 0)
    sh.call("put", key=key, value=value, ns=opts.get("--ns"), **kw)


@command("[--ns NS] KEY")
def cmd_get(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the value stored under KEY: a string as it is, any other value as JSON."""
    opts, rest = options(args, "", ("ns=",))
    (key,) = operands(rest, "KEY")
    print(show(sh.call("get", key=key, ns=opts.get("--ns"))["value"]), file=io.stdout)


@command("[--ns NS] [KEY...]")
def cmd_cat(sh: Shell, io: Streams, args: list[str]) -> int:
    """Print the values of keys, one after another (as get does); without KEY, copy stdin."""
    opts, rest = options(args, "", ("ns=",))
    if not rest:
        while chunk := io.stdin.read(65536):
            io.stdout.write(chunk)
        return 0
    status = 0
    for key in rest:
        try:
            print(show(sh.call("get", key=key, ns=opts.get("--ns"))["value"]), file=io.stdout)
        except errors.LLMOSError as e:
            io.error("cat", error_text(e))
            status = 1
    return status


@command("[-l] [--ns NS] [PREFIX]")
def cmd_ls(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the keys starting with PREFIX, in order; -l adds each one's version and size."""
    opts, rest = options(args, "l", ("ns=",))
    if len(rest) > 1:
        raise Usage(f"unexpected argument {rest[1]!r}")
    items = sh.call("list", prefix=rest[0] if rest else "", ns=opts.get("--ns"), limit=LS_LIMIT)
    if "-l" in opts:
        if items:
            table(io.stdout, ["VERSION", "SIZE", "KEY"],
                  [[str(i["version"]), str(i["size"]), i["key"]] for i in items], right={"VERSION", "SIZE"})
    else:
        for i in items:
            print(i["key"], file=io.stdout)
    if len(items) == LS_LIMIT:
        io.error("ls", f"only the first {LS_LIMIT} keys are shown; give a longer PREFIX")


@command("[--ns NS] KEY...")
def cmd_rm(sh: Shell, io: Streams, args: list[str]) -> int:
    """Delete keys."""
    opts, rest = options(args, "", ("ns=",))
    if not rest:
        raise Usage("missing KEY")
    return for_each(io, "rm", rest, lambda key: sh.call("delete", key=key, ns=opts.get("--ns")))


# == tokens and models ============================================================================
def _piece(text: str) -> str:
    """A token's text made visible: quoted, with spaces kept and newlines escaped."""
    return json.dumps(text, ensure_ascii=False)


@command("[--model M] [--ids] [--plain] TEXT")
def cmd_tokens(sh: Shell, io: Streams, args: list[str]) -> None:
    """Show how a model (the default unless --model) splits TEXT into tokens: id and text of each.

    Each token's text is quoted, so spaces show; a piece of a multi-byte character shows as
    U+FFFD. --ids prints only the ids, on one line. --plain reads special-token text such as
    <|im_start|> as ordinary characters.
    """
    opts, rest = options(args, "", ("model=", "ids", "plain"))
    (text,) = operands(rest, "TEXT")
    model = opts.get("--model")
    ids = sh.call("tokenize", text=text, model=model, special="--plain" not in opts)
    if "--ids" in opts:
        print(" ".join(map(str, ids)), file=io.stdout)
        return
    rows = [[str(i), _piece(sh.call("detokenize", ids=[i], model=model, skip_special=False))]
            for i in ids]
    if rows:
        table(io.stdout, ["ID", "TEXT"], rows, right={"ID"})
    print(f"{len(ids)} token{'' if len(ids) == 1 else 's'}", file=io.stdout)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


@command()
def cmd_models(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the models llmos knows; a * after its name marks the default (used when a call names none).

    Columns: name, architecture, parameters, quantization, context length in tokens, file
    size, the device a driver runs it on and that driver's memory (- when not loaded), and the
    file (or why it cannot be read).
    """
    operands(args)
    show_models(io.stdout, sh.call("models"))


def show_models(out, models: list[dict]) -> None:
    """The table `models` prints (llmos models prints it too)."""
    rows = [[m["name"] + ("*" if m["default"] else ""), m["architecture"] or "-",
             _count(m["parameters"]), m["quantization"] or "-",
             "-" if m["context_length"] is None else str(m["context_length"]),
             "-" if m["file_size"] is None else size(m["file_size"]),
             m.get("device") or "-",
             size(m["memory"]["rss"]) if m.get("memory") and m["memory"].get("rss") else "-",
             m["path"] + (f" ({m['error']})" if m["error"] else "")]
            for m in models]
    table(out, ["NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "DEVICE", "MEM", "PATH"],
          rows, right={"PARAMS", "CONTEXT", "SIZE", "MEM"})


@command("add PATH [--name NAME]  |  model rm NAME...")
def cmd_model(sh: Shell, io: Streams, args: list[str]) -> int:
    """Add a GGUF model file under a name, or remove added models (their files stay).

    `model add PATH` checks the file (a Llama GGUF whose tokenizer llmos can read) and names
    the model after the file, lowercased and without .gguf, unless --name NAME. Every user
    sees it in `models`; `tokens --model NAME` uses it. `model rm NAME` forgets it; the
    default model cannot be removed.
    """
    if not args:
        raise Usage("missing add or rm")
    sub, rest = args[0], args[1:]
    if sub == "add":
        try:
            opts, rest = getopt.gnu_getopt(rest, "", ["name="])
        except getopt.GetoptError as e:
            raise Usage(e.msg) from None
        (path,) = operands(rest, "PATH")
        added = sh.call("model_add", path=os.path.abspath(path), name=dict(opts).get("--name"))
        print(f"added model {added['name']}: {added['path']}", file=io.stdout)
        return 0
    if sub != "rm":
        raise Usage(f"unknown subcommand {sub!r}")
    if not rest:
        raise Usage("missing NAME")
    return for_each(io, "model", rest, lambda name: sh.call("model_remove", name=name))


# == messages =====================================================================================
@command("PID DATA")
def cmd_send(sh: Shell, io: Streams, args: list[str]) -> None:
    """Put DATA, a string, in the mailbox of process PID (it gets it with recv)."""
    pid, data = operands(args, "PID", "DATA")
    sh.call("send", pid=pid_arg(pid), data=data)


@command("[--timeout S]")
def cmd_recv(sh: Shell, io: Streams, args: list[str]) -> None:
    """Take the oldest message from this shell's mailbox and print it, waiting for one if none.

    Prints `from PID: DATA`, or `from PID [TOPIC]: DATA` for a message published to a topic
    this shell subscribed to. --timeout S gives up after S seconds (status 1); Ctrl-C stops
    waiting.
    """
    opts, rest = options(args, "", ("timeout=",))
    operands(rest)
    timeout = seconds_arg(opts["--timeout"]) if "--timeout" in opts else None
    m = sh.call("recv", blocking=True, timeout=timeout)
    topic = "" if m["topic"] is None else f" [{m['topic']}]"
    print(f"from {m['from']}{topic}: {show(m['data'])}", file=io.stdout)


@command("TOPIC DATA")
def cmd_pub(sh: Shell, io: Streams, args: list[str]) -> None:
    """Publish DATA, a string, to the processes subscribed to TOPIC (or a prefix of it)."""
    topic, data = operands(args, "TOPIC", "DATA")
    n = sh.call("publish", topic=topic, data=data)
    print(f"delivered to {n} process{'' if n == 1 else 'es'}", file=io.stdout)


@command("TOPIC...")
def cmd_sub(sh: Shell, io: Streams, args: list[str]) -> None:
    """Subscribe this shell to every topic starting with TOPIC; recv then gets what is published."""
    if not args:
        raise Usage("missing TOPIC")
    for topic in args:
        sh.call("subscribe", topic=topic)


@command("TOPIC...")
def cmd_unsub(sh: Shell, io: Streams, args: list[str]) -> int:
    """Undo sub TOPIC."""
    if not args:
        raise Usage("missing TOPIC")
    return for_each(io, "unsub", args, lambda topic: sh.call("unsubscribe", topic=topic))


# == jobs =========================================================================================
@command()
def cmd_jobs(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the background jobs: [N], + for the current one, Running, Stopped, Done or Exit STATUS.

    A job is a command list ended by &; those that ended are listed once, then forgotten.
    """
    operands(args)
    for job in list(sh.jobs.jobs.values()):
        print(sh.jobs.line(job), file=io.stdout)
    sh.jobs.reap()


@command("[%N]")
def cmd_fg(sh: Shell, io: Streams, args: list[str]) -> int:
    """Bring job N (the current one unless named) to the foreground and wait for it; take its status.

    Ctrl-C then interrupts the job (a second one kills its programs), not the shell; Ctrl-Z
    stops its programs and gives the prompt back (bg or fg resumes them).
    """
    job = sh.jobs.find(operands(args, "%N")[0] if args else None)
    status = job.wait(announce=lambda: print(job.text, file=io.stdout, flush=True))
    if job.stopped:
        print(sh.jobs.line(job), file=io.stdout)
    else:
        sh.jobs.jobs.pop(job.number, None)
    return status


@command("[%N]")
def cmd_bg(sh: Shell, io: Streams, args: list[str]) -> None:
    """Resume job N (the current one unless named) in the background, if it is stopped.

    A job stops on Ctrl-Z while it is in the foreground (fg), or on kill -STOP %N.
    """
    job = sh.jobs.find(operands(args, "%N")[0] if args else None)
    job.resume()
    print(sh.jobs.line(job), file=io.stdout)


# == the system, continued =========================================================================
@command("[-n N]")
def cmd_dmesg(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the last N lines (20 unless -n) of the kernel's log, one readable line per event."""
    opts, rest = options(args, "n:")
    operands(rest)
    n = int_arg(opts["-n"], "-n", 1) if "-n" in opts else 20
    path = sh.paths.log_file("kernel")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = collections.deque(f, maxlen=n)
    except OSError as e:
        raise Failure(f"{path}: {e.strerror}") from None
    from syscalls.runtime.logs import render_lines  # structlog only when needed
    for line in render_lines(lines):
        print(line, file=io.stdout)


@command()
def cmd_shutdown(sh: Shell, io: Streams, args: list[str]) -> None:
    """Stop llmos (every program and service, then the kernel); the shell then exits with 0."""
    operands(args)
    try:
        sh.call("shutdown")
    except (errors.ECONNREFUSED, errors.ESHUTDOWN):
        pass                    # it went before it could answer
    sh.disconnect()
    raise ShellExit(0)


# == the shell itself =============================================================================
SYNTAX = """\
Words are separated by spaces; quote one that has spaces or ;&|<> ('as is', "with $? inside").
  a; b      run a, then b            a && b    run b if a succeeded (status 0)
  # ...     a comment                a || b    run b if a failed
  a | b     b reads a's output; the status is b's
  a &       run a in the background as a job (jobs, fg, bg, wait %N, kill %N)
  a > KEY   store a's output under the storage KEY (a >> KEY adds it as a new line)
  a < FILE  a reads the local FILE as its input
  $?  the status of the last command   $$  this shell's PID
  $!  the last background job (%N), or the PID of the last spawn or run --daemon
"""


@command("[CMD...]")
def cmd_help(sh: Shell, io: Streams, args: list[str]) -> int:
    """Show the commands, or how to use the ones named."""
    if not args:
        print("llmsh, the llmos shell. Commands:", file=io.stdout)
        width = max(map(len, COMMANDS))
        for c in COMMANDS.values():
            print(f"  {c.name:<{width}}  {c.summary}", file=io.stdout)
        print(f"\n{SYNTAX}help CMD shows how to use CMD.", file=io.stdout)
        return 0
    status = 0
    for i, name in enumerate(args):
        c = COMMANDS.get(name)
        if c is None:
            io.error("help", f"no command named {name!r} (help lists them)")
            status = 1
            continue
        print(("\n" if i else "") + f"usage: {c.synopsis}\n\n{c.doc}", file=io.stdout)
    return status


@command("[STATUS]")
def cmd_exit(sh: Shell, io: Streams, args: list[str]) -> None:
    """Leave the shell with STATUS (0-255), or with the status of the last command."""
    if len(args) > 1:
        raise Usage(f"unexpected argument {args[1]!r}")
    raise ShellExit(int_arg(args[0], "STATUS", 0, 255) if args else sh.status)


@command("[WORD...]")
def cmd_echo(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the words, separated by spaces."""
    print(" ".join(args), file=io.stdout)


@command()
def cmd_true(sh: Shell, io: Streams, args: list[str]) -> int:
    """Do nothing, successfully (status 0)."""
    return 0


@command()
def cmd_false(sh: Shell, io: Streams, args: list[str]) -> int:
    """Do nothing, unsuccessfully (status 1)."""
    return 1


# The model commands (gen, chat), priorities and limits (nice, renice, ulimit) and top live in
# modules of their own; importing them registers them.
from . import model as _model_commands  # noqa: E402,F401
from . import priorities as _priority_commands  # noqa: E402,F401
from . import top as _top_command  # noqa: E402,F401
