"""What a running stage sees: its params, upstream artifacts, and a sharded writer.

Shards are the unit of resume. Each shard writes into a private staging dir; when it finishes,
the driver moves its files into the artifact's tmp dir and writes a marker. On a rerun, shards
with a marker are skipped, so a killed run loses at most the shards in flight.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UpstreamCorrupt
from pipeline.io import (
    ParquetFormat,
    ParquetStream,
    part_name,
    read_json,
    write_json,
    write_parquet,
)
from pipeline.stage import Params, RunEnv, Stage
from pipeline.upstream import (
    UpstreamFile,
    UpstreamTable,
    manifest_files,
    upstream_file,
    upstream_table,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.cache import ArtifactStore
    from pipeline.executor import Executor

SHARD_MARKERS = "_shards"
STAGING = "_staging"
KILL_HOOK_ENV = "NEMO_PIPE_TEST_KILL_AFTER_SHARDS"
KILL_STAGE_ENV = "NEMO_PIPE_TEST_KILL_STAGE"  # optional: only this stage dies


@dataclass(frozen=True)
class ShardTask:
    """One deterministic slice of a stage's work; `payload` must be small and picklable."""

    index: int
    payload: Any


class ShardWriter:
    """Writes one shard's tables as `<table>/part-<index>.parquet` in a staging dir."""

    def __init__(self, staging: Path, index: int, schema_version: str) -> None:
        self.staging = staging
        self.index = index
        self.schema_version = schema_version

    def write_table(self, table: str, data: pa.Table, fmt: ParquetFormat | None = None) -> None:
        """`fmt` tunes the layout: small row groups suit tables read by random access."""
        write_parquet(data, self.staging / table / part_name(self.index), self.schema_version,
                      fmt)

    def stream_table(self, table: str, schema: pa.Schema, fmt: ParquetFormat | None = None,
                     background: bool = True) -> ParquetStream:
        """A writer for a shard built piece by piece (`with writer.stream_table(...) as s:
        s.write(piece)`), encoding in a thread while the next piece is computed."""
        return ParquetStream(self.staging / table / part_name(self.index), schema,
                             self.schema_version, fmt, background=background)


@dataclass
class _ShardJob:
    fn: Callable[[Any, ShardWriter], dict[str, Any] | None]
    task: ShardTask
    staging: Path
    schema_version: str


@dataclass
class _ShardDone:
    index: int
    staging: Path
    stats: dict[str, Any]


def _run_shard_job(job: _ShardJob) -> _ShardDone:
    writer = ShardWriter(job.staging, job.task.index, job.schema_version)
    stats = job.fn(job.task.payload, writer) or {}
    return _ShardDone(job.task.index, job.staging, stats)


def valid_marker(tmp_dir: Path, marker: Path, key: str) -> dict[str, Any] | None:
    """A finished shard's marker, or None when it cannot be trusted.

    A marker is trusted only if it is readable, was written for this artifact key (the key holds
    the stage version and params), and every file it lists is there with the size it had when
    the shard finished: a deleted or half-written part means the shard is run again.
    """
    if not marker.is_file():
        return None
    try:
        done = read_json(marker)
    except (OSError, ValueError):
        return None
    files = done.get("files") if isinstance(done, dict) else None
    if done.get("key") != key or not isinstance(files, dict) or "stats" not in done:
        return None
    for rel, size in files.items():
        path = tmp_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    return done


def prune_resume_state(tmp_dir: Path, key: str) -> None:
    """Leave in a tmp dir only what a resumed run may reuse: trusted markers and their files.

    Run before a stage starts on a tmp dir left by an earlier attempt. Files no trusted marker
    claims (a shard killed between moving its files and writing its marker, tables written
    outside shards, anything a user dropped there) would otherwise be published with the
    artifact; untrusted markers would skip their shard.
    """
    markers = tmp_dir / SHARD_MARKERS
    claimed: set[str] = set()
    if markers.is_dir():
        for marker in sorted(markers.iterdir()):
            done = valid_marker(tmp_dir, marker, key)
            if done is not None:
                claimed.update(done["files"])
            elif marker.is_dir():
                shutil.rmtree(marker)
            else:
                marker.unlink()
    for path in sorted(tmp_dir.rglob("*"), reverse=True):
        rel = path.relative_to(tmp_dir).as_posix()
        if rel == SHARD_MARKERS or rel.startswith(SHARD_MARKERS + "/"):
            continue
        if path.is_symlink() or path.is_file():
            if rel not in claimed:
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


@dataclass
class StageContext:
    stage: Stage
    params: Params
    env: RunEnv
    key: str
    tmp_dir: Path
    store: ArtifactStore
    upstream_keys: dict[str, str]
    fingerprint: dict[str, Any]
    executor: Executor
    progress: bool = True
    shared: dict[str, Params] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _shards_done_here: int = 0
    _manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- reading upstream ---------------------------------------------------------------
    def upstream_dir(self, stage: str) -> Path:
        if stage not in self.upstream_keys:
            raise KeyError(
                f"stage {self.stage.name!r} reads {stage!r} without declaring it in `inputs`"
            )
        return self.store.artifact_dir(self.env.dataset, stage, self.upstream_keys[stage])

    def read_table(self, stage: str, table: str) -> pa.Table:
        """A whole upstream table, every part verified against the upstream manifest."""
        return self.upstream_table(stage, table).read()

    def upstream_table(self, stage: str, table: str) -> UpstreamTable:
        """A picklable, verifying reference to an upstream table, for shard payloads; read it
        with `.read()` (or part by part: `.parts[i].read_table()`). Never hand shard workers
        a plain path: what they read would not be checked."""
        d = self.upstream_dir(stage)
        return upstream_table(d, stage, self.upstream_keys[stage],
                              manifest_files(self.upstream_manifest(stage), d), table)

    def upstream_file(self, stage: str, rel: str) -> UpstreamFile:
        """A verifying reference to one upstream file (e.g. `texts.faiss`): `.read_bytes()`."""
        d = self.upstream_dir(stage)
        return upstream_file(d, stage, self.upstream_keys[stage],
                             manifest_files(self.upstream_manifest(stage), d), rel)

    def upstream_manifest(self, stage: str) -> dict[str, Any]:
        """The upstream's manifest, read once per run of this stage (its `files` hashes are
        what every later read is checked against)."""
        if stage not in self._manifests:
            d = self.upstream_dir(stage)
            try:
                manifest = read_json(d / "_manifest.json")
                if not isinstance(manifest, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise UpstreamCorrupt(
                    f"upstream manifest {d / '_manifest.json'} cannot be read ({exc}); "
                    f"rebuild it with `nemo-pipe run --stage {stage} --force`",
                    stage=stage, key=self.upstream_keys[stage], artifact=str(d),
                    file="_manifest.json", what="manifest unreadable") from None
            self._manifests[stage] = manifest
        return self._manifests[stage]

    # -- writing ------------------------------------------------------------------------
    def write_table(self, table: str, data: pa.Table, part: int = 0) -> None:
        """Write a whole (small) table, or one part of it, outside of shards."""
        write_parquet(data, self.tmp_dir / table / part_name(part), self.stage.version)

    def record(self, **stats: Any) -> None:
        """Add stage statistics to the manifest (`nemo-pipe status` shows some)."""
        self.stats.update(stats)

    # -- shards -------------------------------------------------------------------------
    def run_shards(
        self,
        fn: Callable[[Any, ShardWriter], dict[str, Any] | None],
        tasks: Sequence[ShardTask],
        desc: str = "shards",
    ) -> list[dict[str, Any]]:
        """Run `fn(payload, writer)` for each task not finished by an earlier attempt.

        `fn` must be a module-level function (it may run in another process). Returns each
        shard's stats dict in task order, including those recorded by earlier attempts.
        """
        markers = self.tmp_dir / SHARD_MARKERS
        markers.mkdir(parents=True, exist_ok=True)
        staging_root = self.tmp_dir / STAGING
        shutil.rmtree(staging_root, ignore_errors=True)
        indices = [t.index for t in tasks]
        if len(set(indices)) != len(indices):
            raise ValueError("shard indices must be unique")

        results: dict[int, dict[str, Any]] = {}
        todo: list[_ShardJob] = []
        for task in tasks:
            done = valid_marker(self.tmp_dir, markers / f"{task.index:05d}.json", self.key)
            if done is not None:
                results[task.index] = done["stats"]
                continue
            staging = staging_root / f"{task.index:05d}-{uuid.uuid4().hex[:8]}"
            todo.append(_ShardJob(fn, task, staging, self.stage.version))

        resumed = len(tasks) - len(todo)
        self.stats["shards_total"] = self.stats.get("shards_total", 0) + len(tasks)
        self.stats["shards_resumed"] = self.stats.get("shards_resumed", 0) + resumed

        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(tasks),
            initial=resumed,
            desc=f"{self.stage.name}: {desc}",
            unit="shard",
            disable=None if self.progress else True,
        )
        with bar:
            for done_job in self.executor.map_unordered(_run_shard_job, todo):
                results[done_job.index] = done_job.stats
                self._commit_shard(done_job)
                bar.update(1)
        shutil.rmtree(staging_root, ignore_errors=True)
        return [results[i] for i in indices]

    def _commit_shard(self, done: _ShardDone) -> None:
        files: dict[str, int] = {}
        if done.staging.is_dir():
            for src in sorted(p for p in done.staging.rglob("*") if p.is_file()):
                rel = src.relative_to(done.staging)
                dst = self.tmp_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                files[rel.as_posix()] = src.stat().st_size
                os.replace(src, dst)
        marker = self.tmp_dir / SHARD_MARKERS / f"{done.index:05d}.json"
        write_json(marker, {"key": self.key, "files": files, "stats": done.stats})
        self._shards_done_here += 1
        kill_after = os.environ.get(KILL_HOOK_ENV)
        only = os.environ.get(KILL_STAGE_ENV)
        if kill_after and self._shards_done_here >= int(kill_after) and (
                not only or only == self.stage.name):
            # Test hook for crash drills: die like an OOM kill, with no cleanup at all.
            os.kill(os.getpid(), signal.SIGKILL)
