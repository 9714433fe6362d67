"""The gateway daemon: connect to llmos, refuse or bind, advertise, serve until told to stop.

It refuses to serve off a loopback address without keys (``require_key`` false): it stays up,
binding nothing, and advertises why, so that ``llmos status`` and ``llmos logs gateway`` say so
and the kernel does not restart it in a loop. A port another program holds is tried again every
few seconds, advertised as waiting, for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

import uvicorn
import uvloop

import syscalls
from syscalls.errors import LLMOSError
from syscalls.paths import Paths
from syscalls.runtime.config import GatewayConfig, is_loopback, split_listen
from syscalls.runtime.logs import setup

RETRY_BIND_S = 2.0
STOP_GRACE_S = 5      # told to stop, answers in flight get this long, then are cancelled


def refusal(host: str, require_key: bool) -> str | None:
    """Why the gateway must not listen on host, or None."""
    if require_key or is_loopback(host):
        return None
    return (f"listen address {host} is not a loopback address and require_key is false: anyone "
            f"who can reach it could use llmos. Listen on 127.0.0.1, or set require_key = true")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def bind(host: str, port: int, conn, stop: asyncio.Event, log) -> socket.socket | None:
    """A listening socket on host:port, trying again while the port is taken; None if stopped."""
    while True:
        try:
            return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                        else socket.AF_INET, backlog=1024)
        except OSError as e:
            why = f"cannot listen on {host}:{port}: {e.strerror or e}; trying again every {RETRY_BIND_S:.0f} s"
            log.warning("gateway_waiting", error=why)
            await advertise(conn, log, state="waiting", error=why)
        try:
            await asyncio.wait_for(stop.wait(), RETRY_BIND_S)
            return None
        except asyncio.TimeoutError:
            pass


async def serve(args, log) -> int:
    from .app import Gateway, build
    from .keys import KeyRing

    host, port = split_listen(args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # privileged (the kernel starts it so): it gives each key's process its priority and limits
        conn = await syscalls.connect_async(args.home, name="gateway", privileged=True)
    except LLMOSError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    os.environ.pop("LLMOS_SPAWN_TOKEN", None)      # bound now; the keys' connections are others
    try:
        why = refusal(host, args.require_key)
        if why:
            log.error("gateway_refused", reason=why)
            await advertise(conn, log, state="refused", error=why)
            await stop.wait()
            return 0
        sock = await bind(host, port, conn, stop, log)
        if sock is None:
            return 0
        keys = KeyRing(conn, log)
        await keys.start()
        gateway = Gateway(conn, keys, log, require_key=args.require_key,
                          contexts_per_key=args.contexts)
        server = QuietServer(uvicorn.Config(build(gateway), log_config=None, access_log=False,
                                            lifespan="off", http="httptools", server_header=False,
                                            timeout_graceful_shutdown=STOP_GRACE_S))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        url = url_of(sock)
        await advertise(conn, log, state="listening", url=url)
        log.info("gateway_listening", url=url, require_key=args.require_key)
        await asyncio.wait({serving, asyncio.ensure_future(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        gateway.stopping = server.should_exit = True
        await advertise(conn, log, state="stopping", url=url)
        await serving
        await keys.close()
        log.info("gateway_stopped")
        return 0
    finally:
        await conn.abort()


class QuietServer(uvicorn.Server):
    """uvicorn's server without signal handlers of its own: the gateway's stop it, after saying
    it is stopping."""

    def capture_signals(self):
        return contextlib.nullcontext()


async def advertise(conn, log, **info: str) -> None:
    try:
        await conn.advertise(info)
    except LLMOSError as e:         # llmos is going away (ESHUTDOWN): nobody to tell
        log.info("advertise_failed", why=str(e), advertised=info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m userland.gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8790", help="HOST:PORT (port 0: any free one)")
    ap.add_argument("--require-key", action="store_true",
                    help="requests need an API key (needed off a loopback address)")
    ap.add_argument("--contexts", type=int, default=GatewayConfig.contexts_per_key,
                    help="contexts kept per key for chats resent whole (0: none)")
    ap.add_argument("--home", help="LLMOS_HOME (default: $LLMOS_HOME or ~/.llmos)")
    args = ap.parse_args(argv)
    try:
        split_listen(args.listen)
        GatewayConfig(contexts_per_key=args.contexts).check()
    except ValueError as e:
        ap.error(str(e).removeprefix("config: gateway.listen ").removeprefix("config: gateway."))
    log = setup("gateway", Paths.from_env(args.home).log_file("gateway"))
    return uvloop.run(serve(args, log))


if __name__ == "__main__":
    sys.exit(main())
