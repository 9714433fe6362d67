"""What both transports share: the DEALER socket to the kernel's programs.sock, and the core."""

from __future__ import annotations

import os

import zmq

from .. import errors, wire
from ..paths import Paths
from .core import ClientCore


def open_dealer(ctx: zmq.Context, paths: Paths) -> zmq.Socket:
    """A socket connected to llmos in paths.home; ECONNREFUSED where none runs there, EPERM
    where one runs that this OS user may not reach (not in its [kernel] users_group)."""
    try:
        os.stat(paths.programs_sock)
    except FileNotFoundError:
        raise errors.ECONNREFUSED(f"llmos is not running in {paths.home} (no {paths.programs_sock}); "
                                  f"start it with `llmos boot`") from None
    except PermissionError:
        raise errors.EPERM(f"the llmos in {paths.home} is not open to this user (uid {os.getuid()}): "
                           f"its admin may add you to the group its [kernel] users_group names") from None
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paths.programs_endpoint)
    return sock


class Transport:
    """A socket to the kernel and the protocol core that decides what goes over it."""

    def __init__(self, ctx: zmq.Context, home: str | os.PathLike | None, timeout: float | None):
        self.paths = Paths.from_env(home)
        self._sock = open_dealer(ctx, self.paths)
        kernel = self.paths.kernel_pid()
        self._core = ClientCore(timeout, lambda: self.paths.kernel_pid() == kernel)

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each reply (then ETIMEDOUT); None waits as long as it takes."""
        return self._core.timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._core.timeout = seconds
