"""``python -m kernel``: run the kernel in the foreground (``llmos boot`` runs this as a daemon).

Only one kernel may own a LLMOS_HOME: the pidfile is locked with flock for the kernel's whole life,
so a second kernel is refused, while a pidfile left behind by a killed kernel (whose lock died with
it) is simply taken over, stale sockets included.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import signal
import sys

import uvloop

from syscalls.paths import Paths
from syscalls.runtime.config import Config
from syscalls.runtime.devices import DRIVERS_ENV
from syscalls.runtime.logs import setup

from .devices import place_drivers
from .instances import check_budget
from .kernel import Kernel

EXIT_ALREADY_RUNNING = 3


def lock_pidfile(paths: Paths):
    """Take the pidfile's lock; returns the open file (keep it), or None if a kernel holds it."""
    fd = os.open(paths.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def serve(paths: Paths, cfg: Config, log) -> None:
    kernel = Kernel(paths, cfg, log)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, kernel.stopped.set)
    await kernel.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel", description="Run the llmos kernel.")
    parser.add_argument("--home", help="LLMOS_HOME (default: $LLMOS_HOME or ~/.llmos)")
    parser.add_argument("--echo", action="store_true", help="also print the log on stderr")
    args = parser.parse_args(argv)
    paths = Paths.from_env(args.home)
    paths.ensure()
    os.environ["LLMOS_HOME"] = str(paths.home)
    lock = lock_pidfile(paths)
    if lock is None:
        pid = paths.pidfile.read_text().strip() or "?"
        print(f"llmos is already running in {paths.home} (kernel pid {pid})", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    log = setup("kernel", paths.log_file("kernel"), echo=args.echo)
    try:
        cfg = Config.load(paths.home / "config.toml")
        os.environ[DRIVERS_ENV] = ",".join(place_drivers(cfg))     # services inherit the choice
        check_budget(paths, cfg)
    except (ValueError, OSError) as e:
        log.error("bad_config", error=str(e))
        print(f"llmos: {e}", file=sys.stderr)
        return 2
    for stale in (paths.programs_sock, paths.services_sock):
        stale.unlink(missing_ok=True)
    try:
        uvloop.run(serve(paths, cfg, log))
    finally:
        paths.pidfile.unlink(missing_ok=True)
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
