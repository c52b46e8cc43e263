"""Re-check published artifacts against their manifests (checksums, row counts, file set).

What is found is written down: an artifact with problems gets a `_CORRUPT` file (JSON, the
problems) next to its manifest. `status` then shows it `corrupt`, `path` and `load` refuse it, and
the next `run` rebuilds it instead of saying `cached` (the plan's own check only compares sizes,
so a same-size flipped byte would otherwise stay in use). Rebuilding publishes a fresh directory,
which drops the mark; a later clean `verify` drops it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.cache import ArtifactStore
from pipeline.io import (
    CORRUPT,
    MANIFEST,
    SUCCESS,
    parquet_rows,
    read_json,
    sha256_file,
    write_json,
)
from pipeline.upstream import listed_files

log = logging.getLogger(__name__)


@dataclass
class Problem:
    artifact: Path
    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.artifact / self.file}: {self.what}"


def _listed(artifact: Path, identity: bool = True) -> tuple[dict, list[Problem]]:
    """The manifest's `files`, or the problem that makes it unusable. With `identity`, the
    manifest must name this artifact's stage and key (its place in the store)."""
    try:
        manifest = read_json(artifact / MANIFEST)
    except (OSError, ValueError) as exc:
        return {}, [Problem(artifact, MANIFEST, f"manifest unreadable ({exc})")]
    files = listed_files(manifest, with_bytes=True)
    if files is None:
        return {}, [Problem(artifact, MANIFEST, "manifest has no valid `files` list")]
    if identity and (manifest.get("key") != artifact.name
                     or manifest.get("stage") != artifact.parent.name):
        return {}, [Problem(artifact, MANIFEST,
                            f"manifest of another artifact ({manifest.get('stage')} "
                            f"{manifest.get('key')}, here {artifact.parent.name} {artifact.name})")]
    return files, []


def verify_artifact(artifact: Path) -> list[Problem]:
    """Every listed file there with its sha256 and row count, and no unlisted file."""
    listed, problems = _listed(artifact)
    if problems:
        return problems
    for rel, want in sorted(listed.items()):
        path = artifact / rel
        if not path.is_file():
            problems.append(Problem(artifact, rel, "missing"))
            continue
        if sha256_file(path) != want["sha256"]:
            problems.append(Problem(artifact, rel, "checksum differs from the manifest"))
            continue
        if "rows" in want:
            try:
                rows = parquet_rows(path)
            except Exception as exc:  # a corrupt Parquet footer raises from pyarrow
                problems.append(Problem(artifact, rel, f"unreadable ({type(exc).__name__})"))
                continue
            if rows != want["rows"]:
                problems.append(Problem(artifact, rel,
                                        f"{rows} rows, manifest says {want['rows']}"))
    return problems + _unlisted(artifact, listed)


def _unlisted(artifact: Path, listed: dict) -> list[Problem]:
    """Files the manifest does not list: never published by the engine, so never trusted (a
    reader globbing `part-*.parquet` would take them in)."""
    problems = []
    for root, dirs, names in os.walk(artifact):  # does not enter linked dirs: listed below
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(artifact).as_posix()
            if path.is_symlink():  # the engine never publishes a link; one to a dir of parts
                # would add a split no checksum covers
                problems.append(Problem(artifact, rel, "a symbolic link, not listed in the "
                                                       "manifest"))
            elif path.is_file() and rel not in listed and rel not in (MANIFEST, SUCCESS,
                                                                        CORRUPT):
                problems.append(Problem(artifact, rel, "not listed in the manifest"))
    return sorted(problems, key=lambda p: p.file)


def quick_check(artifact: Path, identity: bool = True) -> list[Problem]:
    """Cheap integrity check before reusing a cached artifact: not marked corrupt, a manifest
    of this artifact, every listed file there with its listed size (a deleted or truncated
    part) and no unlisted file. `verify_artifact`
    also re-hashes; stages re-hash what they read. `identity=False` for a copy of an artifact
    outside the store (a trainer's shards on a local disk, under another name)."""
    marked = corrupt_marks(artifact)
    if marked:
        return marked
    files, problems = _listed(artifact, identity)
    for rel, want in sorted(files.items()):
        path = artifact / rel
        if not path.is_file():
            problems.append(Problem(artifact, rel, "missing"))
        elif path.stat().st_size != want["bytes"]:
            problems.append(Problem(artifact, rel, f"{path.stat().st_size} bytes, manifest says "
                                                   f"{want['bytes']}"))
    return problems + (_unlisted(artifact, files) if files else [])


def corrupt_marks(artifact: Path) -> list[Problem]:
    """The problems recorded in the artifact's `_CORRUPT` mark (none if unmarked)."""
    path = artifact / CORRUPT
    if not path.exists():
        return []
    try:
        found = read_json(path)["problems"]
        out = [Problem(artifact, str(p["file"]), str(p["what"])) for p in found]
    except (OSError, ValueError, KeyError, TypeError):
        out = []
    return out or [Problem(artifact, CORRUPT, "marked corrupt")]


def mark_corrupt(artifact: Path, problems: list[Problem], by: str) -> bool:
    """Write the `_CORRUPT` mark; False (and a warning) where the work dir is read-only."""
    data = {"problems": [{"file": p.file, "what": p.what} for p in problems], "by": by,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        write_json(artifact / CORRUPT, data)
    except OSError as exc:
        log.warning("cannot mark %s corrupt (%s)", artifact, exc.strerror)
        return False
    return True


def unmark(artifact: Path) -> None:
    with contextlib.suppress(OSError):
        (artifact / CORRUPT).unlink(missing_ok=True)


def verify_store(store: ArtifactStore, dataset: str | None = None,
                 mark: bool = True) -> tuple[int, list[Problem]]:
    """(number of artifacts checked, problems found) over every published artifact. With
    `mark`, each artifact's `_CORRUPT` mark is set to what was found (removed when clean)."""
    checked, problems = 0, []
    for ds in [dataset] if dataset else store.datasets():
        ds_dir = store.dataset_dir(ds)
        if not ds_dir.is_dir():
            continue
        for stage_dir in sorted(p for p in ds_dir.iterdir() if p.is_dir()):
            for key in store.published_keys(ds, stage_dir.name):
                checked += 1
                artifact = store.artifact_dir(ds, stage_dir.name, key)
                found = verify_artifact(artifact)
                problems.extend(found)
                if mark and found:
                    mark_corrupt(artifact, found, by="nemo-pipe verify")
                elif mark:
                    unmark(artifact)
    return checked, problems
