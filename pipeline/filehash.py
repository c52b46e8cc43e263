"""Fast content hashes of input files, cached by (path, size, mtime).

Input fingerprints must change when a file's content changes, yet a rerun must not re-read tens
of thousands of images. A small SQLite table in the work dir remembers each file's digest for
its (size, mtime_ns); only new or touched files are read again, in parallel threads.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileDigest:
    size: int
    digest: str


def hash_file(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


_WARNED: set[Path] = set()  # databases already said to be unusable in this process
# every digest this process computed, by (path, size, mtime_ns): a file is read at most once
# per process whichever cache instance asks (the ingest key is computed before `run` makes
# the work dir, so with a memory-only cache)
_PROCESS_DIGESTS: dict[tuple[str, int, int], str] = {}


class FileHashCache:
    """Only a cache: where its database cannot be created or written (read-only work dir, full
    disk) digests are computed every time and a warning says so; `status` and `path` keep
    working on a read-only work dir, and `run` fails on its first real write instead."""

    def __init__(self, db_path: Path, persist: bool = True) -> None:
        self.db_path = db_path
        self._memo: dict[str, str] = {}
        self.usable = persist
        if not persist:
            return
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                    "mtime_ns INTEGER, digest TEXT)"
                )
                con.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT)")
        except (OSError, sqlite3.Error) as exc:
            self._give_up(exc)

    @classmethod
    def for_work_dir(cls, work_dir: Path) -> FileHashCache:
        """The work dir's cache, `<work>/.cache/file_hashes.sqlite`; memory-only, silently,
        while the work dir does not exist: `status` and `path` on a fresh (or mistyped) work
        dir must not create it, and `run` creates it with its first artifact anyway."""
        return cls(work_dir / ".cache" / "file_hashes.sqlite", persist=work_dir.is_dir())

    def _give_up(self, exc: Exception) -> None:
        if self.usable and self.db_path not in _WARNED:  # once per process and database
            _WARNED.add(self.db_path)
            log.warning("file hash cache %s unusable (%s); hashing input files without it",
                        self.db_path, exc)
        self.usable = False

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=60)

    def get_memo(self, key: str) -> str | None:
        if not self.usable:
            return self._memo.get(key)
        try:
            with self._connect() as con:
                row = con.execute("SELECT value FROM memo WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._give_up(exc)
            return self._memo.get(key)
        return row[0] if row else None

    def set_memo(self, key: str, value: str) -> None:
        self._memo[key] = value
        if not self.usable:
            return
        try:
            with self._connect() as con:
                con.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (key, value))
        except sqlite3.Error as exc:
            self._give_up(exc)

    def digests(
        self,
        paths: Iterable[Path],
        threads: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[Path, FileDigest | None]:
        """Digest of each path, `None` for a missing file; reads only files the cache lacks."""
        paths = [Path(p).absolute() for p in paths]
        known: dict[str, tuple[int, int, str]] = {}
        if self.usable:
            try:
                with self._connect() as con:
                    known = {
                        row[0]: (row[1], row[2], row[3])
                        for row in con.execute("SELECT path, size, mtime_ns, digest FROM hashes")
                    }
            except sqlite3.Error as exc:
                self._give_up(exc)
        out: dict[Path, FileDigest | None] = {}
        stale: list[tuple[Path, int, int]] = []
        rows: list[tuple[str, int, int, str]] = []  # digests the database lacks
        for p in paths:
            try:
                st = os.stat(p)
            except (FileNotFoundError, NotADirectoryError):
                out[p] = None
                continue
            hit = known.get(str(p))
            seen = _PROCESS_DIGESTS.get((str(p), st.st_size, st.st_mtime_ns))
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                out[p] = FileDigest(st.st_size, hit[2])
            elif seen is not None:  # hashed earlier in this process (a memory-only cache
                # before `run` made the work dir): kept now, not read again
                out[p] = FileDigest(st.st_size, seen)
                rows.append((str(p), st.st_size, st.st_mtime_ns, seen))
            else:
                stale.append((p, st.st_size, st.st_mtime_ns))
        if on_progress:
            on_progress(len(paths) - len(stale))
        if stale:
            with ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 1) * 2)) as pool:
                for (p, size, mtime), digest in zip(
                    stale, pool.map(lambda s: hash_file(s[0]), stale), strict=True
                ):
                    out[p] = FileDigest(size, digest)
                    rows.append((str(p), size, mtime, digest))
                    _PROCESS_DIGESTS[(str(p), size, mtime)] = digest
                    if on_progress:
                        on_progress(1)
        if rows and self.usable:
            try:
                with self._connect() as con:
                    con.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)",
                                    rows)
            except sqlite3.Error as exc:
                self._give_up(exc)
        return out
