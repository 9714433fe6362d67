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
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
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


def _uid(caller: dict) -> int:
    """The caller's OS uid; -1 stands for a peer whose credentials the kernel could not read."""
    uid = caller.get("uid")
    return uid if isinstance(uid, int) else -1


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
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn, args, caller, fut in batch:
                if fut.cancelled():
                    continue
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
                except errors.LLMOSError as e:
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    outcomes.append((fut, None, e))
            self.commits += 1
            if self.commits % 1000 == 0:
                db.execute("DELETE FROM applied WHERE at < (SELECT at FROM applied ORDER BY at DESC "
                           "LIMIT 1 OFFSET ?)", (KEEP_APPLIED,))
            db.execute("COMMIT")
        except BaseException as e:
            db.execute("ROLLBACK")
            self.log.exception("commit_failed", writes=len(batch))
            failure = errors.EIO(f"storage could not commit: {e!r}")
            outcomes = [(fut, None, failure) for _, _, _, fut in batch]
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
        self.db.execute("INSERT INTO namespaces VALUES (?, ?, ?, ?)",
                        (name, _uid(caller), args["mode"], time.time()))

    def _ns_chmod(self, args: dict, caller: dict) -> None:
        row = self.db.execute("SELECT owner FROM namespaces WHERE name=?", (args["name"],)).fetchone()
        if row is None:
            raise errors.ENOENT(f"ns_chmod: no namespace {args['name']!r}")
        if row[0] != _uid(caller) and not caller.get("privileged"):
            raise errors.EPERM(f"ns_chmod: namespace {args['name']!r} belongs to uid {row[0]}")
        self.db.execute("UPDATE namespaces SET mode=? WHERE name=?", (args["mode"], args["name"]))

    def _used(self, owner: int) -> int:
        row = self.db.execute("SELECT bytes FROM usage WHERE owner=?", (owner,)).fetchone()
        return row[0] if row else 0

    def _account(self, owner: int, dbytes: int, dkeys: int) -> None:
        self.db.execute("INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT(owner) DO UPDATE SET "
                        "bytes = bytes + excluded.bytes, keys = keys + excluded.keys",
                        (owner, dbytes, dkeys))


if __name__ == "__main__":
    main(Storage)
