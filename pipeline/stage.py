"""The Stage protocol: what a stage declares and the one method it implements.

A stage reads like its `run`: the engine owns keys, shards, resume, locks, manifests and
publishing, so a stage only declares its inputs, parameters and version, and writes tables
through the :class:`~pipeline.context.StageContext` it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pipeline.context import StageContext

INT_MAX = 2**31 - 1
"""Upper bound of every count and size: they reach int32 columns and C ints (faiss, numpy)."""


class Domain:
    """Annotation metadata: how to say a type's allowed values in an error message, where the
    constraints alone would read badly (a regex). Pydantic ignores it; pipeline.config reads it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Domain({self.text!r})"


# Reusable parameter types. Do not add `ge`/`le` to a field declared with one of these (the
# alias's bound would win); declare `int = Field(..., ge=.., le=INT_MAX)` for other bounds.
Count = Annotated[int, Field(ge=1, le=INT_MAX)]
"""A count or size that must be positive (shard sizes, attempts, search depths)."""
NonNegInt = Annotated[int, Field(ge=0, le=INT_MAX)]
"""A count where 0 is meaningful (0 = auto, all, or one per core)."""
Seed = Annotated[int, Field(ge=0, le=INT_MAX)]
"""A random seed (numpy and faiss take non-negative 32-bit seeds)."""
Name = Annotated[str, Field(min_length=1)]
"""A non-empty string (model id, split name)."""
Splits = Annotated[list[Name], Field(min_length=1)]
"""Split names; empty would select nothing. Checked against the data manifest in preflight."""
Device = Annotated[str, Field(pattern=r"(?i)^\s*(auto|cpu|cuda(:[0-9]+)?)\s*$"),
                   Domain("auto, cpu, cuda or cuda:N")]
"""A torch device spec; whether it exists is checked when the model loads."""
Cosine = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
"""A cosine similarity threshold."""


class ParamDomainError(ValueError):
    """Raised by a params model validator whose rule spans fields (tau's range depends on
    `scale`): it names the offending field, so the config error can name the key."""

    def __init__(self, field: str, allowed: str, got: Any) -> None:
        super().__init__(f"{field}: must be {allowed} (got {got!r})")
        self.field = field
        self.allowed = allowed
        self.got = got


class Params(BaseModel):
    """Base of every stage's parameters: unknown keys are errors, values are immutable, and
    types are strict: a boolean is never taken for a number nor a number for a boolean
    (`k=true` is an error, not K = 1); an int is still accepted where a float is expected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
        renamed_keys: old config keys still accepted for this stage's, `{"old_section.name":
            "section.name"}`: a key that moved keeps working, with a deprecation warning.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    params_model: ClassVar[type[Params]] = Params
    tables: ClassVar[tuple[str, ...]] = ()
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow",)
    uses_sections: ClassVar[tuple[str, ...]] = ()
    renamed_keys: ClassVar[dict[str, str]] = {}

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

    @classmethod
    def check_config(cls, sections: Mapping[str, Params]) -> None:
        """Rules that span config sections (mosaic_tables.k <= negatives.m), checked when the
        config loads, before anything resolves or runs; raise ConfigError naming the keys."""
        return None

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
