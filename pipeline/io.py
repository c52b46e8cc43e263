"""Parquet part files, manifests and checksums.

Writer settings are fixed (zstd level, row-group size, no timestamps) so that the same table
gives the same bytes: artifact checksums are then meaningful and reruns are comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SCHEMA_VERSION_KEY = b"nemo_pipe.schema_version"
ZSTD_LEVEL = 3
DEFAULT_ROW_GROUP_ROWS = 8192


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_parquet(
    table: pa.Table,
    path: Path,
    schema_version: str,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    use_dictionary: bool = True,
    compression_level: int | None = None,
) -> None:
    """Write `table` deterministically, via a temp name so a crash never leaves a partial file."""
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[SCHEMA_VERSION_KEY] = schema_version.encode()
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        compression_level=ZSTD_LEVEL if compression_level is None else compression_level,
        row_group_size=max(1, row_group_rows),
        use_dictionary=use_dictionary,
        write_statistics=True,
    )
    os.replace(tmp, path)


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
