"""The shard runtime: where a stage's shards write, how a finished one is committed, and how a
rerun finds the ones it may skip.

Shards are the unit of resume. Each shard writes into a private staging dir; when it finishes,
the driver moves its files into the artifact's tmp dir and writes a marker. On a rerun, shards
with a trusted marker are skipped, so a killed run loses at most the shards in flight. Stage
authors see only :class:`ShardWriter` (through `StageContext.run_shards`); the rest is the
runner's.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.io import (
    ParquetFormat,
    ParquetStream,
    part_name,
    read_json,
    write_json,
    write_parquet,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.executor import Executor
    from pipeline.stage import Params, ShardTask

SHARD_MARKERS = "_shards"
STAGING = "_staging"
KILL_HOOK_ENV = "NEMO_PIPE_TEST_KILL_AFTER_SHARDS"
KILL_STAGE_ENV = "NEMO_PIPE_TEST_KILL_STAGE"  # optional: only this stage dies
KILL_SIGNAL_ENV = "NEMO_PIPE_TEST_KILL_SIGNAL"  # optional: INT (Ctrl-C) instead of KILL

P = TypeVar("P", bound="Params")


class ShardWriter(Generic[P]):
    """What a running shard gets besides its payload: its index, the stage's params (handed
    over by the engine, so a payload never carries them) and where its tables go,
    `<table>/part-<index>.parquet` in a private staging dir."""

    def __init__(self, staging: Path, index: int, schema_version: str, params: P) -> None:
        self.staging = staging
        self.index = index
        self.schema_version = schema_version
        self.params = params

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


ShardFn = Callable[[Any, ShardWriter[Any]], "dict[str, Any] | None"]
"""A shard function: `fn(payload, writer) -> stats`, module-level (it may run elsewhere)."""


@dataclass
class _ShardJob:
    fn: ShardFn
    index: int
    payload: Any
    params: Any
    staging: Path
    schema_version: str
    call: int


@dataclass
class _ShardDone:
    index: int
    staging: Path
    stats: dict[str, Any]
    call: int


def _run_shard_job(job: _ShardJob) -> _ShardDone:
    # a retried task (a dask worker died mid-shard) gets the same staging dir: the dead
    # attempt's half-written files must not be committed with the new ones
    shutil.rmtree(job.staging, ignore_errors=True)
    writer = ShardWriter(job.staging, job.index, job.schema_version, job.params)
    stats = job.fn(job.payload, writer) or {}
    return _ShardDone(job.index, job.staging, stats, job.call)


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
    if not isinstance(done, dict):  # valid JSON, but not a marker (a list, a number)
        return None
    files = done.get("files")
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


def clear_resume_state(tmp_dir: Path) -> None:
    """Drop markers and staging dirs from a finished tmp dir before it is published."""
    shutil.rmtree(tmp_dir / SHARD_MARKERS, ignore_errors=True)
    shutil.rmtree(tmp_dir / STAGING, ignore_errors=True)


class ShardRuntime:
    """The shards of one attempt at one artifact: skips those a trusted marker says are done,
    maps the rest over the executor, and commits each as it finishes (files moved into the tmp
    dir, then its marker). Resume statistics go into `stats` (the manifest's)."""

    def __init__(self, stage: str, schema_version: str, key: str, tmp_dir: Path,
                 executor: Executor, progress: bool, stats: dict[str, Any]) -> None:
        self.stage = stage
        self.schema_version = schema_version
        self.key = key
        self.tmp_dir = tmp_dir
        self.executor = executor
        self.progress = progress
        self.stats = stats
        self._done_here = 0  # shards committed by this process: the kill hook counts them
        self._calls = 0  # run() calls so far: a stage with two sharded phases numbers both
        # from 0, and the second must not take the first's markers for its own

    def _marker(self, call: int, index: int) -> Path:
        prefix = f"{call}-" if call else ""  # the first call's names are the historical ones
        return self.tmp_dir / SHARD_MARKERS / f"{prefix}{index:05d}.json"

    def run(self, fn: ShardFn, tasks: Sequence[ShardTask], params: Params,
            desc: str) -> list[dict[str, Any]]:
        """Each shard's stats, in task order, including those recorded by earlier attempts."""
        call, self._calls = self._calls, self._calls + 1
        (self.tmp_dir / SHARD_MARKERS).mkdir(parents=True, exist_ok=True)
        staging_root = self.tmp_dir / STAGING
        shutil.rmtree(staging_root, ignore_errors=True)
        indices = [t.index for t in tasks]
        if len(set(indices)) != len(indices):
            raise ValueError("shard indices must be unique")

        results: dict[int, dict[str, Any]] = {}
        todo: list[_ShardJob] = []
        for task in tasks:
            done = valid_marker(self.tmp_dir, self._marker(call, task.index), self.key)
            if done is not None:
                results[task.index] = done["stats"]
                continue
            staging = staging_root / f"{call}-{task.index:05d}-{uuid.uuid4().hex[:8]}"
            todo.append(_ShardJob(fn, task.index, task.payload, params, staging,
                                  self.schema_version, call))

        resumed = len(tasks) - len(todo)
        self.stats["shards_total"] = self.stats.get("shards_total", 0) + len(tasks)
        self.stats["shards_resumed"] = self.stats.get("shards_resumed", 0) + resumed

        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), initial=resumed, desc=f"{self.stage}: {desc}",
                   unit="shard", disable=None if self.progress else True)
        with bar:
            for done_job in self.executor.map_unordered(_run_shard_job, todo):
                results[done_job.index] = done_job.stats
                self._commit(done_job)
                bar.update(1)
        shutil.rmtree(staging_root, ignore_errors=True)
        return [results[i] for i in indices]

    def _commit(self, done: _ShardDone) -> None:
        files: dict[str, int] = {}
        if done.staging.is_dir():
            # dot-files are writers' temporaries (`.part-*.tmp`), never a shard's output
            for src in sorted(p for p in done.staging.rglob("*")
                              if p.is_file() and not p.name.startswith(".")):
                rel = src.relative_to(done.staging)
                dst = self.tmp_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                files[rel.as_posix()] = src.stat().st_size
                os.replace(src, dst)
        write_json(self._marker(done.call, done.index),
                   {"key": self.key, "files": files, "stats": done.stats})
        self._done_here += 1
        self._kill_hook()

    def _kill_hook(self) -> None:
        """Test hook for crash drills: die like an OOM kill, with no cleanup at all, after
        `NEMO_PIPE_TEST_KILL_AFTER_SHARDS` commits (in stage `NEMO_PIPE_TEST_KILL_STAGE` only,
        when set); with `NEMO_PIPE_TEST_KILL_SIGNAL=INT`, be interrupted as by Ctrl-C."""
        kill_after = os.environ.get(KILL_HOOK_ENV)
        only = os.environ.get(KILL_STAGE_ENV)
        if kill_after and self._done_here >= int(kill_after) and (not only or only == self.stage):
            interrupt = os.environ.get(KILL_SIGNAL_ENV) == "INT"
            os.kill(os.getpid(), signal.SIGINT if interrupt else signal.SIGKILL)
