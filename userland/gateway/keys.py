"""API keys: HTTP clients as llmos identities, each key a process with its priority and limits.

A key is kept in storage, namespace "gateway" (mode "": its owner and privileged processes only),
as keys/NAME = {name, hash, priority, limits, created}: only the SHA-256 of the key, which is 256
random bits, so a plain hash is enough. ``llmos keys`` (add, list, rm) writes them and publishes
on TOPIC; the gateway's ``KeyRing`` listens there and reloads, so that a removed key stops working
at once and the process it ran as ends, its requests with it.

A request with a key runs as a process of its own, "key:NAME", which the gateway opens on first
use as a connection of its own and gives the key's priority and limits (setpriority, setrlimit:
the gateway is privileged); ps and top show it, and the kernel and the scheduler enforce them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from typing import Any

import syscalls
from syscalls import errors
from syscalls.table import MODEL_LIMITS

from .responses import ApiError

NS, PREFIX, TOPIC = "gateway", "keys/", "gateway/keys"
KEY_PREFIX = "llmos-"            # what tells an llmos key from an SDK's placeholder
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RELOAD_S = 1.0                   # an unknown key makes the ring reload at most this often


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


# -- llmos keys (a blocking, privileged connection) ----------------------------------------------
def add(conn, name: str, priority: int = 0, limits: dict[str, int] | None = None) -> str:
    """Make a key; returns it (the only time it is ever seen). ValueError for a bad name or limit."""
    if not NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', not "
                         f"starting with a punctuation mark")
    if not -20 <= priority <= 19:
        raise ValueError(f"priority must be in -20..19, got {priority}")
    for resource, limit in (limits or {}).items():
        if resource not in MODEL_LIMITS or limit < 0:
            raise ValueError(f"--limit {resource}={limit}: resources are {', '.join(MODEL_LIMITS)}, "
                             f"each >= 0")
    try:
        conn.ns_create(NS, mode="")
    except errors.EEXIST:
        pass
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = {"name": name, "hash": digest(key), "priority": priority, "limits": dict(limits or {}),
              "created": time.time()}
    try:
        conn.put(PREFIX + name, record, if_version=0, ns=NS)
    except errors.ECONFLICT:
        raise ValueError(f"a key named {name!r} exists; `llmos keys rm {name}` first") from None
    conn.publish(TOPIC, {"added": name})
    return key


def listing(conn) -> list[dict]:
    """Every key's record, by name (no key is in them, only its hash)."""
    try:
        names = [e["key"] for e in conn.list(PREFIX, ns=NS)]
    except errors.ENOENT:           # no key was ever added
        return []
    return [conn.get(name, ns=NS)["value"] for name in names]


def remove(conn, name: str) -> None:
    try:
        conn.delete(PREFIX + name, ns=NS)
    except errors.ENOENT:
        raise ValueError(f"no key named {name!r}") from None
    conn.publish(TOPIC, {"removed": name})


# -- the gateway's side ---------------------------------------------------------------------------
class KeyRing:
    """The keys the gateway knows, by hash, and the process each runs as once used."""

    def __init__(self, conn, log):
        self.conn, self.log = conn, log          # the gateway's own, privileged connection
        self.by_hash: dict[str, dict] = {}
        self.procs: dict[str, tuple[str, asyncio.Task]] = {}   # name -> (its hash, its connection)
        self.loaded_at = 0.0
        self.unreadable: str | None = None        # why the last load failed (storage down)
        self._listener: asyncio.Task | None = None

    async def start(self) -> None:
        # Its own connection waits for the news, so that the gateway's process is not BLOCKED in
        # recv while it generates (ps would show that instead of its model work).
        self.news = await syscalls.connect_async(self.conn.paths.home, name="gateway-keys")
        await self.news.subscribe(TOPIC)
        await self.load()
        self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                await self.news.recv()
                await self.load()
            except errors.LLMOSError as e:      # llmos going away: the gateway is told too
                self.log.warning("keys_listen_failed", error=str(e))
                return

    async def load(self) -> None:
        self.loaded_at = time.monotonic()
        try:
            records = await self._records()
        except errors.LLMOSError as e:      # storage is down or not enabled: keep what is known
            self.unreadable = f"the keys cannot be read: {e}"
            self.log.warning("keys_unreadable", error=str(e))
            return
        self.unreadable = None
        self.by_hash = {r["hash"]: r for r in records}
        current = {r["name"]: r["hash"] for r in records}
        for name, (hashed, opening) in list(self.procs.items()):
            if hashed != current.get(name):          # removed, or made anew under the same name
                del self.procs[name]
                self.log.info("key_removed", key=name)
                asyncio.ensure_future(_close(opening))

    async def _records(self) -> list[dict]:
        try:
            names = [e["key"] for e in await self.conn.list(PREFIX, ns=NS)]
        except errors.ENOENT:           # no key was ever added
            return []
        records = []
        for name in names:
            try:
                record = (await self.conn.get(name, ns=NS))["value"]
            except errors.ENOENT:       # removed since the list
                continue
            if _well_formed(record):
                records.append(record)
            else:                       # written by hand into the namespace: not a key
                self.log.warning("key_malformed", key=name)
        return records

    async def caller(self, token: str | None) -> Any:
        """The connection a request with this bearer token runs as; None for no key (nothing, or
        a placeholder that is no llmos key). An llmos key that is not known is a 401."""
        if token is None or not token.startswith(KEY_PREFIX):
            return None
        hashed = digest(token)
        record = self.by_hash.get(hashed)
        if record is None and time.monotonic() - self.loaded_at > RELOAD_S:
            await self.load()
            record = self.by_hash.get(hashed)
        if record is None and self.unreadable:
            raise ApiError(503, self.unreadable, code="service_unavailable", retry_after=5)
        if record is None:
            raise ApiError(401, "the API key is not known to llmos (removed, or mistyped); "
                                "`llmos keys list` shows the keys there are", code="invalid_api_key")
        hashed, opening = self.procs.get(record["name"], (None, None))
        if opening is None:
            opening = asyncio.ensure_future(self._open(record))
            self.procs[record["name"]] = (record["hash"], opening)
        try:
            return await asyncio.shield(opening)
        except errors.LLMOSError as e:
            self.procs.pop(record["name"], None)
            raise ApiError(503, f"cannot open the process of key {record['name']!r}: {e}",
                           code="service_unavailable", retry_after=5) from None

    async def _open(self, record: dict):
        """The key's process: a connection of its own, with the key's priority and limits."""
        conn = await syscalls.connect_async(self.conn.paths.home, name=f"key:{record['name']}")
        try:
            await self.conn.setpriority(conn.pid, record["priority"])
            for resource in MODEL_LIMITS:
                await self.conn.setrlimit(resource, record["limits"].get(resource), pid=conn.pid)
        except BaseException:
            await conn.close()
            raise
        self.log.info("key_process", key=record["name"], pid=conn.pid)
        return conn

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await self.news.abort()
        for _, opening in self.procs.values():
            await _close(opening)


def _well_formed(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("name"), str) and \
        isinstance(record.get("hash"), str) and type(record.get("priority")) is int and \
        isinstance(record.get("limits"), dict) and \
        all(r in MODEL_LIMITS and type(n) is int for r, n in record["limits"].items())


async def _close(opening: asyncio.Task) -> None:
    """End a key's process (its requests in flight end with it)."""
    try:
        conn = await opening
    except Exception:       # noqa: BLE001 -- it never opened: nothing to close
        return
    await conn.close()
