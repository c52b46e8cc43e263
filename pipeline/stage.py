"""The Stage protocol: what a stage declares and the one method it implements.

A stage reads like its `run`: the engine owns keys, shards, resume, locks, manifests and
publishing, so a stage only declares its inputs, parameters and version, and writes tables
through the :class:`~pipeline.context.StageContext` it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pipeline.context import StageContext


class Params(BaseModel):
    """Base of every stage's parameters: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def runtime_field(default: Any, description: str = "", **kwargs: Any) -> Any:
    """A parameter that changes how a stage runs but never what it writes (batch size, workers).

    Such fields are left out of the artifact key, so changing them reuses the cached output.
    """
    return Field(default, description=description, json_schema_extra={"affects_output": False},
                 **kwargs)


def key_params(params: Params) -> dict[str, Any]:
    """The resolved parameters that determine the output: everything but runtime fields."""
    dumped = params.model_dump(mode="json")
    for name, info in type(params).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("affects_output") is False:
            dumped.pop(name, None)
    return dumped


@dataclass(frozen=True)
class RunEnv:
    """Where a run reads and writes: the work dir, the dataset, and named input locations.

    The engine treats `dataset` and `locations` as opaque; stages give them meaning (for the
    REFER stages, `data_root` and `images`). `name` is the dataset's dir under the work dir
    (default: `dataset` itself, which must then be a valid name); it differs when `dataset` is
    the path of a data-manifest file.
    """

    work_dir: Path
    dataset: str
    locations: dict[str, Path | None] = field(default_factory=dict)
    name: str = ""

    @property
    def dir_name(self) -> str:
        return self.name or self.dataset


class Stage(ABC):
    """One step of the DAG.

    Class attributes:
        name: the stage's name on the CLI and in the artifact layout.
        version: bump when the meaning or layout of the output changes; it is part of the key.
        inputs: names of upstream stages whose artifacts `run` reads.
        section: config namespace of the params (defaults to `name`; stages may share one).
        params_model: the pydantic model of the params.
        tables: names of the tables the stage writes (`<key>/<table>/part-*.parquet`).
        libraries: distributions whose versions are recorded in the manifest.
        uses_sections: other config sections whose params the stage reads (e.g. a stage that
            embeds its own texts reads `embed`); their output-affecting params join its key.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    params_model: ClassVar[type[Params]] = Params
    tables: ClassVar[tuple[str, ...]] = ()
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow",)
    uses_sections: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def config_section(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def upstream(self, params: Params) -> tuple[str, ...]:
        """The stages this one reads under `params` (default: `inputs`). A parameter may add an
        input (e.g. shards reads hard_negatives only when asked to), so that the key never
        depends on which artifacts happen to exist."""
        return self.inputs

    def resolve_params(self, env: RunEnv, params: Params) -> Params:
        """Fill dataset-dependent defaults (e.g. K from the data manifest) before keying, so the
        key and the manifest hold the values actually used."""
        return params

    def fingerprint(self, env: RunEnv, params: Params) -> dict[str, Any]:
        """Digest of external inputs (files outside the work dir) that determine the output.

        Part of the key, so an edited input file yields a new artifact. Stages that only read
        upstream artifacts return nothing.
        """
        return {}

    def preflight(self, env: RunEnv, params: Params) -> None:
        """Check, before any stage of the run starts, what would otherwise fail mid-run
        (unknown model, missing weights file, not enough memory). Most stages need none."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Compute the stage's tables and write them through `ctx`."""
