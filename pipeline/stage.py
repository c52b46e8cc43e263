"""The stage author's whole contract: what a stage declares, the one method it implements, and
what that method is given.

A stage reads like its `run`: the engine owns keys, shards, resume, locks, manifests and
publishing, so a stage only declares its inputs, parameters (a :class:`Params` model; the stage
is a ``Stage[ThatModel]``), optional libraries and version, and writes tables through the
:class:`StageContext` it is given. Everything a stage imports from the engine is here.
"""

from __future__ import annotations

import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import MissingLibrary, UpstreamCorrupt
from pipeline.io import part_name, read_json, write_parquet
from pipeline.shards import ShardFn, ShardRuntime, ShardWriter
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
    from pipeline.runner import Resolved

__all__ = [
    "INT_MAX", "Count", "Cosine", "Device", "Domain", "Name", "NonNegInt", "ParamDomainError",
    "Params", "RunEnv", "Seed", "ShardTask", "ShardWriter", "Splits", "Stage", "StageContext",
    "key_params", "runtime_field",
]

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


def key_params(params: Params, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The resolved parameters that determine the output: everything but runtime fields
    (and, with `only`, but the fields not named there)."""
    dumped = params.model_dump(mode="json")
    unknown = set(only or ()) - set(type(params).model_fields)
    if unknown:  # a typo would silently leave a field out of every key
        raise TypeError(f"key_fields names {sorted(unknown)}, not fields of "
                        f"{type(params).__name__}")
    for name, info in type(params).model_fields.items():
        extra = info.json_schema_extra
        runtime = isinstance(extra, dict) and extra.get("affects_output") is False
        if runtime or (only is not None and name not in only):
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


P = TypeVar("P", bound=Params)


@dataclass(frozen=True)
class ShardTask:
    """One deterministic slice of a stage's work; `payload` must be small and picklable. The
    shard function gets the stage's params from its writer (`writer.params`), not the payload."""

    index: int
    payload: Any


def _importable(module: str) -> bool:
    """Whether `import module` would find it, without importing it (vLLM takes seconds); a
    module already imported (or stood in for in sys.modules) counts."""
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Stage(ABC, Generic[P]):
    """One step of the DAG, generic over its params model: in
    ``class Negatives(Stage[NegativesParams])`` the type argument sets `params_model` and types
    `ctx.params`, `writer.params` and every hook's `params`, with no casts.

    Class attributes:
        name: the stage's name on the CLI and in the artifact layout.
        version: bump when the meaning or layout of the output changes; it is part of the key.
        inputs: names of upstream stages whose artifacts `run` reads.
        section: config namespace of the params (defaults to `name`; stages may share one).
        params_model: the pydantic model of the params (set from the type argument).
        tables: names of the tables the stage writes (`<key>/<table>/part-*.parquet`); the
            runner refuses to publish an artifact that lacks one, unless it is also in
            `optional_tables` (written only for some inputs, e.g. a split a dataset lacks).
        libraries: distributions whose versions are recorded in the manifest.
        requires: optional libraries the stage needs, importable module -> the nemo-pipe extra
            that installs it (`{"vllm": "vllm"}`); `required_libraries` may make it depend on
            the params. The runner checks them before any stage of a run starts.
        uses_sections: other config sections whose params the stage reads (e.g. a stage that
            embeds its own texts reads `embed`); their output-affecting params join its key.
        key_fields: for a section (its own or a used one) shared by stages that read different
            parts of it, the fields that affect this stage's output: only those join its key
            (an image-decode setting must not rebuild what only the text encoder made).
            Sections not named key on every output-affecting field.
        renamed_keys: old config keys still accepted for this stage's, `{"old_section.name":
            "section.name"}`: a key that moved keeps working, with a deprecation warning.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    params_model: ClassVar[type[Params]] = Params
    tables: ClassVar[tuple[str, ...]] = ()
    optional_tables: ClassVar[tuple[str, ...]] = ()
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow",)
    requires: ClassVar[Mapping[str, str]] = {}
    uses_sections: ClassVar[tuple[str, ...]] = ()
    key_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    renamed_keys: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            origin = get_origin(base)
            if not (isinstance(origin, type) and issubclass(origin, Stage)):
                continue
            (model,) = get_args(base)
            if not (isinstance(model, type) and issubclass(model, Params)):
                continue  # a generic intermediate (`Stage[P]`): the subclass names the model
            declared = cls.__dict__.get("params_model")
            if declared is not None and declared is not model:
                raise TypeError(f"{cls.__name__}: params_model {declared.__name__} differs "
                                f"from the type argument {model.__name__}")
            cls.params_model = model

    @classmethod
    def config_section(cls) -> str:
        return cls.section or cls.name

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def upstream(self, params: P) -> tuple[str, ...]:
        """The stages this one reads under `params` (default: `inputs`). A parameter may add an
        input (e.g. shards reads hard_negatives only when asked to), so that the key never
        depends on which artifacts happen to exist."""
        return self.inputs

    def required_libraries(self, params: P) -> Mapping[str, str]:
        """The optional libraries this stage needs under `params` (default: `requires`), as
        importable module -> nemo-pipe extra; e.g. vLLM only when `backend == "vllm"`."""
        return self.requires

    def check_libraries(self, params: P) -> None:
        """MissingLibrary naming the extra to install when a required module is not there."""
        for module, extra in self.required_libraries(params).items():
            if not _importable(module):
                raise MissingLibrary(
                    f"stage {self.name!r} needs the optional library {module!r}, which is not "
                    f"installed (config section {self.config_section()!r}); install it with "
                    f"pip install 'nemo-pipe[{extra}]', or change the config so the stage "
                    "does not need it")

    @classmethod
    def check_config(cls, sections: Mapping[str, Params]) -> None:
        """Rules that span config sections (mosaic_tables.k <= negatives.m), checked when the
        config loads, before anything resolves or runs; raise ConfigError naming the keys."""
        return None

    def resolve_params(self, env: RunEnv, params: P) -> P:
        """Fill dataset-dependent defaults (e.g. K from the data manifest) before keying, so the
        key and the manifest hold the values actually used."""
        return params

    def fingerprint(self, env: RunEnv, params: P) -> dict[str, Any]:
        """Digest of external inputs (files outside the work dir) that determine the output.

        Part of the key, so an edited input file yields a new artifact. Stages that only read
        upstream artifacts return nothing.
        """
        return {}

    def preflight(self, env: RunEnv, params: P) -> None:
        """Check, before any stage of the run starts, what would otherwise fail mid-run
        (unknown model, missing weights file, not enough memory). Most stages need none."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext[P]) -> None:
        """Compute the stage's tables and write them through `ctx`."""


@dataclass
class StageContext(Generic[P]):
    """What a running stage sees: its resolved binding (stage, params, key, upstream keys;
    the runner's :class:`~pipeline.runner.Resolved`), upstream artifacts through verifying
    readers, a writer for small tables, and sharded execution with resume."""

    resolved: Resolved[P]
    env: RunEnv
    tmp_dir: Path
    store: ArtifactStore
    executor: Executor
    progress: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    _shards: ShardRuntime | None = None

    # -- the resolved binding -----------------------------------------------------------
    @property
    def stage(self) -> Stage[P]:
        return self.resolved.stage

    @property
    def params(self) -> P:
        return self.resolved.params

    @property
    def key(self) -> str:
        return self.resolved.key

    @property
    def upstream_keys(self) -> dict[str, str]:
        return self.resolved.upstream

    @property
    def shared(self) -> dict[str, Params]:
        """Params of the other config sections the stage declared in `uses_sections`."""
        return self.resolved.shared

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
    def run_shards(self, fn: ShardFn, tasks: Sequence[ShardTask],
                   desc: str = "shards") -> list[dict[str, Any]]:
        """Run `fn(payload, writer)` for each task not finished by an earlier attempt; the
        writer (a ``ShardWriter[P]``) carries the stage's params.

        `fn` must be a module-level function (it may run in another process). Returns each
        shard's stats dict in task order, including those recorded by earlier attempts.
        """
        if self._shards is None:
            self._shards = ShardRuntime(self.stage.name, self.stage.version, self.key,
                                        self.tmp_dir, self.executor, self.progress, self.stats)
        return self._shards.run(fn, tasks, self.params, desc)
