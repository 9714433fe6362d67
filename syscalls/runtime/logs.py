"""Logging for every llmos process: structlog, JSON lines in LLMOS_HOME/logs/NAME.log.

The file is the record (one JSON object a line, machine-readable); ``llmos logs`` renders it for a
terminal. When ``echo`` is set the same events are also printed readably on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Iterable, TextIO

import structlog


def setup(name: str, path: Path, echo: bool = False, level: int = logging.INFO) -> structlog.BoundLogger:
    path.parent.mkdir(parents=True, exist_ok=True)
    sink: TextIO = open(path, "a", buffering=1, encoding="utf-8")
    render = structlog.processors.JSONRenderer(default=str)
    console = structlog.dev.ConsoleRenderer(colors=False)

    def write(_, __, event: dict) -> str:
        sink.write(render(None, None, dict(event)) + "\n")
        if echo:
            print(console(None, None, dict(event)), file=sys.stderr, flush=True)
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            write,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(proc=name)


def render_lines(lines: Iterable[str]) -> Iterable[str]:
    """Turn JSON log lines into one readable line each: time, level, process, event, key=value."""
    for line in lines:
        line = line.rstrip("\n")
        try:
            ev = json.loads(line)
        except ValueError:
            yield line
            continue
        ts = str(ev.pop("timestamp", ""))[11:23]
        level = str(ev.pop("level", "")).upper()[:5]
        proc = ev.pop("proc", "")
        msg = ev.pop("event", "")
        exc = ev.pop("exception", None)
        rest = " ".join(f"{k}={v}" for k, v in ev.items())
        yield f"{ts} {level:<5} {proc:<10} {msg} {rest}".rstrip()
        if exc:
            yield from ("    " + x for x in str(exc).splitlines())
