"""The storage service: a durable key-value store in SQLite, with namespaces, versions and quotas.

It owns LLMOS_HOME/data/storage.db and must never acknowledge a write before it is on disk: WAL
with synchronous=FULL, and a reply only after COMMIT returns. Writes that arrive together are
committed together (group commit), each inside its own savepoint so one failing write (a version
conflict, a full quota) does not undo the others.

Namespaces: each OS user has a private one, ``user:UID`` (the default); shared namespaces are
created by a user, who owns them and sets what others may do (mode "", "r" or "rw"). A privileged
caller may do anything. Bytes (key + encoded value) count against the namespace owner's quota.

Every write carries the kernel's transaction id, recorded in the same transaction, so a write the
kernel retries after a crash is applied once: that is what makes put and delete idempotent.

A full disk is ENOSPC, never EIO, and loses nothing acknowledged: a write that finds no room
(SQLITE_FULL) fails alone, or, when SQLite gave up the whole transaction, with the writes that
shared it, none of which had been answered. Deleting keys must still work then, to make room:
- ``[storage] max_db_bytes`` bounds the database below the disk's size: puts past it are ENOSPC,
  while deletes may use DELETE_RESERVE pages above it.
- On a disk that really is full, storage gives up the file it reserved at start
  (data/storage.reserve, RESERVE_BYTES) so that deletes and their WAL frames have room; until the
  disk has room for the reserve again, only writes that fit in the database's free pages are tried.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from syscalls.runtime.config import Config
from syscalls.runtime.service import Reply, Service, main
from syscalls import errors, wire

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY, owner INTEGER NOT NULL, mode TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,
    size INTEGER NOT NULL, updated REAL NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    owner INTEGER PRIMARY KEY, bytes INTEGER NOT NULL, keys INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied (
    txid TEXT PRIMARY KEY, result BLOB NOT NULL, at REAL NOT NULL);
"""
KEEP_APPLIED = 100_000      # transaction ids remembered for retries (far more than can be in flight)
APPLIED_MAX_AGE = 600.0     # seconds: a retry comes within kernel.call_deadline, so older ids may go
DELETE_RESERVE = 64         # pages above max_db_bytes that only deletes (and their records) may use
RESERVE_BYTES = 1 << 20     # disk kept back at start for deletes once the disk is full
# Below LOW_DISK free, the WAL is moved into the database every LOW_DISK_CHECKPOINT pages instead
# of SQLite's 1000 (4 MiB): a full disk then finds most of the data in the database's own pages,
# and the WAL small enough to be checkpointed and reused from the start by the deletes after it.
LOW_DISK = 64 << 20
LOW_DISK_CHECKPOINT = 64


def _uid(caller: dict) -> int:
    """The caller's OS uid; -1 stands for a peer whose credentials the kernel could not read."""
    uid = caller.get("uid")
    return uid if isinstance(uid, int) else -1


def _full(e: BaseException) -> bool:
    """SQLite found no room: the disk is full, or max_page_count (storage.max_db_bytes) is reached."""
    return isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _stored(result: dict) -> Reply:
    """A write's result, with the bytes it added (or freed) as the call's usage."""
    return Reply(result, {"storage_bytes": result["delta"]})


class Storage(Service):
    name = "storage"

    async def start(self) -> None:
        cfg = Config.load(self.paths.home / "config.toml").storage
        self.value_limit, self.quota = cfg.value_limit, cfg.quota_bytes
        self.db = sqlite3.connect(self.paths.data / "storage.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.max_db_bytes = cfg.max_db_bytes
        self.max_pages = cfg.max_db_bytes // self.page_size
        if self.max_pages:      # the hard cap, for deletes; puts stop at max_pages (_room)
            self.db.execute(f"PRAGMA max_page_count = {self.max_pages + DELETE_RESERVE}")
        self.reserve = self.paths.data / "storage.reserve"
        self.disk_full = not self._take_reserve()
        self.low_disk = False
        self._watch_disk()
        self.pending: list[tuple[Callable, dict, dict, asyncio.Future]] = []
        self.flush_scheduled = False
        self.commits = 0

    async def stop(self) -> None:
        if self.pending:
            self._flush()
        self.db.close()

    # -- access ---------------------------------------------------------------------------------
    def _ns(self, args: dict, caller: dict, write: bool) -> tuple[str, int]:
        """(namespace, owner uid) the call may use, or EPERM/ENOENT saying why not."""
        uid = _uid(caller)
        ns = args.get("ns") or f"user:{uid}"
        if ns.startswith("user:"):
            try:
                owner = int(ns[5:])
            except ValueError:
                raise errors.EINVAL(f"argument 'ns': {ns!r} is not a user namespace (user:UID)")
            if owner != uid and not caller.get("privileged"):
                raise errors.EPERM(f"namespace {ns!r} is private to uid {owner}")
            return ns, owner
        row = self.db.execute("SELECT owner, mode FROM namespaces WHERE name=?", (ns,)).fetchone()
        if row is None:
            raise errors.ENOENT(f"no namespace {ns!r} (create it with ns_create)")
        owner, mode = row
        if owner != uid and not caller.get("privileged"):
            if (write and mode != "rw") or (not write and "r" not in mode):
                what = "write to" if write else "read"
                raise errors.EPERM(f"uid {uid} may not {what} namespace {ns!r} "
                                   f"(owner uid {owner}, mode {mode!r})")
        return ns, owner

    # -- reads ----------------------------------------------------------------------------------
    def op_get(self, args: dict, caller: dict) -> dict:
        ns, _ = self._ns(args, caller, write=False)
        row = self.db.execute("SELECT value, version FROM kv WHERE ns=? AND key=?",
                              (ns, args["key"])).fetchone()
        if row is None:
            raise errors.ENOENT(f"get: no key {args['key']!r} in namespace {ns!r}")
        return {"value": wire.unpack(row[0]), "version": row[1]}

    def op_list(self, args: dict, caller: dict) -> list[dict]:
        ns, _ = self._ns(args, caller, write=False)
        prefix = args["prefix"]
        # keys in [prefix, prefix + U+10FFFF) are exactly those starting with prefix
        rows = self.db.execute(
            "SELECT key, version, size FROM kv WHERE ns=? AND key>=? AND key<? ORDER BY key LIMIT ?",
            (ns, prefix, prefix + "\U0010ffff", args["limit"])).fetchall()
        return [{"key": k, "version": v, "size": s} for k, v, s in rows]

    def op_ns_list(self, args: dict, caller: dict) -> list[dict]:
        rows = self.db.execute(
            "SELECT n.name, n.owner, n.mode, COALESCE(SUM(kv.size), 0) FROM namespaces n "
            "LEFT JOIN kv ON kv.ns = n.name GROUP BY n.name ORDER BY n.name").fetchall()
        uid = _uid(caller)
        return [{"name": n, "owner": o, "mode": m, "bytes": b} for n, o, m, b in rows
                if o == uid or "r" in m or caller.get("privileged")]

    def op_usage(self, args: dict, caller: dict) -> dict:
        uid = _uid(caller)
        row = self.db.execute("SELECT bytes, keys FROM usage WHERE owner=?", (uid,)).fetchone()
        return {"uid": uid, "bytes": row[0] if row else 0, "keys": row[1] if row else 0,
                "quota": self.quota}

    # -- writes ---------------------------------------------------------------------------------
    async def op_put(self, args: dict, caller: dict) -> Reply:
        return _stored(await self._write(self._put, args, caller))

    async def op_delete(self, args: dict, caller: dict) -> Reply:
        return _stored(await self._write(self._delete, args, caller))

    async def op_ns_create(self, args: dict, caller: dict) -> None:
        return await self._write(self._ns_create, args, caller)

    async def op_ns_chmod(self, args: dict, caller: dict) -> None:
        return await self._write(self._ns_chmod, args, caller)

    def _write(self, fn: Callable, args: dict, caller: dict) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((fn, args, caller, fut))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            # after the socket's current batch has been read: its writes share one commit
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        batch, self.pending = self.pending, []
        outcomes: list[tuple[asyncio.Future, Any, Exception | None]] = []
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            if self.max_pages and self._pages() > self.max_pages * 0.9:
                # near storage.max_db_bytes: old transaction ids take room no retry needs
                db.execute("DELETE FROM applied WHERE at < ?", (time.time() - APPLIED_MAX_AGE,))
            for fn, args, caller, fut in batch:
                if fut.cancelled():
                    continue
                if not db.in_transaction:      # SQLite gave up the transaction (a full disk)
                    raise errors.ENOSPC("storage: the disk is full; the transaction was rolled back")
                txid = caller.get("txid")
                done = db.execute("SELECT result FROM applied WHERE txid=?", (txid,)).fetchone() \
                    if txid else None
                if done is not None:           # a retry of a write that was already applied
                    outcomes.append((fut, wire.unpack(done[0]), None))
                    continue
                db.execute("SAVEPOINT op")
                try:
                    result = fn(args, caller)
                    if txid:
                        db.execute("INSERT INTO applied VALUES (?, ?, ?)",
                                   (txid, wire.pack(result), time.time()))
                    db.execute("RELEASE op")
                    outcomes.append((fut, result, None))
                except (errors.LLMOSError, sqlite3.Error) as e:
                    if not isinstance(e, errors.LLMOSError):
                        if not _full(e):
                            raise
                        e = self._no_space(fn)
                        if not self.max_pages or self._pages() < self.max_pages:
                            self._disk_is_full()
                    if db.in_transaction:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    outcomes.append((fut, None, e))
            if not db.in_transaction:
                raise errors.ENOSPC("storage: the disk is full; the transaction was rolled back")
            self.commits += 1
            if self.commits % 1000 == 0:
                db.execute("DELETE FROM applied WHERE at < (SELECT at FROM applied ORDER BY at DESC "
                           "LIMIT 1 OFFSET ?)", (KEEP_APPLIED,))
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if _full(e) or isinstance(e, errors.ENOSPC):
                self.log.warning("commit_failed_disk_full", writes=len(batch))
                self._disk_is_full()
                failure = e if isinstance(e, errors.ENOSPC) else errors.ENOSPC(
                    f"storage could not commit {len(batch)} writes: the disk is full (nothing of "
                    f"them was applied)")
            else:
                self.log.exception("commit_failed", writes=len(batch))
                failure = errors.EIO(f"storage could not commit: {e!r}")
            outcomes = [(fut, None, failure) for _, _, _, fut in batch]
        if self.disk_full:
            self._after_full()
        self._watch_disk()
        # Only now, with the commit on disk, is any write acknowledged.
        for fut, result, exc in outcomes:
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)

    def _put(self, args: dict, caller: dict) -> dict:
        ns, owner = self._ns(args, caller, write=True)
        key = args["key"]
        blob = wire.pack(args["value"])
        if len(blob) > self.value_limit:
            raise errors.E2BIG(f"put: value is {len(blob)} bytes encoded; the limit is "
                               f"{self.value_limit} (storage.value_limit)")
        size = len(key.encode()) + len(blob)
        row = self.db.execute("SELECT version, size FROM kv WHERE ns=? AND key=?", (ns, key)).fetchone()
        version, old_size = (row[0], row[1]) if row else (0, 0)
        self._room("put", size)
        want = args["if_version"]
        if want is not None and want != version:
            now = f"is at version {version}" if row else "does not exist"
            raise errors.ECONFLICT(f"put: key {key!r} {now}, not {want} as if_version asked")
        allowance = caller.get("storage_allowance")
        if allowance and size - old_size > allowance["left"]:
            raise errors.EDQUOT(f"put: pid {allowance['pid']}'s storage_bytes limit is "
                                f"{allowance['limit']}; this value adds {size - old_size} bytes and "
                                f"only {max(0, allowance['left'])} are left")
        used = self._used(owner)
        if size > old_size and used - old_size + size > self.quota:
            raise errors.EDQUOT(f"put: uid {owner} stores {used} bytes; this value would make it "
                                f"{used - old_size + size}, over its quota of {self.quota} bytes")
        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                        (ns, key, blob, version + 1, size, time.time()))
        self._account(owner, size - old_size, 0 if row else 1)
        return {"version": version + 1, "size": size, "delta": size - old_size}

    def _delete(self, args: dict, caller: dict) -> dict:
        ns, owner = self._ns(args, caller, write=True)
        key = args["key"]
        row = self.db.execute("SELECT version, size FROM kv WHERE ns=? AND key=?", (ns, key)).fetchone()
        if row is None:
            raise errors.ENOENT(f"delete: no key {key!r} in namespace {ns!r}")
        if args["if_version"] is not None and args["if_version"] != row[0]:
            raise errors.ECONFLICT(f"delete: key {key!r} is at version {row[0]}, "
                                   f"not {args['if_version']} as if_version asked")
        self.db.execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))
        self._account(owner, -row[1], -1)
        return {"delta": -row[1]}

    def _ns_create(self, args: dict, caller: dict) -> None:
        name = args["name"]
        if not name or name.startswith("user:") or (":" in name and not caller.get("privileged")):
            raise errors.EINVAL(f"ns_create: argument 'name': {name!r} is not allowed (non-empty, "
                                f"no ':'; user:UID namespaces exist already)")
        if self.db.execute("SELECT 1 FROM namespaces WHERE name=?", (name,)).fetchone():
            raise errors.EEXIST(f"ns_create: namespace {name!r} already exists")
        self._room("ns_create", len(name.encode()))
        self.db.execute("INSERT INTO namespaces VALUES (?, ?, ?, ?)",
                        (name, _uid(caller), args["mode"], time.time()))

    def _ns_chmod(self, args: dict, caller: dict) -> None:
        row = self.db.execute("SELECT owner FROM namespaces WHERE name=?", (args["name"],)).fetchone()
        if row is None:
            raise errors.ENOENT(f"ns_chmod: no namespace {args['name']!r}")
        if row[0] != _uid(caller) and not caller.get("privileged"):
            raise errors.EPERM(f"ns_chmod: namespace {args['name']!r} belongs to uid {row[0]}")
        self.db.execute("UPDATE namespaces SET mode=? WHERE name=?", (args["mode"], args["name"]))

    def _room(self, call: str, size: int) -> None:
        """ENOSPC if `size` more bytes would take the database past storage.max_db_bytes, or,
        while the disk is full, past the database's free pages."""
        need = size // self.page_size + 2          # its pages, and some for the B-tree's splits
        if self.disk_full:
            free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
            if need > free and not self._disk_has_room():
                raise errors.ENOSPC(f"{call}: the disk holding storage.db is full (the database "
                                    f"has {free} free pages of {self.page_size} bytes; this needs "
                                    f"about {need}); delete keys or free disk space")
        if not self.max_pages:
            return
        used = self._pages()
        if used + need > self.max_pages:
            raise errors.ENOSPC(f"{call}: the database holds {used * self.page_size} bytes and this "
                                f"needs about {need * self.page_size} more, past storage.max_db_bytes "
                                f"({self.max_db_bytes}); delete keys to make room")

    def _take_reserve(self) -> bool:
        """Hold RESERVE_BYTES of the disk in data/storage.reserve; False if there is no room."""
        try:
            if not self.reserve.exists() or self.reserve.stat().st_size < RESERVE_BYTES:
                with open(self.reserve, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
            return True
        except OSError as e:
            self.reserve.unlink(missing_ok=True)
            self.log.warning("storage_reserve_not_taken", error=str(e))
            return False

    def _disk_is_full(self) -> None:
        """The disk is full: give the reserve back so that deletes (and their WAL) have room."""
        if not self.disk_full:
            self.log.warning("disk_full", reserve=RESERVE_BYTES)
        self.disk_full = True
        self.reserve.unlink(missing_ok=True)

    def _after_full(self) -> None:
        """After a batch while the disk is full: once the disk has room for what the WAL holds,
        move it into the database and truncate the WAL (which frees its space), and once it has
        room for the reserve again, take it back and let puts grow the database again."""
        try:
            wal = Path(f"{self.paths.data / 'storage.db'}-wal")
            if wal.exists() and self._free() >= wal.stat().st_size:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OSError, sqlite3.Error) as e:
            self.log.warning("disk_still_full", error=str(e))
        self._disk_has_room()

    def _disk_has_room(self) -> bool:
        """Has the disk room for the reserve again? Then take it: puts may grow the database."""
        if self._free() >= 2 * RESERVE_BYTES and self._take_reserve():
            self.disk_full = False
            self.log.info("disk_has_room")
            return True
        return False

    def _watch_disk(self) -> None:
        low = self._free() < LOW_DISK
        if low != self.low_disk:
            self.low_disk = low
            self.db.execute(f"PRAGMA wal_autocheckpoint = {LOW_DISK_CHECKPOINT if low else 1000}")
            self.log.info("low_disk" if low else "disk_not_low", free=self._free())

    def _free(self) -> int:
        st = os.statvfs(self.paths.data)
        return st.f_bavail * st.f_frsize

    def _pages(self) -> int:
        """Pages in use: the database's pages less its free list."""
        return self.db.execute("PRAGMA page_count").fetchone()[0] - \
            self.db.execute("PRAGMA freelist_count").fetchone()[0]

    def _no_space(self, fn: Callable) -> errors.ENOSPC:
        what = fn.__name__.lstrip("_")
        limit = f" or storage.max_db_bytes ({self.max_db_bytes}) with its reserve for deletes" \
            if self.max_pages else ""
        return errors.ENOSPC(f"{what}: no space left: the disk holding storage.db is full{limit}; "
                             f"nothing of this write was applied")

    def _used(self, owner: int) -> int:
        row = self.db.execute("SELECT bytes FROM usage WHERE owner=?", (owner,)).fetchone()
        return row[0] if row else 0

    def _account(self, owner: int, dbytes: int, dkeys: int) -> None:
        self.db.execute("INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT(owner) DO UPDATE SET "
                        "bytes = bytes + excluded.bytes, keys = keys + excluded.keys",
                        (owner, dbytes, dkeys))


if __name__ == "__main__":
    main(Storage)
