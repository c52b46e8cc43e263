"""A durable cache of finished generation requests (SQLite, WAL mode).

Generating text with a large model is the slowest, most expensive step of the pipeline, and runs
get killed (preemption, OOM, Ctrl-C). Every finished request is therefore written here as soon as
it is done, keyed by ``(model, prompt_hash, item_id)``, so a restarted run only redoes the work
that was in flight. The cache knows nothing about models: values are any JSON-able object.

Why SQLite in WAL mode:

* each :meth:`RequestCache.put` is its own committed transaction. In WAL mode a commit is
  appended to the ``-wal`` file with ``write()`` before the call returns, so it survives the
  process being SIGKILLed right after (the OS owns the bytes). ``synchronous=NORMAL`` skips the
  fsync per commit; pass ``synchronous="FULL"`` to also survive power loss.
* readers never block the writer and vice versa, and several processes (e.g. one per GPU) can
  write to the same file: writers serialise on SQLite's lock, waiting up to ``timeout`` seconds.
* one connection per thread (and per process: a forked child opens its own), since a SQLite
  connection must not be shared across threads or across ``fork``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError

__all__ = ["RequestCache", "prompt_hash"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    model       TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    value       TEXT NOT NULL,
    created     REAL NOT NULL,
    PRIMARY KEY (model, prompt_hash, item_id)
) WITHOUT ROWID
"""
# SQLite's default limit on host parameters is 999 in old builds; stay well below it.
_MAX_PARAMS = 500
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


# SQLite's words for "the disk or the directory is the problem", not the data.
_STORAGE_MESSAGES = ("disk is full", "unable to open", "readonly", "read-only", "disk i/o",
                     "no such file or directory", "permission denied")


@contextlib.contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Turn SQLite's and the OS's storage failures (full disk, unwritable or missing dir) into a
    StorageError naming the file: `error: ...`, exit 2, instead of a traceback."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if not any(m in str(exc).lower() for m in _STORAGE_MESSAGES):
            raise
        raise StorageError(
            f"request cache {path}: {exc}; free space on its disk, fix the permissions of "
            f"{path.parent}, or choose another --work-dir. Finished requests are kept") from None
    except OSError as exc:
        raise StorageError(
            f"request cache {path}: {exc.strerror or exc} ({exc.filename or path}); free "
            "space, fix the permissions or choose another --work-dir") from None


def prompt_hash(text: str, *extra: Any) -> str:
    """First 16 hex chars of the sha256 of a prompt and anything else that changes the answer.

    `extra` is for what is not in the text but changes the output (generation parameters, a
    schema, a template version). Parts are serialised together as one JSON list so that
    ``("ab", "c")`` and ``("a", "bc")`` hash differently. 64 bits is plenty for the number of
    prompts one cache ever holds, and keeps keys short in the database and in logs.
    """
    payload = json.dumps(
        [text, *extra], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class RequestCache:
    """``(model, prompt_hash, item_id) -> JSON value``, durable as soon as `put` returns.

    Safe to use from several threads and several processes at once. `get` returns `default`
    (None) for a missing key, so a stored JSON ``null`` looks missing: use `contains` when that
    matters.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0,
                 synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, not {synchronous!r}")
        self.path = Path(path)
        self.timeout = float(timeout)
        self.synchronous = synchronous.upper()
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        self._connect()  # create the file and table now, so errors surface at construction

    # ----------------------------------------------------------------------------------------
    # connections

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again after a fork)."""
        if self._closed:
            raise RuntimeError(f"RequestCache({self.path}) is closed")
        if os.getpid() != self._pid:
            # A forked child inherited the parent's connections: never touch them (SQLite's
            # locks are per process), just forget them and open new ones.
            with self._lock:
                self._pid = os.getpid()
                self._connections = []
                self._local = threading.local()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        # isolation_level=None: autocommit; we open transactions explicitly (BEGIN IMMEDIATE)
        # so each put is exactly one committed transaction and writers take the lock up front
        # (no deadlock-prone read-then-upgrade).
        with storage_errors(self.path):
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
        try:
            with storage_errors(self.path):
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                self._retry_locked(lambda: conn.execute(_SCHEMA))
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _retry_locked(self, fn: Any) -> Any:
        """Run `fn`, retrying while the database is locked (up to `timeout`).

        Switching to WAL or creating the table needs a lock that SQLite's busy handler does not
        always wait for when several processes open a fresh file at the same moment.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def close(self) -> None:
        """Close every connection this object opened (in this process)."""
        with self._lock:
            conns, self._connections = self._connections, []
            self._closed = True
        if os.getpid() == self._pid:
            for conn in conns:
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RequestCache({str(self.path)!r})"

    # ----------------------------------------------------------------------------------------
    # reads

    def get(self, model: str, prompt_hash: str, item_id: str, default: Any = None) -> Any:
        """The stored value, or `default` when the request has not been cached."""
        row = self._connect().execute(
            "SELECT value FROM requests WHERE model = ? AND prompt_hash = ? AND item_id = ?",
            (model, prompt_hash, str(item_id)),
        ).fetchone()
        return default if row is None else json.loads(row[0])

    def contains(self, model: str, prompt_hash: str, item_id: str) -> bool:
        row = self._connect().execute(
            "SELECT 1 FROM requests WHERE model = ? AND prompt_hash = ? AND item_id = ?",
            (model, prompt_hash, str(item_id)),
        ).fetchone()
        return row is not None

    def get_many(self, model: str, prompt_hash: str, item_ids: Iterable[str]) -> dict[str, Any]:
        """``{item_id: value}`` for the ids that are cached (missing ids are simply absent)."""
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        out: dict[str, Any] = {}
        conn = self._connect()
        for start in range(0, len(ids), _MAX_PARAMS):
            chunk = ids[start:start + _MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                "SELECT item_id, value FROM requests WHERE model = ? AND prompt_hash = ? "
                f"AND item_id IN ({marks})",
                (model, prompt_hash, *chunk),
            ).fetchall()
            out.update((item_id, json.loads(value)) for item_id, value in rows)
        return out

    def count(self, model: str | None = None, prompt_hash: str | None = None) -> int:
        """Number of cached requests, optionally for one model (and one prompt hash)."""
        sql, args = "SELECT COUNT(*) FROM requests", []
        conds = []
        if model is not None:
            conds.append("model = ?")
            args.append(model)
        if prompt_hash is not None:
            conds.append("prompt_hash = ?")
            args.append(prompt_hash)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        return int(self._connect().execute(sql, args).fetchone()[0])

    def keys(self, model: str | None = None) -> Iterator[tuple[str, str, str]]:
        """All ``(model, prompt_hash, item_id)`` keys (for inspection and tests)."""
        sql, args = "SELECT model, prompt_hash, item_id FROM requests", ()
        if model is not None:
            sql, args = sql + " WHERE model = ?", (model,)
        yield from self._connect().execute(sql + " ORDER BY 1, 2, 3", args).fetchall()

    # ----------------------------------------------------------------------------------------
    # writes

    def put(self, model: str, prompt_hash: str, item_id: str, value: Any) -> None:
        """Store (or replace) one value; committed before this returns."""
        self.put_many(model, prompt_hash, {str(item_id): value})

    def put_many(self, model: str, prompt_hash: str, items: Mapping[str, Any]) -> None:
        """Store several values of one prompt in a single transaction (all or nothing)."""
        # Serialise first: a value that is not JSON-able must fail before anything is written.
        now = time.time()
        rows = [
            (model, prompt_hash, str(item_id),
             json.dumps(value, ensure_ascii=False, allow_nan=False), now)
            for item_id, value in items.items()
        ]
        if not rows:
            return
        conn = self._connect()
        with storage_errors(self.path):
            self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO requests (model, prompt_hash, item_id, value, "
                    "created) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # a full disk may have ended it
                    conn.execute("ROLLBACK")
                raise

    def delete(self, model: str, prompt_hash: str, item_id: str) -> bool:
        """Forget one request (e.g. a cached failure to retry); True if it was there."""
        conn = self._connect()
        self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            cur = conn.execute(
                "DELETE FROM requests WHERE model = ? AND prompt_hash = ? AND item_id = ?",
                (model, prompt_hash, str(item_id)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return cur.rowcount > 0
