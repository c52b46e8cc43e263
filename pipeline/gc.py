"""Reclaim space: abandoned temp dirs, and artifacts no current config resolves to.

Sweeping tau or K publishes a new artifact per value; without collection the work dir grows
without bound. What the current config (defaults + `--config` + `--set`) resolves to is kept;
a temp dir whose lock is held belongs to a running job and is kept too.

gc deletes only inside the work dir and never through a link: every dir it would remove must
resolve (symlinks followed) to exactly its place under the resolved work dir, else gc stops
with a StorageError before removing anything. The dataset comes from `open_pipeline`, which
accepts only a known dataset name or a data-manifest file (whose validated `name` is the dir).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import NemoError, StorageError
from pipeline.runner import Pipeline


@dataclass
class Garbage:
    path: Path
    why: str
    bytes: int
    lock: Path | None = None  # a temp dir's artifact lock: held while it is deleted


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _locked(lock_path: Path) -> bool:
    from filelock import FileLock, Timeout

    if not lock_path.exists():
        return False
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def check_inside(path: Path, work_dir: Path) -> None:
    """StorageError unless `path` is under `work_dir` with no symlink on the way (a link to
    elsewhere, even to another dir of the work dir, is never followed for deletion)."""
    work = work_dir.resolve()
    try:
        rel = path.absolute().relative_to(work_dir.absolute())
    except ValueError:
        rel = None
    if rel is None or ".." in rel.parts or path.resolve() != work / rel:
        raise StorageError(
            f"gc: {path} resolves to {path.resolve()}, not to its place inside the work dir "
            f"{work}; gc never deletes outside the work dir or through a symlink. Remove the "
            "link (or delete what you mean to by hand), then rerun gc")


def find_garbage(pipe: Pipeline, keep_current: bool) -> list[Garbage]:
    """Temp and trash dirs of the pipeline's dataset; with `keep_current`, also every published
    artifact whose key the current config does not resolve to."""
    store, dataset = pipe.store, pipe.env.dataset
    found: list[Garbage] = []
    for name in pipe.registry.topological():
        stage_dir = store.stage_dir(dataset, name)
        if not stage_dir.is_dir():
            continue
        check_inside(stage_dir, store.work_dir)
        current = None
        if keep_current:
            try:
                current = pipe.resolve(name).key
            except NemoError as exc:
                raise NemoError(f"cannot tell which {name} artifact is current ({exc}); pass "
                                "--data-root/--images or fix the config first") from None
        for path in sorted(stage_dir.iterdir()):
            if path.name.startswith(".trash-"):
                found.append(Garbage(path, "left over from a replaced artifact", dir_bytes(path)))
            elif path.name.startswith(".tmp-"):
                key = path.name[len(".tmp-"):]
                lock = store.lock_path(dataset, name, key)
                if not _locked(lock):
                    found.append(Garbage(path, "unfinished run (resume state)", dir_bytes(path),
                                         lock))
            elif keep_current and path.is_dir() and not path.name.startswith(".") \
                    and path.name != current:
                found.append(Garbage(path, f"not the current {name} ({current})",
                                     dir_bytes(path)))
    for g in found:
        check_inside(g.path, store.work_dir)
    return found


def collect(garbage: list[Garbage], work_dir: Path) -> int:
    """Delete what `find_garbage` found; bytes freed. A temp dir is deleted only while gc holds
    its artifact's lock: a run that took the lock since it was listed (resuming that key) keeps
    its resume state, which deleting under it would turn into a published artifact missing
    the files written before."""
    from filelock import FileLock, Timeout

    for g in garbage:  # all checked before anything goes
        check_inside(g.path, work_dir)
    freed = 0
    for g in garbage:
        if g.lock is None:
            shutil.rmtree(g.path, ignore_errors=True)
            freed += g.bytes
            continue
        had_lock_file = g.lock.exists()
        lock = FileLock(str(g.lock))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a run owns it now
        try:
            if g.path.is_dir():
                shutil.rmtree(g.path, ignore_errors=True)
                freed += g.bytes
            if not had_lock_file:  # made by this acquire: leave the stage dir as it was
                g.lock.unlink(missing_ok=True)
        finally:
            lock.release()
    return freed
