"""Python API: open a pipeline the way the CLI does, and load published tables.

Input locations given once (`--data-root`, `--images`) are remembered per dataset in
`<work>/<dataset>/_locations.json`, so later `status`, `path` and `load` calls resolve the same
keys without repeating them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import load_config
from pipeline.errors import (
    ArtifactCorrupt,
    NemoError,
    NotPublished,
    StorageError,
    UpstreamCorrupt,
)
from pipeline.executor import Executor, LocalExecutor
from pipeline.io import read_json, write_json
from pipeline.registry import dataset_spec, load_registry
from pipeline.runner import Pipeline
from pipeline.stage import RunEnv

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.upstream import UpstreamTable

DEFAULT_WORK_DIR = "artifacts"
LOCATIONS_FILE = "_locations.json"
LOCATION_ENV = {"data_root": "NEMO_DATA_ROOT", "images": "NEMO_IMAGES"}


def user_path(value: Path | str | None) -> Path | None:
    """A path the user gave (option, env variable, argument), `~` expanded; None when not
    given or empty. Shells leave a quoted `~` alone (and env files, docker --env-file and
    systemd never expand it): without this a dir literally named `~` appeared in the cwd, and
    an empty NEMO_WORK_DIR put the dataset dirs straight into the cwd."""
    if value is None or str(value) == "":
        return None
    return Path(value).expanduser()


def default_work_dir() -> Path:
    """$NEMO_WORK_DIR (`~` expanded), or ./artifacts when it is unset or empty."""
    return user_path(os.environ.get("NEMO_WORK_DIR")) or Path(DEFAULT_WORK_DIR)


def check_work_dir(work: Path) -> None:
    """A work dir that is a file, or lies under one, is a StorageError now, not a traceback
    from the first mkdir deep inside a run."""
    for p in (work, *work.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == work else f"lies under {p}, which is"
                raise StorageError(
                    f"work dir {work} {what} not a directory; pass --work-dir (or "
                    "NEMO_WORK_DIR) naming a directory, or remove the file")
            return


def resolve_locations(work_dir: Path, dataset: str,
                      given: dict[str, Path | None]) -> dict[str, Path | None]:
    """Explicit values, else environment variables, else what an earlier run remembered.
    `dataset` is the dataset's dir name under the work dir (`RunEnv.dir_name`)."""
    remembered_file = work_dir / dataset / LOCATIONS_FILE
    try:
        remembered = read_json(remembered_file) if remembered_file.is_file() else {}
    except (OSError, ValueError):
        remembered = {}  # unreadable: as if never written (the next run rewrites it)
    if not isinstance(remembered, dict):
        remembered = {}
    out: dict[str, Path | None] = {}
    for name, env_var in LOCATION_ENV.items():
        value = (user_path(given.get(name)) or user_path(os.environ.get(env_var))
                 or user_path(remembered.get(name)))
        out[name] = value.absolute() if value else None
    return out


def remember_locations(work_dir: Path, dataset: str, locations: dict[str, Path | None]) -> None:
    """`dataset`: the dataset's dir name (`RunEnv.dir_name`)."""
    path = work_dir / dataset / LOCATIONS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {k: str(v) for k, v in locations.items() if v is not None})
    except OSError as exc:
        raise StorageError(f"cannot write {path} ({exc.strerror}); the work dir must be "
                           "writable: fix its permissions, free space or pass another "
                           "--work-dir") from None


def open_pipeline(
    dataset: str,
    work_dir: Path | str | None = None,
    config: Path | str | None = None,
    sets: Sequence[str] = (),
    data_root: Path | str | None = None,
    images: Path | str | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> Pipeline:
    work = (user_path(work_dir) or default_work_dir()).absolute()
    check_work_dir(work)
    registry = load_registry()
    cfg = load_config(registry, user_path(config), sets)
    spec, name = dataset_spec(dataset)
    locations = resolve_locations(work, name, {"data_root": user_path(data_root),
                                               "images": user_path(images)})
    env = RunEnv(work_dir=work, dataset=spec, locations=locations, name=name)
    return Pipeline(registry, cfg, env, executor or LocalExecutor(), progress=progress)


def load(
    stage: str,
    dataset: str,
    table: str | None = None,
    work_dir: Path | str | None = None,
    config: Path | str | None = None,
    sets: Sequence[str] = (),
) -> pa.Table:
    """The published table of `stage` that the current config resolves to.

    `table` may be omitted for a stage that writes a single table.
    """
    pipe = open_pipeline(dataset, work_dir, config, sets)
    cls = pipe.registry.get(stage)
    if table is None:
        if len(cls.tables) != 1:
            raise NemoError(f"stage {stage!r} writes several tables ({', '.join(cls.tables)}); "
                            "pass table=...")
        table = cls.tables[0]
    if table not in cls.tables:
        raise NemoError(f"stage {stage!r} has no table {table!r}; it writes "
                        f"{', '.join(cls.tables)}")
    r = pipe.resolve(stage)
    if not pipe.store.is_published(pipe.env.dataset, stage, r.key):
        raise NotPublished(f"{stage} ({r.key}) for {dataset} is not built yet under "
                           f"{pipe.env.work_dir}; run `nemo-pipe run --stage {stage} "
                           f"--dataset {dataset}`")
    try:
        return published_table(pipe, stage, table).read()  # every part verified
    except UpstreamCorrupt as exc:
        raise ArtifactCorrupt(f"{exc.artifact}/{exc.file}: {exc.what}; run `nemo-pipe run "
                              f"--stage {stage} --dataset {dataset}` to rebuild it") from None


def published_table(pipe: Pipeline, stage: str, table: str) -> UpstreamTable:
    """A verifying reference to a published table of the current config (what a stage gets
    from `ctx.upstream_table`), for commands that read artifacts outside a stage (`load`,
    `calibrate`); ArtifactCorrupt when the artifact fails its cheap check."""
    from pipeline.upstream import manifest_files, upstream_table

    artifact = check_published(pipe, stage)
    key = pipe.resolve(stage).key
    try:
        manifest = pipe.store.manifest(pipe.env.dataset, stage, key)
        files = manifest_files(manifest, artifact)
    except (OSError, ValueError, UpstreamCorrupt):
        raise ArtifactCorrupt(f"{artifact}: its manifest cannot be read; rebuild it with "
                              f"`nemo-pipe run --stage {stage}`") from None
    return upstream_table(artifact, stage, key, files, table)


def check_published(pipe: Pipeline, stage: str) -> Path:
    """The stage's published artifact dir, or ArtifactCorrupt when it is marked corrupt, its
    manifest is unreadable, or a listed file is gone or has another size (a cheap check: no
    hashing; `load` hashes what it reads)."""
    from pipeline.verify import quick_check

    artifact = pipe.artifact_dir(stage)
    problems = quick_check(artifact)
    if problems:
        p = problems[0]
        raise ArtifactCorrupt(
            f"{artifact}: {p.file}: {p.what}; it must not be used. Rebuild it with `nemo-pipe "
            f"run --stage {stage} --dataset {pipe.env.dataset}` (a corrupt artifact is rebuilt)")
    return artifact
