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
from pipeline.errors import NemoError, NotPublished
from pipeline.executor import Executor, LocalExecutor
from pipeline.io import read_json, read_table_dir, write_json
from pipeline.registry import load_registry
from pipeline.runner import Pipeline
from pipeline.stage import RunEnv

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_WORK_DIR = "artifacts"
LOCATIONS_FILE = "_locations.json"
LOCATION_ENV = {"data_root": "NEMO_DATA_ROOT", "images": "NEMO_IMAGES"}


def default_work_dir() -> Path:
    return Path(os.environ.get("NEMO_WORK_DIR", DEFAULT_WORK_DIR))


def resolve_locations(work_dir: Path, dataset: str,
                      given: dict[str, Path | None]) -> dict[str, Path | None]:
    """Explicit values, else environment variables, else what an earlier run remembered."""
    remembered_file = work_dir / dataset / LOCATIONS_FILE
    remembered = read_json(remembered_file) if remembered_file.is_file() else {}
    out: dict[str, Path | None] = {}
    for name, env_var in LOCATION_ENV.items():
        value = given.get(name) or os.environ.get(env_var) or remembered.get(name)
        out[name] = Path(value).absolute() if value else None
    return out


def remember_locations(work_dir: Path, dataset: str, locations: dict[str, Path | None]) -> None:
    path = work_dir / dataset / LOCATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {k: str(v) for k, v in locations.items() if v is not None})


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
    work = Path(work_dir) if work_dir else default_work_dir()
    registry = load_registry()
    cfg = load_config(registry, Path(config) if config else None, sets)
    locations = resolve_locations(
        work, dataset,
        {"data_root": Path(data_root) if data_root else None,
         "images": Path(images) if images else None},
    )
    env = RunEnv(work_dir=work.absolute(), dataset=dataset, locations=locations)
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
    if not pipe.store.is_published(dataset, stage, r.key):
        raise NotPublished(f"{stage} ({r.key}) for {dataset} is not built yet under "
                           f"{pipe.env.work_dir}; run `nemo-pipe run --stage {stage} "
                           f"--dataset {dataset}`")
    return read_table_dir(pipe.artifact_dir(stage) / table)
