"""Content-addressed artifacts: keys, paths, locks, atomic publish.

Layout: `<work>/<dataset>/<stage>/<key>/` holds a published artifact (its tables,
`_manifest.json`, and `_SUCCESS`, written last). Work in progress lives in
`<work>/<dataset>/<stage>/.tmp-<key>/` with one marker per finished shard, so a killed run
resumes there; the directory is renamed into place only when complete. A lock file per key
keeps two runs from writing the same artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, LockBusy
from pipeline.io import MANIFEST, SUCCESS, canonical_json, read_json

KEY_CHARS = 16
# A dataset's dir name: one path component, never `.`/`..`, never a path.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def artifact_key(
    stage: str,
    version: str,
    params: dict[str, Any],
    upstream: dict[str, str],
    fingerprint: dict[str, Any],
) -> str:
    """Hash of everything that determines a stage's output."""
    payload = canonical_json(
        {
            "stage": stage,
            "version": version,
            "params": params,
            "upstream": upstream,
            "fingerprint": fingerprint,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_CHARS]


@dataclass(frozen=True)
class ArtifactStore:
    """`names` maps a dataset as the stages know it (e.g. the absolute path of a data-manifest
    file) to its dir name under the work dir; a dataset not in it must be a valid name itself,
    so no path is ever built from user input."""

    work_dir: Path
    names: Mapping[str, str] = field(default_factory=dict)

    def dataset_dir(self, dataset: str) -> Path:
        name = self.names.get(dataset, dataset)
        if not DATASET_NAME.fullmatch(name):
            raise InputError(
                f"dataset {dataset!r} cannot name a dir under the work dir {self.work_dir}: use "
                "a dataset name (see --help) or a data-manifest .yaml path, whose `name` is used")
        return self.work_dir / name

    def stage_dir(self, dataset: str, stage: str) -> Path:
        return self.dataset_dir(dataset) / stage

    def artifact_dir(self, dataset: str, stage: str, key: str) -> Path:
        return self.stage_dir(dataset, stage) / key

    def tmp_dir(self, dataset: str, stage: str, key: str) -> Path:
        return self.stage_dir(dataset, stage) / f".tmp-{key}"

    def lock_path(self, dataset: str, stage: str, key: str) -> Path:
        return self.stage_dir(dataset, stage) / f".{key}.lock"

    def is_published(self, dataset: str, stage: str, key: str) -> bool:
        return (self.artifact_dir(dataset, stage, key) / SUCCESS).is_file()

    def published_keys(self, dataset: str, stage: str) -> list[str]:
        """Keys of every published artifact of the stage, newest first."""
        d = self.stage_dir(dataset, stage)
        if not d.is_dir():
            return []
        found = [p for p in d.iterdir() if not p.name.startswith(".") and (p / SUCCESS).is_file()]
        found.sort(key=lambda p: (p / SUCCESS).stat().st_mtime, reverse=True)
        return [p.name for p in found]

    def manifest(self, dataset: str, stage: str, key: str) -> dict[str, Any]:
        return read_json(self.artifact_dir(dataset, stage, key) / MANIFEST)

    def datasets(self) -> list[str]:
        if not self.work_dir.is_dir():
            return []
        return sorted(p.name for p in self.work_dir.iterdir() if p.is_dir()
                      and DATASET_NAME.fullmatch(p.name))

    @contextlib.contextmanager
    def lock(self, dataset: str, stage: str, key: str, wait: bool = True) -> Iterator[None]:
        """Exclusive lock on one artifact; an OS lock, so a killed holder releases it."""
        from filelock import FileLock, Timeout

        path = self.lock_path(dataset, stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise LockBusy(
                    f"another nemo-pipe run is writing {stage} ({key}) for {dataset} "
                    f"(lock {path}); wait for it to finish, or rerun without --no-wait to queue "
                    "behind it"
                ) from None
            print(
                f"waiting for another run writing {stage} ({key}) to finish (lock {path})...",
                file=sys.stderr,
            )
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def publish(self, tmp: Path, final: Path) -> None:
        """Rename a complete tmp dir into place, replacing an older copy (`--force`)."""
        if final.exists():
            trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
