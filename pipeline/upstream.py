"""Verified reads of upstream artifacts: the integrity chain.

A stage may only consume upstream bytes that match the sha256 its upstream's manifest recorded
at publish time; otherwise one flipped byte in a cached part would flow, unseen, into every
artifact built from it (a K sweep re-reads `negatives` hours after it was written). A stage
gets small picklable references from its context (`ctx.upstream_table(stage, table)`,
`ctx.upstream_file(stage, rel)`) and hands them to shard workers, which may run in other
processes or on dask; every read goes through them. A file is read once into memory, hashed,
and parsed from that buffer, so verification costs one sha256 pass over bytes already read.

A mismatch (or a listed file gone) raises :class:`~pipeline.errors.UpstreamCorrupt`, which
names the file and its artifact; the runner marks that artifact corrupt, rebuilds it once and
retries the stage (see `Pipeline.execute`).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UpstreamCorrupt

if TYPE_CHECKING:
    import pyarrow as pa

# For benchmarks only (`benchmarks/integrity_bench.py` measures what hashing costs): with this
# set to 1 the bytes are still read into memory, but not hashed or compared.
NO_VERIFY_ENV = "NEMO_PIPE_BENCH_NO_VERIFY"


def _verifying() -> bool:
    return os.environ.get(NO_VERIFY_ENV) != "1"


@dataclass(frozen=True)
class UpstreamFile:
    """One file of a published upstream artifact, with the sha256 its manifest lists."""

    artifact: str  # the artifact dir (a str: cheap to pickle)
    stage: str
    key: str
    rel: str  # path inside the artifact, e.g. "negatives/part-00003.parquet"
    sha256: str

    @property
    def path(self) -> Path:
        return Path(self.artifact) / self.rel

    def _corrupt(self, what: str) -> UpstreamCorrupt:
        return UpstreamCorrupt(
            f"upstream file {self.path} ({self.stage} {self.key}) {what}; nothing was "
            f"published from it. Rebuild it with `nemo-pipe run --stage {self.stage} --force`",
            stage=self.stage, key=self.key, artifact=self.artifact, file=self.rel, what=what)

    def _raw(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise self._corrupt("is missing") from None
        except IsADirectoryError:
            raise self._corrupt("is a directory, not a file") from None

    def _check(self, digest: str) -> None:
        if digest != self.sha256:
            raise self._corrupt("does not match the sha256 in its manifest (changed on disk "
                                "after it was published)")

    def read_bytes(self) -> bytes:
        """The file's bytes, verified against the manifest's sha256."""
        data = self._raw()
        if _verifying():
            self._check(hashlib.sha256(data).hexdigest())
        return data

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file parsed from its verified bytes (never re-read from disk).

        The hash runs on a second thread while pyarrow parses the same buffer (both release the
        GIL), so on a machine with a spare core verification costs little wall time; the table
        is returned only once the hash has matched, and a parse error of a mismatching file is
        reported as the mismatch."""
        if not _verifying():
            return self._parse(self._raw(), columns)
        data = self._raw()
        with ThreadPoolExecutor(1) as pool:
            digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
            try:
                table, error = self._parse(data, columns), None
            except UpstreamCorrupt as exc:
                table, error = None, exc
            self._check(digest.result())
        if error is not None:
            raise error
        return table

    def _parse(self, data: bytes, columns: list[str] | None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            # one thread: a threaded parse that fails (a flipped byte) can leave Arrow's pool
            # tasks running while the command exits with its error, and the process then
            # aborts (SIGABRT, 'terminate called') instead of exiting 2; seen in about 1 run in
            # 10 under load, never in 30 with one thread. The hash runs beside it anyway.
            return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)
        except (pa.ArrowException, OSError) as exc:  # matched the hash, yet not Parquet
            raise self._corrupt(f"cannot be parsed as Parquet ({exc})") from None

    def __str__(self) -> str:
        return f"{self.path}#{self.sha256[:12]}"


@dataclass(frozen=True)
class UpstreamTable:
    """The parts of one table of a published upstream artifact, in part order."""

    artifact: str
    stage: str
    key: str
    table: str
    parts: tuple[UpstreamFile, ...]

    @property
    def dir(self) -> Path:
        return Path(self.artifact) / self.table

    @property
    def ident(self) -> str:
        """Names this exact content (dir and hashes): a per-process cache key that can never
        serve bytes of an older or rebuilt artifact."""
        h = hashlib.sha256("".join(p.sha256 for p in self.parts).encode()).hexdigest()[:16]
        return f"{self.dir}#{h}"

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All parts concatenated, each verified (like `pipeline.io.read_table_dir`)."""
        import pyarrow as pa

        if not self.parts:
            raise FileNotFoundError(f"no part-*.parquet files listed for {self.dir} in its "
                                    "manifest")
        tables = [p.read_table(columns) for p in self.parts]
        return pa.concat_tables(tables).replace_schema_metadata(None)

    def __str__(self) -> str:
        return self.ident


def listed_files(manifest: Any, with_bytes: bool = False) -> dict[str, dict[str, Any]] | None:
    """The manifest's `files` mapping (rel -> {"sha256", "bytes", ...}) when it is well formed,
    else None: the one definition of a usable listing, for upstream reads and `verify` (which
    also needs each file's size: `with_bytes`)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and (not with_bytes or isinstance(v.get("bytes"), int)) for v in files.values()):
        return None
    return files


def manifest_files(manifest: dict[str, Any], artifact: Path) -> dict[str, str]:
    """rel -> sha256 of every file the manifest lists; UpstreamCorrupt if it lists none."""
    files = listed_files(manifest)
    if files is None:
        raise UpstreamCorrupt(
            f"manifest {artifact / '_manifest.json'} has no valid `files` list; rebuild the "
            "artifact", stage=str(manifest.get("stage", artifact.parent.name)),
            key=artifact.name, artifact=str(artifact), file="_manifest.json",
            what="manifest without a valid files list")
    return {rel: v["sha256"] for rel, v in files.items()}


def upstream_file(artifact: Path, stage: str, key: str, files: dict[str, str],
                  rel: str) -> UpstreamFile:
    if rel not in files:
        raise UpstreamCorrupt(
            f"{artifact}: {rel} is not listed in the manifest of {stage} ({key}); rebuild it "
            f"with `nemo-pipe run --stage {stage} --force`", stage=stage, key=key,
            artifact=str(artifact), file=rel, what="not listed in the manifest")
    return UpstreamFile(str(artifact), stage, key, rel, files[rel])


def upstream_table(artifact: Path, stage: str, key: str, files: dict[str, str],
                   table: str) -> UpstreamTable:
    rels = sorted(r for r in files if r.startswith(f"{table}/part-") and r.endswith(".parquet")
                  and "/" not in r[len(table) + 1:])
    parts = tuple(UpstreamFile(str(artifact), stage, key, r, files[r]) for r in rels)
    return UpstreamTable(str(artifact), stage, key, table, parts)
