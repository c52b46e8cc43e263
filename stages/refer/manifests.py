"""Data manifests: which files make up a dataset layout, its splits and published counts.

`--dataset NAME` looks up `data_manifests/NAME.yaml` shipped with the package; a path to a YAML
file of the same schema works too, for a custom REFER-format dataset. Either way the artifacts
live under `<work>/<name>/`, `name` being the manifest's validated `name` (never the path: a
`--dataset ../../m.yaml` must not write outside the work dir); see `dataset_spec`.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.cache import DATASET_NAME
from pipeline.errors import InputError
from pipeline.stage import INT_MAX


class SplitCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refs: int
    images: int | None = None
    sentences: int | None = None


class PaperDefaults(BaseModel):
    """The paper's K, tau (minmax scale) and gamma; `auto` config values resolve to these, so
    they obey the same domains as the config keys (mosaic_tables.k, tau_ti / tau_ii)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    k: int = Field(ge=3, le=INT_MAX)  # a mosaic shows 3 negatives
    tau: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    gamma: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)  # a probability


class DataManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    format: Literal["refer", "grefer"]
    dir: str
    refs_file: str
    instances_file: str = "instances.json"
    split_by: str
    splits: list[str]
    train_split: str = "train"
    expected: dict[str, SplitCounts] = {}
    defaults: PaperDefaults
    citation: str = ""
    source_path: str = ""
    digest: str = ""

    @field_validator("name")
    @classmethod
    def _dir_name(cls, v: str) -> str:
        if not DATASET_NAME.fullmatch(v):
            raise ValueError(f"name {v!r} must be 1-64 letters, digits or . _ + - starting "
                             "with a letter or digit (it names the dataset's dir in the work "
                             "dir)")
        return v

    def refs_path(self, data_root: Path) -> Path:
        return data_root / self.dir / self.refs_file

    def instances_path(self, data_root: Path) -> Path:
        return data_root / self.dir / self.instances_file


def is_manifest_path(dataset: str) -> bool:
    return dataset.endswith((".yaml", ".yml"))


def dataset_spec(dataset: str) -> tuple[str, str]:
    """`--dataset` value -> (what `load_data_manifest` is given from now on, the name of the
    dataset's dir in the work dir). A manifest path becomes absolute (shard workers and later
    commands may run elsewhere) and its dir is the manifest's `name`; a known dataset is its
    own name. Anything else is an InputError, before any path is built from it."""
    if is_manifest_path(dataset):
        spec = str(Path(dataset).expanduser().absolute())
        return spec, load_data_manifest(spec).name
    load_data_manifest(dataset)
    return dataset, dataset


def known_datasets() -> list[str]:
    files = resources.files("data_manifests")
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=32)
def load_data_manifest(dataset: str) -> DataManifest:
    """The manifest of a known dataset name, or of a YAML file path."""
    if is_manifest_path(dataset):
        path = Path(dataset)
        if not path.is_file():
            raise InputError(f"data manifest {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"data manifest {path} cannot be read ({exc})") from None
        source = str(path)
    else:
        res = resources.files("data_manifests") / f"{dataset}.yaml"
        if not DATASET_NAME.fullmatch(dataset) or not res.is_file():
            raise InputError(
                f"unknown dataset {dataset!r}; known: {', '.join(known_datasets())} "
                "(or pass the path of a data-manifest YAML file)"
            )
        text = res.read_text()
        source = f"data_manifests/{dataset}.yaml"
    try:
        data = yaml.safe_load(text)
        manifest = DataManifest(**data, source_path=source,
                                digest=hashlib.sha256(text.encode()).hexdigest())
    except ValidationError as exc:
        raise InputError(f"data manifest {source} is invalid: " + "; ".join(
            _validation_lines(exc)) + "; fix the file (the shipped data_manifests/*.yaml "
            "show the layout)") from None
    except (yaml.YAMLError, TypeError) as exc:
        raise InputError(f"data manifest {source} is invalid: {exc}") from None
    if manifest.train_split not in manifest.splits:
        raise InputError(f"data manifest {source}: train_split {manifest.train_split!r} "
                         f"is not one of its splits {manifest.splits}")
    return manifest


def _validation_lines(exc: ValidationError) -> list[str]:
    """`key.path: what is wrong (got value)` per error, without pydantic's URLs and dumps."""
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        out.append(f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}{shown}")
    return out


def check_splits(key: str, splits: list[str], dataset: str) -> None:
    """A config key naming splits must name splits of the dataset (caught before any work)."""
    manifest = load_data_manifest(dataset)
    unknown = sorted(set(splits) - set(manifest.splits))
    if unknown:
        raise InputError(f"{key}: {unknown} are not splits of {manifest.name} "
                         f"({', '.join(manifest.splits)})")
