"""Who a connection is, and who may connect: the kernel's OS-user identity and its files' modes.

A connection's uid is never the program's word. libzmq reads it with SO_PEERCRED on the accepted
ipc socket, inside the kernel's process, and puts it in each message's Peer-Address metadata
(``peer``); a program cannot change it after connecting. ``Users.admits`` decides who may become a
process: root and the kernel's own OS user always; with ``[kernel] users_group``, the members of
that OS group too, checked against the group database at each new connection; nobody else, and
nobody whose credentials cannot be read. It also lays out the files (``protect``): run/ and
programs.sock reachable by the group, services.sock, data/ and logs/ the kernel's user's alone.

Never: trust a uid, pid or name a program sends; start a program as anyone but its caller's user
(``spawn_as``); signal an OS process without checking it is still the caller's (``signal_peer``).
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat

import zmq

from syscalls import errors
from syscalls.paths import Paths

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def peer(head: zmq.Frame) -> tuple[int | None, int | None, int | None]:
    """(uid, gid, OS pid) of the peer behind a message, as libzmq read them with SO_PEERCRED."""
    try:
        parts = head.get("Peer-Address").split(":")
        return int(parts[-3]), int(parts[-2]), int(parts[-1])
    except (zmq.ZMQError, ValueError, IndexError, AttributeError):
        return None, None, None


def trusted(uid: int | None) -> bool:
    """Root and the kernel's own user: the only ones who may hold privilege."""
    return uid is not None and uid in (0, os.getuid())


def check_quota(table, uid: int | None, limit: int, call: str) -> None:
    """EAGAIN when uid, other than root or the kernel's, already has `limit` live processes."""
    if trusted(uid):
        return
    n = sum(1 for p in table if p.uid == uid and p.alive)
    if n >= limit:
        raise errors.EAGAIN(f"{call}: uid {uid} has {n} processes, the most a user may have "
                            f"(kernel.processes_per_user = {limit})")


class Users:
    """The kernel's view of the machine's users: its own uid, and the group that may connect."""

    def __init__(self, group: str):
        self.uid = os.getuid()
        self.group = group
        self.gid = grp.getgrnam(group).gr_gid if group else None

    def admits(self, uid: int | None, gid: int | None) -> bool:
        """May a peer with these credentials connect at all?"""
        if trusted(uid):
            return True
        if uid is None or self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            user = pwd.getpwuid(uid)
            return user.pw_gid == self.gid or user.pw_name in grp.getgrgid(self.gid).gr_mem
        except KeyError:            # a uid with no passwd entry, or the group was deleted
            return False

    def protect(self, paths: Paths) -> None:
        """Set the modes of LLMOS_HOME's files for the kernel's sockets once bound: without a group,
        everything is the kernel's user's; with one, the group may reach programs.sock only."""
        for d in (paths.data, paths.logs):
            os.chmod(d, 0o700)
        os.chmod(paths.services_sock, 0o600)
        if self.gid is None:
            os.chmod(paths.run, 0o700)
            os.chmod(paths.programs_sock, 0o600)
            return
        # the group may traverse LLMOS_HOME (not list it), and read run/ for the pidfile's lock
        home_mode = stat.S_IMODE(os.stat(paths.home).st_mode)
        os.chown(paths.home, -1, self.gid)
        os.chmod(paths.home, home_mode | stat.S_IXGRP)
        for path, mode in ((paths.run, 0o750), (paths.pidfile, 0o640), (paths.programs_sock, 0o660)):
            os.chown(path, -1, self.gid)
            os.chmod(path, mode)


def spawn_as(uid: int | None) -> tuple[dict, dict[str, str] | None]:
    """(Popen arguments, base environment) to start a program as uid. For the kernel's own
    user: nothing to change, and the kernel's environment (None). For another user: its uid,
    groups, and an environment of its own, never the kernel's; PermissionError if the kernel
    cannot switch users (it is not root)."""
    if uid is None or uid == os.getuid():
        return {}, None
    if os.getuid() != 0:
        raise PermissionError(f"the kernel runs as uid {os.getuid()} and cannot start programs "
                              f"as uid {uid}")
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        raise PermissionError(f"uid {uid} has no entry in the user database") from None
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    env = {"PATH": SAFE_PATH, "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "SHELL": user.pw_shell or "/bin/sh"}
    env.update({k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "TERM")})
    return {"user": uid, "group": user.pw_gid, "extra_groups": groups}, env


def signal_peer(os_pid: int, uid: int | None, signum: int) -> None:
    """Signal the OS process of a program that merely connected, if it is still its user's: its
    pid may have been reused since, by a process of another user. ProcessLookupError if gone."""
    fd = os.pidfd_open(os_pid)
    try:
        if uid is not None:
            with open(f"/proc/{os_pid}/status") as f:
                line = next(line for line in f if line.startswith("Uid:"))
            if int(line.split()[2]) != uid:         # its effective uid, as SO_PEERCRED gave
                raise ProcessLookupError(os_pid)
        signal.pidfd_send_signal(fd, signum)
    except FileNotFoundError:
        raise ProcessLookupError(os_pid) from None
    finally:
        os.close(fd)
