"""top: the processes and the model's run queue, refreshed until q.

Each frame is made of two calls, ``ps`` and ``runqueue``; when the inference service is not
enabled or is down, the processes are still shown and the run queue is said to be unavailable.
On a terminal the frame is redrawn in place (the alternate screen, plain ANSI; the terminal in
cbreak mode so one key is enough); otherwise, or with -b, frames are printed one after another,
as procps's top -b does, for scripts.
"""

from __future__ import annotations

import collections
import io as _io
import os
import select
import shutil
import termios
import time
import tty

from syscalls import errors

from ..builtin import (Shell, Streams, command, duration, error_text, int_arg, operands, options,
                       seconds_arg, size, table)

STATES = ("RUNNING", "READY", "SUSPENDED", "BLOCKED", "STOPPED", "ZOMBIE")
ORDER = {s: i for i, s in enumerate(STATES)}
DEFAULT_DELAY = 2.0


@command("[-b] [-n N] [-d SECONDS]")
def cmd_top(sh: Shell, io: Streams, args: list[str]) -> int:
    """Show the processes and the model's run queue, refreshed every 2 seconds (-d) until q.

    The first lines count the processes by state and show the model's run queue: requests
    running, ready (waiting for a batch slot) and suspended, the bounds, and the KV-cache blocks
    in use. Then a line per process, those making tokens first: PID, name, state, priority, tokens
    per second now, KV blocks and sequences held, tokens in (prompts) and out (generated), age.
    Then a line per model request, in the order the scheduler would serve them.
    Keys: q quits, space refreshes at once. -b prints frames one after another (also when not on
    a terminal); -n N stops after N frames.
    """
    opts, rest = options(args, "bn:d:")
    operands(rest)
    frames = int_arg(opts["-n"], "-n", 1) if "-n" in opts else None
    delay = seconds_arg(opts["-d"], "-d") if "-d" in opts else DEFAULT_DELAY
    live = "-b" not in opts and _isatty(io.stdin) and _isatty(io.stdout)
    if live:
        return _live(sh, io, frames, delay)
    shown = 0
    while True:
        print("\n".join(frame(sh)), file=io.stdout, flush=True)
        shown += 1
        if frames is not None and shown >= frames:
            return 0
        time.sleep(delay)
        print(file=io.stdout)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _live(sh: Shell, io: Streams, frames: int | None, delay: float) -> int:
    fd, out = io.stdin.fileno(), io.stdout
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    out.write("\x1b[?1049h\x1b[?25l")          # the alternate screen; no cursor
    try:
        shown = 0
        while True:
            size = shutil.get_terminal_size()
            lines = [line[:size.columns] for line in frame(sh)][:size.lines - 1]
            out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
            out.flush()
            shown += 1
            if frames is not None and shown >= frames:
                return 0
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    break
                keys = os.read(fd, 64)
                if b"q" in keys.lower():
                    return 0
                if b" " in keys:
                    break
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def frame(sh: Shell) -> list[str]:
    """One screen of top, as lines."""
    procs = sh.call("ps")
    try:
        queue, why = sh.call("runqueue"), None
    except errors.LLMOSError as e:
        queue, why = None, e
    now = time.time()
    kernel = next((p for p in procs if p["pid"] == 1), None)
    up = duration(now - kernel["started"]) if kernel else "-"
    counts = collections.Counter(p["state"] for p in procs)
    states = ", ".join(f"{counts[s]} {s.lower()}" for s in STATES)
    others = "".join(f", {n} {s.lower()}" for s, n in sorted(counts.items()) if s not in ORDER)
    lines = [f"top - {time.strftime('%H:%M:%S')} up {up}, {len(procs)} processes: {states}{others}"]
    if queue is None:
        lines.append(f"model: run queue unavailable ({why.code}: {error_text(why)})")
    else:
        lines.append(
            f"model: {queue.get('running', 0)} running, {queue.get('ready', 0)} ready, "
            f"{queue.get('suspended', 0)} suspended (at most {queue.get('max_running', '-')} running, "
            f"{queue.get('max_queue', '-')} queued); KV blocks {queue.get('blocks_used', 0)}/"
            f"{queue.get('blocks_total', 0)} used, {queue.get('blocks_cached', 0)} cached")
        lines += _models(queue, now)
    lines.append("")
    procs.sort(key=lambda p: (-(p.get("tok_s") or 0), ORDER.get(p["state"], len(ORDER)), p["pid"]))
    rows = [[str(p["pid"]), p["name"] or "-", p["state"], str(p["priority"]),
             f"{p.get('tok_s') or 0:.1f}", str(p.get("kv_blocks") or 0), str(p.get("sequences") or 0),
             str(p.get("tokens_in") or 0), str(p.get("tokens_out") or 0), duration(now - p["started"])]
            for p in procs]
    lines += _table(["PID", "NAME", "STATE", "PRI", "TOK/S", "KV", "SEQ", "TOK-IN", "TOK-OUT", "AGE"],
                    rows, right={"PID", "PRI", "TOK/S", "KV", "SEQ", "TOK-IN", "TOK-OUT"})
    requests = queue.get("requests", []) if queue else []
    if requests:
        lines.append("")
        rows = [[str(r.get("pid")), str(r.get("request")), r.get("model") or "-", r.get("state", "-"),
                 str(r.get("priority")),
                 "-" if r.get("position") is None else str(r["position"]), str(r.get("kv_blocks", 0)),
                 str(r.get("prompt_tokens", 0)), str(r.get("generated", 0)),
                 f"{r.get('waited_s') or 0:.1f}s"] for r in requests]
        lines += _table(["PID", "REQUEST", "MODEL", "STATE", "PRI", "POS", "KV", "PROMPT", "GENERATED",
                         "WAITED"], rows, right={"PID", "REQUEST", "PRI", "POS", "KV", "PROMPT",
                                                 "GENERATED"})
    return lines


def _models(queue: dict, now: float) -> list[str]:
    """A line per model loaded or on its way: its state, memory, last use and expiry."""
    models = queue.get("models") or []
    if not models:
        return []
    out = [f"models: {size(queue.get('memory_held') or 0)} held of a {size(queue.get('memory_budget') or 0)} budget"]
    for m in models:
        expiry = "-" if m.get("state") != "resident" else \
            ("never" if (m.get("keep_alive") or 0) < 0 else "busy") if m.get("expires_at") is None \
            else f"expires in {duration(m['expires_at'] - now)}"
        place = f" #{m['position']}" if m.get("position") else ""
        out.append(f"  {m['name']}: {m['state']}{place}, {size(m.get('memory_bytes') or 0)}, "
                   f"{m.get('requests') or 0} requests, used {duration(now - m['last_used'])} ago, {expiry}")
    return out


def _table(header: list[str], rows: list[list[str]], right: set[str]) -> list[str]:
    out = _io.StringIO()
    table(out, header, rows, right=right)
    return out.getvalue().splitlines()
