"""Parquet part files, manifests and checksums.

Writer settings are fixed (zstd level, row-group size, no timestamps) so that the same table
gives the same bytes: artifact checksums are then meaningful and reruns are comparable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from typing_extensions import Self

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
CORRUPT = "_CORRUPT"  # written by `verify` or a stage that read a mismatching file
SCHEMA_VERSION_KEY = b"nemo_pipe.schema_version"
ZSTD_LEVEL = 3
DEFAULT_ROW_GROUP_ROWS = 8192


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class ParquetFormat:
    """How a table is laid out on disk. The defaults suit most tables; large lists of floats
    (scores) write several times faster without dictionary, statistics or compression, which
    gain them little."""

    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    use_dictionary: bool = True
    compression_level: int | None = None
    uncompressed: tuple[str, ...] = ()  # columns stored without zstd
    statistics: bool | tuple[str, ...] = True  # all columns, none, or these

    def writer_options(self, columns: Iterable[str]) -> dict[str, Any]:
        codec = {c: ("none" if c in self.uncompressed else "zstd") for c in columns}
        return {
            "compression": codec,
            "compression_level": {c: ZSTD_LEVEL if self.compression_level is None
                                  else self.compression_level
                                  for c, kind in codec.items() if kind == "zstd"},
            "use_dictionary": self.use_dictionary,
            "write_statistics": (list(self.statistics) if isinstance(self.statistics, tuple)
                                 else self.statistics),
        }


def _with_version(schema: pa.Schema, schema_version: str) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta[SCHEMA_VERSION_KEY] = schema_version.encode()
    return schema.with_metadata(meta)


def write_parquet(table: pa.Table, path: Path, schema_version: str,
                  fmt: ParquetFormat | None = None) -> None:
    """Write `table` deterministically, via a temp name so a crash never leaves a partial file."""
    with ParquetStream(path, table.schema, schema_version, fmt) as stream:
        stream.write(table)


class CloseOrAbort:
    """`with` support for writers that publish on `close` and discard on `abort`: leaving the
    block normally closes, an exception aborts, so no error path leaves a half-written file."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ParquetStream(CloseOrAbort):
    """Writes a table piece by piece, byte for byte as `write_parquet` writes the whole.

    Row groups are cut every `row_group_rows` rows whatever the pieces' sizes, so a stage's
    output does not depend on how it batched its work. The file has a temp name until `close`;
    an exception inside `with` removes it. With `background=True` pieces are encoded by a
    thread (pyarrow releases the GIL), so the caller computes the next piece meanwhile.
    """

    def __init__(self, path: Path, schema: pa.Schema, schema_version: str,
                 fmt: ParquetFormat | None = None, background: bool = False) -> None:
        import pyarrow.parquet as pq

        self.fmt = fmt or ParquetFormat()
        self.path = path
        self.schema = _with_version(schema, schema_version)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._writer = pq.ParquetWriter(self.tmp, self.schema,
                                        **self.fmt.writer_options(schema.names))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._thread = ThreadPoolExecutor(1) if background else None
        self._futures: list[Future[None]] = []

    def write(self, piece: pa.Table) -> None:
        if piece.schema.remove_metadata() != self.schema.remove_metadata():
            raise ValueError(f"{self.path.name}: piece schema {piece.schema} differs from "
                             f"the stream's {self.schema}")
        self._pending.append(piece)
        self._pending_rows += piece.num_rows
        rows = max(1, self.fmt.row_group_rows)
        if self._pending_rows >= rows:
            import pyarrow as pa

            whole = pa.concat_tables(self._pending)
            cut = self._pending_rows - self._pending_rows % rows
            self._pending = [whole.slice(cut)]
            self._pending_rows -= cut
            self._submit(whole.slice(0, cut))

    def _submit(self, table: pa.Table) -> None:
        rows = max(1, self.fmt.row_group_rows)
        groups = [table.slice(s, rows) for s in range(0, table.num_rows, rows)]
        if self._thread is None:
            self._write_groups(groups)
            return
        for f in [f for f in self._futures if f.done()]:
            f.result()  # raise a writer error now, not at close
            self._futures.remove(f)
        self._futures.append(self._thread.submit(self._write_groups, groups))

    def _write_groups(self, groups: list[pa.Table]) -> None:
        for group in groups:
            self._writer.write_table(group, row_group_size=group.num_rows)

    def close(self) -> None:
        import pyarrow as pa

        if self._pending_rows:
            self._submit(pa.concat_tables(self._pending))
        self._drain()
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the error that got us here is the one to report
            self._drain()
        self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def _drain(self) -> None:
        try:
            for f in self._futures:
                f.result()
        finally:
            self._futures.clear()
            if self._thread is not None:
                self._thread.shutdown(wait=True)


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def schema_version_of(path: Path) -> str | None:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    value = meta.get(SCHEMA_VERSION_KEY)
    return value.decode() if value is not None else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """Checksum, size and (for Parquet) row count of one artifact file."""
    info: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.suffix == ".parquet":
        info["rows"] = parquet_rows(path)
    return info


def table_files(table_dir: Path) -> list[Path]:
    return sorted(table_dir.glob("part-*.parquet"))


def read_table_dir(table_dir: Path) -> pa.Table:
    """All parts of a table, concatenated in part order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = table_files(table_dir)
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {table_dir}")
    tables = [pq.read_table(p) for p in parts]
    return pa.concat_tables(tables).replace_schema_metadata(None)


def write_json(path: Path, data: Any) -> None:
    """JSON via a temp file and rename: readers never see half a manifest."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def make_dirs(path: Path) -> None:
    """`path.mkdir(parents=True, exist_ok=True)`, with a file in the way reported as what it
    is: Python raises FileExistsError ("File exists") when the file is the folder's parent, a
    puzzling reason for `report afile/out.html`; here it is NotADirectoryError naming it."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
            break
    path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def output_file(path: Path, what: str, option: str = "the output path") -> Iterator[Path]:
    """A temp path next to `path` for a command to write `what` into, renamed onto `path` when
    the block ends normally and removed when it does not: a failed write leaves neither a
    half-written output nor a temp file. An OSError (no permission, a read-only disk, `path` a
    directory) becomes an InputError naming the path and `option` to change."""
    from pipeline.errors import InputError

    path = Path(path).expanduser()  # a quoted `~` is the home dir, never a dir named `~`
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a directory", str(path))
        make_dirs(path.parent)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the {what} ({exc.strerror or exc}); choose "
                         f"a writable {option}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def output_dir(path: Path, what: str, option: str = "the output folder") -> Path:
    """`path` as a folder a command may write `what` into (created), or an InputError naming
    it: a file in the way, no permission, a read-only disk."""
    from pipeline.errors import InputError

    path = Path(path).expanduser()  # a quoted `~` is the home dir, never a dir named `~`
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder", str(path))
        make_dirs(path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as exc:
        raise InputError(f"{path}: cannot write the {what} there ({exc.strerror or exc}); "
                         f"choose a writable {option}") from None
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def library_versions(names: Iterable[str]) -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("nemo-pipe", *names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-' (for status tables and reports)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
